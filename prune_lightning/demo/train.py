"""Training the demo's tiny GPT-2 on a generated world: once, offline, by a Lightning fit, then from the cache.

:func:`demo_checkpoint` is the whole recipe. It generates the :class:`~prune_lightning.demo.world.World` of a seed,
trains a byte-level BPE tokenizer on the world's texts (:func:`prune_lightning.models.train_bpe_tokenizer`, well
under a second), builds a small GPT-2 from config and fits it with a plain Lightning ``Trainer`` (progress bar
included) on the texts: every fact in every phrasing plus the general-ability material, one text a row (ending
with ``<|endoftext|>``), batches of texts of similar length padded to their longest, causal-LM loss on the real
tokens.

The result - model and tokenizer via ``save_pretrained``, plus ``world.json`` (the generator's settings,
:meth:`World.from_settings`), ``training.json`` (the training settings and what the fit measured) and
``corpus.txt`` (the training texts, shuffled, one a line: a corpus for second-moment statistics) - is written to a
temporary sibling and renamed to ``<cache>/demo/gpt2-<key>``; ``<key>`` hashes the world's and the training's
settings. A later call with the same settings returns that directory without training. The same seed gives the
same world, the same data order and the same weights.

Sizing (measured on 2 CPU threads of an AMD EPYC): 4 layers, ``d = 128``, 4 heads, a 1024-token vocabulary, no
dropout; AdamW at ``3e-3`` after 100 warm-up steps, cosine decay to ``3e-4``; batches of 32 texts (50-60 ms a
step), 3000 steps: about 3 minutes (176 s for seed 0). The model then prefers the true object to the requested new
one on all the rewrite prompts of 300 requests, and solves the general-ability tasks (copying, entailment, most
additions). :func:`fact_accuracy` and :func:`rewrite_accuracy` measure that knowledge (target_true against another
object under :func:`prune_lightning.metrics.target_nll`); :func:`mlp_out_sigma_max` gives the largest singular value
of each MLP out-projection, the matrices ROME writes into: PRUNE's log restraint shrinks values only where
``sigma_max * ln(alpha) > 1`` (they come out at 6-8).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from prune_lightning.demo.world import World
from prune_lightning.io import atomic_target
from prune_lightning.models import build_tiny_model, default_cache_dir, mlp_out_template, train_bpe_tokenizer

__all__ = [
    "DemoTrainingConfig",
    "demo_checkpoint",
    "demo_checkpoint_path",
    "fact_accuracy",
    "mlp_out_sigma_max",
    "rewrite_accuracy",
    "train_demo_model",
]

TRAIN_VERSION = 1  # bump when the recipe changes what the same settings produce (it is part of the cache key)


@dataclass(frozen=True)
class DemoTrainingConfig:
    """How the demo model is built and trained.

    Args:
        n_layer: Transformer blocks.
        n_embd: Width of the residual stream.
        n_head: Attention heads.
        vocab_size: Size of the BPE vocabulary trained on the world's texts.
        n_positions: Context length of the model (prompts plus generated tokens; training rows are shorter).
        steps: Optimizer steps of the fit.
        batch_size: Texts per step.
        lr: Peak learning rate of AdamW.
        warmup_steps: Linear warm-up from 0 to ``lr``.
        final_lr_fraction: The learning rate decays along a cosine from ``lr`` to ``lr * final_lr_fraction`` over
            the steps after warm-up; ``1.0`` keeps it constant.
        weight_decay: AdamW's decoupled weight decay.
        initializer_range: Standard deviation of the initial weights.
        dropout: GPT-2's residual, embedding and attention dropout. 0 by default: the model is meant to memorise its
            world, and on a CPU the masks cost a tenth of a step.
        activation: GPT-2's ``activation_function``; the exact ``"gelu"`` is one fused kernel, GPT-2's ``"gelu_new"``
            (tanh approximation) five.
    """

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 1024
    n_positions: int = 64
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    initializer_range: float = 0.02
    dropout: float = 0.0
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0")


# --------------------------------------------------------------------------------------------------------------------
# the fit
# --------------------------------------------------------------------------------------------------------------------


class _Texts(torch.utils.data.Dataset):
    """Token ids of each text followed by the end-of-text id."""

    def __init__(self, ids: Sequence[list[int]]) -> None:
        self.ids = [torch.tensor(x, dtype=torch.long) for x in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.ids[index]


class _LengthGroupedBatches(torch.utils.data.Sampler):
    """``num_batches`` batches of texts of similar length, in a random order that only the seed decides.

    Each pass over the data shuffles all texts, cuts them into pools of ``pool_batches`` batches, sorts each pool by
    length, cuts it into batches and shuffles the batches: rows of a batch then need little padding, so a step costs
    about as much as its real tokens (fact sentences are half as long as entailment pairs). Passes follow each other
    until ``num_batches`` batches are out, so the whole fit is one Lightning epoch (and one progress bar).

    Args:
        lengths: Token count of each text.
        batch_size: Texts per batch.
        num_batches: Batches in all (the fit's steps).
        seed: Seeds the order.
        pool_batches: Batches per length-sorted pool.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, num_batches: int, seed: int, pool_batches: int = 50
    ) -> None:
        self.lengths = torch.tensor(list(lengths))
        self.batch_size = min(batch_size, len(self.lengths))
        self.num_batches = num_batches
        self.seed = seed
        self.pool = self.batch_size * pool_batches

    def __len__(self) -> int:
        return self.num_batches

    def _one_pass(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(len(self.lengths), generator=generator)
        batches = []
        for start in range(0, len(order), self.pool):
            pool = order[start : start + self.pool]
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches += [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        batches = [b for b in batches if len(b) == self.batch_size]  # drop the ragged ends
        return [batches[i].tolist() for i in torch.randperm(len(batches), generator=generator)]

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        done = 0
        while done < self.num_batches:
            for batch in self._one_pass(generator)[: self.num_batches - done]:
                done += 1
                yield batch


def _collate(rows: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch to its longest row; padding is masked out of attention and loss."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention[i, : len(r)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _lightning_module(model: nn.Module, config: DemoTrainingConfig):
    """A LightningModule that fits ``model`` with the causal-LM loss (built here to keep lightning imports lazy)."""
    import math

    import lightning.pytorch as pl

    class CausalLMFit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            self.log("loss", loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
            return loss

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98)
            )

            def factor(step: int) -> float:
                if step < config.warmup_steps:
                    return (step + 1) / config.warmup_steps
                span = max(1, config.steps - config.warmup_steps)
                progress = min(1.0, (step - config.warmup_steps) / span)
                floor = config.final_lr_fraction
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return CausalLMFit()


def train_demo_model(
    world: World, config: DemoTrainingConfig = DemoTrainingConfig(), seed: int = 0, progress: bool = True
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Trains a tokenizer and a tiny GPT-2 on ``world``'s texts with a Lightning fit.

    Args:
        world: The world whose :meth:`~prune_lightning.demo.world.World.training_texts` the model learns.
        config: Model and training settings.
        seed: Seeds the weights and the data order (``lightning.seed_everything``, which also seeds the global
            random, NumPy and torch generators).
        progress: Show Lightning's progress bar.

    Returns:
        ``(model, tokenizer, info)``; the model is in eval mode, ``info`` holds the fit's wall time and final loss.
    """
    import lightning.pytorch as pl

    texts = world.training_texts()
    tokenizer = train_bpe_tokenizer(texts, vocab_size=config.vocab_size)
    tokenizer.model_max_length = config.n_positions
    eos = tokenizer.eos_token_id
    ids = [tokenizer(t)["input_ids"][: config.n_positions - 1] + [eos] for t in texts]

    pl.seed_everything(seed, workers=True, verbose=False)
    model = build_tiny_model(
        "gpt2",
        seed=seed,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        n_positions=config.n_positions,
        vocab_size=len(tokenizer),
        initializer_range=config.initializer_range,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        activation_function=config.activation,
    )
    model.loss_type = "ForCausalLM"  # the labels' loss; transformers warns once when the config names none
    model.train()
    loader = torch.utils.data.DataLoader(
        _Texts(ids),
        batch_sampler=_LengthGroupedBatches([len(x) for x in ids], config.batch_size, config.steps, seed),
        collate_fn=functools.partial(_collate, pad_id=eos),
        num_workers=0,
    )
    module = _lightning_module(model, config)
    scratch = tempfile.mkdtemp(prefix="prune-lightning-demo-fit-")
    try:
        trainer = pl.Trainer(
            max_steps=config.steps,
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            enable_checkpointing=False,
            logger=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=scratch,
        )
        start = time.perf_counter()
        with warnings.catch_warnings():  # the texts are in memory: loader workers would only add start-up time
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    loss = trainer.callback_metrics.get("loss")
    model.eval()
    info = {"fit_seconds": round(seconds, 2), "final_loss": None if loss is None else round(float(loss), 4)}
    return model, tokenizer, info


# --------------------------------------------------------------------------------------------------------------------
# the cached checkpoint
# --------------------------------------------------------------------------------------------------------------------


def _resolve(seed: int, steps: Optional[int], n_entities: Optional[int], config: Optional[DemoTrainingConfig]):
    config = DemoTrainingConfig() if config is None else config
    if steps is not None:
        config = replace(config, steps=steps)
    world = World.generate(seed=seed, **({} if n_entities is None else {"n_entities": n_entities}))
    return world, config


def _key(world: World, config: DemoTrainingConfig, seed: int) -> str:
    payload = {"world": world.settings, "training": asdict(config), "seed": seed, "version": TRAIN_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def demo_checkpoint_path(
    seed: int = 0,
    steps: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    n_entities: Optional[int] = None,
    config: Optional[DemoTrainingConfig] = None,
) -> Path:
    """Where :func:`demo_checkpoint` keeps the model of these settings (whether or not it exists yet)."""
    world, config = _resolve(seed, steps, n_entities, config)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "demo"
    return root / f"gpt2-{_key(world, config, seed)}"


def demo_checkpoint(
    seed: int = 0,
    steps: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
    n_entities: Optional[int] = None,
    config: Optional[DemoTrainingConfig] = None,
) -> Path:
    """The directory of the demo model for ``seed``: trained on the first call, read from the cache afterwards.

    Args:
        seed: Seed of the world and of the training.
        steps: Optimizer steps (default: ``config.steps``).
        cache_dir: Folder of the cached models (default ``<default_cache_dir()>/demo``).
        progress: Show the fit's progress bar.
        n_entities: Size of the world (default: :meth:`World.generate`'s).
        config: Model and training settings (default :class:`DemoTrainingConfig`).

    Returns:
        A ``save_pretrained`` directory (model, tokenizer) that also holds ``world.json``, ``training.json`` and
        ``corpus.txt``; load it with :func:`prune_lightning.models.load_causal_lm`.
    """
    world, config = _resolve(seed, steps, n_entities, config)
    target = demo_checkpoint_path(seed, config=config, cache_dir=cache_dir, n_entities=len(world.entities))
    if (target / "config.json").exists():
        return target
    from transformers.utils import logging as hf_logging

    model, tokenizer, info = train_demo_model(world, config, seed=seed, progress=progress)
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with atomic_target(target, keep_existing=True) as tmp:  # another process that got there first keeps its copy
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            corpus = world.training_texts()
            random.Random(seed).shuffle(corpus)
            (tmp / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
            (tmp / "world.json").write_text(json.dumps(world.settings, indent=1) + "\n", encoding="utf-8")
            training = {"seed": seed, "config": asdict(config), "version": TRAIN_VERSION, **info}
            (tmp / "training.json").write_text(json.dumps(training, indent=1) + "\n", encoding="utf-8")
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()
    return target


# --------------------------------------------------------------------------------------------------------------------
# what the model knows
# --------------------------------------------------------------------------------------------------------------------


def fact_accuracy(
    model: nn.Module, tokenizer: Any, world: World, n: Optional[int] = 500, seed: int = 0, template: int = 0
) -> float:
    """The share of facts for which the true object beats a random other object of the same relation.

    Both objects are scored by :func:`prune_lightning.metrics.target_nll` (mean token NLL) after the fact's prompt.

    Args:
        model: A causal LM trained on ``world``.
        tokenizer: Its tokenizer.
        world: The world.
        n: Facts sampled (``None``: all).
        seed: Seed of the sample and of the alternatives.
        template: Which phrasing of each relation to ask in.
    """
    from prune_lightning.metrics import target_nll

    rng = random.Random(seed)
    facts = world.facts()
    if n is not None and n < len(facts):
        facts = rng.sample(facts, n)
    prompts, true, other = [], [], []
    for fact in facts:
        rel = world.relation(fact.relation_id)
        prompts.append(rel.prompt(fact.subject, template))
        true.append(fact.object)
        other.append(rng.choice([o for o in rel.objects if o != fact.object]))
    nll_true = target_nll(model, tokenizer, prompts, true, batch_size=64)
    nll_other = target_nll(model, tokenizer, prompts, other, batch_size=64)
    return float((nll_true < nll_other).float().mean())


def rewrite_accuracy(model: nn.Module, tokenizer: Any, records: Sequence[dict], part: str = "prompt") -> float:
    """The share of CounterFact records whose ``target_true`` beats ``target_new`` before any edit.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        records: CounterFact-schema dicts (:meth:`World.counterfact_records`).
        part: ``"prompt"`` (the rewrite prompt), ``"paraphrase"`` or ``"neighborhood"`` prompts.
    """
    from prune_lightning.metrics import target_nll

    prompts, true, new = [], [], []
    for record in records:
        rewrite = record["requested_rewrite"]
        if part == "prompt":
            chosen = [rewrite["prompt"].format(rewrite["subject"])]
        elif part in ("paraphrase", "neighborhood"):
            chosen = record[f"{part}_prompts"]
        else:
            raise ValueError(f"part must be 'prompt', 'paraphrase' or 'neighborhood', got {part!r}")
        prompts += chosen
        true += [rewrite["target_true"]["str"]] * len(chosen)
        new += [rewrite["target_new"]["str"]] * len(chosen)
    nll_true = target_nll(model, tokenizer, prompts, true, batch_size=64)
    nll_new = target_nll(model, tokenizer, prompts, new, batch_size=64)
    return float((nll_true < nll_new).float().mean())


def mlp_out_sigma_max(model: nn.Module) -> dict[str, float]:
    """The largest singular value of every MLP out-projection (``transformer.h.{i}.mlp.c_proj.weight`` for GPT-2).

    Args:
        model: A Hugging Face causal LM of a type :func:`prune_lightning.models.mlp_out_template` knows.
    """
    template = mlp_out_template(model) + ".weight"
    params = dict(model.named_parameters())
    out = {}
    i = 0
    while template.format(i) in params:
        weight = params[template.format(i)].detach().float()
        out[template.format(i)] = float(torch.linalg.matrix_norm(weight, ord=2))
        i += 1
    return out
