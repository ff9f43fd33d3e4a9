"""Statistics users already have: the authors' ``.npz`` layout imported into the cache and exported from it, the
provenance every cache file carries, and the refusal of a cached ``C`` whose provenance differs from the request."""

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import prune_lightning.stats as stats_mod
from prune_lightning.cli import main as cli_main
from prune_lightning.editors import ROME
from prune_lightning.models import get_module, input_dim, load_causal_lm, load_tokenizer, mlp_out_template
from prune_lightning.stats import SecondMomentJob, export_reference_stats, import_reference_stats
from prune_lightning.stats.corpus import REFERENCE_CORPUS, chain_digest
from prune_lightning.stats.reference import parse_reference_path, read_reference_file, reference_path

_WORDS = ("the capital of France is Paris and Rome is in Italy while Berlin Madrid London Tokyo plays guitar piano "
          "soccer English French German a was by for with").split()
N_DOCS = 19


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    module = mlp_out_template(model).format(1)
    return model, tokenizer, module, tiny_model_dir


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(1)
    docs = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 30))) for _ in range(N_DOCS)]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n")
    return path


def _sums(model, tokenizer, module, texts, max_length):
    """What the authors' SecondMoment holds after a run: ``sum_t k_t k_t^T`` (float64) and the count, from one
    unpadded forward per document (tokenized and cut as the job does), keys taken by a plain forward hook."""
    keys = []
    handle = get_module(model, module).register_forward_hook(lambda m, args, out: keys.append(args[0][0]))
    try:
        with torch.no_grad():
            for text in texts:
                model(torch.tensor([tokenizer(text, truncation=True, max_length=max_length)["input_ids"]]))
    finally:
        handle.remove()
    k = torch.cat(keys).double()
    return (k.T @ k).numpy(), k.shape[0]


