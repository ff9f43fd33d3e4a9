"""ROME on tiny GPT-2 (Conv1D, in x out) and tiny LLaMA (Linear, out x in): the edit, its shape, its math, its hygiene.

The tiny models are random-init, so facts are nearly uniform guesses. The edited prompt puts the subject last, where
the value written at the subject's last token reaches the next-token prediction directly; the targets are chosen so
that before the edit the true target is the more likely one on both architectures.
"""

import pytest
import torch

from prune_lightning.data import EditRequest
from prune_lightning.editors import ROME, ROME_PRESETS, Editor, LowRankUpdate, second_moment
from prune_lightning.models import get_module, get_parameter, load_causal_lm, load_tokenizer
from conftest import UpdatesWritten, edited_names, new_vs_true_margin

# Single-token targets of the tiny tokenizer; on both tiny models "tennis" is the likelier one before the edit.
REQUEST = EditRequest(prompt="The favourite sport of {}", subject="Danielle Darrieux", target_new="piano",
                      target_true="tennis", case_id=7)
OTHER_REQUEST = EditRequest(prompt="The home town of {}", subject="Toko Yasuda", target_new="Paris",
                            target_true="soccer", case_id=8)
# Prompts about other subjects (and one unrelated fact): the edit must leave their predictions nearly alone.
UNRELATED = ["The favourite sport of Michael Jordan", "Toko Yasuda plays the", "The capital of France is"]

FAST = dict(layer=1, v_num_grad_steps=40, context_template_lengths=((5, 4),))


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def edited(lm, tiny_corpus):
    """One ROME edit with statistics from the shipped tiny corpus; the model's state before and after the call."""
    model, tokenizer = lm
    editor = ROME(mom2_corpus=str(tiny_corpus), mom2_n_samples=200, **FAST)
    editor.setup(model, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    updates = editor.compute_update(model, tokenizer, [REQUEST])
    after = {k: v.clone() for k, v in model.state_dict().items()}
    return editor, updates, before, after


def _next_token_probs(model, tokenizer, prompt):
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1].float(), dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# the edit works, and stays local
# --------------------------------------------------------------------------------------------------------------------


def test_edit_makes_the_new_target_win(lm, edited):
    model, tokenizer = lm
    editor, updates, _, _ = edited
    before = new_vs_true_margin(model, tokenizer, REQUEST)
    assert before > 0  # the true target is the more likely one before the edit
    with UpdatesWritten(model, updates):
        after = new_vs_true_margin(model, tokenizer, REQUEST)
    assert after < 0, (before, after)
    assert before - after > 0.3
    assert editor.last_metrics["loss"] < editor.last_metrics["loss_init"] - 0.3


def test_unrelated_prompts_change_little(lm, edited):
    model, tokenizer = lm
    _, updates, _, _ = edited
    prompts = [REQUEST.rendered_prompt] + UNRELATED
    before = [_next_token_probs(model, tokenizer, p) for p in prompts]
    with UpdatesWritten(model, updates):
        after = [_next_token_probs(model, tokenizer, p) for p in prompts]
    tv = [0.5 * (a - b).abs().sum().item() for a, b in zip(after, before)]  # total-variation distance
    assert tv[0] > 0.01
    # A random-weight tiny model separates subjects less sharply than a trained one: about a third at worst.
    assert max(tv[1:]) < 0.5 * tv[0], tv
    assert sum(tv[1:]) / len(tv[1:]) < 0.3 * tv[0], tv


# --------------------------------------------------------------------------------------------------------------------
# the update: its name, shape, rank and the rank-one algebra
# --------------------------------------------------------------------------------------------------------------------


def test_parameter_names_and_protocol(lm, tiny_arch):
    model, _ = lm
    editor = ROME(layer=1)
    assert isinstance(editor, Editor)
    assert editor.parameter_names(model) == [edited_names(tiny_arch, [1])[0]]


