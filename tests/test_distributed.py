"""Sequential editing on several processes: the sharding helpers, ROME's split of its rows, and a 2-process DDP fit.

The DDP fit (``ddp_spawn``, gloo, 2 CPU processes) edits the same requests as a single-process fit and must end with
the same weights on both ranks - and the single-process ones - and the same general-ability scores. ``ddp_spawn``
copies only the weights back to the parent, so each rank saves what the test compares in ``on_fit_end``.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DistributedSampler

from conftest import write_counterfact
from prune_lightning import EditDataModule, SequentialEditor
from prune_lightning.callbacks import (ConditionNumberMonitor, EditQualityEvaluator, GeneralAbilityEvaluator,
                                       PRUNECallback, TaskConfig)
from prune_lightning.distributed import WorkSplit, current_split, shard, shard_indices, split_work
from prune_lightning.models import get_parameter

N_EDITS = 10
ALPHA = 1e4  # the tiny model's sigma_max(W_0) is small: ln(alpha) must exceed 1 / sigma_max(W_0) for F to shrink
ROME_SETTINGS = dict(layer=1, v_num_grad_steps=20, v_lr=0.5, mom2_n_samples=200, v_weight_decay=0.5,
                     context_template_lengths=((5, 2),))  # conftest's rome_factory(): 3 templates + KL = 4 rows


# --------------------------------------------------------------------------------------------------------------------
# helpers without a process group
# --------------------------------------------------------------------------------------------------------------------


def test_shards_cover_every_index_once():
    for n in (0, 1, 5, 8):
        for world in (1, 2, 3, 7):
            shards = [shard_indices(n, r, world) for r in range(world)]
            assert sorted(i for s in shards for i in s) == list(range(n))
            assert all(s == list(range(r, n, world)) for r, s in enumerate(shards))
    assert shard(list("abcde"), 1, 2) == ["b", "d"]
    assert shard(list("abc")) == list("abc")  # no process group: one process takes everything
    with pytest.raises(ValueError, match="need 0 <= rank < world_size, got rank=2, world_size=2"):
        shard_indices(4, 2, 2)


def test_without_a_process_group_the_split_is_one_process():
    assert current_split() == WorkSplit() and not current_split().active
    with split_work() as split:
        assert split == WorkSplit() and current_split() is split
        t = torch.arange(3.0)
        assert split.all_reduce_sum_(t) is t and torch.equal(t, torch.arange(3.0))
        assert split.rows(3) == [0, 1, 2] and split.owner(2) == 0
    split = WorkSplit(rank=1, world_size=3)
    assert split.active and split.rows(7) == [1, 4] and split.owner(5) == 2


def test_train_loader_is_never_split_and_eval_loaders_are_sharded(tmp_path):
    data = EditDataModule(source=str(write_counterfact(tmp_path / "cf.json", 5)))
    data.setup("fit")
    train = data.train_dataloader()
    # A DistributedSampler by type: Lightning then leaves the loader alone, whatever use_distributed_sampler says.
    assert isinstance(train.sampler, DistributedSampler)
    assert [r.case_id for batch in train for r in batch] == [0, 1, 2, 3, 4]
    shards = []
    for rank in range(2):
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = data.val_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)
        shards.append([r.case_id for batch in loader for r in batch])
    assert shards == [[0, 2, 4], [1, 3]]  # each request once, no padding with repeats


# --------------------------------------------------------------------------------------------------------------------
# a whole fit: ddp_spawn with 2 processes against one process
# --------------------------------------------------------------------------------------------------------------------


def _probe_collectives_and_rome(pl_module, request) -> dict:
    """Before the first edit: the collectives, the same-batch check, and ROME's key and value for one request inside
    split_work (on one process: the whole computation; on two: each rank half of the rows)."""
    from prune_lightning import distributed
    from prune_lightning.editors.base import LowRankUpdate
    from prune_lightning.models import get_module
    from prune_lightning.module import _broadcast_updates, _check_same_batch

    rank = distributed.rank()
    out: dict = {"sum": distributed.all_reduce_sum_(torch.tensor([1.0 + rank, 10.0])).tolist(),
                 "broadcast": distributed.broadcast_(torch.tensor([float(rank)] * 2), src=1 % distributed.world_size()
                                                     ).tolist(),
                 "max": distributed.all_reduce_max_(torch.tensor([rank, -rank])).tolist(), "error": ""}
    try:
        _check_same_batch(["same"], 0)
        _check_same_batch([f"differs on rank {rank}"], 1)
    except RuntimeError as err:
        out["error"] = str(err)
    update = LowRankUpdate(torch.full((3, 1), float(rank)), torch.full((2, 1), float(rank + 5)))
    (received,) = _broadcast_updates({"w": update}).values()
    out["factors"] = [received.left.flatten().tolist(), received.right.flatten().tolist()]
    if distributed.world_size() > 1:  # a restraint's result travels from the rank that computed it (here rank 1)
        from prune_lightning.callbacks._restraint import _share_restraint
        from prune_lightning.spectral import DeltaTracker

        for layout in ("lowrank", "dense", "empty", "unchanged"):
            tracker = DeltaTracker((4, 3), dense_rank_fraction=1.0)
            if rank == 0 or layout != "empty":
                tracker.add(LowRankUpdate(torch.full((4, 1), 7.0 * (1 - rank) + rank), torch.ones(3, 1)))
            if rank == 1 and layout == "dense":
                tracker.set_dense(tracker.dense())
            values = {"value": 2.0, "changed": float(layout != "unchanged")} if rank == 1 else None
            shared = _share_restraint(tracker, values, src=1)
            out[f"share_{layout}"] = [shared, "empty" if tracker.is_empty else "lowrank" if tracker.is_lowrank
                                      else "dense", tracker.dense().tolist()]
    editor, model, tokenizer = pl_module.editor, pl_module.model, pl_module.tokenizer
    with distributed.split_work() as split:
        out["split"] = [split.rank, split.world_size]
        out["key"] = editor._compute_key(model, tokenizer, get_module(model, editor._module_name(model)), request)
        delta, out["nll_init"], out["nll"], out["steps"] = editor._compute_delta(model, tokenizer, request)
        out["delta"] = delta
    return out


class _SaveResults(Callback):
    """Saves this rank's edited matrix and the callbacks' histories (ddp_spawn does not bring them back)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.probe: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.probe = _probe_collectives_and_rome(pl_module, trainer.datamodule.requests[0])

    def on_fit_end(self, trainer, pl_module) -> None:
        (name,) = pl_module.edited_parameter_names
        found = {type(c).__name__: c for c in trainer.callbacks}
        torch.save({
            "probe": self.probe,
            "weight": get_parameter(pl_module.model, name).detach().clone(),
            "requests_edited": pl_module.requests_edited,
            "global_step": trainer.global_step,
            "general": found["GeneralAbilityEvaluator"].history,
            "quality": found["EditQualityEvaluator"].history,
            "condition": found["ConditionNumberMonitor"].history,
            "prune": found["PRUNECallback"].history,
            "requires_grad": any(p.requires_grad for p in pl_module.model.parameters()),
            "state_dict_keys": sorted(pl_module.state_dict()),
        }, Path(self.out_dir) / f"world{trainer.world_size}-rank{trainer.global_rank}.pt")


