"""FineTune (FT / FT-L) on tiny GPT-2 and LLaMA: the edit, the norm constraint, dense updates, the editing loop."""

import pytest
import torch

from prune_lightning.data import EditRequest
from prune_lightning.editors import Editor, FineTune
from prune_lightning.models import get_parameter, load_causal_lm, load_tokenizer
from conftest import edited_names, target_nll

REQUESTS = [
    EditRequest(prompt="The favourite sport of {}", subject="Danielle Darrieux", target_new="piano",
                target_true="tennis", case_id=0),
    EditRequest(prompt="The home town of {}", subject="Toko Yasuda", target_new="Paris", target_true="soccer",
                case_id=1),
]
EPS = 2e-3
# A larger step than FT-L's published 5e-4: the tiny random models need more to move a prediction in a few steps.
FAST = dict(layers=[1, 2], num_steps=15, lr=2e-2, norm_constraint=EPS)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _write(model, updates, sign=1.0):
    with torch.no_grad():
        for name, update in updates.items():
            param = get_parameter(model, name)
            param.add_(sign * update.to(param.dtype))


@pytest.fixture(scope="module")
def tuned(lm):
    model, tokenizer = lm
    editor = FineTune(**FAST)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    updates = editor.compute_update(model, tokenizer, REQUESTS)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    return editor, updates, before, after


def test_fine_tuning_makes_the_new_targets_likelier(lm, tuned):
    model, tokenizer = lm
    editor, updates, _, _ = tuned
    before = [target_nll(model, tokenizer, r.rendered_prompt, r.target_new) for r in REQUESTS]
    _write(model, updates)
    try:
        after = [target_nll(model, tokenizer, r.rendered_prompt, r.target_new) for r in REQUESTS]
    finally:
        _write(model, updates, sign=-1.0)
    assert all(a < b - 0.5 for a, b in zip(after, before)), (before, after)
    # The logged losses are the batch means of the same quantity.
    assert editor.last_metrics["loss_init"] == pytest.approx(sum(before) / len(before), abs=1e-4)
    assert editor.last_metrics["loss"] < editor.last_metrics["loss_init"] - 0.5
    assert editor.last_metrics["ft_steps"] == FAST["num_steps"]


def test_updates_are_dense_in_the_parameters_layout_and_respect_the_constraint(lm, tuned, tiny_arch):
    model, _ = lm
    editor, updates, _, _ = tuned
    assert isinstance(editor, Editor)
    assert editor.parameter_names(model) == edited_names(tiny_arch, (1, 2)) == list(updates)
    for name, update in updates.items():
        assert isinstance(update, torch.Tensor) and update.dtype == torch.float32
        assert update.shape == get_parameter(model, name).shape
        # Every entry moved by at most eps, and the constraint was active (many entries sit at the bound).
        assert update.abs().max().item() <= EPS * (1 + 1e-5)
        assert (update.abs() > EPS * (1 - 1e-5)).float().mean().item() > 0.01
    assert editor.last_metrics["max_abs_change"] <= EPS * (1 + 1e-5)


def test_without_the_constraint_weights_move_further(lm):
    model, tokenizer = lm
    free = FineTune(**{**FAST, "norm_constraint": None, "num_steps": 5})
    updates = free.compute_update(model, tokenizer, REQUESTS)
    assert max(u.abs().max().item() for u in updates.values()) > 2 * EPS


def test_compute_update_leaves_the_model_unchanged(lm, tuned):
    model, _ = lm
    _, _, before, after = tuned
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m.training for m in model.modules())


def test_weight_decay_pulls_weights_towards_zero(lm, tiny_arch):
    """Adam's weight decay acts on W itself: with no loss signal (lr tiny for the loss, decay large) |W| shrinks."""
    model, tokenizer = lm
    name = edited_names(tiny_arch, [1])[0]
    weight = get_parameter(model, name).detach()
    plain = FineTune(layers=[1], num_steps=3, lr=1e-3, norm_constraint=None)
    decayed = FineTune(layers=[1], num_steps=3, lr=1e-3, weight_decay=1e3, norm_constraint=None)
    a = plain.compute_update(model, tokenizer, REQUESTS)[name]
    b = decayed.compute_update(model, tokenizer, REQUESTS)[name]
    assert (weight + b).norm() < (weight + a).norm()


def test_bfloat16_model_is_tuned_in_float32(tiny_model_dir, tiny_arch):
    model = load_causal_lm(str(tiny_model_dir), dtype="bfloat16")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    name = edited_names(tiny_arch, [1])[0]
    weight = get_parameter(model, name).detach().clone()
    update = FineTune(layers=[1], num_steps=3, lr=1e-2, norm_constraint=EPS).compute_update(model, tokenizer,
                                                                                              REQUESTS)[name]
    assert update.dtype == torch.float32 and torch.isfinite(update).all()
    assert 0 < update.abs().max().item() <= EPS * (1 + 1e-5)
    assert torch.equal(get_parameter(model, name), weight)


