"""What a run checks so that nothing is lost or corrupted: before it writes, while it edits, when it resumes.

- **Saving** (:func:`save_model`). The edited model is written to a temporary sibling of its folder and swapped into
  place (:func:`prune_lightning.io.atomic_target`), so the folder holds the previous save or the new one, whole,
  whatever happens midway. A save leaves a marker file (:data:`MARKER`) with its provenance; a folder that exists,
  is not empty and has no marker was not written by this project and is refused (:func:`check_save_target`),
  unless ``overwrite=True``. The check runs in ``setup``, before the first edit.
- **Updates** (:func:`update_problem`). Every update is checked before it is written: its factors (or its dense
  matrix) must be finite and its Frobenius norm must be a finite number. A bad update names the requests of its
  batch (file, record, ``case_id``) and the matrix, and the weights stay as they were (:class:`BadUpdateError`).
- **Inputs** (:func:`check_request_lengths`). Every prompt of every request, with its target and the editor's
  longest context template, must fit the model's context; the first that does not is named before any output.
- **Resuming** (:func:`run_signature`, :func:`signature_changes`). A checkpoint records what defines the run: the
  model, the editor and its settings, the edited matrices and the restraints. A resume that differs in one of them
  is refused, naming it. Where to save and what to log may change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from prune_lightning.io import atomic_target
from prune_lightning.spectral import LowRankUpdate, Update

__all__ = [
    "MARKER",
    "BadUpdateError",
    "check_request_lengths",
    "check_save_target",
    "editor_settings",
    "run_signature",
    "save_model",
    "signature_changes",
    "update_problem",
]

#: The file a save of this project leaves in the folder it writes (its provenance), by which it is recognised.
MARKER = "prune_lightning.json"


class BadUpdateError(ValueError):
    """An editor computed an update that must not be written (not finite). Names the requests and the matrix."""


# --------------------------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------------------------


def check_save_target(path: Union[str, Path], overwrite: bool = False) -> None:
    """Refuses a destination that holds something this project did not write.

    Args:
        path: The folder a model will be saved to.
        overwrite: Replace whatever is there.

    Raises:
        ValueError: ``path`` is a file, or a non-empty folder without :data:`MARKER`, and ``overwrite`` is False.
    """
    path = Path(path)
    if overwrite or not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"Cannot save the edited model to {path}: it is a file. Choose another edited_model_dir, or "
                         "set overwrite=True to replace it.")
    if any(path.iterdir()) and not (path / MARKER).is_file():
        raise ValueError(
            f"Cannot save the edited model to {path}: the folder is not empty and was not written by prune-lightning "
            f"(it has no {MARKER}), so it is left alone. Choose another edited_model_dir, or set overwrite=True to "
            "replace it."
        )


def save_model(model: Any, tokenizer: Any, path: Union[str, Path], provenance: dict[str, Any],
               state_dict: Optional[dict] = None, overwrite: bool = False) -> Path:
    """``save_pretrained`` of model and tokenizer into ``path``, atomically, with the marker file.

    Args:
        model: A Hugging Face model.
        tokenizer: Its tokenizer.
        path: The destination folder (see :func:`check_save_target`).
        provenance: What to record in :data:`MARKER` (JSON-serializable).
        state_dict: The model's tensors, when they are not the model's own (a gathered sharded model).
        overwrite: Replace a folder this project did not write.
    """
    path = Path(path)
    check_save_target(path, overwrite)
    with atomic_target(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(provenance, indent=1, sort_keys=True, default=str) + "\n",
                                  encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# updates
# --------------------------------------------------------------------------------------------------------------------


def update_problem(update: Update) -> Optional[str]:
    """What is wrong with an update (``None`` if nothing): non-finite entries, or a norm that is not a number."""
    parts = [update.left, update.right] if isinstance(update, LowRankUpdate) else [update]
    for part in parts:
        if not bool(torch.isfinite(part).all()):
            bad = int((~torch.isfinite(part)).sum())
            return f"holds {bad} non-finite (NaN or Inf) entries"
    norm = frobenius_norm(update)
    if not math.isfinite(norm):
        return f"has a Frobenius norm that overflows ({norm})"
    return None


def frobenius_norm(update: Update) -> float:
    """``||update||_F``; for factors ``L R^T`` from the small Gram matrices, without forming the product."""
    if isinstance(update, LowRankUpdate):
        left, right = update.left.double(), update.right.double()
        return math.sqrt(max(float(((left.T @ left) * (right.T @ right)).sum()), 0.0))
    return float(torch.linalg.matrix_norm(update.double()))


# --------------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------------


def check_request_lengths(requests: Sequence, tokenizer: Any, context: Optional[int], overhead: int = 0) -> None:
    """Raises a ``ValueError`` for the first prompt that, with its target, does not fit the model's context.

    Args:
        requests: ``EditRequest`` objects.
        tokenizer: The model's tokenizer.
        context: The longest input the model takes, in tokens (``None``: no limit known, nothing checked).
        overhead: Tokens the editor puts in front of the edited prompt (its longest context template).
    """
    if not context:
        return
    for request in requests:
        targets = [t for t in (request.target_new, request.target_true) if t]
        checks = [("prompt", request.rendered_prompt, targets, overhead)]
        checks += [(f"paraphrase_prompts[{i}]", p, targets, 0) for i, p in enumerate(request.paraphrase_prompts)]
        for i, prompt in enumerate(request.neighborhood_prompts):
            answer = [request.neighborhood_targets[i]] if request.neighborhood_targets else targets
            checks.append((f"neighborhood_prompts[{i}]", prompt, answer, 0))
        for name, prompt, answers, extra in checks:
            longest = max(len(tokenizer(f"{prompt} {answer}")["input_ids"]) for answer in answers) + extra
            if longest > context:
                with_template = f" and the editor's longest context template ({extra} tokens)" if extra else ""
                raise ValueError(
                    f"{request.where}: field '{name}': {longest} tokens with its target{with_template}, but the model "
                    f"takes at most {context}. Shorten the prompt, or leave the request out (data.limit / offset)."
                )


# --------------------------------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------------------------------


def editor_settings(editor: Any) -> dict[str, str]:
    """The editor's class and its constructor's arguments (``Editor.settings``), as strings (for comparing runs)."""
    settings = {"class": f"{type(editor).__module__}.{type(editor).__qualname__}"}
    values = editor.settings() if callable(getattr(editor, "settings", None)) else {}
    settings.update({name: repr(value) for name, value in values.items()})
    return settings


def run_signature(model: str, tokenizer: Optional[str], dtype: str, editor: Any, matrices: Sequence[str],
                  restraints: Sequence[str]) -> dict[str, str]:
    """What defines an editing run, flat: a resume must agree on every entry (:func:`signature_changes`).

    Args:
        model: The model's hub id or path.
        tokenizer: The tokenizer's, if given apart.
        dtype: The model's dtype.
        editor: The editor (its class and constructor arguments are recorded).
        matrices: The edited parameters.
        restraints: The state keys of the restraint callbacks (PRUNE, RECT), which hold their settings.
    """
    signature = {"model": str(model), "tokenizer": str(tokenizer or model), "dtype": str(dtype),
                 "edited matrices": ", ".join(matrices), "restraints": ", ".join(sorted(restraints)) or "none"}
    signature.update({f"editor.{k}" if k != "class" else "editor": v for k, v in editor_settings(editor).items()})
    return signature


def signature_changes(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per setting that differs between a checkpoint's run and this one."""
    keys = list(saved) + [k for k in current if k not in saved]
    return [f"{key}: {saved.get(key, '(not set)')} in the checkpoint, {current.get(key, '(not set)')} now"
            for key in keys if saved.get(key) != current.get(key)]
