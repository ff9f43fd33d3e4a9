"""MEMIT on tiny GPT-2 (Conv1D, in x out) and tiny LLaMA (Linear, out x in): the batch edit, its algebra, its hygiene,
the editing loop with PRUNE, and the configs.

The tiny models are random-init. Every edited prompt puts the subject last, so the hidden state written at the
subject's last token reaches the next-token prediction directly; the targets are single tokens of the tiny tokenizer,
chosen so that before the edit the true target is the more likely one on both architectures.
"""

import pytest
import torch
import yaml

from prune_lightning.data import EditRequest
from prune_lightning.editors import MEMIT, MEMIT_PRESETS, Editor, LowRankUpdate, second_moment
from prune_lightning.editors.value import fact_representations
from prune_lightning.models import get_module, get_parameter, load_causal_lm, load_tokenizer
from conftest import UpdatesWritten, edited_names, new_vs_true_margin

REQUESTS = [
    EditRequest(prompt="The favourite sport of {}", subject="Danielle Darrieux", target_new="piano",
                target_true="tennis", case_id=0),
    EditRequest(prompt="The home town of {}", subject="Toko Yasuda", target_new="Berlin", target_true="soccer",
                case_id=1),
    EditRequest(prompt="The hometown of {}", subject="Michael Jordan", target_new="Tokyo", target_true="Berlin",
                case_id=2),
    EditRequest(prompt="The language of {}", subject="Albert Einstein", target_new="Japanese", target_true="German",
                case_id=3),
]
LAYERS = [0, 1]
# lambda sized for the tiny models' 176-256 dimensional keys (the papers' 15000-20000 suit keys of 6400-11008).
FAST = dict(layers=LAYERS, v_num_grad_steps=20, mom2_update_weight=10.0, clamp_norm_factor=4.0,
            context_template_lengths=((5, 2),))


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def edited(lm, tiny_corpus):
    """One MEMIT batch of four facts, statistics from the shipped tiny corpus; the model's state around the call."""
    model, tokenizer = lm
    editor = MEMIT(mom2_corpus=str(tiny_corpus), mom2_n_samples=200, **FAST)
    editor.setup(model, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    updates = editor.compute_update(model, tokenizer, REQUESTS)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    return editor, updates, before, after


def _keys(model, tokenizer, module, request, groups):
    """Independent reference for a key: the module's input at the subject's last token, averaged within each group
    of templates, then over the groups (MEMIT's compute_ks.py)."""
    return torch.stack([_flat_key(model, tokenizer, module, request, group) for group in groups]).mean(dim=0)


def _flat_key(model, tokenizer, module, request, templates):
    rows = []
    for template in templates:
        text = template.format(request.rendered_prompt)
        end = text.index(request.subject) + len(request.subject)
        index = len(tokenizer(text[:end])["input_ids"]) - 1
        captured = {}
        handle = module.register_forward_pre_hook(lambda _m, args: captured.update(x=args[0][0, index].detach()))
        try:
            with torch.no_grad():
                model(torch.tensor([tokenizer(text)["input_ids"]]))
        finally:
            handle.remove()
        rows.append(captured["x"].float())
    return torch.stack(rows).mean(dim=0)


def _no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------------------------------------
# the batch edit works
# --------------------------------------------------------------------------------------------------------------------


def test_batch_makes_every_new_target_win(lm, edited):
    model, tokenizer = lm
    editor, updates, _, _ = edited
    before = [new_vs_true_margin(model, tokenizer, r) for r in REQUESTS]
    assert all(m > 0 for m in before), before  # the true targets are the likelier ones before the edit
    with UpdatesWritten(model, updates):
        after = [new_vs_true_margin(model, tokenizer, r) for r in REQUESTS]
    assert all(m < 0 for m in after), (before, after)
    assert editor.last_metrics["loss"] < editor.last_metrics["loss_init"]
    assert [t.case_id for t in editor.last_trace] == [0, 1, 2, 3]


def test_targets_are_reached_at_the_last_edited_layer(lm, edited, tiny_arch):
    """After all layers are written, the last edited layer's output is much closer to the targets z = h + delta."""
    model, tokenizer = lm
    editor, updates, _, _ = edited
    targets = torch.stack([t.target for t in editor.last_trace])
    deltas = torch.stack([t.delta for t in editor.last_trace])
    top = get_module(model, ("transformer.h.{}" if tiny_arch == "gpt2" else "model.layers.{}").format(LAYERS[-1]))
    with UpdatesWritten(model, updates):
        reached = fact_representations(model, tokenizer, top, REQUESTS, "subject_last")
    remaining = (targets - reached).norm(dim=1)
    assert (remaining < 0.5 * deltas.norm(dim=1)).all(), (remaining, deltas.norm(dim=1))
    # The residual still missing shrinks from layer to layer.
    norms = [t.residual_norm for t in editor.last_layers]
    assert norms[0] == pytest.approx(float(deltas.norm(dim=1).mean()), rel=1e-4)
    assert norms[1] < norms[0]


# --------------------------------------------------------------------------------------------------------------------
# the updates: names, layout, rank and the least-squares algebra
# --------------------------------------------------------------------------------------------------------------------


def test_parameter_names_and_protocol(lm, tiny_arch):
    model, _ = lm
    editor = MEMIT(layers=[0, 2, 3])
    assert isinstance(editor, Editor)
    assert editor.parameter_names(model) == edited_names(tiny_arch, [0, 2, 3])


def test_each_layers_update_has_rank_at_most_the_batch_size(lm, edited, tiny_arch):
    model, _ = lm
    _, updates, _, _ = edited
    assert list(updates) == edited_names(tiny_arch, LAYERS)
    in_dim = 256 if tiny_arch == "gpt2" else 176
    for name, update in updates.items():
        param = get_parameter(model, name)
        assert isinstance(update, LowRankUpdate)
        assert update.rank == len(REQUESTS) and update.shape == tuple(param.shape)
        assert update.left.dtype == update.right.dtype == torch.float32
        rank = torch.linalg.matrix_rank(update.dense()).item()
        assert 1 <= rank <= len(REQUESTS)
        # GPT-2's Conv1D stores (in, out): the key factor is the left one there, the right one for nn.Linear.
        key_factor = update.left if tiny_arch == "gpt2" else update.right
        assert key_factor.shape == (in_dim, len(REQUESTS))


def test_update_solves_memits_normal_equations(lm, edited, tiny_corpus, tiny_arch):
    """dW_l (lambda C_l + K K^T) = R_l K^T for every layer, with C_l recomputed here, in float64."""
    model, tokenizer = lm
    editor, updates, _, _ = edited
    deltas = torch.stack([t.delta for t in editor.last_trace]).T.double()
    for j, (trace, name) in enumerate(zip(editor.last_layers, edited_names(tiny_arch, LAYERS))):
        module_name = name.removesuffix(".weight")
        mom2 = second_moment(model, tokenizer, module_name, str(tiny_corpus), n_samples=200).double()
        dense = updates[name].dense().double()
        dw = dense.T if tiny_arch == "gpt2" else dense  # (out, in)
        keys, residual = trace.keys.double(), trace.residual.double()
        lhs = dw @ (editor.mom2_update_weight * mom2 + keys @ keys.T)
        rhs = residual @ keys.T
        assert (lhs - rhs).norm() / rhs.norm() < 1e-4
        if j == 0:  # nothing is written yet: the first layer takes 1/L of each delta
            torch.testing.assert_close(residual, deltas / len(LAYERS), rtol=1e-4, atol=1e-5)


def test_keys_are_grouped_averages_and_later_layers_see_the_earlier_updates(lm, edited, tiny_arch):
    model, tokenizer = lm
    editor, updates, _, _ = edited
    # The plain prompt is a group of its own, the generated templates another (compute_ks.py).
    templates = [["{}"], editor.context_templates[1:]]
    assert editor.context_templates[0] == "{}" and len(templates[1]) == 2
    names = edited_names(tiny_arch, LAYERS)
    first, second = (get_module(model, n.removesuffix(".weight")) for n in names)
    request = REQUESTS[2]
    k0 = _keys(model, tokenizer, first, request, templates)
    torch.testing.assert_close(editor.last_layers[0].keys[:, 2], k0, rtol=1e-4, atol=1e-5)
    k1_unedited = _keys(model, tokenizer, second, request, templates)
    with UpdatesWritten(model, {names[0]: updates[names[0]]}):
        k1_after_first = _keys(model, tokenizer, second, request, templates)
    torch.testing.assert_close(editor.last_layers[1].keys[:, 2], k1_after_first, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(editor.last_layers[1].keys[:, 2], k1_unedited, rtol=1e-3, atol=1e-4)


def test_identity_stats_files_equal_no_adjustment(lm, tiny_arch, tmp_path):
    """stats_file as a template and as a mapping reach each layer; identity statistics equal mom2_adjustment=False."""
    from safetensors.torch import save_file

    model, tokenizer = lm
    in_dim = 256 if tiny_arch == "gpt2" else 176
    for layer in LAYERS:
        save_file({"mom2": torch.eye(in_dim)}, str(tmp_path / f"eye{layer}.safetensors"))
    settings = {**FAST, "v_num_grad_steps": 3}
    template = MEMIT(stats_file=str(tmp_path / "eye{}.safetensors"), **settings)
    mapping = MEMIT(stats_file={layer: str(tmp_path / f"eye{layer}.safetensors") for layer in LAYERS}, **settings)
    plain = MEMIT(mom2_adjustment=False, **settings)
    results = [e.compute_update(model, tokenizer, REQUESTS[:2]) for e in (template, mapping, plain)]
    for name in edited_names(tiny_arch, LAYERS):
        torch.testing.assert_close(results[0][name].dense(), results[2][name].dense(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(results[1][name].dense(), results[2][name].dense(), rtol=1e-5, atol=1e-7)
    save_file({"mom2": torch.eye(in_dim + 3)}, str(tmp_path / "wrong0.safetensors"))
    with pytest.raises(ValueError, match=rf"expected shape \({in_dim}, {in_dim}\)"):
        MEMIT(stats_file=str(tmp_path / "wrong{}.safetensors"), **settings).setup(model, tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# hygiene: the model is left as found, also after a failure; runs are reproducible
# --------------------------------------------------------------------------------------------------------------------


def test_compute_update_leaves_the_model_unchanged(lm, edited):
    model, _ = lm
    _, _, before, after = edited
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())


def test_failure_after_a_layer_was_written_restores_the_weights(lm, monkeypatch):
    model, tokenizer = lm
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = MEMIT(mom2_adjustment=False, **{**FAST, "v_num_grad_steps": 2})
    calls = []
    original_solve = torch.linalg.solve

    def failing_solve(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second layer's solve: the first layer's update is in the weight by now
            raise RuntimeError("injected failure")
        return original_solve(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve", failing_solve)
    with pytest.raises(RuntimeError, match="injected failure"):
        editor.compute_update(model, tokenizer, REQUESTS[:2])
    assert len(calls) == 2
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert _no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())


def test_same_settings_give_bit_identical_updates_in_train_mode_too(lm):
    model, tokenizer = lm
    settings = dict(mom2_adjustment=False, **{**FAST, "v_num_grad_steps": 3})
    first = MEMIT(**settings).compute_update(model, tokenizer, REQUESTS[:2])
    model.train()
    try:
        second = MEMIT(**settings).compute_update(model, tokenizer, REQUESTS[:2])
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    for name, update in first.items():
        assert torch.equal(update.left, second[name].left) and torch.equal(update.right, second[name].right)


def test_bfloat16_model_gets_float32_factors(tiny_model_dir, tiny_arch):
    model = load_causal_lm(str(tiny_model_dir), dtype="bfloat16")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    weights = {n: get_parameter(model, n).detach().clone() for n in edited_names(tiny_arch, LAYERS)}
    editor = MEMIT(mom2_adjustment=False, **{**FAST, "v_num_grad_steps": 2})
    updates = editor.compute_update(model, tokenizer, REQUESTS[:2])
    for name, weight in weights.items():
        update = updates[name]
        assert update.left.dtype == update.right.dtype == torch.float32
        assert update.shape == tuple(weight.shape) and torch.isfinite(update.dense()).all()
        assert torch.equal(get_parameter(model, name), weight)


# --------------------------------------------------------------------------------------------------------------------
# the editing loop: sequential MEMIT batches with PRUNE and the condition-number monitor
# --------------------------------------------------------------------------------------------------------------------


def test_sequential_batches_under_the_lightning_loop(tiny_model_dir, tiny_arch, tiny_corpus, counterfact_file,
                                                     make_trainer):
    from conftest import read_csv_metrics

    from prune_lightning import EditDataModule, SequentialEditor
    from prune_lightning.callbacks import ConditionNumberMonitor, PRUNECallback

    editor = MEMIT(mom2_corpus=str(tiny_corpus), mom2_n_samples=200, **{**FAST, "v_num_grad_steps": 10})
    module = SequentialEditor(model=str(tiny_model_dir), editor=editor, save_edited_model=False, verbose=False)
    data = EditDataModule(source=str(counterfact_file(6)), batch_size=3)
    names = module.edited_parameter_names
    assert names == edited_names(tiny_arch, LAYERS)
    w_start = {n: get_parameter(module.model, n).detach().clone() for n in names}
    prune = PRUNECallback(alpha=100.0, mode="online")
    trainer = make_trainer(callbacks=[ConditionNumberMonitor(every_n_edits=1), prune])
    trainer.fit(module, datamodule=data)

    assert trainer.global_step == 2  # two batches of three facts
    assert module.requests_edited == 6
    for name in names:
        entry = module.edit_registry[name]
        assert torch.equal(entry.w0, w_start[name])
        w_end = get_parameter(module.model, name).detach()
        assert not torch.allclose(w_end, w_start[name])
        torch.testing.assert_close(entry.delta.dense(), w_end - entry.w0, rtol=0, atol=1e-6)
        assert entry.delta.rank <= 6  # two rank-3 batches, restrained in factor form
    rows = read_csv_metrics(trainer)
    header = set(rows[0])
    short = names[-1].removesuffix(".weight")
    assert f"condition/{short}/kappa" in header and f"prune/{short}/restrained" in header
    assert "edit/loss" in header and f"edit/residual_norm/layer_{LAYERS[-1]}" in header


# --------------------------------------------------------------------------------------------------------------------
# configuration: arguments, presets, the CLI and the shipped configs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=[]), r"layers must be a non-empty list.*\[\]"),
        (dict(layers=[2, 1]), r"strictly increasing.*\[2, 1\]"),
        (dict(layers=[1, 1]), r"strictly increasing.*\[1, 1\]"),
        (dict(layers=[-1, 0]), r"layer indices >= 0.*\[-1, 0\]"),
        (dict(mom2_update_weight=0), "mom2_update_weight must be positive, got 0"),
        (dict(mom2_n_samples=0), "mom2_n_samples.*got 0"),
        (dict(v_lr=-1.0), "v_lr must be positive, got -1.0"),
        (dict(fact_token="first"), "fact_token.*'first'"),
        (dict(layers=[0, 1], stats_file="one.safetensors"), r"one\.safetensors.*single path"),
        (dict(layers=[0, 1], stats_file={0: "a.safetensors"}), r"no file for layers \[1\]"),
        (dict(context_templates=["no placeholder"]), "exactly one"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MEMIT(**kwargs)


def test_unknown_modules_and_loss_layer_are_reported(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match=r"does not exist.*Modules:.*(c_proj|down_proj)"):
        MEMIT(layers=[1, 99]).parameter_names(model)
    with pytest.raises(ValueError, match="v_loss_layer=9 is out of range"):
        MEMIT(layers=[0, 1], v_loss_layer=9, mom2_adjustment=False).setup(model, tokenizer)
    with pytest.raises(ValueError, match="outputs .* features"):  # an MLP in-projection does not write the stream
        template = "transformer.h.{}.mlp.c_fc" if model.config.model_type == "gpt2" else "model.layers.{}.mlp.up_proj"
        MEMIT(layers=[0, 1], module_template=template, mom2_adjustment=False).setup(model, tokenizer)


def test_presets_hold_the_published_hyperparameters():
    expected = {
        "gpt2-xl": dict(layers=[13, 14, 15, 16, 17], clamp_norm_factor=0.75, mom2_update_weight=20000.0,
                        v_loss_layer=47, v_lr=0.5, v_num_grad_steps=20, v_weight_decay=0.5, kl_factor=0.0625,
                        mom2_n_samples=100000, mom2_adjustment=True),
        "llama2-7b": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=4.0, mom2_update_weight=15000.0,
                          v_loss_layer=31, v_lr=0.5, v_num_grad_steps=25, v_weight_decay=1e-3, kl_factor=0.0625,
                          mom2_n_samples=100000, mom2_adjustment=True),
    }
    expected["llama3-8b"] = expected["llama2-7b"]
    assert set(MEMIT_PRESETS) == set(expected)
    for name, values in expected.items():
        editor = MEMIT.preset(name)
        for key, value in values.items():
            assert getattr(editor, key) == value, (name, key)
    assert MEMIT.preset("gpt2-xl", layers=[3, 4]).layers == [3, 4]
    with pytest.raises(ValueError, match="Unknown MEMIT preset 'gpt5'"):
        MEMIT.preset("gpt5")


_CONFIGS = {
    "configs/gpt2-xl/memit-counterfact.yaml": ("gpt2-xl", []),
    "configs/llama2-7b/memit-counterfact.yaml": ("llama2-7b", []),
    "configs/llama3-8b/memit-counterfact.yaml": ("llama3-8b", []),
    "configs/gpt2-xl/memit-prune-counterfact.yaml": ("gpt2-xl", ["ConditionNumberMonitor", "PRUNECallback"]),
    "configs/llama3-8b/memit-prune-counterfact.yaml": ("llama3-8b", ["ConditionNumberMonitor", "PRUNECallback"]),
}


@pytest.mark.parametrize("path", sorted(_CONFIGS))
def test_shipped_configs_parse_and_spell_out_the_presets(path, repo_dir, monkeypatch, capsys):
    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    preset, callbacks = _CONFIGS[path]
    editor = config["model"]["editor"]
    assert editor["class_path"] == "prune_lightning.editors.MEMIT"
    for key, value in MEMIT_PRESETS[preset].items():
        got = editor["init_args"][key]
        assert (list(map(list, got)) if key == "context_template_lengths" else got) == \
            (list(map(list, value)) if key == "context_template_lengths" else value), (path, key)
    assert config["data"]["batch_size"] == 100
    assert [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"] or []] == callbacks


def test_cli_switches_the_editor_to_memit(repo_dir, monkeypatch, capsys):
    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/tiny.yaml", "--model.editor=MEMIT", "--model.editor.layers=[0,1]",
              "--model.editor.mom2_update_weight=10", "--data.batch_size=4", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    editor = config["model"]["editor"]
    assert editor["class_path"] == "prune_lightning.editors.MEMIT"
    assert editor["init_args"]["layers"] == [0, 1] and editor["init_args"]["mom2_update_weight"] == 10.0
    assert config["data"]["batch_size"] == 4


def test_fit_tiny_memit_config(repo_dir, tmp_path, monkeypatch, capsys):
    """configs/tiny-memit.yaml end to end: two MEMIT batches of four facts with PRUNE, offline."""
    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    main(["fit", "--config", "configs/tiny-memit.yaml", "--model.editor.init_args.v_num_grad_steps=5",
          f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.enable_progress_bar=false"])
    output = capsys.readouterr()
    assert "case 0 " in output.out and "(+3 more)" in output.out and "case 4 " in output.out
    run_dir = tmp_path / "logs" / "version_0"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "prune/transformer.h.1.mlp.c_proj/restrained" in header
    assert "condition/transformer.h.0.mlp.c_proj/kappa" in header
    assert (run_dir / "edited_model" / "model.safetensors").exists()
