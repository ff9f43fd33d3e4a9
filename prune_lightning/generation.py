"""Batched greedy generation with a causal LM: the prompts of a downstream task in, the continuations out.

:func:`generate_batched` is what the general-ability evaluation runs on the edited model, and is usable on its own.
It gives the same text as calling ``model.generate`` once per prompt, only faster:

- **Left padding.** A causal LM continues from the last position of each row, so the prompts of a batch are padded
  on the left, with an attention mask; ``generate`` derives the position ids from that mask, so a padded row sees
  the same positions as the prompt alone. The padding is done here, from the token ids, so the tokenizer is left
  untouched (its ``padding_side`` does not matter) and needs no pad token: ``eos`` pads where there is none.
- **Batches of similar length.** Prompts are sorted by token length (longest first, so an out-of-memory error
  shows in the first batch) and cut into batches of ``batch_size``; the results are put back in prompt order.
- **Only the new tokens** are kept, up to the first end-of-sequence token (the rest of a row that stopped early is
  padding), and decoded with special tokens skipped, so each continuation is what the prompt generated alone gives.
  :func:`generate_batched_ids` returns those token ids, for scores that compare tokens (the free-generation exact
  match of :mod:`prune_lightning.metrics.free_generation`); :func:`generate_batched` their text.
- **Left truncation.** A prompt longer than the model's context minus ``max_new_tokens`` loses tokens from its
  start (keeping leading special tokens such as ``<s>``): the end of a prompt - the question, ``"TL;DR:"`` - is
  what the continuation depends on. GSM8K and Natural Questions prompts with their rationale or passage can exceed
  a small model's context.

Greedy decoding (``do_sample=False``, one beam) in eval mode, under ``torch.no_grad()`` (not ``inference_mode``:
tensors made there could not be used by an editor's autograd afterwards); the model's training mode is restored.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from prune_lightning.distributed import lockstep

__all__ = ["context_length", "find_language_model", "generate_batched", "generate_batched_ids"]

# Config attributes that hold a model's maximum sequence length, in the order they are tried.
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
# A tokenizer's model_max_length at or above this means "not set" (transformers uses int(1e30)).
_UNSET_LENGTH = 1_000_000


def context_length(model: nn.Module, tokenizer: Any = None) -> Optional[int]:
    """The longest sequence (prompt plus generated tokens) the model accepts, or ``None`` if nothing says.

    Read from the model's config (``max_position_embeddings``, ``n_positions``, ...), else from the tokenizer's
    ``model_max_length`` when that is set.

    Args:
        model: A Hugging Face causal LM.
        tokenizer: Its tokenizer (optional).
    """
    config = getattr(model, "config", None)
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _UNSET_LENGTH:
        return value
    return None


def find_language_model(pl_module: nn.Module, owner: str) -> tuple[nn.Module, Any]:
    """The ``(model, tokenizer)`` of a LightningModule: its ``.model`` and ``.tokenizer`` attributes.

    :class:`~prune_lightning.SequentialEditor` has both; any other LightningModule works if it has them too.

    Args:
        pl_module: The LightningModule the calling callback runs in.
        owner: The caller's name, for the error message.

    Raises:
        AttributeError: If either attribute is missing or ``None``.
    """
    missing = [name for name in ("model", "tokenizer") if getattr(pl_module, name, None) is None]
    if missing:
        raise AttributeError(
            f"{owner} needs the language model to evaluate: it reads `.model` (a Hugging Face causal LM) and "
            f"`.tokenizer` from the LightningModule, but {type(pl_module).__name__} has no "
            f"{' and no '.join(f'`.{name}`' for name in missing)}. Use SequentialEditor, or set these attributes "
            "in your module's __init__."
        )
    return pl_module.model, pl_module.tokenizer


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _pad_token_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"{type(tokenizer).__name__} has neither a pad token nor an eos token to pad batches with; "
        "set tokenizer.pad_token first"
    )


def _leading_special(ids: Sequence[int], special: set[int]) -> int:
    count = 0
    for token in ids:
        if token not in special:
            break
        count += 1
    return count


def _encode(tokenizer: Any, prompts: Sequence[str], budget: Optional[int]) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (with the tokenizer's special tokens), truncated from the left to ``budget``."""
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    encoded, truncated = [], 0
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{index}] must be a string, got {type(prompt).__name__}")
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids:
            raise ValueError(f"prompts[{index}] = {prompt!r} tokenizes to no tokens: there is nothing to continue")
        if budget is not None and len(ids) > budget:
            keep = min(_leading_special(ids, special), budget - 1)
            ids = ids[:keep] + ids[len(ids) - (budget - keep) :]
            truncated += 1
        encoded.append(ids)
    return encoded, truncated


