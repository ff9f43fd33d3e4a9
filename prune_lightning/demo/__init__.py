"""The embedded default: a synthetic fact world and a tiny GPT-2 that knows it, trained offline in minutes.

    from prune_lightning.demo import World, demo_checkpoint, fact_accuracy

    world = World.generate(seed=0)
    path = demo_checkpoint(seed=0)            # trains once (a Lightning fit), then a cached directory
    world.write_counterfact("requests.json", n_requests=200)
    world.write_tasks("tasks/", n_requests=200)   # load_task("demo-arithmetic", "tasks/arithmetic.jsonl")

Importing this package registers the demo's general-ability tasks (:mod:`prune_lightning.demo.tasks`).
"""

from prune_lightning.demo import tasks as _tasks  # noqa: F401  (registers demo-* tasks)
from prune_lightning.demo.train import (
    DemoTrainingConfig,
    demo_checkpoint,
    fact_accuracy,
    mlp_out_sigma_max,
    rewrite_accuracy,
)
from prune_lightning.demo.world import RELATIONS, Fact, Relation, World

__all__ = [
    "DemoTrainingConfig",
    "Fact",
    "RELATIONS",
    "Relation",
    "World",
    "demo_checkpoint",
    "fact_accuracy",
    "mlp_out_sigma_max",
    "rewrite_accuracy",
]
