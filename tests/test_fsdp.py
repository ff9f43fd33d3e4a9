"""Edited matrices sharded by FSDP2 (``fully_shard``), on CPU with gloo: 2 processes (3 for the even split, 4 for
HSDP).

The registry gathers a sharded matrix once (``W_0``), writes each rank's shard of ``W_0 + dW``, and PRUNE and the
condition numbers work on the replicated registry. Here they must give what they give on the unsharded model.
"""

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

NAME = "transformer.h.1.mlp.c_proj.weight"
ALPHA = 100.0
WORLD_SIZE = 2


def _on_ranks(worker, tmp_path, tiny_model_dir, prefix: str, world_size: int = WORLD_SIZE) -> list:
    """Runs ``worker(rank, world_size, init_file, model_dir, out_dir)`` on ``world_size`` processes (gloo) and
    returns what each rank saved as ``<prefix><rank>.pt``. One architecture (GPT-2) is enough for the sharding logic."""
    if "gpt2" not in str(tiny_model_dir):
        pytest.skip("one architecture is enough for the sharding logic")
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(world_size, str(tmp_path / "init"), str(tiny_model_dir), str(tmp_path)),
             nprocs=world_size, join=True)
    return [torch.load(tmp_path / f"{prefix}{rank}.pt") for rank in range(world_size)]


def _updates(shape, n=4, seed=0):
    """The same random rank-one updates on every rank, large enough for PRUNE to restrain."""
    from prune_lightning.editors import LowRankUpdate

    generator = torch.Generator().manual_seed(seed)
    return [LowRankUpdate(torch.randn(shape[0], 1, generator=generator),
                          torch.randn(shape[1], 1, generator=generator)) for _ in range(n)]


def _edit_and_restrain(model, registry):
    """Records the updates, writes them, restrains with PRUNE, writes again; returns kappa and PRUNE's values."""
    from prune_lightning.callbacks import ConditionNumberMonitor, PRUNECallback

    registry.track(model, [NAME])
    entry = registry[NAME]
    for update in _updates(entry.shape):
        entry.record(update)
        registry.write([NAME])
    kappa_before = ConditionNumberMonitor()._spectrum(registry, NAME)
    values = PRUNECallback(alpha=ALPHA).restrain_matrix(entry)
    registry.write([NAME])
    kappa_after = ConditionNumberMonitor()._spectrum(registry, NAME)
    return {"kappa_before": torch.tensor(kappa_before), "kappa_after": torch.tensor(kappa_after),
            "sigma_max_dW_after": torch.tensor(values["sigma_max_dW_after"]),
            "restrained": torch.tensor(values["restrained"])}