def generate_batched(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    max_length: Optional[int] = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, generated ``batch_size`` at a time with left padding.

    Args:
        model: A Hugging Face causal LM (anything with ``generate``); put in eval mode for the call and restored.
        tokenizer: Its tokenizer (not modified; its ``padding_side`` does not matter).
        prompts: The prompts, any lengths.
        max_new_tokens: Tokens to generate after each prompt (generation also stops at ``eos``).
        batch_size: Prompts per ``generate`` call.
        max_length: The model's context, prompt plus new tokens (default: :func:`context_length`). Longer prompts are
            truncated from the left to ``max_length - max_new_tokens`` tokens, with a warning.

    Returns:
        The decoded new tokens of each prompt (special tokens skipped), in the order of ``prompts``.

    Raises:
        ValueError: For a prompt that is not a string or tokenizes to nothing, a bad ``max_new_tokens`` /
            ``batch_size`` / ``max_length``, or a context too short for ``max_new_tokens``.
    """
    generated = generate_batched_ids(model, tokenizer, prompts, max_new_tokens, batch_size, max_length)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]


def generate_batched_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    max_length: Optional[int] = None,
) -> list[list[int]]:
    """The new token ids of each prompt's greedy continuation, up to (not including) the first end-of-sequence token.

    Arguments, batching, truncation and errors as :func:`generate_batched`, which decodes these ids.

    Returns:
        One list of token ids per prompt, in the order of ``prompts``: at most ``max_new_tokens``, fewer where the
        model ended the sequence.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, not a single string; wrap it in a list")
    _check_int("max_new_tokens", max_new_tokens)
    _check_int("batch_size", batch_size)
    if max_length is None:
        max_length = context_length(model, tokenizer)
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be None or an int >= 1, got {max_length!r}")
    budget = None
    if max_length is not None:
        budget = max_length - max_new_tokens
        if budget < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{max_length} tokens"
            )
    # A sharded model (FSDP): every rank enters, also one without prompts, and the forwards stay paired.
    with lockstep(model):
        if not prompts:
            return []
        encoded, truncated = _encode(tokenizer, prompts, budget)
        if truncated:
            rank_zero_warn(
                f"generate_batched: {truncated} of {len(prompts)} prompts are longer than {budget} tokens (context "
                f"{max_length} - max_new_tokens {max_new_tokens}) and were truncated from the left"
            )

        pad_id = _pad_token_id(tokenizer)
        stop = _end_of_sequence_ids(model, tokenizer)
        device = next(model.parameters()).device
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # stable: ties keep prompt order
        outputs: list[list[int]] = [[] for _ in encoded]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    input_ids, attention_mask = _left_pad([encoded[i] for i in rows], pad_id)
                    generated = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        do_sample=False,
                        num_beams=1,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=pad_id,
                        synced_gpus=False,  # lockstep pairs the forwards across ranks
                    )
                    for i, new_ids in zip(rows, generated[:, input_ids.shape[1] :].tolist()):
                        outputs[i] = _until_end(new_ids, stop)
        finally:
            model.train(was_training)
        return outputs


def _end_of_sequence_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokens that end a generation: the generation config's ``eos_token_id`` (one or a list) and the
    tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int) and not isinstance(value, bool):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _until_end(ids: list[int], stop: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop:
            return ids[:position]
    return ids


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned: padding (mask 0) on the left."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask
