"""AlphaEdit on tiny GPT-2 (Conv1D, in x out) and tiny LLaMA (Linear, out x in): the null-space projection and its
cache, the defining property (the preserved keys keep their values), the update against its formula over sequential
batches, the accumulated keys as editor state (checkpoint, resume, fresh runs, DDP), composition with PRUNE, RECT and
the condition-number monitor, and the configs.

The tiny models are random-init; every edited prompt puts the subject last (see tests/test_memit.py). The projection
threshold and ``l2`` are sized for the tiny models' keys (norms of 5-9; the published 0.02 and 10 suit GPT-2 XL's and
LLaMA's), so that the null space holds a fair share of the keys and AlphaEdit edits as well as MEMIT does here.
"""

import math

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from prune_lightning import EditDataModule, SequentialEditor
from prune_lightning.data import EditRequest
from prune_lightning.editors import ALPHAEDIT_PRESETS, MEMIT, AlphaEdit, Editor, LowRankUpdate, second_moment
from prune_lightning.editors.nullspace import load_or_compute_projection, null_space_projection
from prune_lightning.models import default_cache_dir, get_module, get_parameter, load_causal_lm, load_tokenizer
from conftest import edited_names, read_csv_metrics, target_nll

REQUESTS = [
    EditRequest(prompt="The favourite sport of {}", subject="Danielle Darrieux", target_new="piano",
                target_true="tennis", case_id=0),
    EditRequest(prompt="The home town of {}", subject="Toko Yasuda", target_new="Berlin", target_true="soccer",
                case_id=1),
    EditRequest(prompt="The hometown of {}", subject="Michael Jordan", target_new="Tokyo", target_true="Berlin",
                case_id=2),
    EditRequest(prompt="The language of {}", subject="Albert Einstein", target_new="Japanese", target_true="German",
                case_id=3),
    EditRequest(prompt="The hometown of {}", subject="Lena Omarson", target_new="Paris", target_true="Rome",
                case_id=4),
    EditRequest(prompt="The favourite sport of {}", subject="Ivan Petrason", target_new="soccer",
                target_true="tennis", case_id=5),
]
LAYERS = [0, 1]
# Null spaces of 153 and 174 of 256 dimensions (GPT-2, layers 0 and 1) and 105 and 97 of 176 (LLaMA) at these
# thresholds of the tiny corpus's C.
THRESHOLD = {"gpt2": 0.05, "llama": 0.1}
FAST = dict(layers=LAYERS, v_num_grad_steps=20, clamp_norm_factor=4.0, l2=0.1, context_template_lengths=((5, 2),))
# Sentences whose keys are the preserved ones of the defining-property test (fewer tokens than key dimensions).
PRESERVED = ["The cat sat on the mat.", "Paris is the capital of France.", "Rain fell all night long.",
             "She plays the piano every day.", "Numbers add up."]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _arch(model) -> str:
    return "gpt2" if model.config.model_type == "gpt2" else "llama"


def _alphaedit(model, tiny_corpus, **overrides) -> AlphaEdit:
    settings = dict(FAST, nullspace_threshold=THRESHOLD[_arch(model)], mom2_corpus=str(tiny_corpus),
                    mom2_n_samples=200)
    settings.update(overrides)
    return AlphaEdit(**settings)


def _out_in(update: LowRankUpdate, arch: str) -> torch.Tensor:
    """The update as an (out, in) matrix, float64 (GPT-2's Conv1D stores (in, out))."""
    dense = update.dense().double()
    return dense.T if arch == "gpt2" else dense


