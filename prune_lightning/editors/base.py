"""The editor protocol: what ``SequentialEditor`` asks of ROME, MEMIT, fine-tuning and friends.

An editor turns a batch of :class:`~prune_lightning.data.EditRequest` into weight updates. It does not write them:
the module writes each update into its parameter and records it in the edited-matrix registry, so that callbacks
(PRUNE, condition numbers, RECT) see every write, whatever the editor.

Updates are keyed by *parameter* name (``"transformer.h.17.mlp.c_proj.weight"``) and given in the parameter's own
layout (GPT-2's ``Conv1D`` stores ``(in, out)``): either a :class:`LowRankUpdate` ``left @ right.T`` (ROME: rank
one; MEMIT: rank <= batch size) or a dense tensor (fine-tuning).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from torch import nn

from prune_lightning.spectral.lowrank import LowRankUpdate, Update, update_to_dense

__all__ = ["Editor", "LowRankUpdate", "Update", "implements_editor", "update_to_dense"]

if TYPE_CHECKING:
    from prune_lightning.data import EditRequest


class Editor:
    """Base class of the editing methods :class:`~prune_lightning.SequentialEditor` drives.

    Subclass it (LightningCLI then offers every subclass as ``model.editor``); an object with the same three methods
    also works when passed from Python. An editor that keeps state across batches (AlphaEdit) also overrides
    :meth:`state_dict` / :meth:`load_state_dict`, so that a checkpoint resumes it.
    """

    #: Published hyperparameters by model name (``"gpt2-xl"``, ...), for :meth:`preset`.
    presets: ClassVar[dict[str, dict]] = {}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Editor":
        """The editor with the published hyperparameters of ``name`` (a key of :attr:`presets`).

        Args:
            name: The model the hyperparameters were published for, e.g. ``"gpt2-xl"`` or ``"llama3-8b"``.
            **overrides: Constructor arguments that replace the preset's.
        """
        if name not in cls.presets:
            raise ValueError(f"Unknown {cls.__name__} preset {name!r}; presets: {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    def parameter_names(self, model: nn.Module) -> list[str]:
        """The names of the parameters this editor writes into (raises a clear error for unknown modules)."""
        raise NotImplementedError(f"{type(self).__name__} must implement parameter_names(model)")

    def setup(self, model: nn.Module, tokenizer: Any) -> None:
        """Called once before the first edit (load or compute statistics, check the model)."""

    def discard_last_update(self) -> None:
        """Called when the updates of the last :meth:`compute_update` were not written (``SequentialEditor`` with
        ``on_bad_update="skip"``): an editor that keeps state across batches (AlphaEdit's accumulated keys) undoes
        what that call added to it. Default: nothing to undo."""

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments as the editor holds them: what a resume compares with the checkpoint's run.

        Default: every constructor argument stored under its own name. Override where an attribute of that name
        changes after construction (ROME's generated context templates).
        """
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in parameters if name != "self" and hasattr(self, name)}

    def prompt_overhead(self, tokenizer: Any) -> int:
        """Tokens the editor puts in front of a request's prompt (context templates): the run checks that every
        prompt fits the model's context with them, before any edit. Default: none."""
        return 0

    def compute_update(self, model: nn.Module, tokenizer: Any, requests: Sequence["EditRequest"]) -> dict[str, Update]:
        """The updates for one edit batch, keyed by parameter name. Must leave the model's weights as they were.

        Editors that work layer by layer (MEMIT) may write intermediate layers while they compute, but must restore
        them; the module writes the returned updates.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_update(model, tokenizer, requests)")

    def state_dict(self) -> dict[str, Any]:
        """What the editor carries from one edit batch to the next (AlphaEdit: the keys of the earlier edits), for
        the checkpoint. Default: nothing (``{}``); such an editor is stateless between batches.

        ``SequentialEditor`` saves a non-empty state under ``"editor_state"`` and hands it back to
        :meth:`load_state_dict` on resume, after :meth:`setup` (which starts the state afresh for a new run).
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned. Default: nothing to restore.

        Args:
            state: A dict from :meth:`state_dict`.
        """


def implements_editor(obj: Any) -> bool:
    """Whether ``obj`` is an :class:`Editor` or has its three methods (duck typing for editors from elsewhere)."""
    return isinstance(obj, Editor) or all(
        callable(getattr(obj, name, None)) for name in ("parameter_names", "setup", "compute_update")
    )
