"""prune-lightning: sequential model editing as a PyTorch Lightning loop, with PRUNE as a callback.

    from prune_lightning import SequentialEditor, EditDataModule, EditRequest
    from prune_lightning.editors import ROME
    from prune_lightning.callbacks import PRUNECallback, ConditionNumberMonitor
"""

from prune_lightning.data import EditDataModule, EditRequest
from prune_lightning.module import TRAINER_DEFAULTS, SequentialEditor

__all__ = ["SequentialEditor", "EditDataModule", "EditRequest", "TRAINER_DEFAULTS"]
__version__ = "0.1.0"