def _projector(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """Independent reference for P: the singular vectors of C with singular value below the threshold (what the
    reference's get_project does), U_0 U_0^T, in float64."""
    u, s, _ = torch.linalg.svd(moment.double())
    null = u[:, s < threshold]
    return null @ null.T


def _write(model, updates) -> None:
    with torch.no_grad():
        for name, update in updates.items():
            param = get_parameter(model, name)
            param.add_(update.dense().to(param.dtype))


def _inputs_at_every_token(model, tokenizer, module, texts) -> torch.Tensor:
    """The module's input at every token of the texts, (d_in, n), float64: the preserved keys K_0."""
    rows = []
    handle = module.register_forward_pre_hook(lambda _m, args: rows.append(args[0][0].detach().double()))
    try:
        with torch.no_grad():
            for text in texts:
                model(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        handle.remove()
    return torch.cat(rows).T


# --------------------------------------------------------------------------------------------------------------------
# the projection and its cache
# --------------------------------------------------------------------------------------------------------------------


def test_projection_keeps_the_eigenvectors_below_the_threshold():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    moment = keys @ keys.T / 5  # rank 5: a 7-dimensional null space
    projection, dim = null_space_projection(moment, 1e-6)
    assert dim == 7
    torch.testing.assert_close(projection, _projector(moment, 1e-6), rtol=0, atol=1e-10)
    torch.testing.assert_close(projection @ projection, projection, rtol=0, atol=1e-10)
    assert (projection @ keys).norm() < 1e-10 * keys.norm()
    # The threshold is absolute: between two eigenvalues it keeps exactly those below.
    values = torch.linalg.eigvalsh(moment)  # ascending: 7 zeros (to rounding), then the 5 nonzero ones
    above = float(values[9])  # the third smallest nonzero eigenvalue
    projection, dim = null_space_projection(moment, above * 1.0001)
    assert dim == 10
    torch.testing.assert_close(projection, _projector(moment, above * 1.0001), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="square matrix"):
        null_space_projection(torch.zeros(3, 4), 0.1)
    with pytest.raises(ValueError, match="nullspace_threshold must be a positive number, got 0"):
        null_space_projection(moment, 0)


def test_projection_is_cached_beside_c_with_its_provenance(lm, tiny_corpus, monkeypatch):
    from safetensors import safe_open

    model, tokenizer = lm
    editor = _alphaedit(model, tiny_corpus)
    editor.setup(model, tokenizer)
    stats_dir = default_cache_dir() / "stats"
    for layer, name in zip(LAYERS, edited_names(_arch(model), LAYERS)):
        module = name.removesuffix(".weight")
        threshold = THRESHOLD[_arch(model)]
        files = sorted(stats_dir.glob(f"*{module}__tiny-corpus.txt__200__float32__nullspace-{threshold:g}__float32*"))
        assert len(files) == 1, files
        (path,) = files
        moment_file = path.with_name(path.name.split("__nullspace")[0] + ".safetensors")
        assert moment_file.exists()  # beside C
        with safe_open(str(path), framework="pt") as f:
            metadata, stored = f.metadata(), f.get_tensor("projection")
        with safe_open(str(moment_file), framework="pt") as f:
            moment_metadata = f.metadata()
        for key in ("model_id", "module", "corpus", "n_samples", "dtype", "max_length", "n_tokens"):
            assert metadata[key] == moment_metadata[key], key
        assert metadata["module"] == module and metadata["corpus"] == "tiny-corpus.txt"
        assert metadata["n_samples"] == "200" and metadata["threshold"] == repr(THRESHOLD[_arch(model)])
        assert int(metadata["null_space_dim"]) == editor.null_space_dims[layer] > 0
        assert torch.equal(stored, editor.projections[layer])
        moment = second_moment(model, tokenizer, module, str(tiny_corpus), n_samples=200)
        torch.testing.assert_close(stored.double(), _projector(moment, THRESHOLD[_arch(model)]), rtol=0, atol=1e-5)
    assert not list(stats_dir.glob(".*tmp*"))  # written atomically

    # A second run reads the cache: no eigendecomposition, the same projections.
    def no_eigh(*args, **kwargs):
        raise AssertionError("the cached projection should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "eigh", no_eigh)
        again = _alphaedit(model, tiny_corpus)
        again.setup(model, tokenizer)
    for layer in LAYERS:
        assert torch.equal(again.projections[layer], editor.projections[layer])
    # Another threshold is another file; a file whose C digest does not match is recomputed, with a warning.
    other = _alphaedit(model, tiny_corpus, nullspace_threshold=THRESHOLD[_arch(model)] / 2)
    other.setup(model, tokenizer)
    assert all(other.null_space_dims[layer] < editor.null_space_dims[layer] for layer in LAYERS)
    first, second = torch.diag(torch.tensor([1.0, 1.0, 0.1, 0.1])), torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.1]))
    path = stats_dir / "two-moments.safetensors"
    assert load_or_compute_projection(first, 0.5, cache_path=path, provenance={"model_id": "x"})[1] == 2
    with pytest.warns(UserWarning, match="does not match this C"):
        assert load_or_compute_projection(second, 0.5, cache_path=path)[1] == 1  # recomputed and rewritten
    with pytest.warns(UserWarning, match="does not match this C"):
        projection, dim = load_or_compute_projection(first, 0.5, cache_path=path)
    assert dim == 2 and torch.equal(projection, torch.diag(torch.tensor([0.0, 0.0, 1.0, 1.0])))