def _write_tasks(root: Path) -> list[TaskConfig]:
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


def _fit(devices: int, root: Path, requests_file: Path, tasks: list, corpus: str) -> SequentialEditor:
    from prune_lightning.cli import TRAINER_DEFAULTS
    from prune_lightning.editors import ROME

    module = SequentialEditor(model="tiny:gpt2", editor=ROME(**ROME_SETTINGS, mom2_corpus=corpus),
                              save_edited_model=devices > 1, verbose=False)
    callbacks = [PRUNECallback(alpha=ALPHA, mode="online"), ConditionNumberMonitor(),
                 GeneralAbilityEvaluator(tasks=tasks, every_n_edits=5, batch_size=2),
                 EditQualityEvaluator(every_n_edits=5, batch_size=8), _SaveResults(str(root))]
    strategy = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": devices, **strategy,
                         "default_root_dir": root, "logger": CSVLogger(root, name=f"logs{devices}"),
                         "enable_progress_bar": False, "enable_checkpointing": False, "callbacks": callbacks})
    trainer.fit(module, datamodule=EditDataModule(source=str(requests_file)))
    return module


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("ddp")
    requests_file = write_counterfact(root / "cf.json", N_EDITS)
    tasks = _write_tasks(root)
    single_module = _fit(1, root, requests_file, tasks, str(tiny_corpus))  # first: caches the statistics
    parent_module = _fit(2, root, requests_file, tasks, str(tiny_corpus))
    load = lambda name: torch.load(root / name, weights_only=True)  # noqa: E731
    return dict(root=root, single=load("world1-rank0.pt"), ranks=[load(f"world2-rank{r}.pt") for r in range(2)],
                single_module=single_module, parent_module=parent_module)