def test_fine_tuning_in_the_lightning_loop(tiny_model_dir, tiny_arch, counterfact_file, make_trainer):
    from conftest import read_csv_metrics

    from prune_lightning import EditDataModule, SequentialEditor
    from prune_lightning.callbacks import ConditionNumberMonitor, PRUNECallback

    editor = FineTune(layers=[1], num_steps=10, lr=2e-2, norm_constraint=EPS)
    module = SequentialEditor(model=str(tiny_model_dir), editor=editor, save_edited_model=False, verbose=False)
    data = EditDataModule(source=str(counterfact_file(4)), batch_size=2)
    (name,) = module.edited_parameter_names
    assert name == edited_names(tiny_arch, [1])[0]
    data.setup("fit")
    nll_before = [target_nll(module.model, module.tokenizer, r.rendered_prompt, r.target_new) for r in data.requests]
    trainer = make_trainer(callbacks=[ConditionNumberMonitor(), PRUNECallback(alpha=100.0)])
    trainer.fit(module, datamodule=data)

    assert trainer.global_step == 2
    entry = module.edit_registry[name]
    w_end = get_parameter(module.model, name).detach()
    torch.testing.assert_close(entry.delta.dense(), w_end - entry.w0, rtol=0, atol=1e-6)
    # Two constrained batches: no entry moved more than 2 eps in all (PRUNE only shrinks large singular values).
    assert (w_end - entry.w0).abs().max().item() <= 2 * EPS * (1 + 1e-4)
    nll_after = [target_nll(module.model, module.tokenizer, r.rendered_prompt, r.target_new) for r in data.requests]
    gains = [b - a for a, b in zip(nll_after[-2:], nll_before[-2:])]  # the last batch's targets got likelier
    assert min(gains) > 0.2 and sum(gains) / 2 > 0.5, gains
    header = set(read_csv_metrics(trainer)[0])
    assert {"edit/loss", "edit/loss_init"} <= header


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=[]), r"layers must be a non-empty list.*\[\]"),
        (dict(layers=[1, 1]), r"must not repeat.*\[1, 1\]"),
        (dict(layers=[-2]), r"layer indices >= 0.*\[-2\]"),
        (dict(num_steps=-1), "num_steps must be an int >= 0, got -1"),
        (dict(lr=0.0), "lr must be positive, got 0.0"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
        (dict(norm_constraint=0.0), "norm_constraint must be positive or None.*got 0.0"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FineTune(**kwargs)


def test_unknown_module_and_empty_batch_are_reported(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match=r"does not exist.*Modules:.*(c_proj|down_proj)"):
        FineTune(layers=[99]).parameter_names(model)
    with pytest.raises(ValueError, match="at least one request"):
        FineTune().compute_update(model, tokenizer, [])


def test_a_sharded_model_is_refused(lm, monkeypatch):
    import prune_lightning.editors.ft as ft

    model, tokenizer = lm
    monkeypatch.setattr(ft, "is_sharded_model", lambda m: m is model)
    request = EditRequest(prompt="The hometown of {} is", subject="Danielle", target_new="Rome", case_id=0)
    with pytest.raises(NotImplementedError, match="FineTune on a sharded .*Use DDP, or ROME / MEMIT"):
        FineTune(num_steps=1).compute_update(model, tokenizer, [request])


def test_targets_are_scored_at_the_prompts_end_as_in_the_reference(lm):
    """ft_main.py scores every target token at the prompt's last position: for a two-token target the loss is the
    mean of -log p(y_t | prompt) over t, not the teacher-forced NLL (which target_positions="teacher_forced" gives)."""
    model, tokenizer = lm
    request = EditRequest(prompt="The favourite sport of {}", subject="Danielle Darrieux", target_new="tennis Paris",
                          target_true="piano", case_id=5)
    prompt = request.rendered_prompt
    prompt_ids = tokenizer(prompt)["input_ids"]
    target = tokenizer(prompt + " " + request.target_new)["input_ids"][len(prompt_ids):]
    assert len(target) == 2
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, -1].float(), dim=-1)
    bag = float(-logp[torch.tensor(target)].mean())
    settings = dict(layers=[1], num_steps=0)
    reference = FineTune(**settings)
    reference.compute_update(model, tokenizer, [request])
    assert reference.target_positions == "prompt_end"
    assert reference.last_metrics["loss_init"] == pytest.approx(bag, rel=1e-5)
    forced = FineTune(target_positions="teacher_forced", **settings)
    forced.compute_update(model, tokenizer, [request])
    expected = target_nll(model, tokenizer, prompt, request.target_new)
    assert forced.last_metrics["loss_init"] == pytest.approx(expected, rel=1e-5)
    assert abs(bag - expected) > 1e-2