# --------------------------------------------------------------------------------------------------------------------
# the defining property and the formula
# --------------------------------------------------------------------------------------------------------------------


def test_updates_leave_the_preserved_keys_outputs_unchanged(tiny_model_dir, tmp_path):
    """With P from C = K_0 K_0^T / n: ||dW K_0|| <= 1e-4 ||dW|| ||K_0|| for every layer and batch (float64), and the
    model's logits on the preserved sentences do not move, while the edited targets become likelier."""
    from safetensors.torch import save_file

    model = load_causal_lm(str(tiny_model_dir), dtype="float64")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    arch = _arch(model)
    names = edited_names(arch, LAYERS)
    preserved, smallest, noise = {}, [], []
    for layer, name in zip(LAYERS, names):
        keys = _inputs_at_every_token(model, tokenizer, get_module(model, name.removesuffix(".weight")), PRESERVED)
        n, rank = keys.shape[1], int(torch.linalg.matrix_rank(keys))
        assert rank == n < keys.shape[0]  # a null space to project onto
        moment = (keys @ keys.T / n).float()
        save_file({"mom2": moment}, str(tmp_path / f"c{layer}.safetensors"))
        values = torch.linalg.eigvalsh(moment.double()).flip(0)  # descending: n nonzero ones, then rounding noise
        smallest.append(float(values[n - 1]))
        noise.append(float(values[n:].abs().max()))
        preserved[layer] = keys
    assert min(smallest) > 1e3 * max(noise)
    threshold = math.sqrt(min(smallest) * max(noise))  # between the nonzero eigenvalues and the noise, every layer
    editor = AlphaEdit(stats_file=str(tmp_path / "c{}.safetensors"), nullspace_threshold=threshold,
                       state_dtype="float64", cache_projections=False, **FAST)
    editor.setup(model, tokenizer)
    assert editor.null_space_dims == {layer: preserved[layer].shape[0] - preserved[layer].shape[1] for layer in LAYERS}
    with torch.no_grad():
        logits_before = [model(torch.tensor([tokenizer(t)["input_ids"]])).logits for t in PRESERVED]
    for batch in (REQUESTS[:2], REQUESTS[2:4]):  # the second batch solves with K_p K_p^T of the first
        nll_before = [target_nll(model, tokenizer, r.rendered_prompt, r.target_new) for r in batch]
        updates = editor.compute_update(model, tokenizer, batch)
        for layer, name in zip(LAYERS, names):
            dw, keys = _out_in(updates[name], arch), preserved[layer]
            assert dw.norm() > 0
            assert (dw @ keys).norm() <= 1e-4 * dw.norm() * keys.norm()
        _write(model, updates)
        nll_after = [target_nll(model, tokenizer, r.rendered_prompt, r.target_new) for r in batch]
        assert all(a < b - 0.5 for a, b in zip(nll_after, nll_before)), (nll_before, nll_after)
    with torch.no_grad():
        logits_after = [model(torch.tensor([tokenizer(t)["input_ids"]])).logits for t in PRESERVED]
    for before, after in zip(logits_before, logits_after):
        assert (after - before).abs().max() <= 1e-5 * before.abs().max()


