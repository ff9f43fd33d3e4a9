"""Editing methods: each turns a batch of ``EditRequest`` into weight updates (see :mod:`.base` for the protocol).

    from prune_lightning.editors import ROME, MEMIT, FineTune, MEND
    editor = ROME.preset("gpt2-xl")          # the paper's hyperparameters
    editor = MEMIT.preset("llama3-8b")       # a batch of facts spread over layers 4-8
    editor = FineTune(layers=[0])            # FT-L: constrained fine-tuning, dense updates
    editor = MEND(hypernetwork="hypernetwork.safetensors")   # a hypernetwork trained by prune-edit mend-train
"""

from prune_lightning.editors.base import Editor, LowRankUpdate, Update
from prune_lightning.editors.ft import FineTune
from prune_lightning.editors.memit import MEMIT, MEMIT_PRESETS
from prune_lightning.editors.mend import MEND, MEND_PRESETS
from prune_lightning.editors.rome import ROME, ROME_PRESETS
from prune_lightning.editors.stats import second_moment, second_moments
from prune_lightning.editors.stats_job import SecondMomentJob

__all__ = [
    "Editor",
    "LowRankUpdate",
    "Update",
    "ROME",
    "ROME_PRESETS",
    "MEMIT",
    "MEMIT_PRESETS",
    "FineTune",
    "MEND",
    "MEND_PRESETS",
    "second_moment",
    "second_moments",
    "SecondMomentJob",
]
