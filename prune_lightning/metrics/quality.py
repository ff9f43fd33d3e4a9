"""Edit quality of a batch of ``EditRequest``: the prompts to score, scored in one pass, fed to the metrics.

A CounterFact request (it has ``target_true``) is scored by NLL comparison on its edited prompt, paraphrases and
neighborhood prompts (:class:`~prune_lightning.metrics.CounterFactScore`); a zsRE request (no ``target_true``) by
teacher-forced token accuracy of ``target_new`` on its question and rephrasings and of its ``neighborhood_targets``
on the locality questions (:class:`~prune_lightning.metrics.ZsREScore`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from prune_lightning.distributed import lockstep
from prune_lightning.metrics.edit import CounterFactScore, ZsREScore, target_nll, teacher_forced_accuracy


def _split(values: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(values, list(sizes))) if len(values) else [values[:0] for _ in sizes]


def update_edit_quality(
    counterfact: CounterFactScore,
    zsre: ZsREScore,
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence,
    batch_size: int = 16,
) -> None:
    """Scores ``requests`` on ``model`` and adds them to the matching metric.

    Args:
        counterfact: Receives the requests that have a ``target_true``.
        zsre: Receives the others.
        model: The (edited) causal LM.
        tokenizer: Its tokenizer.
        requests: ``EditRequest`` objects.
        batch_size: Prompts per forward pass.
    """
    # A sharded model (FSDP): every rank enters, also one without requests, and the forwards stay paired.
    with lockstep(model):
        cf = [r for r in requests if r.target_true is not None]
        zs = [r for r in requests if r.target_true is None]
        if cf:
            groups = [[r.rendered_prompt] for r in cf], [list(r.paraphrase_prompts) for r in cf], \
                [list(r.neighborhood_prompts) for r in cf]
            prompts, new, true, sizes = [], [], [], []
            for group in groups:
                for request, group_prompts in zip(cf, group):
                    prompts += group_prompts
                    new += [request.target_new] * len(group_prompts)
                    true += [request.target_true] * len(group_prompts)
                    sizes.append(len(group_prompts))
            nll_new = _split(target_nll(model, tokenizer, prompts, new, batch_size), sizes)
            nll_true = _split(target_nll(model, tokenizer, prompts, true, batch_size), sizes)
            n = len(cf)
            counterfact.update(
                torch.stack([v[0] for v in nll_new[:n]]), torch.stack([v[0] for v in nll_true[:n]]),
                paraphrase_nll_new=nll_new[n:2 * n], paraphrase_nll_true=nll_true[n:2 * n],
                neighborhood_nll_new=nll_new[2 * n:], neighborhood_nll_true=nll_true[2 * n:],
            )
        if zs:
            prompts, targets = [], []
            for request in zs:
                prompts.append(request.rendered_prompt)
                targets.append(request.target_new)
            for request in zs:
                prompts += list(request.paraphrase_prompts)
                targets += [request.target_new] * len(request.paraphrase_prompts)
            for request in zs:
                prompts += list(request.neighborhood_prompts)
                targets += list(request.neighborhood_targets)
            sizes = [1] * len(zs) + [len(r.paraphrase_prompts) for r in zs] + [len(r.neighborhood_prompts) for r in zs]
            accuracy = _split(teacher_forced_accuracy(model, tokenizer, prompts, targets, batch_size), sizes)
            n = len(zs)
            zsre.update(efficacy=accuracy[:n], generalization=accuracy[n:2 * n], locality=accuracy[2 * n:])
