"""Editing methods: each turns a batch of ``EditRequest`` into weight updates (see :mod:`.base` for the protocol).

    from prune_lightning.editors import ROME, MEMIT, FineTune, MEND
    editor = ROME.preset("gpt2-xl")          # the paper's hyperparameters
    editor = MEMIT.preset("llama3-8b")       # a batch of facts spread over layers 4-8
    editor = AlphaEdit.preset("gpt2-xl")     # MEMIT-style batches projected onto the preserved keys' null space
    editor = FineTune(layers=[0])            # FT-L: constrained fine-tuning, dense updates
    editor = MEND(hypernetwork="hypernetwork.safetensors")   # a hypernetwork trained by prune-edit mend-train
"""

from prune_lightning.editors.alphaedit import ALPHAEDIT_PRESETS, AlphaEdit
from prune_lightning.editors.base import Editor, LowRankUpdate, Update
from prune_lightning.editors.ft import FineTune
from prune_lightning.editors.memit import MEMIT, MEMIT_PRESETS
from prune_lightning.editors.mend import MEND, MEND_PRESETS
from prune_lightning.editors.rome import ROME, ROME_PRESETS
from prune_lightning.stats import SecondMomentJob, second_moment, second_moments  # re-exported: their old home

__all__ = [
    "Editor",
    "LowRankUpdate",
    "Update",
    "ROME",
    "ROME_PRESETS",
    "MEMIT",
    "MEMIT_PRESETS",
    "AlphaEdit",
    "ALPHAEDIT_PRESETS",
    "FineTune",
    "MEND",
    "MEND_PRESETS",
    "second_moment",
    "second_moments",
    "SecondMomentJob",
]