def test_update_follows_the_formula_over_sequential_batches(lm, tiny_corpus):
    """dW = R K_1^T P (K_p K_p^T P + K_1 K_1^T P + l2 I)^{-1} per layer, with P from C recomputed here and K_p the
    keys of the earlier batch; the editor's K_p K_p^T is the sum of every batch's K K^T."""
    import copy

    model, tokenizer = lm
    model = copy.deepcopy(model)
    arch = _arch(model)
    editor = _alphaedit(model, tiny_corpus)
    editor.setup(model, tokenizer)
    names = edited_names(arch, LAYERS)
    projections = {
        layer: _projector(second_moment(model, tokenizer, name.removesuffix(".weight"), str(tiny_corpus),
                                        n_samples=200), THRESHOLD[arch])
        for layer, name in zip(LAYERS, names)
    }
    earlier = {layer: torch.zeros_like(p) for layer, p in projections.items()}  # K_p K_p^T
    for batch in (REQUESTS[:2], REQUESTS[2:4]):
        updates = editor.compute_update(model, tokenizer, batch)
        for trace, name in zip(editor.last_layers, names):
            p, keys, residual = projections[trace.layer], trace.keys.double(), trace.residual.double()
            eye = torch.eye(p.shape[0], dtype=torch.float64)
            expected = residual @ keys.T @ p @ torch.linalg.inv(earlier[trace.layer] @ p + keys @ keys.T @ p
                                                                + FAST["l2"] * eye)
            got = _out_in(updates[name], arch)
            assert isinstance(updates[name], LowRankUpdate) and updates[name].rank == len(batch)
            assert (got - expected).norm() <= 1e-4 * expected.norm()
            earlier[trace.layer] = earlier[trace.layer] + keys @ keys.T
        _write(model, updates)
    assert editor.keys_accumulated == 4
    for layer in LAYERS:
        torch.testing.assert_close(editor.key_gram[layer].double(), earlier[layer], rtol=1e-5, atol=1e-5)