def _write_reference(path: Path, mom2: np.ndarray, count: int, sample_size, precision="float32", **extra):
    """An ``.npz`` as the authors' ``tally`` caches it (``numpy.savez`` of ``CombinedStat.state_dict()`` plus
    ``sample_size``), written with numpy alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mom2.constructor": np.array("util.runningstats.SecondMoment()"), "mom2.count": np.array(count),
              "mom2.mom2": mom2.astype(precision), "sample_size": np.array(sample_size)}
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("mom2"), f.metadata()


def _reference_load(path):
    """How the authors' code reads it: ``CombinedStat.load_state_dict`` pulls the ``mom2.`` prefix,
    ``SecondMoment.load_state_dict`` takes ``int(count)`` and ``torch.from_numpy(mom2)``, ``moment() = mom2 / count``;
    ``tally`` compares ``sample_size``."""
    data = np.load(path)  # numpy's default: no pickle
    state = {k[len("mom2."):]: v for k, v in data.items() if k.startswith("mom2.")}
    return torch.from_numpy(state["mom2"]) / int(state["count"]), int(state["count"]), int(data["sample_size"])


def _no_computing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("computed")

    monkeypatch.setattr(SecondMomentJob, "training_step", boom)
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", boom)


# --------------------------------------------------------------------------------------------------------------------


def test_reference_file_imports_to_the_C_our_job_computes(lm, corpus, tmp_path, monkeypatch):
    model, tokenizer, module, model_dir = lm
    texts = stats_mod.load_corpus_texts(str(corpus))
    mom2, count = _sums(model, tokenizer, module, texts[:15], max_length=128)
    ref = _write_reference(tmp_path / "data" / "stats" / model_dir.name / "wikitext_stats" /
                           f"{module}_float32_mom2_15.npz", mom2, count, 15)

    written = import_reference_stats([ref], str(model_dir), corpus=str(corpus), cache_dir=tmp_path / "imported")
    target = stats_mod.stats_cache_path(model_dir.name, module, str(corpus), 15, "float32",
                                        cache_dir=tmp_path / "imported")
    assert written == {module: target}
    imported, meta = _read(target)
    assert meta["source"] == "imported" and meta["n_tokens"] == str(count) and meta["imported_layout"] == "rome"
    assert meta["imported_sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert meta["imported_file"] == str(ref.resolve()) and meta["max_length"] == "128"
    assert meta["reference_ds_name"] == "wikitext" and meta["reference_dataset"] == "wikitext:wikitext-103-raw-v1"
    assert {"tokenizer_sha256", "model_revision", "sample_sha256"} <= set(meta["unknown"].split(","))

    # The editors' lookup finds it (nothing computed); our job over the same documents gives the same C.
    _no_computing(monkeypatch)
    found = stats_mod.second_moment(model, tokenizer, module, str(corpus), n_samples=15,
                                    cache_dir=tmp_path / "imported")
    torch.testing.assert_close(found, imported.float())
    monkeypatch.undo()
    ours = stats_mod.second_moment(model, tokenizer, module, str(corpus), n_samples=15, batch_size=4,
                                   cache_dir=tmp_path / "computed")
    torch.testing.assert_close(found, ours, rtol=1e-5, atol=1e-7)
    _, ours_meta = _read(next((tmp_path / "computed").glob("*.safetensors")))
    assert ours_meta["n_tokens"] == str(count)
    # The same file also serves as stats_file directly.
    given = stats_mod.second_moment(model, tokenizer, module, "unused.txt", stats_file=ref)
    torch.testing.assert_close(given, ours, rtol=1e-5, atol=1e-7)


def test_prune_edit_stats_import_files_the_authors_wikipedia_stats_where_rome_finds_them(tiny_arch, tmp_path,
                                                                                         monkeypatch, capsys):
    model, tokenizer = load_causal_lm(f"tiny:{tiny_arch}"), load_tokenizer(f"tiny:{tiny_arch}")
    module = mlp_out_template(model).format(1)
    dim = input_dim(get_module(model, module))
    keys = torch.randn(3 * dim, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model_name = model.config._name_or_path.replace("/", "_")  # ROME's folder name
    ref = _write_reference(tmp_path / model_name / "wikipedia_stats" / f"{module}_float32_mom2_777.npz",
                           (keys.T @ keys).numpy(), 3 * dim, 777)

    cli_main(["stats", "import", str(ref), "--model", f"tiny:{tiny_arch}"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{module}: ") and line.endswith(f"(imported from {ref})")
    target = Path(line.split(": ", 1)[1].split(" (imported")[0])
    assert target == stats_mod.stats_cache_path(Path(model.config._name_or_path).name, module, REFERENCE_CORPUS, 777,
                                                "float32")
    moment, meta = _read(target)
    assert meta["corpus"] == REFERENCE_CORPUS and meta["dataset_id"] == "wikimedia/wikipedia"
    assert meta["reference_dataset"] == "wikipedia:20200501.en" and "20200501.en" in meta["note"]
    torch.testing.assert_close(moment.double(), keys.T @ keys / (3 * dim))

    # ROME with the presets' corpus, n_samples and dtype reads it: no job, no hub.
    _no_computing(monkeypatch)
    editor = ROME(layer=1, mom2_corpus=REFERENCE_CORPUS, mom2_n_samples=777, mom2_dtype="float32",
                  context_templates=["{}"])
    editor.setup(model, tokenizer)
    key = torch.randn(dim, dtype=torch.float64)
    torch.testing.assert_close(editor._solve_mom2(key), torch.linalg.solve(moment.double(), key))

    cli_main(["stats", "import", str(ref), "--model", f"tiny:{tiny_arch}"])  # the same file again: nothing to do
    assert _read(target)[1] == meta


def test_export_is_what_the_reference_loads_and_imports_back_to_the_same_C_and_metadata(lm, corpus, tmp_path,
                                                                                          capsys):
    model, tokenizer, module, model_dir = lm
    computed = stats_mod.second_moment(model, tokenizer, module, str(corpus), n_samples=12, cache_dir=tmp_path / "a")
    cache_file = next((tmp_path / "a").glob("*.safetensors"))
    _, meta = _read(cache_file)
    capsys.readouterr()

    cli_main(["stats", "export", "--model", str(model_dir), "--modules", module, "--corpus", str(corpus),
              "--n_samples", "12", "--cache_dir", str(tmp_path / "a"), "--out", str(tmp_path / "data"),
              "--ds_name", "docs"])
    out = reference_path(tmp_path / "data", model_dir.name, "docs", module, "float32", 12)
    assert capsys.readouterr().out.strip() == f"{cache_file} -> {out}"
    assert out.name == f"{module}_float32_mom2_12.npz" and out.parent.name == "docs_stats"
    data = np.load(out, allow_pickle=False)
    assert str(data["mom2.constructor"]) == "util.runningstats.SecondMoment()"
    assert data["mom2.mom2"].dtype == np.float32 and int(data["mom2.count"]) == int(meta["n_tokens"])
    moment, count, sample_size = _reference_load(out)
    assert (count, sample_size) == (int(meta["n_tokens"]), 12)
    torch.testing.assert_close(moment.float(), computed, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"exists; pass overwrite=True"):
        export_reference_stats([cache_file], tmp_path / "data", ds_name="docs")
    with pytest.raises(ValueError, match=r"no dataset name for corpus 'docs.txt'; give ds_name"):
        export_reference_stats([cache_file], tmp_path / "elsewhere")

    written = import_reference_stats([out], str(model_dir), corpus=str(corpus), cache_dir=tmp_path / "b")
    back, back_meta = _read(written[module])
    torch.testing.assert_close(back.float(), computed, rtol=1e-6, atol=1e-8)
    imported_fields = {"source", "imported_file", "imported_sha256", "imported_layout"}
    assert {k: v for k, v in back_meta.items() if k not in imported_fields} == {
        k: v for k, v in meta.items() if k not in imported_fields}
    assert back_meta["source"] == "imported" and meta["source"] == "computed"
    # Filed as something else than its provenance says: refused, naming the field.
    with pytest.raises(ValueError, match=r"differs from what it would be filed as \(dtype: 'float32' in the file, "
                                         r"'float64' here\)"):
        import_reference_stats([out], str(model_dir), corpus=str(corpus), dtype="float64", cache_dir=tmp_path / "c")


def _rewrite_metadata(path, **changes):
    moment, meta = _read(path)
    save_file({"mom2": moment}, str(path), metadata=dict(meta, **changes))


def test_a_cached_C_of_other_provenance_is_refused_naming_the_field(lm, corpus, tmp_path, monkeypatch, capsys):
    model, tokenizer, module, model_dir = lm
    kwargs = dict(n_samples=10, cache_dir=tmp_path)
    stats_mod.second_moment(model, tokenizer, module, str(corpus), **kwargs)
    path = next(tmp_path.glob("*.safetensors"))
    _, meta = _read(path)
    assert meta["tokenizer_sha256"] == stats_mod.tokenizer_sha256(tokenizer)

    _rewrite_metadata(path, tokenizer_sha256="0" * 64)
    with pytest.raises(ValueError, match=r"\(tokenizer_sha256: '0000.*' in the file, '[0-9a-f.]+' requested\).*"
                                         r"recompute=True.*--recompute.*delete the file"):
        stats_mod.second_moment(model, tokenizer, module, str(corpus), **kwargs)
    _rewrite_metadata(path, tokenizer_sha256=meta["tokenizer_sha256"], model_revision="1" * 40)
    monkeypatch.setattr(model.config, "_commit_hash", "2" * 40, raising=False)
    with pytest.raises(stats_mod.StatsProvenanceError, match=r"model_revision: '1111.*' in the file, '2222.*'") as err:
        stats_mod.second_moment(model, tokenizer, module, str(corpus), **kwargs)
    assert set(err.value.differences) == {"model_revision"}
    # Through the command line: one line naming the field and the remedy.
    monkeypatch.undo()
    _rewrite_metadata(path, max_length="64")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["stats", "--model", str(model_dir), "--modules", module, "--corpus", str(corpus), "--n_samples",
                  "10", "--cache_dir", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "max_length: '64' in the file, '128' requested" in capsys.readouterr().err
    # recompute replaces it.
    stats_mod.second_moment(model, tokenizer, module, str(corpus), recompute=True, **kwargs)
    moment, rewritten = _read(path)
    assert rewritten == meta
    # A file from before these fields were recorded is not refused for lacking them.
    older = {k: v for k, v in meta.items() if k not in ("tokenizer_sha256", "dataset_id", "sample_sha256", "source",
                                                         "forward_precision", "model_dtype")}
    save_file({"mom2": moment}, str(path), metadata=older)
    monkeypatch.setattr(SecondMomentJob, "training_step", lambda *a, **k: pytest.fail("recomputed"))
    assert torch.equal(stats_mod.second_moment(model, tokenizer, module, str(corpus), **kwargs), moment.float())


def test_an_imported_C_is_compared_on_what_the_import_could_know(lm, corpus, tmp_path):
    model, tokenizer, module, model_dir = lm
    dim = input_dim(get_module(model, module))
    eye = np.eye(dim) * 50
    ref = _write_reference(tmp_path / "x" / "wikitext_stats" / f"{module}_float64_mom2_10.npz", eye, 50, 10)
    # Unknown: the tokenizer, the model revision - not compared. Known: the truncation length the authors used.
    import_reference_stats([ref], str(model_dir), corpus=str(corpus), max_length=64, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"max_length: '64' in the file, '128' requested"):
        stats_mod.second_moment(model, tokenizer, module, str(corpus), n_samples=10, dtype="float64",
                                cache_dir=tmp_path)
    import_reference_stats([ref], str(model_dir), corpus=str(corpus), cache_dir=tmp_path, overwrite=True)
    got = stats_mod.second_moment(model, tokenizer, module, str(corpus), n_samples=10, dtype="float64",
                                  cache_dir=tmp_path)
    torch.testing.assert_close(got, torch.eye(dim))
    # Another file for the same cache entry is not filed over it silently.
    other = _write_reference(tmp_path / "y" / "wikitext_stats" / ref.name, eye * 2, 50, 10)
    with pytest.raises(ValueError, match=r"already holds statistics of .* \(source: imported\); pass overwrite=True"):
        import_reference_stats([other], str(model_dir), corpus=str(corpus), cache_dir=tmp_path)


def test_bad_reference_files_are_refused_naming_the_file_and_the_key(lm, tmp_path):
    model, _, module, model_dir = lm
    folder = tmp_path / "m" / "wikitext_stats"
    name = f"{module}_float32_mom2_10.npz"
    dim = input_dim(get_module(model, module))

    def refused(path, match, **kwargs):
        with pytest.raises(ValueError, match=match):
            import_reference_stats([path], str(model_dir), **kwargs)

    folder.mkdir(parents=True)
    no_keys = folder / name
    np.savez(no_keys, mean=np.zeros(3))
    refused(no_keys, rf"{no_keys}: no key 'mom2.mom2' .*holds \['mean'\]")
    square = _write_reference(tmp_path / "sq" / "wikitext_stats" / name, np.zeros((3, 4)), 10, 10)
    refused(square, rf"{square}: key 'mom2.mom2' has shape \(3, 4\); expected a square matrix")
    wrong = _write_reference(tmp_path / "dim" / "wikitext_stats" / name, np.eye(dim + 1), 10, 10)
    refused(wrong, rf"{wrong}: key 'mom2.mom2' has shape \({dim + 1}, {dim + 1}\), but {module} takes inputs of "
                   rf"dimension {dim}")
    pickled = tmp_path / "pk" / "wikitext_stats" / name
    pickled.parent.mkdir(parents=True)
    np.savez(pickled, **{"mom2.mom2": np.array([{"a": 1}], dtype=object), "mom2.count": np.array(1)})
    refused(pickled, rf"{pickled}: key 'mom2.mom2' is a pickled object array, refused")
    zero = _write_reference(tmp_path / "zero" / "wikitext_stats" / name, np.eye(dim), 0, 10)
    refused(zero, rf"{zero}: key 'mom2.count' is .*expected a positive whole number")
    nan = _write_reference(tmp_path / "nan" / "wikitext_stats" / name, np.full((dim, dim), np.nan), 5, 10)
    refused(nan, rf"{nan}: key 'mom2.mom2' holds values that are not finite")
    sample = _write_reference(tmp_path / "n" / "wikitext_stats" / name, np.eye(dim), 5, 11)
    refused(sample, rf"{sample}: key 'sample_size' is 11, but n_samples=10")
    text = folder / f"{module}_float32_mom2_12.npz"
    text.write_text("not an archive")
    refused(text, rf"{text}: not a numpy .npz archive")
    odd = tmp_path / "stats.npz"
    _write_reference(odd, np.eye(dim), 5, 10)
    refused(odd, rf"{odd}: the name is not in the reference layout")
    half = _write_reference(tmp_path / "h" / "wikitext_stats" / f"{module}_float16_mom2_10.npz", np.eye(dim), 5, 10,
                            precision="float16")
    refused(half, rf"{half}: the sums are in float16; the cache holds float32 or float64")
    unknown_ds = _write_reference(tmp_path / "m" / "books_stats" / name, np.eye(dim), 5, 10)
    refused(unknown_ds, r"cannot tell the corpus: the folder names dataset 'books'.*give the corpus")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        import_reference_stats([tmp_path / "missing.npz"], str(model_dir))
    with pytest.raises(ValueError, match=rf"{square}: key 'mom2.mom2' has shape \(3, 4\)"):
        read_reference_file(square)


def test_reference_names():
    name = parse_reference_path("data/stats/gpt2-xl/wikipedia_stats/"
                                "transformer.h.17.mlp.c_proj_float32_mom2_100000.npz")
    assert (name.model_name, name.ds_name, name.layer_name, name.precision, name.to_collect, name.sample_size,
            name.batch_tokens) == ("gpt2-xl", "wikipedia", "transformer.h.17.mlp.c_proj", "float32", ("mom2",), 100000,
                                   None)
    # The authors' code writes "_t{batch_tokens}" without the f-string: the literal text is in their file names.
    literal = parse_reference_path("s/EleutherAI_gpt-j-6B/wikitext_stats/"
                                   "transformer.h.5.mlp.fc_out_float64_mean-mom2_t{batch_tokens}_1000.npz")
    assert (literal.model_name, literal.to_collect, literal.batch_tokens, literal.sample_size) == (
        "EleutherAI_gpt-j-6B", ("mean", "mom2"), "{batch_tokens}", 1000)
    assert parse_reference_path("model.layers.4.mlp.down_proj_float32_mom2_t512.npz").batch_tokens == 512
    assert parse_reference_path("model.layers.4.mlp.down_proj_float32_mom2-norm_mean.npz").sample_size is None
    path = reference_path("data/stats", "gpt2-xl", "wikipedia", "transformer.h.17.mlp.c_proj", "float32", 100000)
    assert str(path) == "data/stats/gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz"
    literal_name = reference_path("d", "m", "w", "l", "float32", 10, batch_tokens=512).name
    assert literal_name == "l_float32_mom2_t{batch_tokens}_10.npz"
    with pytest.raises(ValueError, match=r"expected 'mom2'"):
        parse_reference_path("x/w_stats/transformer.h.1.mlp.c_proj_float32_mean_10.npz")


def test_provenance_of_a_computed_file(lm, corpus, tmp_path):
    model, tokenizer, module, _ = lm
    texts = stats_mod.load_corpus_texts(str(corpus))
    digest = ""
    for text in texts[:9]:
        digest = chain_digest(digest, text)
    metas = []
    for batch_size in (2, 5):  # the digest is of the documents in stream order: batches and windows do not matter
        stats_mod.second_moment(model, tokenizer, module, str(corpus), n_samples=9, batch_size=batch_size,
                                cache_dir=tmp_path / str(batch_size))
        metas.append(_read(next((tmp_path / str(batch_size)).glob("*.safetensors")))[1])
    assert metas[0] == metas[1]
    meta = metas[0]
    assert meta["sample_sha256"] == digest and meta["source"] == "computed"
    assert meta["tokenizer_sha256"] == stats_mod.tokenizer_sha256(tokenizer)
    assert meta["forward_precision"] == "model" and meta["model_dtype"] == "float32"
    assert meta["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    # A hub corpus spec is recorded in its parts.
    hub = stats_mod.cache.expected_metadata("m", module, "wikitext:wikitext-103-raw-v1:validation@abc123", 5,
                                            "float32", 128)
    assert (hub["dataset_id"], hub["dataset_config"], hub["dataset_split"], hub["dataset_revision"]) == (
        "wikitext", "wikitext-103-raw-v1", "validation", "abc123")
    reference = stats_mod.cache.expected_metadata("m", module, REFERENCE_CORPUS, 5, "float32", 128)
    assert (reference["dataset_id"], reference["dataset_config"], reference["dataset_split"]) == (
        "wikimedia/wikipedia", "20231101.en", "train")
    assert "dataset_revision" not in reference  # not pinned: nothing to compare


def test_tokenizer_hash_is_stable_and_sees_a_changed_vocabulary(tiny_model_dir):
    first, second = load_tokenizer(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    assert stats_mod.tokenizer_sha256(first) == stats_mod.tokenizer_sha256(second)
    second.add_tokens(["zqxjv"])
    assert stats_mod.tokenizer_sha256(first) != stats_mod.tokenizer_sha256(second)
