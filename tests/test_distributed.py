"""Sequential editing on several processes: the sharding helpers, ROME's split of its rows, and a 2-process DDP fit.

The DDP fit (``ddp_spawn``, gloo, 2 CPU processes) edits the same requests as a single-process fit and must end with
the same weights on both ranks - and the single-process ones - and the same general-ability scores. ``ddp_spawn``
copies only the weights back to the parent, so each rank saves what the test compares in ``on_fit_end``.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import write_counterfact
from distributed_fit import N_EDITS, fit, write_tasks
from prune_lightning import EditDataModule, SequentialEditor
from prune_lightning.distributed import WorkSplit, current_split, shard, shard_indices, split_work
from prune_lightning.editors.value import compute_key, optimize_value
from prune_lightning.models import get_parameter


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
    for world_size, batch_size, expected in [(2, 1, [[[0], [2], [4]], [[1], [3], []]]),
                                             (2, 2, [[[0, 2], [4]], [[1, 3], []]]),
                                             (8, 1, [[[i]] for i in range(5)] + [[[]]] * 3)]:
        data.batch_size = batch_size
        batches = []
        for rank in range(world_size):
            data.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
            loader = data.val_dataloader()
            assert isinstance(loader.sampler, DistributedSampler)
            batches.append([[r.case_id for r in batch] for batch in loader])
        # Each request once, no padding with repeats; every rank as many batches (the short shards end in empty
        # ones), also a rank without any request: the evaluation loop runs on every rank.
        assert batches == expected


# --------------------------------------------------------------------------------------------------------------------
# a whole fit: ddp_spawn with 2 processes against one process
# --------------------------------------------------------------------------------------------------------------------


def _probe_collectives_and_rome(pl_module, request) -> dict:
    """Before the first edit: the collectives, the same-batch check, and ROME's key and value for one request inside
    split_work (on one process: the whole computation; on two: each rank half of the rows)."""
    from prune_lightning import distributed
    from prune_lightning.editors.base import LowRankUpdate
    from prune_lightning.models import get_module
    from prune_lightning.strategies import broadcast_updates, check_same_batch

    rank = distributed.rank()
    out: dict = {"sum": distributed.all_reduce_sum_(torch.tensor([1.0 + rank, 10.0])).tolist(),
                 "broadcast": distributed.broadcast_(torch.tensor([float(rank)] * 2), src=1 % distributed.world_size()
                                                     ).tolist(),
                 "max": distributed.all_reduce_max_(torch.tensor([rank, -rank])).tolist(), "error": ""}
    try:
        check_same_batch(["same"], 0)
        check_same_batch([f"differs on rank {rank}"], 1)
    except RuntimeError as err:
        out["error"] = str(err)
    update = LowRankUpdate(torch.full((3, 1), float(rank)), torch.full((2, 1), float(rank + 5)))
    (received,) = broadcast_updates({"w": update}).values()
    out["factors"] = [received.left.flatten().tolist(), received.right.flatten().tolist()]
    if distributed.world_size() > 1:  # a restraint's result travels from the rank that computed it (here rank 1)
        from prune_lightning.strategies import broadcast_restraint
        from prune_lightning.spectral import DeltaTracker

        for layout in ("lowrank", "dense", "empty", "unchanged"):
            tracker = DeltaTracker((4, 3), dense_rank_fraction=1.0)
            if rank == 0 or layout != "empty":
                tracker.add(LowRankUpdate(torch.full((4, 1), 7.0 * (1 - rank) + rank), torch.ones(3, 1)))
            if rank == 1 and layout == "dense":
                tracker.set_dense(tracker.dense())
            values = {"value": 2.0, "changed": float(layout != "unchanged")} if rank == 1 else None
            shared = broadcast_restraint(tracker, values, src=1)
            out[f"share_{layout}"] = [shared, "empty" if tracker.is_empty else "lowrank" if tracker.is_lowrank
                                      else "dense", tracker.dense().tolist()]
    editor, model, tokenizer = pl_module.editor, pl_module.model, pl_module.tokenizer
    with distributed.split_work() as split:
        out["split"] = [split.rank, split.world_size]
        module = get_module(model, editor.parameter_names(model)[0].removesuffix(".weight"))
        out["key"] = compute_key(model, tokenizer, module, request, [editor.context_templates], editor.fact_token)
        value = optimize_value(model, tokenizer, request, module, editor.context_templates, editor.value_settings,
                               editor.fact_token)
        out["delta"], out["nll_init"], out["nll"], out["steps"] = value.delta, value.nll_init, value.nll, value.steps
    return out


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("ddp")
    requests_file = write_counterfact(root / "cf.json", N_EDITS)
    tasks = write_tasks(root)
    single_module = fit(1, root, requests_file, tasks, str(tiny_corpus), probe=_probe_collectives_and_rome)
    parent_module = fit(2, root, requests_file, tasks, str(tiny_corpus), strategy="ddp_spawn",
                        probe=_probe_collectives_and_rome)
    load = lambda name: torch.load(root / name, weights_only=True)  # noqa: E731
    return dict(root=root, single=load("world1-rank0.pt"), ranks=[load(f"world2-rank{r}.pt") for r in range(2)],
                single_module=single_module, parent_module=parent_module)


@pytest.mark.slow
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


@pytest.mark.slow
def test_ddp_ranks_end_with_the_single_process_weights(ddp_runs):
    single, ranks = ddp_runs["single"], ddp_runs["ranks"]
    _assert_same_weights(single, ranks)
    assert not torch.allclose(single["weight"], ddp_runs["single_module"].edit_registry[
        ddp_runs["single_module"].edited_parameter_names[0]].w0)  # the edits did change the matrix
    # ddp_spawn copies rank 0's weights back into the parent's module.
    (name,) = ddp_runs["parent_module"].edited_parameter_names
    torch.testing.assert_close(get_parameter(ddp_runs["parent_module"].model, name), ranks[0]["weight"])


def _assert_same_weights(single: dict, ranks: list[dict]) -> None:
    """Every rank edited every request and ends with the single-process matrix; PRUNE restrained the same values."""
    for out in ranks:
        assert out["requests_edited"] == N_EDITS and out["global_step"] == N_EDITS
        torch.testing.assert_close(out["weight"], single["weight"], rtol=0, atol=1e-5)
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # bit-identical on every rank
    restrained = [[h["restrained"] for h in out["prune"]] for out in (single, *ranks)]
    assert restrained[0] == restrained[1] == restrained[2] and len(restrained[0]) == N_EDITS and sum(restrained[0]) > 0


def _assert_same_histories(single: dict, ranks: list[dict]) -> None:
    """General-ability scores, condition numbers and edit quality as in the single-process run, on every rank."""
    assert [h["step"] for h in single["general"]] == [0, 0, 5, 5, 10, 10]
    for out in ranks:
        assert out["general"] == single["general"]  # integer counts over the shards: exactly equal
        assert len(out["condition"]) == len(single["condition"])
        for got, want in zip(out["condition"], single["condition"]):
            assert (got["step"], got["final"]) == (want["step"], want["final"])
            for key in ("kappa", "sigma_max", "sigma_min", "sigma_max_dW"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6)
        fields = ("step", "requests", "timing", "protocol", "kind", "score")
        assert [tuple(h[f] for f in fields) for h in out["quality"]] == \
            [tuple(h[f] for f in fields) for h in single["quality"]]
        assert [h["value"] for h in out["quality"]] == pytest.approx([h["value"] for h in single["quality"]],
                                                                     abs=1e-5)
    for key in ("condition", "quality"):
        assert ranks[0][key] == ranks[1][key]  # the same history on every rank


@pytest.mark.slow
def test_ddp_scores_and_spectra_equal_the_single_process_ones(ddp_runs):
    _assert_same_histories(ddp_runs["single"], ddp_runs["ranks"])


@pytest.mark.slow
def test_ddp_freezes_the_model_for_the_fit_and_keeps_the_anchor_out_of_checkpoints(ddp_runs):
    single, ranks = ddp_runs["single"], ddp_runs["ranks"]
    assert single["requires_grad"] and not any(out["requires_grad"] for out in ranks)
    assert all(out["state_dict_keys"] == single["state_dict_keys"] for out in ranks)
    assert not any("ddp_anchor" in key for key in single["state_dict_keys"])
    # Rank 0 saved the edited model (the other rank waited for it before the process group went down).
    assert list(ddp_runs["root"].glob("logs-world2/**/edited_model/model.safetensors"))


def test_the_ddp_anchor_is_neither_saved_nor_required_when_loading():
    module = SequentialEditor(model="tiny:gpt2", save_edited_model=False)
    saved = module.state_dict()
    module._prepare_replicas()  # what setup does on several processes: freeze the model, add the anchor
    assert module.ddp_anchor.requires_grad and not any(p.requires_grad for p in module.model.parameters())
    assert "ddp_anchor" not in module.state_dict() and set(module.state_dict()) == set(saved)
    module.load_state_dict(saved, strict=True)  # a checkpoint written without it (or by one process) loads
    module.teardown("fit")
    assert all(p.requires_grad for p in module.model.parameters())


def test_deepspeed_and_fsdp1_are_refused_ddp_and_model_parallel_accepted():
    from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                              SingleDeviceStrategy)

    from prune_lightning.callbacks import ConditionNumberMonitor, PRUNECallback
    from prune_lightning.strategies import strategy_kind

    class DeepSpeedSubclass(DeepSpeedStrategy):  # refused by type, also a subclass: not by its name
        pass

    refused = [(DeepSpeedSubclass, "does not support DeepSpeedSubclass: DeepSpeed partitions"),
               (FSDPStrategy, "does not support FSDPStrategy: it wraps the model in FSDP1")]
    for cls, match in refused:
        trainer = SimpleNamespace(strategy=cls.__new__(cls), world_size=2)  # no __init__: DeepSpeed needs deepspeed
        with pytest.raises(NotImplementedError, match=match):
            strategy_kind(trainer)
        for callback in (PRUNECallback(), ConditionNumberMonitor()):  # the callbacks refuse the same, by type
            owner_match = match.replace("does not", f"{type(callback).__name__} does not")
            with pytest.raises(NotImplementedError, match=owner_match):
                callback.setup(trainer, None, "fit")
    named_like = SimpleNamespace(strategy=type("FSDPStrategyLookalike", (SingleDeviceStrategy,), {})("cpu"),
                                 world_size=2)
    with pytest.raises(NotImplementedError, match="only under a DDPStrategy .* or ModelParallelStrategy"):
        strategy_kind(named_like)  # a name that contains "FSDP" is not what decides
    assert strategy_kind(SimpleNamespace(strategy=DDPStrategy(), world_size=2)) == "replicas"
    assert strategy_kind(SimpleNamespace(strategy=ModelParallelStrategy(), world_size=2)) == "shards"


# --------------------------------------------------------------------------------------------------------------------
# FSDP2 (ModelParallelStrategy) with 2 processes, started by torchrun, against the same single-process run
# --------------------------------------------------------------------------------------------------------------------


def _torchrun_fit(root: Path, corpus: Path, repo_dir: Path, *extra: str) -> None:
    """``torchrun`` (standalone, 2 CPU processes, gloo) runs ``tests/distributed_fit.py`` with ModelParallelStrategy:
    Lightning's launcher for it re-runs the script, which under pytest would be pytest itself."""
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tests_dir), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tests_dir / "distributed_fit.py"), str(root), str(root / "cf.json"), str(corpus), *extra]
    result = subprocess.run(command, cwd=repo_dir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def fsdp_run(ddp_runs, tiny_corpus, repo_dir):
    _torchrun_fit(ddp_runs["root"], tiny_corpus, repo_dir)
    return [torch.load(ddp_runs["root"] / f"fsdp-rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
def test_fsdp_ranks_hold_shards_and_end_with_the_single_process_weights(ddp_runs, fsdp_run):
    single = ddp_runs["single"]
    _assert_same_weights(single, fsdp_run)
    full = single["weight"]
    for rank, out in enumerate(fsdp_run):  # each rank holds its half of the rows (Shard(0)), not the whole matrix
        assert out["local_shard"].shape[0] == full.shape[0] // 2
        torch.testing.assert_close(out["local_shard"], out["weight"].chunk(2, dim=0)[rank], rtol=0, atol=0)
    # The model was not frozen (no DistributedDataParallel wrapper, so no anchor either).
    assert all(out["requires_grad"] for out in fsdp_run)
    assert all(out["state_dict_keys"] == single["state_dict_keys"] for out in fsdp_run)


@pytest.mark.slow
def test_fsdp_scores_and_spectra_equal_the_single_process_ones(ddp_runs, fsdp_run):
    """The evaluators shard odd numbers of examples across the ranks: distributed.lockstep keeps the sharded
    model's forwards paired (without it the run would hang)."""
    _assert_same_histories(ddp_runs["single"], fsdp_run)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_to_the_single_process_weights(ddp_runs, tiny_corpus, repo_dir):
    """A sharded run checkpoints (whole matrices, rank 0's file: the shipped config's setting) after each of 3 edits;
    a new run resumed from the last one edits the other 7 and ends where the uninterrupted runs end."""
    root = ddp_runs["root"]
    _torchrun_fit(root, tiny_corpus, repo_dir, "resume")
    first = [torch.load(root / f"fsdp-first-rank{r}.pt", weights_only=True) for r in range(2)]
    resumed = [torch.load(root / f"fsdp-resumed-rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(out["global_step"] == 3 for out in first)
    assert (root / "fsdp-checkpoints" / "last.ckpt").is_file()
    single = ddp_runs["single"]
    _assert_same_weights(single, resumed)  # requests_edited == N_EDITS: the count came back from the checkpoint
    for out in resumed:  # PRUNE's and the monitor's histories came back too, and went on
        assert [h["step"] for h in out["prune"]] == [h["step"] for h in single["prune"]]
        assert [h["step"] for h in out["condition"]] == [h["step"] for h in single["condition"]]


@pytest.mark.slow
def test_fsdp_validate_scores_the_requests_as_one_process_does(ddp_runs, fsdp_run, tmp_path):
    """``validate`` on the sharded model: each rank a shard of the 10 requests, in as many batches, summed."""
    from lightning.pytorch import Trainer

    module = ddp_runs["single_module"]
    data = EditDataModule(source=str(ddp_runs["root"] / "cf.json"))
    (expected,) = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          default_root_dir=tmp_path).validate(module, datamodule=data, verbose=False)
    assert expected["val/teacher_forced/counterfact/probability_success"] > 0.5  # the edits took
    for rank in range(2):
        (got,) = torch.load(ddp_runs["root"] / f"fsdp-validate-rank{rank}.pt", weights_only=True)
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.slow
def test_fsdp_rank_zero_saves_the_whole_edited_model(ddp_runs, fsdp_run):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    (saved,) = ddp_runs["root"].glob("logs-fsdp/**/edited_model")
    (unsharded,) = ddp_runs["root"].glob("logs-world2/**/edited_model")
    keys = [sorted(safe_open(str(path / "model.safetensors"), "pt").keys()) for path in (saved, unsharded)]
    assert keys[0] == keys[1]  # the tensors an unsharded save_pretrained writes (tied weights once)
    model = AutoModelForCausalLM.from_pretrained(saved)
    (name,) = ddp_runs["single_module"].edited_parameter_names
    torch.testing.assert_close(get_parameter(model, name).detach(), ddp_runs["single"]["weight"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path, strategy", [("configs/llama2-7b/rome-ddp.yaml", "DDPStrategy"),
                                            ("configs/llama2-7b/rome-fsdp.yaml", "ModelParallelStrategy")])
def test_multi_gpu_configs_parse_and_name_a_strategy_the_editor_accepts(path, strategy, repo_dir, monkeypatch,
                                                                        capsys):
    import yaml

    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["strategy"]["class_path"] == f"lightning.pytorch.strategies.{strategy}"
    assert config["trainer"]["devices"] == 8 and config["model"]["model"] == "meta-llama/Llama-2-7b-hf"
    assert [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]] == \
        ["PRUNECallback", "ConditionNumberMonitor"]


def test_ranks_with_different_context_templates_are_refused(monkeypatch):
    """Each rank runs its share of the template rows: templates that differ between ranks (generated by sampling,
    which need not be bit-identical across devices) would mix into one update, so the set-up refuses them."""
    from prune_lightning import distributed
    from prune_lightning.editors import ROME

    module = SequentialEditor(model="tiny:gpt2", editor=ROME(layer=1, mom2_adjustment=False,
                                                             context_templates=["{}", "The {}"]),
                              save_edited_model=False, verbose=False)
    module._replicated = True  # as setup() makes it on several processes
    compared = []
    monkeypatch.setattr(distributed, "same_on_all_ranks", lambda obj, group=None: compared.append(obj) or False)
    with pytest.raises(RuntimeError, match="different context templates for ROME.*Pass context_templates"):
        module.prepare_editor()
    assert compared == [["{}", "The {}"]]
    monkeypatch.setattr(distributed, "same_on_all_ranks", lambda obj, group=None: True)
    module.prepare_editor()  # the same templates everywhere: set up, and the matrix tracked
    assert list(module.edit_registry) == module.edited_parameter_names
