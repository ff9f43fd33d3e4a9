"""The statistics job: its value against a direct computation, resuming, the token budget, the cache, the command
line, and the all-reduce across processes (Lightning ddp_spawn, and nested inside a torch.distributed program)."""

import os
import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open

import prune_lightning.stats as stats_mod
import prune_lightning.stats.moments as moments_mod
from prune_lightning.stats import CorpusStream, SecondMomentJob
from prune_lightning.stats.job import GramSum, gram_blocks
from prune_lightning.models import get_module, load_causal_lm, load_tokenizer, mlp_out_template

_WORDS = ("the capital of France is Paris and Rome is in Italy while Berlin Madrid London Tokyo Cairo Lima Oslo "
          "Vienna Dublin Prague plays guitar piano soccer tennis English French German Spanish a was by for "
          "with").split()
N_DOCS = 23  # not a multiple of any batch size used here: the last batch is short


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 25))) for _ in range(n)]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = mlp_out_template(model)
    return model, tokenizer, [template.format(0), template.format(2)], tiny_model_dir


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.txt"
    docs = _documents(N_DOCS)
    path.write_text("\n\n".join(docs[:5]) + "\n" + "\n".join(docs[5:]) + "\n")  # blank lines are not documents
    return path


def _reference(model, tokenizer, module_names, texts, max_tokens=None):
    """E[k k^T] per module from one unpadded, complete forward pass per document, keys taken by plain forward hooks;
    with a token budget, the first ``max_tokens`` keys in document order (a causal model's keys of a cut document are
    the first rows of the whole one's)."""
    keys = {name: [] for name in module_names}
    handles = [
        get_module(model, name).register_forward_hook(lambda m, args, out, name=name: keys[name].append(args[0][0]))
        for name in module_names
    ]
    try:
        with torch.no_grad():
            for text in texts:
                model(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name in module_names:
        k = torch.cat(keys[name]).double()
        k = k if max_tokens is None else k[:max_tokens]
        out[name] = (k.T @ k / k.shape[0]).float()
    return out, k.shape[0]


def _trainer(root, callbacks=(), **kwargs):
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0,
                    default_root_dir=str(root), use_distributed_sampler=False, callbacks=list(callbacks))
    settings.update(kwargs)
    return Trainer(**settings)


def _read(path: Path):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("mom2").float(), f.metadata()


def _cache_file(cache: Path, module: str) -> Path:
    files = [f for f in cache.glob("*.safetensors") if f"__{module}__" in f.name]
    assert len(files) == 1, f"expected one cache file for {module}: {sorted(p.name for p in cache.iterdir())}"
    return files[0]


class _CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args, **kwargs):
        self.steps += 1


def _job(model_dir, modules, corpus, cache, **overrides):
    settings = dict(model=str(model_dir), modules=modules, corpus=str(corpus), n_samples=100, batch_size=3,
                    cache_dir=str(cache))
    settings.update(overrides)
    return SecondMomentJob(**settings)


# --------------------------------------------------------------------------------------------------------------------


