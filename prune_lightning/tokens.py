"""How prompts and targets become token ids: one definition for the editors and the edit metrics.

An editor that teaches a model ``"The mother tongue of Danielle Darrieux is" -> "English"`` and a metric that checks
whether it worked must agree on which tokens *are* the target. Both use :func:`continuation_ids`.

The target is ``" " + target`` as it follows the prompt in running text: the tokens that the tokenization of
``prompt + " " + target`` has after the prompt's own tokens. That is what the model reads when the sentence is
written out whole, and it is also what ROME's and MEMIT's code feeds the model for GPT-2 (``tok(" " + target)`` after
the prompt's tokens; byte-level BPE never merges across the space). Tokenizers differ in how they treat the
space:

- Byte-level BPE (GPT-2, LLaMA-3): ``" English"`` is one piece, ``"ĠEnglish"``, alone or after the prompt.
- SentencePiece (LLaMA-2): ``" English"`` on its own becomes ``"▁"`` + ``"▁English"``; after a prompt it is
  ``"▁English"``. EasyEdit, which the PRUNE paper used for LLaMA, tokenizes the target on its own and so teaches the
  model to write a lone ``"▁"`` first; here the target is what running text holds. Digits keep their separate
  ``"▁"`` in running text (``" 1990"`` -> ``"▁"``, ``"1"``, ...), and so they keep it here.

When the tokens of ``prompt + " " + target`` do not begin with the prompt's own tokens (a merge across the
boundary), the target falls back to ``" " + target`` tokenized on its own, without special tokens and without a
leading piece that decodes to whitespace only.

Batches are right-padded (:func:`pad_right`): positions stay ``0, 1, ...`` for every row, which the fact-token
indices of the editors rely on.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

__all__ = ["continuation_ids", "pad_id", "pad_right"]


def continuation_ids(tokenizer: Any, target: str, prompt: Optional[str] = None) -> list[int]:
    """The token ids of ``" " + target`` as a continuation of ``prompt``.

    Args:
        tokenizer: A Hugging Face tokenizer.
        target: The continuation, without its leading space (``"Paris"``).
        prompt: The text it follows. Without it, ``" " + target`` is tokenized on its own (no special tokens, a
            leading whitespace-only piece dropped when more follow).

    Raises:
        ValueError: If ``target`` is empty or tokenizes to nothing.
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    if prompt is not None:
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        full_ids = list(tokenizer(prompt + " " + target)["input_ids"])
        if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids:
            return full_ids[len(prompt_ids):]
    ids = list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])
    if len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to no tokens")
    return ids


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def pad_right(seqs: Sequence[Sequence[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads token id lists into ``(input_ids, attention_mask)`` (positions stay ``0, 1, ...`` in every row).

    Args:
        seqs: The token id lists, at least one.
        pad: The padding id (:func:`pad_id`).
        device: Where the tensors go.
    """
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return input_ids.to(device), attention_mask.to(device)