def test_earlier_batches_keys_move_less_than_under_memit(tiny_model_dir, tiny_corpus):
    """Three sequential batches: each write makes its own targets likelier, and the later writes change the edited
    matrices' outputs at the first batch's keys much less than MEMIT's writes with the same settings do."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    batches = [REQUESTS[0:2], REQUESTS[2:4], REQUESTS[4:6]]
    moved = {}
    for kind in ("alphaedit", "memit"):
        model = load_causal_lm(str(tiny_model_dir))
        arch = _arch(model)
        names = edited_names(arch, LAYERS)
        common = dict(layers=LAYERS, v_num_grad_steps=20, clamp_norm_factor=4.0, context_template_lengths=((5, 2),),
                      mom2_corpus=str(tiny_corpus), mom2_n_samples=200)
        if kind == "alphaedit":
            editor = AlphaEdit(nullspace_threshold=THRESHOLD[arch], l2=FAST["l2"], **common)
        else:
            editor = MEMIT(mom2_update_weight=10.0, **common)
        editor.setup(model, tokenizer)
        for b, batch in enumerate(batches):
            before = [target_nll(model, tokenizer, r.rendered_prompt, r.target_new) for r in batch]
            updates = editor.compute_update(model, tokenizer, batch)
            _write(model, updates)
            after = [target_nll(model, tokenizer, r.rendered_prompt, r.target_new) for r in batch]
            assert all(a < b_ - 1.0 for a, b_ in zip(after, before)), (kind, b, before, after)
            if b == 0:
                first_keys = {t.layer: t.keys.double() for t in editor.last_layers}
                first_weights = {n: get_parameter(model, n).detach().double().clone() for n in names}
        moved[kind] = []
        for layer, name in zip(LAYERS, names):
            change = get_parameter(model, name).detach().double() - first_weights[name]
            change = change.T if arch == "gpt2" else change
            moved[kind].append(float((change @ first_keys[layer]).norm()))
    assert all(a < 0.5 * m for a, m in zip(moved["alphaedit"], moved["memit"])), moved


# --------------------------------------------------------------------------------------------------------------------
# the editor's state: checkpoints, resume, fresh runs, several processes
# --------------------------------------------------------------------------------------------------------------------


def _fit(source, root, make_trainer, editor=None, ckpt_path=None, checkpoint=False, callbacks=(), tiny_corpus=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    editor = editor or AlphaEdit(**{**FAST, "v_num_grad_steps": 5}, nullspace_threshold=THRESHOLD["gpt2"],
                                 mom2_corpus=str(tiny_corpus), mom2_n_samples=200)
    module = SequentialEditor(model="tiny:gpt2", editor=editor, save_edited_model=False, verbose=False)
    callbacks = list(callbacks)
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                         filename="{step}"))
    trainer = make_trainer(callbacks, root=root, enable_checkpointing=checkpoint)
    trainer.fit(module, datamodule=EditDataModule(source=str(source), batch_size=2), ckpt_path=ckpt_path)
    return module


def _weights(module) -> dict:
    return {n: get_parameter(module.model, n).detach().clone() for n in module.edited_parameter_names}


def test_resume_from_a_mid_run_checkpoint_restores_the_accumulated_keys(tmp_path, counterfact_file, make_trainer,
                                                                        tiny_corpus):
    source = counterfact_file(6)
    full = _fit(source, tmp_path / "full", make_trainer, checkpoint=True, tiny_corpus=tiny_corpus)
    assert full.editor.keys_accumulated == 6
    checkpoint_path = tmp_path / "full" / "ckpt" / "step=1.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    state = checkpoint["editor_state"]
    assert state["keys_accumulated"] == 2 and sorted(state["key_gram"]) == LAYERS
    assert all(gram.norm() > 0 for gram in state["key_gram"].values())

    resumed = _fit(source, tmp_path / "resumed", make_trainer, ckpt_path=checkpoint_path, tiny_corpus=tiny_corpus)
    assert resumed.requests_edited == 6 and resumed.editor.keys_accumulated == 6
    for name, weight in _weights(full).items():
        assert torch.equal(get_parameter(resumed.model, name), weight), name
    for layer in LAYERS:
        assert torch.equal(resumed.editor.key_gram[layer], full.editor.key_gram[layer])

    # Without the accumulated keys the resumed run ends elsewhere: they are what makes it the same run.
    del checkpoint["editor_state"]
    torch.save(checkpoint, tmp_path / "stateless.ckpt")
    forgetful = _fit(source, tmp_path / "forgetful", make_trainer, ckpt_path=tmp_path / "stateless.ckpt",
                     tiny_corpus=tiny_corpus)
    assert forgetful.editor.keys_accumulated == 4
    assert any(not torch.allclose(get_parameter(forgetful.model, n), w, atol=1e-6) for n, w in _weights(full).items())


def test_two_fits_in_one_process_do_not_share_state(tmp_path, counterfact_file, make_trainer, tiny_corpus):
    """The same editor object in a second run starts from zero: the run ends as a run of its own does."""
    stream = counterfact_file(4, seed=3)
    alone = _fit(stream, tmp_path / "alone", make_trainer, tiny_corpus=tiny_corpus)
    editor = AlphaEdit(**{**FAST, "v_num_grad_steps": 5}, nullspace_threshold=THRESHOLD["gpt2"],
                       mom2_corpus=str(tiny_corpus), mom2_n_samples=200)
    _fit(counterfact_file(6, seed=1), tmp_path / "first", make_trainer, editor=editor)
    assert editor.keys_accumulated == 6
    second = _fit(stream, tmp_path / "second", make_trainer, editor=editor)
    assert editor.keys_accumulated == 4
    for name, weight in _weights(alone).items():
        assert torch.equal(get_parameter(second.model, name), weight), name
    for layer in LAYERS:
        assert torch.equal(editor.key_gram[layer], alone.editor.key_gram[layer])


def test_a_skipped_batch_leaves_the_accumulated_keys_as_they_were(tmp_path, counterfact_file, make_trainer,
                                                                   tiny_corpus):
    """With on_bad_update="skip" a batch whose update is not written does not count among the preserved edits."""
    stream = counterfact_file(4, seed=3)
    first_batch_only = _fit(counterfact_file(2, seed=3), tmp_path / "one", make_trainer, tiny_corpus=tiny_corpus)

    editor = AlphaEdit(**{**FAST, "v_num_grad_steps": 5}, nullspace_threshold=THRESHOLD["gpt2"],
                       mom2_corpus=str(tiny_corpus), mom2_n_samples=200)
    real = editor.compute_update

    def second_batch_diverges(model, tokenizer, requests):
        updates = real(model, tokenizer, requests)
        if editor.keys_accumulated > 2:  # the second batch: its update holds a NaN
            for update in updates.values():
                update.left[0, 0] = float("nan")
        return updates

    editor.compute_update = second_batch_diverges
    module = SequentialEditor(model="tiny:gpt2", editor=editor, save_edited_model=False, verbose=False,
                              on_bad_update="skip")
    with pytest.warns(UserWarning, match="skipped"):
        make_trainer(root=tmp_path / "skip").fit(module, datamodule=EditDataModule(source=str(stream), batch_size=2))
    assert module.requests_skipped == 2 and editor.keys_accumulated == 2
    for layer in LAYERS:
        torch.testing.assert_close(editor.key_gram[layer], first_batch_only.editor.key_gram[layer], rtol=1e-5,
                                   atol=1e-5)


def test_state_of_other_layers_is_refused():
    editor = AlphaEdit(layers=[0, 1])
    with pytest.raises(ValueError, match=r"state is for layers \[3, 4\], but this editor edits \[0, 1\]"):
        editor.load_state_dict({"layers": [3, 4], "keys_accumulated": 0, "key_gram": {}})
    assert Editor().state_dict() == {} and Editor().load_state_dict({}) is None  # the protocol's default


class _SaveEditorState(Callback):
    """Saves each rank's editor state and edited weights at the end of fit (ddp_spawn returns only rank 0's)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save({"state": pl_module.editor.state_dict(), "weights": _weights(pl_module)},
                   f"{self.out_dir}/rank{trainer.global_rank}-of{trainer.world_size}.pt")


