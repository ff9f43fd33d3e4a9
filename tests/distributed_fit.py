"""The fit that the distributed tests compare: ROME edits with PRUNE (online), the condition-number monitor and both
evaluators, on one process or several (``ddp_spawn``, or FSDP2 under ``ModelParallelStrategy``).

Each rank saves what the tests compare (its edited matrix, put together when sharded, and the callbacks' histories)
in ``on_fit_end``: ``ddp_spawn`` copies only the weights back to the parent, and an FSDP run is launched by
``torchrun`` in processes of its own, with this file as the script::

    torchrun --nproc_per_node 2 tests/distributed_fit.py ROOT REQUESTS CORPUS           # one fit
    torchrun --nproc_per_node 2 tests/distributed_fit.py ROOT REQUESTS CORPUS resume    # 3 edits, then resumed
"""

import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from prune_lightning import EditDataModule, SequentialEditor
from prune_lightning.callbacks import (ConditionNumberMonitor, EditQualityEvaluator, GeneralAbilityEvaluator,
                                       PRUNECallback, TaskConfig)
from prune_lightning.models import full_weight, get_parameter, is_sharded

N_EDITS = 10
ALPHA = 1e4  # the tiny model's sigma_max(W_0) is small: ln(alpha) must exceed 1 / sigma_max(W_0) for F to shrink
ROME_SETTINGS = dict(layer=1, v_num_grad_steps=20, v_lr=0.5, mom2_n_samples=200, v_weight_decay=0.5,
                     context_template_lengths=((5, 2),))  # conftest's rome_factory(): 3 templates + KL = 4 rows


class SaveResults(Callback):
    """Saves this rank's edited matrix and the callbacks' histories as ``<label>-rank<r>.pt`` in ``out_dir``.

    ``probe``: called with the module and the first request in ``on_fit_start``; its result is saved too.
    """

    def __init__(self, out_dir: str, label: str, probe: Optional[Any] = None) -> None:
        self.out_dir = out_dir
        self.label = label
        self.probe = probe
        self.probed: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.probe is not None:
            self.probed = self.probe(pl_module, trainer.datamodule.requests[0])

    def on_fit_end(self, trainer, pl_module) -> None:
        (name,) = pl_module.edited_parameter_names
        param = get_parameter(pl_module.model, name)
        found = {type(c).__name__: c for c in trainer.callbacks}
        torch.save({
            "probe": self.probed,
            "weight": full_weight(param).clone(),
            "local_shard": param.to_local().detach().clone() if is_sharded(param) else None,
            "requests_edited": pl_module.requests_edited,
            "global_step": trainer.global_step,
            "general": found["GeneralAbilityEvaluator"].history,
            "quality": found["EditQualityEvaluator"].history,
            "condition": found["ConditionNumberMonitor"].history,
            "prune": found["PRUNECallback"].history,
            "requires_grad": any(p.requires_grad for p in pl_module.model.parameters()),
            "state_dict_keys": sorted(pl_module.state_dict()),
        }, Path(self.out_dir) / f"{self.label}-rank{trainer.global_rank}.pt")


def write_tasks(root: Path) -> list[TaskConfig]:
    """Small task files in the paper's formats (as tests/test_evaluators.py writes them); odd sizes, uneven shards."""
    gsm8k = root / "test-reasoning.jsonl"
    gsm8k.write_text("".join(json.dumps({
        "question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
        "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"}) + "\n" for i in range(3)))
    rte = root / "test-NLI.tsv"
    rows = ["index\tsentence1\tsentence2\tlabel"]
    rows += [f"{i}\tThe Eiffel Tower is in Paris {i}.\tParis has a tower.\t"
             f"{'entailment' if i % 2 else 'not_entailment'}" for i in range(5)]
    rte.write_text("\n".join(rows) + "\n")
    return [TaskConfig("gsm8k", str(gsm8k), limit=0), TaskConfig("rte", str(rte), limit=0)]


def fit(devices: int, root: Path, requests_file: Path, tasks: list, corpus: str, strategy: Any = None,
        label: Optional[str] = None, probe: Optional[Any] = None, max_steps: int = -1,
        checkpoint_dir: Optional[Path] = None, ckpt_path: Optional[Path] = None) -> SequentialEditor:
    """One fit of the ``N_EDITS`` requests (or the first ``max_steps``); logs into ``root/logs-<label>``, results into
    ``root/<label>-rank<r>.pt``; with ``checkpoint_dir``, a checkpoint after every edit (``last.ckpt`` the latest)."""
    from prune_lightning import TRAINER_DEFAULTS
    from prune_lightning.editors import ROME

    label = label or f"world{devices}"
    module = SequentialEditor(model="tiny:gpt2", editor=ROME(**ROME_SETTINGS, mom2_corpus=corpus),
                              save_edited_model=devices > 1, verbose=False)
    callbacks = [PRUNECallback(alpha=ALPHA, mode="online"), ConditionNumberMonitor(),
                 GeneralAbilityEvaluator(tasks=tasks, every_n_edits=5, batch_size=2),
                 EditQualityEvaluator(every_n_edits=5, batch_size=8), SaveResults(str(root), label, probe)]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=1, save_last=True))
    trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": devices,
                         **({"strategy": strategy} if strategy is not None else {}),
                         "default_root_dir": root, "logger": CSVLogger(root, name=f"logs-{label}"),
                         "max_steps": max_steps, "enable_progress_bar": False,
                         "enable_checkpointing": checkpoint_dir is not None, "callbacks": callbacks})
    trainer.fit(module, datamodule=EditDataModule(source=str(requests_file)), ckpt_path=ckpt_path)
    return module


if __name__ == "__main__":  # one rank of the FSDP2 run, started by torchrun
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    out_root, requests_path, corpus_path = (Path(arg) for arg in sys.argv[1:4])
    tasks = write_tasks(out_root)
    try:
        if sys.argv[4:] == ["resume"]:  # 3 edits with a checkpoint after each, then a new fit resumed from the last
            checkpoints = out_root / "fsdp-checkpoints"
            for label, steps, ckpt_path in (("fsdp-first", 3, None), ("fsdp-resumed", -1, checkpoints / "last.ckpt")):
                strategy = ModelParallelStrategy(save_distributed_checkpoint=False)  # the shipped config's
                fit(2, out_root, requests_path, tasks, str(corpus_path), strategy=strategy, label=label,
                    max_steps=steps, checkpoint_dir=checkpoints, ckpt_path=ckpt_path)
        else:
            module = fit(2, out_root, requests_path, tasks, str(corpus_path), strategy=ModelParallelStrategy(),
                         label="fsdp")
            # validate on the edited, still sharded model: every rank scores its shard of the requests
            trainer = Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(), logger=False,
                              enable_progress_bar=False, default_root_dir=out_root)
            scores = trainer.validate(module, datamodule=EditDataModule(source=str(requests_path)), verbose=False)
            torch.save(scores, out_root / f"fsdp-validate-rank{trainer.global_rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
