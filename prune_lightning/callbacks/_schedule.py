"""When the callbacks act, in edits: one schedule for the restraints, the monitor and the evaluators.

Every callback here counts edits by ``trainer.global_step`` (one step = one edit batch) and acts

- at edit 0, before any write (the monitor and the evaluators: the unedited model's values);
- after every ``every_n_edits``-th write, once per step however often the hook fires;
- at the end of fit, unless it already acted at the last step - and, for the measuring callbacks, once more if a
  restraint rewrote the model after the last write (a post-hoc PRUNE or RECT).

Measuring callbacks also move themselves behind the restraints in the callback list (:func:`run_after_restraints`),
so that they see every write after its restraint whatever order the user listed them in. A restraint callback marks
itself with the class attribute ``rewrites_weights = True``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

__all__ = ["EditSchedule", "Scheduled", "check_every_n_edits", "post_hoc_restraint", "run_after_restraints"]


def check_every_n_edits(owner: str, every_n_edits: Any) -> int:
    """``every_n_edits`` as an int >= 1; anything else is a ``ValueError`` naming ``owner``."""
    if isinstance(every_n_edits, bool) or not isinstance(every_n_edits, int) or every_n_edits < 1:
        raise ValueError(f"{owner}: every_n_edits must be an int >= 1, got {every_n_edits!r}")
    return every_n_edits


class EditSchedule:
    """The step at which a callback last acted, and whether it acts now.

    Args:
        owner: The callback's name, for error messages.
        every_n_edits: Act after every n-th write.
    """

    def __init__(self, owner: str, every_n_edits: int) -> None:
        self.every_n_edits = check_every_n_edits(owner, every_n_edits)
        self.last_step = -1

    def at_start(self, trainer: Trainer) -> bool:
        """Edit 0: before the first write of a fresh fit (not of a resumed one)."""
        return trainer.global_step == 0 and self.last_step < 0

    def after_write(self, trainer: Trainer) -> bool:
        """After every ``every_n_edits``-th write, once per step."""
        step = trainer.global_step
        return step != self.last_step and step % self.every_n_edits == 0

    def at_end(self, trainer: Trainer, after_restraints: bool = False) -> bool:
        """At the end of fit: unless already done at the last step; with ``after_restraints``, also when a post-hoc
        restraint rewrote the model after that."""
        return trainer.global_step != self.last_step or (after_restraints and post_hoc_restraint(trainer))

    def done(self, trainer: Trainer) -> int:
        """Records that the callback acted at the current step; returns that step."""
        self.last_step = trainer.global_step
        return self.last_step

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state.get("last_step", -1))


class Scheduled:
    """Mixin of a callback that acts on an :class:`EditSchedule` kept as ``self.schedule``."""

    schedule: EditSchedule

    @property
    def every_n_edits(self) -> int:
        """Acts after every n-th write."""
        return self.schedule.every_n_edits

    @property
    def last_step(self) -> int:
        """The edit count at which it last acted (-1: not yet)."""
        return self.schedule.last_step


def _rewrites_weights(callback: Callback) -> bool:
    return bool(getattr(type(callback), "rewrites_weights", False))


def post_hoc_restraint(trainer: Trainer) -> bool:
    """Whether a restraint callback rewrites the model in ``on_train_end`` (PRUNE / RECT with ``mode="post_hoc"``)."""
    return any(_rewrites_weights(c) and getattr(c, "mode", None) == "post_hoc" for c in trainer.callbacks)


def run_after_restraints(trainer: Trainer, callback: Callback) -> None:
    """Moves ``callback`` behind every restraint callback (PRUNE, RECT) in ``trainer.callbacks``.

    Lightning calls callbacks in list order, so a monitor listed before PRUNE - easily done when fragments are
    appended with ``--trainer.callbacks+=`` - would measure each write before its restraint. Measuring callbacks call
    this in ``setup`` so they always see the restrained model (Lightning moves checkpoint callbacks last the same
    way).
    """
    callbacks = list(trainer.callbacks)
    last_restraint = max((i for i, c in enumerate(callbacks) if _rewrites_weights(c)), default=-1)
    position = callbacks.index(callback)
    if position < last_restraint:
        callbacks.insert(last_restraint, callbacks.pop(position))
        # A new list: Lightning is iterating the old one right now (this runs inside the setup hook loop), and
        # reordering it in place would skip the setup of the callback that slides into the freed slot.
        trainer.callbacks = callbacks