@pytest.mark.slow  # multi-process (the marker main registers for `pytest -m "not slow"`)
def test_ddp_ranks_accumulate_the_same_keys_as_one_process(tmp_path, counterfact_file, make_trainer, tiny_corpus):
    source = counterfact_file(4)
    for devices in (1, 2):
        strategy = {"strategy": "ddp_spawn"} if devices > 1 else {}
        _fit_ddp(source, tmp_path, devices, strategy, tiny_corpus)
    single = torch.load(tmp_path / "rank0-of1.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"rank{r}-of2.pt", weights_only=False) for r in range(2)]
    assert [r["state"]["keys_accumulated"] for r in ranks] == [4, 4]
    for layer in LAYERS:
        assert torch.equal(ranks[0]["state"]["key_gram"][layer], ranks[1]["state"]["key_gram"][layer])
        torch.testing.assert_close(ranks[0]["state"]["key_gram"][layer], single["state"]["key_gram"][layer],
                                   rtol=1e-4, atol=1e-4)
    for name, weight in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name])
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=0, atol=1e-5)


def _fit_ddp(source, root, devices, strategy, tiny_corpus):
    from lightning.pytorch import Trainer

    from prune_lightning import TRAINER_DEFAULTS

    editor = AlphaEdit(**{**FAST, "v_num_grad_steps": 5}, nullspace_threshold=THRESHOLD["gpt2"],
                       mom2_corpus=str(tiny_corpus), mom2_n_samples=200)
    module = SequentialEditor(model="tiny:gpt2", editor=editor, save_edited_model=False, verbose=False)
    trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": devices, **strategy,
                         "default_root_dir": root, "logger": False, "enable_progress_bar": False,
                         "enable_checkpointing": False, "callbacks": [_SaveEditorState(str(root))]})
    trainer.fit(module, datamodule=EditDataModule(source=str(source), batch_size=2))