def test_update_is_rank_one_in_the_parameters_layout(lm, edited, tiny_arch):
    model, _ = lm
    _, updates, _, _ = edited
    assert list(updates) == [edited_names(tiny_arch, [1])[0]]
    update = updates[edited_names(tiny_arch, [1])[0]]
    param = get_parameter(model, edited_names(tiny_arch, [1])[0])
    assert isinstance(update, LowRankUpdate) and update.rank == 1
    assert update.shape == tuple(param.shape)
    assert update.left.dtype == update.right.dtype == torch.float32
    dense = update.dense()
    assert dense.shape == param.shape
    assert torch.linalg.matrix_rank(dense).item() == 1
    # GPT-2's Conv1D stores (in, out): the key vector is the left factor there, the right one for nn.Linear.
    in_dim = 256 if tiny_arch == "gpt2" else 176
    key_factor = update.left if tiny_arch == "gpt2" else update.right
    assert key_factor.shape[0] == in_dim


def test_update_writes_value_at_key_and_spares_c_orthogonal_keys(lm, edited, tiny_corpus):
    """W' k = W k + residual at the plain prompt's key k; a key x with x^T C^{-1} k* = 0 keeps its value (checked
    through the module's own forward); the residual is the optimised delta (the site is the MLP's output)."""
    model, tokenizer = lm
    editor, updates, _, _ = edited
    (trace,) = editor.last_trace
    assert trace.case_id == REQUEST.case_id and trace.steps > 0
    module = get_module(model, editor.parameter_names(model)[0].removesuffix(".weight"))
    mom2 = second_moment(model, tokenizer, editor.parameter_names(model)[0].removesuffix(".weight"),
                         str(tiny_corpus), n_samples=200).double()
    key = trace.key.double()
    c_inv_key = torch.linalg.solve(mom2, key)
    x = torch.randn(key.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_perp = x - (x @ c_inv_key) / (key @ c_inv_key) * key
    probe = torch.stack([trace.key_plain.double(), x_perp]).float()
    with torch.no_grad():
        old = module(probe)
        with UpdatesWritten(model, updates):
            new = module(probe)
    torch.testing.assert_close(new[0] - old[0], trace.residual, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(old[0], new[0], atol=1e-4)
    torch.testing.assert_close(new[1], old[1], rtol=1e-4, atol=1e-5)
    assert (trace.residual - trace.delta).norm() <= 1e-4 * trace.delta.norm()


def test_without_mom2_the_key_factor_is_the_key(lm, tiny_arch):
    model, tokenizer = lm
    editor = ROME(mom2_adjustment=False, **{**FAST, "v_num_grad_steps": 3})
    update = next(iter(editor.compute_update(model, tokenizer, [REQUEST]).values()))  # setup runs lazily
    key_factor = (update.left if tiny_arch == "gpt2" else update.right)[:, 0]
    key = editor.last_trace[0].key
    cosine = torch.nn.functional.cosine_similarity(key_factor, key, dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-5)


def test_identity_stats_file_equals_no_adjustment(lm, tiny_arch, tmp_path):
    from safetensors.torch import save_file

    model, tokenizer = lm
    in_dim = 256 if tiny_arch == "gpt2" else 176
    save_file({"mom2": torch.eye(in_dim)}, str(tmp_path / "eye.safetensors"))
    settings = {**FAST, "v_num_grad_steps": 3}
    with_file = ROME(stats_file=str(tmp_path / "eye.safetensors"), **settings)
    without = ROME(mom2_adjustment=False, **settings)
    a = next(iter(with_file.compute_update(model, tokenizer, [REQUEST]).values()))
    b = next(iter(without.compute_update(model, tokenizer, [REQUEST]).values()))
    torch.testing.assert_close(a.dense(), b.dense(), rtol=1e-5, atol=1e-7)

    save_file({"mom2": torch.eye(in_dim + 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=rf"expected shape \({in_dim}, {in_dim}\)"):
        ROME(stats_file=str(tmp_path / "wrong.safetensors"), **settings).setup(model, tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# hygiene: the model is left as found, runs are reproducible, batches are sequential
# --------------------------------------------------------------------------------------------------------------------


def _no_hooks(model):
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def test_compute_update_leaves_the_model_unchanged(lm, edited):
    model, _ = lm
    _, _, before, after = edited
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())


def test_same_seed_gives_bit_identical_update(lm, edited, tiny_corpus):
    model, tokenizer = lm
    editor, updates, _, _ = edited
    again = ROME(mom2_corpus=str(tiny_corpus), mom2_n_samples=200, **FAST)  # statistics come from the cache now
    again.setup(model, tokenizer)
    assert again.context_templates == editor.context_templates
    repeat = again.compute_update(model, tokenizer, [REQUEST])
    for name, update in updates.items():
        assert torch.equal(repeat[name].left, update.left) and torch.equal(repeat[name].right, update.right)


def test_train_mode_is_restored_and_does_not_matter(lm):
    """Lightning puts the module in train mode; ROME must edit without dropout and restore the mode."""
    model, tokenizer = lm
    settings = dict(mom2_adjustment=False, **{**FAST, "v_num_grad_steps": 5})
    in_eval = next(iter(ROME(**settings).compute_update(model, tokenizer, [REQUEST]).values()))
    model.train()
    try:
        in_train = next(iter(ROME(**settings).compute_update(model, tokenizer, [REQUEST]).values()))
        assert all(m.training for m in model.modules())
    finally:
        model.eval()
    assert torch.equal(in_eval.dense(), in_train.dense())


def test_batch_of_two_is_rank_two_and_sequential(lm, edited, tiny_arch, tiny_corpus):
    model, tokenizer = lm
    editor, single, _, _ = edited
    name = edited_names(tiny_arch, [1])[0]
    weight = get_parameter(model, name).detach().clone()
    batch = editor.compute_update(model, tokenizer, [REQUEST, OTHER_REQUEST])
    update = batch[name]
    assert update.rank == 2 and update.shape == tuple(weight.shape)
    assert torch.linalg.matrix_rank(update.dense()).item() == 2
    assert torch.equal(get_parameter(model, name), weight)
    # The first request sees the unedited model: its factors are those of the single edit.
    assert torch.equal(update.left[:, :1], single[name].left) and torch.equal(update.right[:, :1], single[name].right)
    assert [t.case_id for t in editor.last_trace] == [7, 8]
    # The second request saw the first one's update: alone, it gets a different update.
    alone = editor.compute_update(model, tokenizer, [OTHER_REQUEST])[name]
    assert not torch.allclose(alone.dense(), update.left[:, 1:] @ update.right[:, 1:].T)
    # Both edits hold after writing the batch.
    with UpdatesWritten(model, batch):
        assert new_vs_true_margin(model, tokenizer, REQUEST) < 0


def test_failure_mid_batch_restores_weights_hooks_and_grads(lm, tiny_arch, monkeypatch):
    model, tokenizer = lm
    name = edited_names(tiny_arch, [1])[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    editor = ROME(mom2_adjustment=False, **{**FAST, "v_num_grad_steps": 3})
    calls = []
    original_step = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # 3 loop rounds take 2 steps: this is the second request, the first one written
            raise RuntimeError("injected failure")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(RuntimeError, match="injected failure"):
        editor.compute_update(model, tokenizer, [REQUEST, OTHER_REQUEST])
    assert len(calls) == 3
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), name
    assert _no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------------------


def test_unknown_layer_or_module_lists_existing_modules(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match=r"does not exist.*Modules:.*(c_proj|down_proj)"):
        ROME(layer=99).parameter_names(model)
    with pytest.raises(ValueError, match=r"does not exist.*Did you mean"):
        ROME(layer=1, module_template="transformer.h.{}.mlp.c_prj").parameter_names(model)
    with pytest.raises(ValueError, match="does not exist"):
        ROME(layer=1, layer_module_template="blocks.{}", mom2_adjustment=False).setup(model, tokenizer)
    with pytest.raises(ValueError, match="v_loss_layer=9 is out of range"):
        ROME(layer=1, v_loss_layer=9, mom2_adjustment=False).setup(model, tokenizer)


def test_context_templates_are_generated_deterministically(lm):
    model, tokenizer = lm
    lengths = ((3, 4), (5, 2))
    a = ROME(layer=1, mom2_adjustment=False, context_template_lengths=lengths, seed=3, template_prompts="prefixes")
    b = ROME(layer=1, mom2_adjustment=False, context_template_lengths=lengths, seed=3, template_prompts="prefixes")
    c = ROME(layer=1, mom2_adjustment=False, context_template_lengths=lengths, seed=4, template_prompts="prefixes")
    for editor in (a, b, c):
        editor.setup(model, tokenizer)
    assert a.context_templates[0] == "{}" and len(a.context_templates) == 1 + 4 + 2
    assert all(t.count("{}") == 1 and t.endswith(". {}") for t in a.context_templates[1:])
    openings = ["The", "Therefore", "Because", "I", "The", "Therefore"]  # (3, 4) then (5, 2), cycling the openings
    assert all(t.startswith(o) for t, o in zip(a.context_templates[1:], openings))
    assert a.context_templates == b.context_templates
    assert a.context_templates != c.context_templates

    given = ROME(layer=1, mom2_adjustment=False, context_templates=["{}", "Once upon a time. {}"])
    given.setup(model, tokenizer)
    assert given.context_templates == ["{}", "Once upon a time. {}"]
    with pytest.raises(ValueError, match="exactly one"):
        ROME(context_templates=["no placeholder"])


def test_context_template_lengths_count_the_opening_token(lm):
    """(length, count): count texts of `length` tokens in all, the opening included (the reference's max_out_len),
    so `length - len(opening)` tokens are sampled. ROME's GPT-2 code opens them with the end-of-text token, which the
    decoded text does not show."""
    model, tokenizer = lm
    sampled = []
    handle = model.register_forward_hook(lambda _m, _a, kwargs_out: sampled.append(1))
    try:
        editor = ROME(layer=1, mom2_adjustment=False, context_template_lengths=((4, 3),), seed=0)
        assert editor.template_prompts == "eos"
        editor.setup(model, tokenizer)
        eos_forwards, sampled[:] = len(sampled), []
        prefixed = ROME(layer=1, mom2_adjustment=False, context_template_lengths=((6, 1),), template_prompts="prefixes")
        prefixed.setup(model, tokenizer)
        prefix_forwards = len(sampled)
    finally:
        handle.remove()
    assert eos_forwards == 4 - 1  # one batch of 3 texts, one forward per sampled token
    assert prefix_forwards == 6 - len(tokenizer("The")["input_ids"])
    texts = [t.removesuffix(". {}") for t in editor.context_templates[1:]]
    assert len(texts) == 3 and all(tokenizer.eos_token not in t for t in texts)
    assert prefixed.context_templates[1].startswith("The")


def test_fact_token_last_and_argument_checks(lm):
    model, tokenizer = lm
    prompt_last = EditRequest(prompt="{} is a citizen of", subject="Danielle Darrieux", target_new="Messi",
                              target_true="basketball")
    subject = ROME(mom2_adjustment=False, fact_token="subject_last", **{**FAST, "v_num_grad_steps": 1})
    last = ROME(mom2_adjustment=False, fact_token="last", **{**FAST, "v_num_grad_steps": 1})
    subject.compute_update(model, tokenizer, [prompt_last])
    last.compute_update(model, tokenizer, [prompt_last])
    assert not torch.allclose(subject.last_trace[0].key, last.last_trace[0].key)
    with pytest.raises(ValueError, match="fact_token"):
        ROME(fact_token="first")
    with pytest.raises(ValueError, match="v_lr"):
        ROME(v_lr=0)


def test_intermediate_loss_layer_reads_logits_through_the_final_norm(lm):
    model, tokenizer = lm
    settings = dict(mom2_adjustment=False, **{**FAST, "v_num_grad_steps": 2})
    last = ROME(**settings)
    middle = ROME(v_loss_layer=2, **settings)
    last.compute_update(model, tokenizer, [REQUEST])
    middle.compute_update(model, tokenizer, [REQUEST])
    assert 0 < middle.last_trace[0].nll_init < 10
    assert middle.last_trace[0].nll_init != pytest.approx(last.last_trace[0].nll_init, abs=1e-4)


def test_intermediate_loss_layer_is_refused_on_a_sharded_model(lm, monkeypatch):
    """There the final norm and head hold sharded weights outside the model's forward: a clear error, not a crash."""
    import prune_lightning.editors.rome as rome

    model, tokenizer = lm
    monkeypatch.setattr(rome, "is_sharded_model", lambda m: m is model)
    settings = dict(mom2_adjustment=False, **{**FAST, "v_num_grad_steps": 1})
    with pytest.raises(NotImplementedError, match="v_loss_layer=2 below the last layer on a sharded"):
        ROME(v_loss_layer=2, **settings).compute_update(model, tokenizer, [REQUEST])
    ROME(**settings).compute_update(model, tokenizer, [REQUEST])  # the last layer: fine


def test_bfloat16_model_gets_float32_factors(tiny_model_dir, tiny_arch):
    model = load_causal_lm(str(tiny_model_dir), dtype="bfloat16")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    name = edited_names(tiny_arch, [1])[0]
    weight = get_parameter(model, name).detach().clone()
    editor = ROME(mom2_adjustment=False, **{**FAST, "v_num_grad_steps": 3})
    update = editor.compute_update(model, tokenizer, [REQUEST])[name]
    assert update.left.dtype == update.right.dtype == torch.float32
    assert update.shape == tuple(weight.shape) and torch.isfinite(update.dense()).all()
    assert torch.equal(get_parameter(model, name), weight)


def test_presets_hold_the_published_hyperparameters():
    expected = {
        "gpt2-xl": dict(layer=17, v_num_grad_steps=20, v_lr=0.5, v_loss_layer=47, v_weight_decay=0.5,
                        clamp_norm_factor=4.0, kl_factor=0.0625, mom2_n_samples=100000),
        "llama2-7b": dict(layer=5, v_num_grad_steps=25, v_lr=0.5, v_loss_layer=31, v_weight_decay=1e-3,
                          clamp_norm_factor=4.0, kl_factor=0.0625),
        "llama3-8b": dict(layer=5, v_num_grad_steps=25, v_lr=0.5, v_loss_layer=31, v_weight_decay=1e-3,
                          clamp_norm_factor=4.0, kl_factor=0.0625),
    }
    # The inputs as the references had them: Wikipedia statistics (kmeng01/rome layer_stats.py); templates opened by
    # the end-of-text token in ROME's GPT-2 code, by "The", "Therefore", ... in EasyEdit's LLaMA ROME.
    inputs = {"gpt2-xl": dict(mom2_adjustment=True, template_prompts="eos"),
              "llama2-7b": dict(mom2_adjustment=False, template_prompts="prefixes"),
              "llama3-8b": dict(mom2_adjustment=False, template_prompts="prefixes")}
    assert set(ROME_PRESETS) == set(expected)
    for name, values in expected.items():
        editor = ROME.preset(name)
        for key, value in {**values, **inputs[name]}.items():
            assert getattr(editor, key) == value, (name, key)
        assert editor.context_template_lengths == ((5, 10), (10, 10))
        assert editor.mom2_corpus == "wikimedia/wikipedia:20231101.en" and editor.mom2_n_samples == 100000
        assert (editor.delta_site, editor.closed_form_key, editor.early_stop_loss) == ("module", "plain", 0.05)
    assert ROME.preset("gpt2-xl", layer=3).layer == 3
    with pytest.raises(ValueError, match="Unknown ROME preset"):
        ROME.preset("gpt5")


@pytest.mark.parametrize("path, preset", [("configs/gpt2-xl/rome-counterfact.yaml", "gpt2-xl"),
                                          ("configs/llama2-7b/rome-counterfact.yaml", "llama2-7b"),
                                          ("configs/llama3-8b/rome-counterfact.yaml", "llama3-8b"),
                                          ("configs/llama2-7b/rome-ddp.yaml", "llama2-7b"),
                                          ("configs/llama2-7b/rome-fsdp.yaml", "llama2-7b")])
def test_shipped_rome_configs_spell_out_the_presets(path, preset, repo_dir, monkeypatch, capsys):
    import yaml

    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code == 0
    editor = yaml.safe_load(capsys.readouterr().out)["model"]["editor"]
    assert editor["class_path"] == "prune_lightning.editors.ROME"
    for key, value in ROME_PRESETS[preset].items():
        got = editor["init_args"][key]
        if key == "context_template_lengths":
            got, value = [list(x) for x in got], [list(x) for x in value]
        assert got == value, (path, key)
