"""Second-moment statistics: the value against a direct computation, the cache, user-provided statistics, corpora."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import prune_lightning.stats as stats_mod
from prune_lightning.editors import second_moment
from prune_lightning.stats import SecondMomentJob
from prune_lightning.models import get_module, load_causal_lm, load_tokenizer, mlp_out_template

DOCS = [
    "The capital of France is Paris.",
    "",
    "Michael Jordan plays basketball for Chicago.",
    "   ",
    "Water boils at one hundred degrees.",
    "Toko Yasuda plays the guitar in a band that tours in Japan and in Spain every summer.",
    "Rome is in Italy.",
    "A",
    "The Space Needle is in Seattle, and the Eiffel Tower is in Paris.",
    "Apple was founded by Steve Jobs.",
    "This line is past n_samples and must not count.",
]
N_SAMPLES = 8  # the first 8 non-empty lines


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    module_name = mlp_out_template(model).format(1)
    return model, tokenizer, module_name


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCS) + "\n")
    return path


def _reference_moment(model, tokenizer, module_name, texts):
    """E[k k^T] from one unpadded forward pass per document, keys collected by a plain forward hook."""
    keys = []
    handle = get_module(model, module_name).register_forward_hook(lambda m, args, out: keys.append(args[0][0]))
    try:
        with torch.no_grad():
            for text in texts:
                model(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        handle.remove()
    k = torch.cat(keys).double()
    return (k.T @ k / k.shape[0]).float(), k.shape[0]


def _count_module_calls(model, module_name):
    calls = []
    handle = get_module(model, module_name).register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls, handle


def test_matches_direct_computation_and_caches_with_metadata(lm, corpus, tmp_path):
    model, tokenizer, module_name = lm
    texts = [d for d in DOCS if d.strip()][:N_SAMPLES]
    expected, n_tokens = _reference_moment(model, tokenizer, module_name, texts)

    cache = tmp_path / "stats"
    moment = second_moment(model, tokenizer, module_name, str(corpus), n_samples=N_SAMPLES, batch_size=3,
                           cache_dir=cache, model_id="tiny-test")
    in_dim = expected.shape[0]
    assert moment.shape == (in_dim, in_dim) and moment.dtype == torch.float32
    torch.testing.assert_close(moment, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(moment, moment.T)

    files = list(cache.iterdir())
    assert [f.name for f in files] == [f"tiny-test__{module_name}__corpus.txt__{N_SAMPLES}__float32.safetensors"]
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["mom2"]
    assert meta["model_id"] == "tiny-test" and meta["module"] == module_name
    assert meta["corpus"] == "corpus.txt" and meta["corpus_sha256"] and meta["n_samples"] == str(N_SAMPLES) and meta["dtype"] == "float32"
    assert meta["n_tokens"] == str(n_tokens) and meta["n_documents"] == str(N_SAMPLES)


def test_batch_size_and_float64_do_not_change_the_result(lm, corpus, tmp_path):
    model, tokenizer, module_name = lm
    one = second_moment(model, tokenizer, module_name, str(corpus), n_samples=N_SAMPLES, batch_size=1,
                        cache_dir=tmp_path / "a")
    many = second_moment(model, tokenizer, module_name, str(corpus), n_samples=N_SAMPLES, batch_size=8,
                         dtype="float64", cache_dir=tmp_path / "b")
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-7)
    assert next((tmp_path / "b").iterdir()).name.endswith("__float64.safetensors")


def test_second_call_reuses_the_cache(lm, corpus, tmp_path, tiny_model_dir, monkeypatch):
    model, tokenizer, module_name = lm
    kwargs = dict(n_samples=N_SAMPLES, cache_dir=tmp_path)
    calls, handle = _count_module_calls(model, module_name)
    try:
        first = second_moment(model, tokenizer, module_name, str(corpus), **kwargs)
        assert len(calls) > 0
        # The model id defaults to the checkpoint's directory name.
        assert [f.name.split("__")[0] for f in tmp_path.glob("*.safetensors")] == [tiny_model_dir.name]
        calls.clear()
        second = second_moment(model, tokenizer, module_name, str(corpus), **kwargs)
        assert calls == []  # no forward pass reached the module
    finally:
        handle.remove()
    assert torch.equal(first, second)

    def boom(*args, **kw):
        raise AssertionError("recomputed")

    # The statistics job is what computes: a cached matrix never reaches its training step.
    monkeypatch.setattr(SecondMomentJob, "training_step", boom)
    assert torch.equal(second_moment(model, tokenizer, module_name, str(corpus), **kwargs), first)
    with pytest.raises(AssertionError, match="recomputed"):
        second_moment(model, tokenizer, module_name, str(corpus), recompute=True, **kwargs)


def test_changed_corpus_is_refused_naming_the_field_and_recomputed_on_request(lm, corpus, tmp_path):
    model, tokenizer, module_name = lm
    first = second_moment(model, tokenizer, module_name, str(corpus), n_samples=3, cache_dir=tmp_path)
    corpus.write_text("Completely different text about the ocean.\nAnd another line.\nAnd a third one here.\n")
    # The file at the request's path holds C of the old content: refused, never used or silently replaced.
    with pytest.raises(ValueError, match=r"does not match this request \(corpus_sha256: '[0-9a-f]+\.\.\.[0-9a-f]+' in "
                                         r"the file, '[0-9a-f.]+' requested\).*recompute=True"):
        second_moment(model, tokenizer, module_name, str(corpus), n_samples=3, cache_dir=tmp_path)
    second = second_moment(model, tokenizer, module_name, str(corpus), n_samples=3, cache_dir=tmp_path,
                           recompute=True)
    assert not torch.allclose(first, second)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # same name, rewritten
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    assert torch.equal(second_moment(model, tokenizer, module_name, str(corpus), n_samples=3, cache_dir=tmp_path),
                       second)


def test_user_stats_file_is_used_and_checked(lm, tmp_path):
    model, tokenizer, module_name = lm
    weight = get_module(model, module_name).weight
    in_dim = weight.shape[0] if type(get_module(model, module_name)).__name__ == "Conv1D" else weight.shape[1]
    a = torch.randn(in_dim, in_dim, generator=torch.Generator().manual_seed(0))
    given = a @ a.T / in_dim

    st = tmp_path / "mom2.safetensors"
    save_file({"mom2": given, "other": torch.zeros(2)}, str(st))
    torch.testing.assert_close(second_moment(model, tokenizer, module_name, "unused.txt", stats_file=st), given)
    only = tmp_path / "only.safetensors"
    save_file({"whatever": given}, str(only))
    torch.testing.assert_close(second_moment(model, tokenizer, module_name, "unused.txt", stats_file=only), given)
    npy = tmp_path / "mom2.npy"
    np.save(npy, given.double().numpy())
    torch.testing.assert_close(second_moment(model, tokenizer, module_name, "unused.txt", stats_file=npy), given)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"mom2": torch.eye(in_dim + 1)}, str(wrong))
    message = rf"shape \({in_dim + 1}, {in_dim + 1}\).*expected shape \({in_dim}, {in_dim}\)"
    with pytest.raises(ValueError, match=message):
        second_moment(model, tokenizer, module_name, "unused.txt", stats_file=wrong)
    two = tmp_path / "two.safetensors"
    save_file({"a": given, "b": given.clone()}, str(two))
    with pytest.raises(ValueError, match="expected one named 'mom2'"):
        second_moment(model, tokenizer, module_name, "unused.txt", stats_file=two)
    with pytest.raises(ValueError, match="unsupported format '.pt'"):
        torch.save(given, tmp_path / "mom2.pt")
        second_moment(model, tokenizer, module_name, "unused.txt", stats_file=tmp_path / "mom2.pt")


def test_unknown_module_lists_names(lm, corpus, tmp_path):
    model, tokenizer, _ = lm
    with pytest.raises(ValueError, match=r"does not exist.*Modules:"):
        second_moment(model, tokenizer, "model.nothing.here", str(corpus), cache_dir=tmp_path)


def test_corpus_formats(tmp_path, monkeypatch):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "", "two", "three"])))
    assert stats_mod.load_corpus_texts(str(jsonl), n_samples=2) == ["one", "two"]
    as_json = tmp_path / "docs.json"
    as_json.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert stats_mod.load_corpus_texts(str(as_json)) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1: field 'text'"):
        stats_mod.load_corpus_texts(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        stats_mod.load_corpus_texts(str(tmp_path / "missing.txt"))

    # A hub corpus "id:config" goes through datasets.load_dataset (stubbed here: tests are offline).
    import datasets

    seen = {}

    def fake_load_dataset(name, config, split, streaming=False, revision=None):
        seen.update(name=name, config=config, split=split, streaming=streaming, revision=revision)
        return datasets.Dataset.from_dict({"text": ["", " = Title = ", "first line", "", "second line"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert stats_mod.load_corpus_texts("wikitext:wikitext-103-raw-v1", n_samples=2) == [" = Title = ", "first line"]
    assert seen == {"name": "wikitext", "config": "wikitext-103-raw-v1", "split": "train", "streaming": True,
                    "revision": None}
    # A revision after "@" pins the dataset (and, as part of the spec, is recorded in the cache's metadata).
    assert stats_mod.load_corpus_texts("wikitext:wikitext-103-raw-v1@abc123", n_samples=1) == [" = Title = "]
    assert seen["revision"] == "abc123" and seen["config"] == "wikitext-103-raw-v1"


def test_cache_path_is_slugged():
    path = stats_mod.stats_cache_path("meta-llama/Llama 2", "model.layers.5.mlp.down_proj",
                                      "wikitext:wikitext-103-raw-v1", 100000, "float32", cache_dir="/c")
    assert path.name == (
        "meta-llama-Llama-2__model.layers.5.mlp.down_proj__wikitext-wikitext-103-raw-v1__100000__float32.safetensors"
    )


def test_shipped_tiny_corpus(tiny_corpus):
    texts = stats_mod.load_corpus_texts(str(tiny_corpus))
    assert 150 <= len(texts) <= 300
    assert tiny_corpus.stat().st_size < 30_000