# --------------------------------------------------------------------------------------------------------------------
# composition with PRUNE, RECT and the condition-number monitor
# --------------------------------------------------------------------------------------------------------------------


def test_prune_and_the_monitor_act_on_alphaedits_writes_and_keep_the_projection(tmp_path, counterfact_file,
                                                                                 make_trainer, tiny_corpus):
    """PRUNE restrains the singular values of dW = W - W_0, not its right singular vectors, which AlphaEdit's writes
    keep in P's range: the restrained update still leaves the null space's complement alone, dW (I - P) = 0."""
    from prune_lightning.callbacks import ConditionNumberMonitor, PRUNECallback

    callbacks = [ConditionNumberMonitor(every_n_edits=1), PRUNECallback(alpha=100.0, mode="online")]
    module = _fit(counterfact_file(4), tmp_path, make_trainer, callbacks=callbacks, tiny_corpus=tiny_corpus)
    rows = read_csv_metrics(module.trainer)
    header = set(rows[0])
    assert {"edit/null_space_fraction/layer_0", "edit/preserved_edit_keys"} <= header
    for layer, name in zip(LAYERS, module.edited_parameter_names):
        short = name.removesuffix(".weight")
        assert {f"condition/{short}/kappa", f"condition/{short}/sigma_max_dW"} <= header
        assert sum(float(r[f"prune/{short}/restrained"]) for r in rows if r.get(f"prune/{short}/restrained")) > 0
        entry = module.edit_registry[name]
        delta = get_parameter(module.model, name).detach().double() - entry.w0.double()
        torch.testing.assert_close(entry.delta.dense().double(), delta, rtol=0, atol=1e-6)
        assert entry.delta.is_lowrank and entry.delta.rank <= 4  # two rank-2 batches, restrained as factors
        dw = delta.T  # tiny:gpt2's Conv1D stores (in, out)
        complement = torch.eye(dw.shape[1], dtype=torch.float64) - module.editor.projections[layer].double()
        assert (dw @ complement).norm() <= 1e-5 * dw.norm()
    assert callbacks[1].restraints == 2


def test_rect_acts_on_alphaedits_writes(tmp_path, counterfact_file, make_trainer, tiny_corpus):
    """RECT keeps the top entries by relative change (elementwise: unlike PRUNE, it leaves the projection's range)."""
    from prune_lightning.callbacks import RECTCallback

    rect = RECTCallback(ratio=0.5, mode="online")
    module = _fit(counterfact_file(4), tmp_path, make_trainer, callbacks=[rect], tiny_corpus=tiny_corpus)
    header = set(read_csv_metrics(module.trainer)[0])
    for name in module.edited_parameter_names:
        assert f"rect/{name.removesuffix('.weight')}/kept" in header
        entry = module.edit_registry[name]
        delta = get_parameter(module.model, name).detach() - entry.w0
        torch.testing.assert_close(entry.delta.dense(), delta, rtol=0, atol=1e-6)
        assert 0 < int((delta != 0).sum()) <= math.ceil(0.5 * delta.numel())
    assert rect.restraints == 2


