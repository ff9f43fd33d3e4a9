"""Lightning callbacks that act around the writes of sequential editing (one module each)."""

from prune_lightning.callbacks.condition_number import ConditionNumberMonitor
from prune_lightning.callbacks.edit_quality import EditQualityEvaluator
from prune_lightning.callbacks.general_ability import GeneralAbilityEvaluator, TaskConfig
from prune_lightning.callbacks.prune import PRUNECallback
from prune_lightning.callbacks.rect import RECTCallback

__all__ = [
    "PRUNECallback",
    "ConditionNumberMonitor",
    "RECTCallback",
    "GeneralAbilityEvaluator",
    "EditQualityEvaluator",
    "TaskConfig",
]