def test_job_equals_direct_computation_for_several_modules_in_one_pass(lm, corpus, tmp_path):
    model, tokenizer, modules, model_dir = lm
    texts = stats_mod.load_corpus_texts(str(corpus))
    assert len(texts) == N_DOCS
    expected, n_tokens = _reference(model, tokenizer, modules, texts)

    # The job gets the model in memory: the forward stops at layer 2's module, layer 3 is never run.
    above = []
    layer3 = get_module(model, mlp_out_template(model).format(3))
    handle = layer3.register_forward_pre_hook(lambda m, a: above.append(1))
    job = SecondMomentJob(model=model, tokenizer=tokenizer, modules=modules, corpus=str(corpus), n_samples=100,
                          batch_size=4, cache_dir=str(tmp_path / "cache"))
    try:
        _trainer(tmp_path).fit(job)
    finally:
        handle.remove()
    assert above == []
    assert not model.training and all(not m.training for m in model.modules())  # the model's mode is kept
    for name in modules:
        torch.testing.assert_close(job.moments[name], expected[name], rtol=1e-5, atol=1e-7)
        moment, meta = _read(job.written[name])
        assert torch.equal(moment, moment.T)
        torch.testing.assert_close(moment, expected[name], rtol=1e-5, atol=1e-7)
        assert meta["n_tokens"] == str(n_tokens) and meta["n_documents"] == str(N_DOCS)
        assert meta["module"] == name and meta["n_samples"] == "100" and meta["dtype"] == "float32"
        assert job.written[name] == stats_mod.stats_cache_path(model_dir.name, name, str(corpus), 100, "float32",
                                                              cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("sort_window", [1, 3])
def test_stream_shards_cover_every_document_once(corpus, sort_window):
    tokenizer = load_tokenizer("tiny:gpt2")
    docs = [tokenizer(t)["input_ids"] for t in stats_mod.load_corpus_texts(str(corpus))]
    shards = [list(CorpusStream(str(corpus), tokenizer, n_samples=21, batch_size=2, max_length=128,
                                          rank=rank, world_size=2, sort_window=sort_window)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(CorpusStream(
        str(corpus), tokenizer, n_samples=21, batch_size=2, max_length=128, world_size=2)) == 6
    seen = []
    for rank, batches in enumerate(shards):
        for batch in batches:
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            seen += [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
            assert batch["n_tokens"] == sum(lengths)
    assert sorted(seen) == sorted(docs[:21])
    assert [b["cursor"]["finished"] for b in shards[0]] == [False] * 5 + [True]
    assert shards[1][-1]["n_documents"] == 0  # 21 = 5 x 4 + 1: the last step leaves process 1 an empty batch
    if sort_window == 3:  # within a window of 3 steps (12 documents), the batches go from short to long
        firsts = [int(b["attention_mask"].sum(dim=1).max()) for b in shards[0][:3]]
        assert firsts == sorted(firsts)


def test_upper_triangle_accumulation_equals_the_full_product():
    keys = torch.randn(300, 1100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram = GramSum(1100, torch.float64, torch.device("cpu"))
    assert gram.blocks == [(0, 256), (256, 512), (512, 768), (768, 1024), (1024, 1100)]
    assert len(gram_blocks(6400)) == 8 and gram_blocks(200) == [(0, 200)]
    gram.add(keys[:170])
    gram.add(keys[170:])
    full = gram.symmetric()
    assert torch.equal(full, full.T)
    torch.testing.assert_close(full, keys.T @ keys)


def test_killed_run_resumes_to_the_same_result(lm, corpus, tmp_path):
    _, _, modules, model_dir = lm
    _trainer(tmp_path).fit(_job(model_dir, modules, corpus, tmp_path / "whole"))

    # 8 steps in all (23 documents, 3 per step); stopped after 3 with a checkpoint after every step.
    checkpoints = tmp_path / "ckpt"
    every_step = ModelCheckpoint(dirpath=str(checkpoints), save_top_k=0, save_last=True, every_n_train_steps=1)
    with pytest.warns(UserWarning, match=r"stopped after 3 steps \(9 documents\)"):
        _trainer(tmp_path, callbacks=[every_step], enable_checkpointing=True, max_steps=3).fit(
            _job(model_dir, modules, corpus, tmp_path / "resumed"))
    assert not (tmp_path / "resumed").exists()  # nothing written for an unfinished stream

    counter = _CountSteps()
    _trainer(tmp_path, callbacks=[counter]).fit(_job(model_dir, modules, corpus, tmp_path / "resumed"),
                                                 ckpt_path=str(checkpoints / "last.ckpt"))
    assert counter.steps == 5
    # That checkpoint is in the middle of a window of length-sorted documents: other batches would not fit it.
    with pytest.raises(ValueError, match="in the middle of a window of documents with batch_size x processes = 5"):
        _trainer(tmp_path).fit(_job(model_dir, modules, corpus, tmp_path / "refused", batch_size=5),
                               ckpt_path=str(checkpoints / "last.ckpt"))
    # At a window boundary the cursor is a count of documents: another batch size resumes.
    boundary = tmp_path / "boundary"
    every_step = ModelCheckpoint(dirpath=str(boundary), save_top_k=0, save_last=True, every_n_train_steps=1)
    with pytest.warns(UserWarning, match=r"stopped after 3 steps \(9 documents\)"):
        _trainer(tmp_path, callbacks=[every_step], enable_checkpointing=True, max_steps=3).fit(
            _job(model_dir, modules, corpus, tmp_path / "resumed5", sort_window=1))
    _trainer(tmp_path).fit(_job(model_dir, modules, corpus, tmp_path / "resumed5", batch_size=5, sort_window=1),
                           ckpt_path=str(boundary / "last.ckpt"))
    for name in modules:
        whole, whole_meta = _read(_cache_file(tmp_path / "whole", name))
        # Same batches: the same sums, up to summation order; other batches: float32 noise of other padding (as in
        # test_stats' batch-size test).
        for folder, tolerance in (("resumed", dict(rtol=1e-6, atol=1e-8)), ("resumed5", dict(rtol=1e-5, atol=1e-7))):
            resumed, meta = _read(_cache_file(tmp_path / folder, name))
            torch.testing.assert_close(resumed, whole, **tolerance)
            assert meta == whole_meta

    with pytest.raises(ValueError, match=r"different statistics \(n_samples: 100 in the checkpoint, 50 now"):
        _trainer(tmp_path).fit(_job(model_dir, modules, corpus, tmp_path / "other", n_samples=50),
                               ckpt_path=str(checkpoints / "last.ckpt"))


def test_second_moment_resumes_an_interrupted_computation(lm, corpus, tmp_path, monkeypatch):
    model, tokenizer, modules, _ = lm
    kwargs = dict(n_samples=100, batch_size=3, checkpoint_every_n_steps=1)
    whole = stats_mod.second_moments(model, tokenizer, modules, str(corpus), cache_dir=tmp_path / "whole", **kwargs)

    step = SecondMomentJob.training_step
    calls = []

    def killed_at_the_fourth_step(self, batch, batch_idx):
        calls.append(batch_idx)
        if batch_idx == 3 and calls.count(3) == 1:
            raise RuntimeError("killed")
        return step(self, batch, batch_idx)

    cache = tmp_path / "cache"
    monkeypatch.setattr(SecondMomentJob, "training_step", killed_at_the_fourth_step)
    with pytest.raises(RuntimeError, match="killed"):
        stats_mod.second_moments(model, tokenizer, modules, str(corpus), cache_dir=cache, **kwargs)
    partial = list((cache / ".partial").glob("*/last.ckpt"))
    assert len(partial) == 1
    assert not list(cache.glob("*.safetensors"))
    assert model.training is False  # restored after the exception too

    assert calls == [0, 1, 2, 3]
    resumed = stats_mod.second_moments(model, tokenizer, modules, str(corpus), cache_dir=cache, **kwargs)
    assert calls == [0, 1, 2, 3, 3, 4, 5, 6, 7]  # the three summed steps are not run again
    assert not (cache / ".partial").exists()  # removed once the files are written
    for name in modules:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-6, atol=1e-8)


def test_token_budget(lm, corpus, tmp_path):
    model, tokenizer, modules, _ = lm
    texts = stats_mod.load_corpus_texts(str(corpus))
    expected, n_tokens = _reference(model, tokenizer, modules, texts, max_tokens=101)
    assert n_tokens == 101
    moments = stats_mod.second_moments(model, tokenizer, modules, str(corpus), n_samples=100, batch_size=2,
                                       max_tokens=101, cache_dir=tmp_path)
    for name in modules:
        torch.testing.assert_close(moments[name], expected[name], rtol=1e-5, atol=1e-7)
        path = _cache_file(tmp_path, name)
        assert path.name.endswith("__100-101tok__float32.safetensors")
        _, meta = _read(path)
        assert meta["n_tokens"] == "101" and meta["max_tokens"] == "101"
        assert int(meta["n_documents"]) < N_DOCS
    # A budget larger than the corpus uses it all, and says so.
    with pytest.warns(UserWarning, match=r"holds only \d+ tokens in 23 documents \(< max_tokens=1000000\)"):
        stats_mod.second_moments(model, tokenizer, modules[:1], str(corpus), max_tokens=1_000_000,
                                 cache_dir=tmp_path / "big")


def test_cached_modules_are_not_recomputed(lm, corpus, tmp_path, monkeypatch):
    model, tokenizer, modules, _ = lm
    first = stats_mod.second_moment(model, tokenizer, modules[0], str(corpus), n_samples=10, cache_dir=tmp_path)
    mtime = _cache_file(tmp_path, modules[0]).stat().st_mtime_ns

    computed = []
    compute = moments_mod.compute_second_moments

    def spy(model, tokenizer, module_names, *args, **kwargs):
        computed.append(list(module_names))
        return compute(model, tokenizer, module_names, *args, **kwargs)

    monkeypatch.setattr(moments_mod, "compute_second_moments", spy)
    both = stats_mod.second_moments(model, tokenizer, modules, str(corpus), n_samples=10, cache_dir=tmp_path)
    assert computed == [modules[1:]]  # only the missing module
    assert torch.equal(both[modules[0]], first)
    assert _cache_file(tmp_path, modules[0]).stat().st_mtime_ns == mtime

    def boom(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(SecondMomentJob, "training_step", boom)
    again = stats_mod.second_moments(model, tokenizer, modules, str(corpus), n_samples=10, cache_dir=tmp_path)
    assert all(torch.equal(again[name], both[name]) for name in modules)


def test_lower_precision_forward_keeps_full_precision_sums_and_is_part_of_the_provenance(lm, corpus, tmp_path,
                                                                                           monkeypatch):
    model, tokenizer, modules, _ = lm
    full = stats_mod.second_moments(model, tokenizer, modules, str(corpus), n_samples=100, cache_dir=tmp_path / "full")
    seen = []
    add = GramSum.add

    def spy(self, keys):
        seen.append((keys.dtype, self.total.dtype, torch.is_autocast_enabled("cpu"),
                     torch.get_float32_matmul_precision()))
        return add(self, keys)

    monkeypatch.setattr(GramSum, "add", spy)
    with pytest.warns(UserWarning, match=r"forward_precision='bfloat16' on a CPU is emulated"):
        bf16 = stats_mod.second_moments(model, tokenizer, modules, str(corpus), n_samples=100,
                                        cache_dir=tmp_path / "bf16", forward_precision="bfloat16")
    # The keys come out of a bfloat16 forward; they are summed in float32, outside autocast, at full precision.
    assert seen and set(seen) == {(torch.bfloat16, torch.float32, False, "highest")}
    monkeypatch.undo()
    for name in modules:
        error = float((bf16[name] - full[name]).norm() / full[name].norm())
        assert 0 < error < 5e-2, error
        assert _read(_cache_file(tmp_path / "bf16", name))[1]["forward_precision"] == "bfloat16"
    # TF32 is a GPU feature: on a CPU the result is that of the full-precision forward.
    with pytest.warns(UserWarning, match=r"'tf32' changes nothing on a CPU"):
        tf32 = stats_mod.second_moments(model, tokenizer, modules, str(corpus), n_samples=100,
                                        cache_dir=tmp_path / "tf32", forward_precision="tf32")
    for name in modules:
        torch.testing.assert_close(tf32[name], full[name], rtol=1e-6, atol=1e-8)
    # A request that names another forward precision refuses the file; one that names none takes it.
    with pytest.raises(ValueError, match=r"forward_precision: 'bfloat16' in the file, 'model' requested"):
        stats_mod.second_moments(model, tokenizer, modules, str(corpus), n_samples=100, cache_dir=tmp_path / "bf16",
                                 forward_precision="model")

    def boom(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(SecondMomentJob, "training_step", boom)
    again = stats_mod.second_moments(model, tokenizer, modules, str(corpus), n_samples=100,
                                     cache_dir=tmp_path / "bf16")
    assert all(torch.equal(again[name], bf16[name]) for name in modules)
    with pytest.raises(ValueError, match=r"forward_precision must be one of \['model', 'bfloat16', 'tf32'\]"):
        SecondMomentJob(model="tiny:gpt2", layers=[0], forward_precision="fp8")


def test_empty_corpus_is_an_error(lm, tmp_path):
    model, tokenizer, modules, _ = lm
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="holds no non-empty text"):
        stats_mod.second_moment(model, tokenizer, modules[0], str(empty), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Give the measured modules either as modules=\[names\] or as layers"):
        SecondMomentJob(model="tiny:gpt2", corpus=str(empty))


def test_prune_edit_stats_fills_the_cache_that_rome_reads(corpus, capsys, monkeypatch):
    from prune_lightning.cli import main
    from prune_lightning.editors import ROME

    args = ["stats", "--model", "tiny:gpt2", "--layers", "1", "--corpus", str(corpus), "--n_samples", "17",
            "--batch_size", "4"]
    main(args)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("transformer.h.1.mlp.c_proj")]
    assert len(lines) == 1 and lines[0].startswith("transformer.h.1.mlp.c_proj: ")
    path = Path(lines[0].split(": ", 1)[1])
    assert path.exists() and path.parent == Path(os.environ["PRUNE_LIGHTNING_CACHE"]) / "stats"
    moment, meta = _read(path)
    assert meta["n_documents"] == "17"

    main(args)  # a second run finds the file
    assert capsys.readouterr().out.strip().endswith("(cached)")

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(SecondMomentJob, "training_step", boom)
    model, tokenizer = load_causal_lm("tiny:gpt2"), load_tokenizer("tiny:gpt2")
    editor = ROME(layer=1, mom2_corpus=str(corpus), mom2_n_samples=17, context_templates=["{}"])
    editor.setup(model, tokenizer)  # reads the file the command wrote
    lu, pivots = torch.linalg.lu_factor(moment.double())
    key = torch.randn(moment.shape[0], dtype=torch.float64)
    torch.testing.assert_close(editor._solve_mom2(key), torch.linalg.lu_solve(lu, pivots, key[:, None])[:, 0])


@pytest.mark.slow
def test_ddp_spawn_all_reduces_to_the_single_process_result(tiny_arch, lm, corpus, tmp_path):
    if tiny_arch != "gpt2":
        pytest.skip("one architecture is enough for the distributed path")
    _, _, modules, model_dir = lm
    _trainer(tmp_path).fit(_job(model_dir, modules, corpus, tmp_path / "single"))
    # Two processes, a checkpoint kept after every step (4 steps of 2 x 3 documents).
    checkpoints = tmp_path / "ckpt"
    every_step = ModelCheckpoint(dirpath=str(checkpoints), filename="{step}", save_top_k=-1, every_n_train_steps=1)
    _trainer(tmp_path, callbacks=[every_step], enable_checkpointing=True, devices=2, strategy="ddp_spawn").fit(
        _job(model_dir, modules, corpus, tmp_path / "ddp"))
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step={i}.ckpt" for i in range(1, 5)]
    # A checkpoint of the two processes (sums all-reduced at that step) resumes on one, with the same documents per
    # step (it is in the middle of a window of length-sorted documents).
    _trainer(tmp_path).fit(_job(model_dir, modules, corpus, tmp_path / "ddp-resumed", batch_size=6),
                           ckpt_path=str(checkpoints / "step=2.ckpt"))
    for name in modules:
        single, single_meta = _read(_cache_file(tmp_path / "single", name))
        for folder in ("ddp", "ddp-resumed"):  # other batches than one process's: float32 noise of other padding
            other, meta = _read(_cache_file(tmp_path / folder, name))
            torch.testing.assert_close(other, single, rtol=1e-5, atol=1e-7)
            assert meta == single_meta


def _nested_worker(rank, world, init_file, model_dir, modules, corpus, cache, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
        moments = stats_mod.second_moments(model, tokenizer, modules, corpus, n_samples=100, batch_size=3,
                                           cache_dir=cache)
        torch.save(moments, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_nested_in_a_distributed_program_shards_and_all_reduces(tiny_arch, lm, corpus, tmp_path):
    if tiny_arch != "gpt2":
        pytest.skip("one architecture is enough for the distributed path")
    model, tokenizer, modules, model_dir = lm
    single = stats_mod.second_moments(model, tokenizer, modules, str(corpus), n_samples=100, batch_size=3,
                                      cache_dir=tmp_path / "single")
    torch.multiprocessing.spawn(
        _nested_worker,
        args=(2, str(tmp_path / "init"), str(model_dir), modules, str(corpus), str(tmp_path / "nested"), str(tmp_path)),
        nprocs=2,
    )
    tolerance = dict(rtol=1e-5, atol=1e-7)  # two processes batch other documents together than one
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name in modules:
        assert torch.equal(ranks[0][name], ranks[1][name])  # every process returns the all-reduced result
        torch.testing.assert_close(ranks[0][name], single[name], **tolerance)
        written, meta = _read(_cache_file(tmp_path / "nested", name))
        _, single_meta = _read(_cache_file(tmp_path / "single", name))
        torch.testing.assert_close(written, single[name], **tolerance)
        assert meta == single_meta
    assert not (tmp_path / "nested" / ".partial").exists()