def test_collectives_and_rome_split_match_one_process(ddp_runs):
    single, ranks = ddp_runs["single"]["probe"], [out["probe"] for out in ddp_runs["ranks"]]
    assert single["split"] == [0, 1] and single["error"] == "" and single["factors"] == [[0.0] * 3, [5.0] * 2]
    for rank, out in enumerate(ranks):
        assert out["sum"] == [3.0, 20.0] and out["broadcast"] == [1.0, 1.0] and out["max"] == [1, 0]
        assert out["split"] == [rank, 2]
        assert "different edit batches at batch 1" in out["error"]  # raised on every rank, not at batch 0
        assert out["factors"] == [[0.0] * 3, [5.0] * 2]  # rank 0's
        # Each rank computed half of the rows (2 of the 3 templates + KL prompt); the sums give the one-process values.
        torch.testing.assert_close(out["key"], single["key"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["delta"], single["delta"], rtol=1e-4, atol=1e-5)
        assert out["nll_init"] == pytest.approx(single["nll_init"], rel=1e-5)
        assert out["nll"] == pytest.approx(single["nll"], rel=1e-4) and out["steps"] == single["steps"]
    # ... and the same bits on both ranks.
    assert torch.equal(ranks[0]["delta"], ranks[1]["delta"]) and torch.equal(ranks[0]["key"], ranks[1]["key"])
    # A restraint computed on rank 1 arrives on rank 0: values, layout and update; an unchanged one moves no update.
    for layout in ("lowrank", "dense", "empty"):
        assert ranks[0][f"share_{layout}"] == ranks[1][f"share_{layout}"]
        assert ranks[0][f"share_{layout}"][:2] == [{"value": 2.0, "changed": 1.0}, layout]
    assert ranks[0]["share_lowrank"][2] == [[1.0] * 3] * 4
    assert ranks[0]["share_unchanged"][2] == [[7.0] * 3] * 4 and ranks[1]["share_unchanged"][2] == [[1.0] * 3] * 4


def test_ddp_ranks_end_with_the_single_process_weights(ddp_runs):
    single, ranks = ddp_runs["single"], ddp_runs["ranks"]
    for out in ranks:
        assert out["requests_edited"] == N_EDITS and out["global_step"] == N_EDITS  # every rank edited every request
        torch.testing.assert_close(out["weight"], single["weight"], rtol=0, atol=1e-5)
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # bit-identical replicas
    assert not torch.allclose(single["weight"], ddp_runs["single_module"].edit_registry[
        ddp_runs["single_module"].edited_parameter_names[0]].w0)  # the edits did change the matrix
    # PRUNE restrained (online) in both runs, the same number of values at every write.
    restrained = [[h["restrained"] for h in out["prune"]] for out in (single, *ranks)]
    assert restrained[0] == restrained[1] == restrained[2] and len(restrained[0]) == N_EDITS and sum(restrained[0]) > 0
    # ddp_spawn copies rank 0's weights back into the parent's module.
    (name,) = ddp_runs["parent_module"].edited_parameter_names
    torch.testing.assert_close(get_parameter(ddp_runs["parent_module"].model, name), ranks[0]["weight"])


def test_ddp_scores_and_spectra_equal_the_single_process_ones(ddp_runs):
    single, ranks = ddp_runs["single"], ddp_runs["ranks"]
    assert [h["step"] for h in single["general"]] == [0, 0, 5, 5, 10, 10]
    for out in ranks:
        assert out["general"] == single["general"]  # integer counts over the shards: exactly equal
        assert len(out["condition"]) == len(single["condition"])
        for got, want in zip(out["condition"], single["condition"]):
            assert (got["step"], got["final"]) == (want["step"], want["final"])
            for key in ("kappa", "sigma_max", "sigma_min", "sigma_max_dW"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6)
        assert [(h["step"], h["score"], h["pre_edit"], h["requests"]) for h in out["quality"]] == \
            [(h["step"], h["score"], h["pre_edit"], h["requests"]) for h in single["quality"]]
        assert [h["value"] for h in out["quality"]] == pytest.approx([h["value"] for h in single["quality"]],
                                                                     abs=1e-5)
    for key in ("condition", "quality"):
        assert ranks[0][key] == ranks[1][key]  # the same history on every rank


def test_ddp_freezes_the_model_for_the_fit_and_keeps_the_anchor_out_of_checkpoints(ddp_runs):
    single, ranks = ddp_runs["single"], ddp_runs["ranks"]
    assert single["requires_grad"] and not any(out["requires_grad"] for out in ranks)
    assert all(out["state_dict_keys"] == single["state_dict_keys"] for out in ranks)
    assert not any("ddp_anchor" in key for key in single["state_dict_keys"])
    # Rank 0 saved the edited model (the other rank waited for it before the process group went down).
    assert list(ddp_runs["root"].glob("logs2/**/edited_model/model.safetensors"))


def test_the_ddp_anchor_is_neither_saved_nor_required_when_loading():
    module = SequentialEditor(model="tiny:gpt2", save_edited_model=False)
    saved = module.state_dict()
    module._prepare_replicas()  # what setup does on several processes: freeze the model, add the anchor
    assert module.ddp_anchor.requires_grad and not any(p.requires_grad for p in module.model.parameters())
    assert "ddp_anchor" not in module.state_dict() and set(module.state_dict()) == set(saved)
    module.load_state_dict(saved, strict=True)  # a checkpoint written without it (or by one process) loads
    module.teardown("fit")
    assert all(p.requires_grad for p in module.model.parameters())


def test_deepspeed_and_fsdp_are_refused():
    from prune_lightning.module import _check_strategy

    for name, match in [("DeepSpeedStrategy", "does not support DeepSpeedStrategy"),
                        ("FSDPStrategy", "does not support FSDPStrategy yet"),
                        ("XLAStrategy", "only under a DDPStrategy")]:
        trainer = SimpleNamespace(strategy=type(name, (), {})(), world_size=2)
        with pytest.raises(NotImplementedError, match=match):
            _check_strategy(trainer)
