"""Editing methods: each turns a batch of ``EditRequest`` into weight updates (see :mod:`.base` for the protocol).

    from prune_lightning.editors import ROME
    editor = ROME.preset("gpt2-xl")          # the paper's hyperparameters
"""

from prune_lightning.editors.base import Editor, LowRankUpdate, Update
from prune_lightning.editors.rome import ROME, ROME_PRESETS
from prune_lightning.editors.stats import second_moment

__all__ = ["Editor", "LowRankUpdate", "Update", "ROME", "ROME_PRESETS", "second_moment"]