# --------------------------------------------------------------------------------------------------------------------
# configuration: arguments, presets, the shipped configs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mom2_adjustment=False), "mom2_adjustment=False is not supported"),
        (dict(nullspace_threshold=0), "nullspace_threshold must be a positive number, got 0"),
        (dict(nullspace_threshold=-1e-2), "nullspace_threshold must be a positive number, got -0.01"),
        (dict(l2=0.0), r"l2 must be positive \(the solve needs it\), got 0.0"),
        (dict(state_dtype="float16"), "state_dtype must be one of.*'float16'"),
        (dict(layers=[2, 1]), r"strictly increasing.*\[2, 1\]"),
        (dict(layers=[]), r"layers must be a non-empty list.*\[\]"),
        (dict(layers=[0, 1], stats_file="one.safetensors"), r"one\.safetensors.*single path"),
        (dict(fact_token="first"), "fact_token.*'first'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlphaEdit(**kwargs)


def test_an_empty_null_space_is_reported(lm, tiny_corpus):
    model, tokenizer = lm
    with pytest.warns(UserWarning, match=r"null space is empty and the updates of .* will be zero"):
        _alphaedit(model, tiny_corpus, nullspace_threshold=1e-9).setup(model, tokenizer)


def test_presets_hold_the_published_hyperparameters():
    """hparams/AlphaEdit/{gpt2-xl, EleutherAI_gpt-j-6B, Llama3-8B}.json of jianghoucheng/AlphaEdit."""
    common = dict(fact_token="subject_last", kl_factor=0.0625, nullspace_threshold=2e-2, l2=10.0, v_weight_decay=0.5,
                  clamp_norm_factor=0.75, mom2_n_samples=100000, mom2_dtype="float32")
    expected = {
        "gpt2-xl": dict(common, layers=[13, 14, 15, 16, 17], v_num_grad_steps=20, v_lr=0.5, v_loss_layer=47),
        "gpt-j-6b": dict(common, layers=[3, 4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.5, v_loss_layer=27),
        "llama3-8b": dict(common, layers=[4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.1, v_loss_layer=31),
    }
    assert set(ALPHAEDIT_PRESETS) == set(expected)
    for name, values in expected.items():
        editor = AlphaEdit.preset(name)
        for key, value in values.items():
            assert getattr(editor, key) == value, (name, key)
        assert editor.context_template_lengths == ((10, 5),)
    with pytest.raises(ValueError, match="Unknown AlphaEdit preset 'gpt5'"):
        AlphaEdit.preset("gpt5")


_CONFIGS = {
    "configs/gpt2-xl/alphaedit-prune-counterfact.yaml": "gpt2-xl",
    "configs/llama3-8b/alphaedit-prune-counterfact.yaml": "llama3-8b",
}


@pytest.mark.parametrize("path", sorted(_CONFIGS))
def test_shipped_configs_parse_and_spell_out_the_presets(path, repo_dir, monkeypatch, capsys):
    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    editor = config["model"]["editor"]
    assert editor["class_path"] == "prune_lightning.editors.AlphaEdit"
    for key, value in ALPHAEDIT_PRESETS[_CONFIGS[path]].items():
        got = editor["init_args"][key]
        if key == "context_template_lengths":
            got, value = list(map(list, got)), list(map(list, value))
        assert got == value, (path, key)
    assert config["data"]["batch_size"] == 100 and config["data"]["limit"] == 2000
    names = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
    assert names == ["ConditionNumberMonitor", "PRUNECallback"]


def test_fit_tiny_alphaedit_config(repo_dir, tmp_path, monkeypatch, capsys):
    """configs/tiny-alphaedit.yaml end to end: two AlphaEdit batches of four facts with PRUNE, offline."""
    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    main(["fit", "--config", "configs/tiny-alphaedit.yaml", "--model.editor.init_args.v_num_grad_steps=5",
          f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.enable_progress_bar=false"])
    output = capsys.readouterr()
    assert "case 0 " in output.out and "(+3 more)" in output.out and "case 4 " in output.out
    run_dir = tmp_path / "logs" / "version_0"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "prune/transformer.h.1.mlp.c_proj/restrained" in header
    assert "condition/transformer.h.0.mlp.c_proj/kappa" in header
    assert "edit/null_space_fraction/layer_1" in header
    assert (run_dir / "edited_model" / "model.safetensors").exists()