def _fully_shard(model, world_size: int) -> None:
    """FSDP2 over the ranks, as SequentialEditor does it: every GPT-2 block a unit of its own, then the rest. The mesh
    is ModelParallelStrategy's ``(data_parallel, tensor_parallel)`` one: ``(1, world)`` - one node - except on 4
    ranks, ``(2, 2)`` - two nodes of two devices: replicated across the nodes, sharded within (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    from prune_lightning.models import decoder_layers, is_sharded_model, shard_model
    from prune_lightning.strategies import fsdp_mesh

    assert decoder_layers(model) == list(model.transformer.h)
    shape = (2, 2) if world_size == 4 else (1, world_size)
    mesh = fsdp_mesh(init_device_mesh("cpu", shape, mesh_dim_names=("data_parallel", "tensor_parallel")))
    assert mesh.ndim == (2 if world_size == 4 else 1)
    assert shard_model(model, mesh) and is_sharded_model(model)
    assert not shard_model(model, mesh)  # a sharded model is left as it is


def _worker(rank: int, world_size: int, init_file: str, model_dir: str, out_dir: str) -> None:
    from prune_lightning.models import load_causal_lm, load_tokenizer
    from prune_lightning.registry import EditRegistry, full_weight, is_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tokenizer = load_tokenizer(model_dir)
        inputs = tokenizer(["The hometown of Danielle is"], return_tensors="pt")

        reference = load_causal_lm(model_dir)
        expected = _edit_and_restrain(reference, EditRegistry())
        with torch.no_grad():
            expected_logits = reference(**inputs).logits
        expected_weight = reference.get_parameter(NAME).detach().clone()

        model = load_causal_lm(model_dir)
        _fully_shard(model, world_size)
        param = model.get_parameter(NAME)
        assert is_sharded(param)
        got = _edit_and_restrain(model, EditRegistry())
        with torch.no_grad():
            logits = model(**inputs).logits
        torch.save({"expected": expected, "got": got, "expected_weight": expected_weight,
                    "weight": full_weight(param).clone(), "local_shard": param.to_local().detach().clone(),
                    "expected_logits": expected_logits, "logits": logits.detach()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4], ids=["fsdp-2", "hsdp-2x2"])
def test_prune_and_kappa_on_a_sharded_matrix_equal_the_unsharded_result(tmp_path, tiny_model_dir, world_size):
    results = _on_ranks(_worker, tmp_path, tiny_model_dir, "rank", world_size=world_size)
    for result in results:
        expected, got = result["expected"], result["got"]
        assert float(expected["restrained"]) >= 1, "the test needs PRUNE to restrain something"
        assert float(got["restrained"]) == float(expected["restrained"])
        torch.testing.assert_close(got["sigma_max_dW_after"], expected["sigma_max_dW_after"], rtol=1e-6, atol=0)
        torch.testing.assert_close(got["kappa_before"], expected["kappa_before"], rtol=1e-5, atol=0)
        torch.testing.assert_close(got["kappa_after"], expected["kappa_after"], rtol=1e-5, atol=0)
        assert float(got["kappa_after"][0]) < float(got["kappa_before"][0])
        # The shards put together are the restrained matrix, and the sharded model computes what the plain one does.
        torch.testing.assert_close(result["weight"], result["expected_weight"], rtol=0, atol=1e-6)
        torch.testing.assert_close(result["logits"], result["expected_logits"], rtol=1e-5, atol=1e-5)
    # Each rank holds its own half of the rows (Shard(0)), not the whole matrix; under HSDP the two "nodes" (ranks
    # 0-1 and 2-3) hold the same halves.
    full = results[0]["expected_weight"]
    for rank, result in enumerate(results):
        assert result["local_shard"].shape[0] < full.shape[0]
        torch.testing.assert_close(result["local_shard"], full.chunk(2, dim=0)[rank % 2], rtol=0, atol=1e-6)


def test_the_sharding_mesh_is_the_one_dimension_with_several_ranks_or_both():
    from prune_lightning.strategies import fsdp_mesh

    class Mesh(dict):
        def size(self):
            return self["size"]

    for data, shards, expected in [(1, 8, "tensor_parallel"), (4, 1, "data_parallel"), (2, 8, "both")]:
        mesh = Mesh(data_parallel=Mesh(size=data), tensor_parallel=Mesh(size=shards), size=data * shards)
        assert fsdp_mesh(mesh) is (mesh if expected == "both" else mesh[expected])


def _editors(world_size: int) -> dict:
    """ROME (one matrix, request after request) and MEMIT (two layers, one after the other), without statistics.

    On 2 ranks they run as an editor called directly does (every rank computes everything). On 3 ranks they run
    inside an even split of their rows, as SequentialEditor runs them on a sharded model, with so few rows that
    ranks pad: ROME with the plain template only (1 key row: ranks 1 and 2 pad; 2 value rows with the KL prompt:
    rank 2 runs padding only), MEMIT with 2 templates (2 key rows: rank 2 pads).
    """
    from prune_lightning.editors import MEMIT, ROME

    settings = dict(mom2_adjustment=False, v_num_grad_steps=5)
    if world_size == 2:
        two = ["{}", "The {}"]
        return {"rome": lambda: ROME(layer=1, context_templates=two, **settings),
                "memit": lambda: MEMIT(layers=[0, 1], mom2_update_weight=10.0, context_templates=two, **settings)}
    return {"rome-split": lambda: ROME(layer=1, context_templates=["{}"], **settings),
            "memit-split": lambda: MEMIT(layers=[0, 1], mom2_update_weight=10.0, context_templates=["{}", "The {}"],
                                         **settings)}


def _edit_worker(rank: int, world_size: int, init_file: str, model_dir: str, out_dir: str) -> None:
    from prune_lightning.data import EditRequest
    from prune_lightning.distributed import split_work
    from prune_lightning.models import load_causal_lm, load_tokenizer
    from prune_lightning.registry import full_weight

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tokenizer = load_tokenizer(model_dir)
        requests = [EditRequest(prompt="The hometown of {} is", subject=subject, target_new=new, target_true="Paris",
                                case_id=i)
                    for i, (subject, new) in enumerate((("Danielle", "Rome"), ("Marco", "Oslo")))]

        def edit(model, editor, split=False):
            editor.setup(model, tokenizer)
            before = {name: full_weight(model.get_parameter(name)).clone() for name in editor.parameter_names(model)}
            with split_work(even=True) if split else contextlib.nullcontext():
                updates = editor.compute_update(model, tokenizer, requests)
            after = {name: full_weight(model.get_parameter(name)).clone() for name in before}
            return {name: update.dense() for name, update in updates.items()}, before, after

        results = {}
        for label, make_editor in _editors(world_size).items():
            expected, _, _ = edit(load_causal_lm(model_dir), make_editor())
            model = load_causal_lm(model_dir)
            _fully_shard(model, world_size)
            got, before, after = edit(model, make_editor(), split=world_size > 2)
            results[label] = {"expected": expected, "got": got, "before": before, "after": after}
        torch.save(results, os.path.join(out_dir, f"edit{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rome_and_memit_on_a_sharded_model_give_the_unsharded_updates(tmp_path, tiny_model_dir):
    """The editors gather the edited matrices (and only them) for ``W k*`` and their writes within a batch (ROME:
    request after request; MEMIT: layer after layer), and restore the shards. With their rows split evenly over 3
    ranks (padding rows included, one rank with nothing but padding) they still give the one-process updates."""
    results = _on_ranks(_edit_worker, tmp_path / "whole", tiny_model_dir, "edit")
    results += _on_ranks(_edit_worker, tmp_path / "split", tiny_model_dir, "edit", world_size=3)
    assert [sorted(r) for r in results] == [["memit", "rome"]] * 2 + [["memit-split", "rome-split"]] * 3
    for rank_results in results:
        for label, result in rank_results.items():
            assert len(result["expected"]) == (2 if label.startswith("memit") else 1)
            for name, expected in result["expected"].items():
                assert float(expected.abs().max()) > 1e-4, f"the test needs {label} to change {name}"
                torch.testing.assert_close(result["got"][name], expected, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(result["after"][name], result["before"][name], rtol=0, atol=0)


def _lockstep_worker(rank: int, world_size: int, init_file: str, model_dir: str, out_dir: str) -> None:
    from prune_lightning.distributed import lockstep
    from prune_lightning.generation import generate_batched
    from prune_lightning.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tokenizer = load_tokenizer(model_dir)
        # Uneven work: rank 0 three prompts (three generate calls, batch size 1), rank 1 none.
        prompts = ["The hometown of Danielle is", "Marco works in the city of", "Oslo is"] if rank == 0 else []
        reference = load_causal_lm(model_dir)
        expected = generate_batched(reference, tokenizer, prompts, max_new_tokens=3, batch_size=1)
        model = load_causal_lm(model_dir)
        _fully_shard(model, world_size)
        got = generate_batched(model, tokenizer, prompts, max_new_tokens=3, batch_size=1)
        # Plain forwards, nested lockstep (the inner one does nothing): rank 0 runs one, rank 1 two.
        texts = ["Paris is"] if rank == 0 else ["Rome is", "Berlin is in"]
        with lockstep(model), lockstep(model), torch.no_grad():
            logits = [model(**tokenizer([text], return_tensors="pt")).logits for text in texts]
        with torch.no_grad():
            expected_logits = [reference(**tokenizer([text], return_tensors="pt")).logits for text in texts]
        torch.save({"expected": expected, "got": got, "logits": logits, "expected_logits": expected_logits},
                   os.path.join(out_dir, f"lockstep{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lockstep_pairs_the_forwards_of_ranks_with_uneven_work(tmp_path, tiny_model_dir):
    """Under FSDP every forward is a collective: without lockstep, rank 0's second forward would wait forever."""
    for rank, result in enumerate(_on_ranks(_lockstep_worker, tmp_path, tiny_model_dir, "lockstep")):
        assert result["got"] == result["expected"] and len(result["got"]) == (3 if rank == 0 else 0)
        assert len(result["logits"]) == (1 if rank == 0 else 2)
        for got, expected in zip(result["logits"], result["expected_logits"]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
