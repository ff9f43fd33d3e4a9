"""The conventions of the shared key-value steps (``editors/value.py``), each pinned by a computation written here
from the formula of the authors' code (kmeng01/rome compute_u.py / compute_v.py, kmeng01/memit compute_z.py):

    loss(delta) = mean_t NLL(target | template_t + prompt ; delta)
                + kl_factor * KL(p_delta || p_0) on "{subject} is a"
                + v_weight_decay * ||delta|| / ||h||^2            h: the site's output at the plain prompt
    v_num_grad_steps rounds, the last only evaluating; stop when the *total* loss < early_stop_loss
    ||delta|| <= clamp_norm_factor * ||h|| after each step
    ROME: dW = (h + delta - W k - b) (C^-1 k*)^T / (k . C^-1 k*),  k: the plain prompt's key, k*: the averaged one

The reference computation below runs every row on its own (no batching, no padding) with its own hooks.
"""

import math

import pytest
import torch

from prune_lightning.data import EditRequest
from prune_lightning.editors import MEMIT, ROME
from prune_lightning.editors.value import ValueSettings, optimize_value
from prune_lightning.metrics import target_nll
from prune_lightning.models import get_module, load_causal_lm, load_tokenizer

# A two-token target on both tiny tokenizers, so the teacher forcing is exercised.
REQUEST = EditRequest(prompt="The favourite sport of {}", subject="Danielle Darrieux", target_new="tennis Paris",
                      target_true="piano", case_id=3)
TEMPLATES = ["{}", "I like it. {}", "Because of this. {}"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


def _names(tiny_arch: str, layer: int) -> tuple[str, str]:
    if tiny_arch == "gpt2":
        return f"transformer.h.{layer}.mlp.c_proj", f"transformer.h.{layer}"
    return f"model.layers.{layer}.mlp.down_proj", f"model.layers.{layer}"


def _subject_last(tokenizer, text: str, subject: str) -> int:
    end = text.index(subject) + len(subject)
    return len(tokenizer(text[:end])["input_ids"]) - 1


def _target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    return tokenizer(prompt + " " + target)["input_ids"][len(prompt_ids):]


def _run(model, ids, site=None, index=None, delta=None, capture=None):
    """One forward of one row; ``delta`` added to ``site``'s output at ``index``; ``capture`` collects that output
    (before the change) and the site's input there."""
    def hook(_module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if capture is not None:
            capture["out"] = hidden[0, index].detach().clone()
            capture["in"] = args[0][0, index].detach().clone()
        if delta is None:
            return output
        hidden = hidden.clone()
        hidden[0, index] += delta
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = site.register_forward_hook(hook) if site is not None else None
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()
    finally:
        if handle is not None:
            handle.remove()


def reference_loss(model, tokenizer, request, templates, site, delta, weight_decay, kl_factor,
                   kl_direction="edited||original", decay_power=1):
    """The value loss of compute_v.py at a given delta, row by row; returns (total, nll, h)."""
    plain = request.rendered_prompt
    h = {}
    _run(model, tokenizer(plain)["input_ids"], site, _subject_last(tokenizer, plain, request.subject), capture=h)
    target = _target_ids(tokenizer, plain, request.target_new)
    nlls = []
    for template in templates:
        text = template.format(plain)
        ids = tokenizer(text)["input_ids"]
        logits = _run(model, ids + target[:-1], site, _subject_last(tokenizer, text, request.subject), delta)
        logp = torch.log_softmax(logits[len(ids) - 1: len(ids) - 1 + len(target)], dim=-1)
        nlls.append(-logp[torch.arange(len(target)), torch.tensor(target)].mean())
    nll = torch.stack(nlls).mean()
    kl_text = f"{request.subject} is a"
    kl_ids, kl_index = tokenizer(kl_text)["input_ids"], _subject_last(tokenizer, kl_text, request.subject)
    edited = torch.log_softmax(_run(model, kl_ids, site, kl_index, delta)[kl_index], dim=-1)
    original = torch.log_softmax(_run(model, kl_ids)[kl_index], dim=-1)
    if kl_direction == "edited||original":
        kl = (edited.exp() * (edited - original)).sum()
    else:
        kl = (original.exp() * (original - edited)).sum()
    decay = weight_decay * delta.norm() ** decay_power / h["out"].norm() ** 2
    return float(nll + kl_factor * kl + decay), float(nll), h


def _sites(model, tiny_arch, layer=1):
    module_name, block_name = _names(tiny_arch, layer)
    return get_module(model, module_name), get_module(model, block_name)


def test_loss_after_one_step_is_the_reference_loss(lm, tiny_arch):
    """NLL over the templated rows + KL(edited || original) + wd * ||delta|| / ||h||^2, h the MLP output; the
    other directions, the squared decay and the block as the site would each give another number."""
    model, tokenizer = lm
    module, block = _sites(model, tiny_arch)
    # A long first step and a heavy KL weight, so that the KL's direction shows in the total.
    settings = ValueSettings(num_grad_steps=2, lr=2.0, weight_decay=2.0, kl_factor=20.0, early_stop_loss=-math.inf)
    result = optimize_value(model, tokenizer, REQUEST, module, TEMPLATES, settings)
    assert result.steps == 1 and result.delta.norm() > 0
    total, nll, h = reference_loss(model, tokenizer, REQUEST, TEMPLATES, module, result.delta, 2.0, 20.0)
    assert result.loss == pytest.approx(total, rel=1e-4)
    assert result.nll == pytest.approx(nll, rel=1e-4)
    torch.testing.assert_close(result.init, h["out"], rtol=1e-4, atol=1e-5)
    # The test tells the conventions apart: each alternative is off by far more than the tolerance.
    for variant in (dict(kl_direction="original||edited"), dict(decay_power=2)):
        other, _, _ = reference_loss(model, tokenizer, REQUEST, TEMPLATES, module, result.delta, 2.0, 20.0, **variant)
        assert abs(other - total) > 1e-2 * abs(total), variant
    block_total, _, _ = reference_loss(model, tokenizer, REQUEST, TEMPLATES, block, result.delta, 2.0, 20.0)
    assert abs(block_total - total) > 1e-2 * abs(total)


def test_loss_at_zero_is_the_metrics_nll(lm, tiny_arch):
    """At delta = 0 the loss is the target NLL, scored on the same target tokens as the edit metrics score."""
    model, tokenizer = lm
    module, _ = _sites(model, tiny_arch)
    result = optimize_value(model, tokenizer, REQUEST, module, ["{}"], ValueSettings(num_grad_steps=1))
    assert result.steps == 0 and torch.equal(result.delta, torch.zeros_like(result.delta))
    expected = float(target_nll(model, tokenizer, [REQUEST.rendered_prompt], [REQUEST.target_new])[0])
    assert result.nll_init == pytest.approx(expected, rel=1e-5) and result.loss_init == result.nll_init


def test_the_delta_is_clamped_to_the_site_output_norm(lm, tiny_arch):
    """||delta|| <= clamp_norm_factor * ||h||, with h the MLP's output for ROME's site, the block's for MEMIT's."""
    model, tokenizer = lm
    module, block = _sites(model, tiny_arch)
    plain = REQUEST.rendered_prompt
    index = _subject_last(tokenizer, plain, REQUEST.subject)
    for site, name in ((module, "module"), (block, "block")):
        h = {}
        _run(model, tokenizer(plain)["input_ids"], site, index, capture=h)
        settings = ValueSettings(num_grad_steps=3, lr=10.0, clamp_norm_factor=0.05, early_stop_loss=-math.inf,
                                 site=name)
        result = optimize_value(model, tokenizer, REQUEST, site, TEMPLATES, settings)
        assert float(result.delta.norm()) == pytest.approx(0.05 * float(h["out"].norm()), rel=1e-5), name
    assert not torch.allclose(h["out"].norm(), _module_out_norm(model, tokenizer, module, index), rtol=1e-2)


def _module_out_norm(model, tokenizer, module, index):
    h = {}
    _run(model, tokenizer(REQUEST.rendered_prompt)["input_ids"], module, index, capture=h)
    return h["out"].norm()


def test_the_last_round_takes_no_step(lm, tiny_arch, monkeypatch):
    """v_num_grad_steps rounds take v_num_grad_steps - 1 Adam steps (the last round only evaluates)."""
    model, tokenizer = lm
    module, _ = _sites(model, tiny_arch)
    calls = []
    original_step = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        calls.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    result = optimize_value(model, tokenizer, REQUEST, module, TEMPLATES,
                            ValueSettings(num_grad_steps=5, early_stop_loss=-math.inf))
    assert result.steps == 4 and len(calls) == 4
    with pytest.raises(ValueError, match="v_num_grad_steps must be an int >= 1"):
        ValueSettings(num_grad_steps=0)


def test_early_stop_reads_the_total_loss(lm, tiny_arch):
    """A threshold between the NLL and the total loss after the first step: the loop goes on (an NLL-based stop would
    end it there)."""
    model, tokenizer = lm
    module, _ = _sites(model, tiny_arch)
    # Adam's first step is -lr * sign(gradient), and the decay's gradient is 0 at delta = 0: delta_1 does not depend
    # on the decay's weight, so the weight can be chosen to put the decay at half of the first step's NLL gain.
    probe = optimize_value(model, tokenizer, REQUEST, module, TEMPLATES,
                           ValueSettings(num_grad_steps=2, kl_factor=0.0, weight_decay=0.0, early_stop_loss=-math.inf))
    gain = probe.nll_init - probe.nll
    assert gain > 0
    weight = 0.5 * gain * float(probe.init.norm()) ** 2 / float(probe.delta.norm())
    settings = dict(kl_factor=0.0, weight_decay=weight)
    first = optimize_value(model, tokenizer, REQUEST, module, TEMPLATES,
                           ValueSettings(num_grad_steps=2, early_stop_loss=-math.inf, **settings))
    assert first.nll == pytest.approx(probe.nll) and first.loss == pytest.approx(probe.nll + 0.5 * gain, rel=1e-4)
    threshold = first.nll + 0.25 * gain  # NLL < threshold < total loss, both after the first step
    going_on = optimize_value(model, tokenizer, REQUEST, module, TEMPLATES,
                              ValueSettings(num_grad_steps=4, early_stop_loss=threshold, **settings))
    assert going_on.steps >= 2
    stopped = optimize_value(model, tokenizer, REQUEST, module, TEMPLATES,
                             ValueSettings(num_grad_steps=4, early_stop_loss=first.loss + 1e-4, **settings))
    assert stopped.steps == 1 and stopped.loss == pytest.approx(first.loss)


def test_rome_closed_form_uses_the_plain_prompts_key_in_the_denominator(lm, tiny_arch, tmp_path):
    """dW = (h + delta - W k - b) (C^-1 k*)^T / (k . C^-1 k*): k the plain prompt's key, k* the template average."""
    from safetensors.torch import save_file

    model, tokenizer = lm
    module, _ = _sites(model, tiny_arch)
    in_dim = module.weight.shape[0] if tiny_arch == "gpt2" else module.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(in_dim, in_dim, generator=gen, dtype=torch.float64)
    mom2 = a @ a.T / in_dim + 0.1 * torch.eye(in_dim, dtype=torch.float64)
    save_file({"mom2": mom2.float()}, str(tmp_path / "c.safetensors"))
    editor = ROME(layer=1, v_num_grad_steps=4, stats_file=str(tmp_path / "c.safetensors"),
                  context_templates=TEMPLATES)
    update = editor.compute_update(model, tokenizer, [REQUEST])[f"{_names(tiny_arch, 1)[0]}.weight"]
    (trace,) = editor.last_trace

    keys = []
    for template in TEMPLATES:
        text = template.format(REQUEST.rendered_prompt)
        seen = {}
        _run(model, tokenizer(text)["input_ids"], module, _subject_last(tokenizer, text, REQUEST.subject),
             capture=seen)
        keys.append(seen)
    k_star = torch.stack([s["in"] for s in keys]).double().mean(dim=0)
    k_plain, out_plain = keys[0]["in"].double(), keys[0]["out"].double()  # TEMPLATES[0] is the plain prompt
    mom2_used = mom2.float().double()
    c_inv_k = torch.linalg.solve(mom2_used, k_star)
    residual = trace.delta.double()  # h + delta - (W k + b), with h = W k + b: the plain prompt is the first template
    expected = torch.outer(residual, c_inv_k) / (k_plain @ c_inv_k)  # (out, in)
    dense = update.dense().double()
    dense = dense.T if tiny_arch == "gpt2" else dense
    assert (dense - expected).norm() <= 1e-4 * expected.norm()
    averaged = torch.outer(residual, c_inv_k) / (k_star @ c_inv_k)
    assert (dense - averaged).norm() > 1e-2 * expected.norm()  # the other denominator is measurably different
    torch.testing.assert_close(trace.key.double(), k_star, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trace.key_plain.double(), k_plain, rtol=1e-4, atol=1e-5)


def test_rome_variants_are_options(lm, tiny_arch):
    """delta_site="block" and closed_form_key="averaged" change the update; the defaults are the reference's."""
    model, tokenizer = lm
    name = f"{_names(tiny_arch, 1)[0]}.weight"
    settings = dict(layer=1, v_num_grad_steps=3, mom2_adjustment=False, context_templates=TEMPLATES)
    default = ROME(**settings)
    assert (default.delta_site, default.closed_form_key) == ("module", "plain")
    base = default.compute_update(model, tokenizer, [REQUEST])[name].dense()
    block = ROME(delta_site="block", **settings).compute_update(model, tokenizer, [REQUEST])[name].dense()
    averaged = ROME(closed_form_key="averaged", **settings).compute_update(model, tokenizer, [REQUEST])[name].dense()
    assert not torch.allclose(base, block, rtol=1e-3) and not torch.allclose(base, averaged, rtol=1e-3)
    with pytest.raises(ValueError, match="closed_form_key"):
        ROME(closed_form_key="mean")
    with pytest.raises(ValueError, match="delta site"):
        ROME(delta_site="mlp")


def test_memit_targets_are_the_block_output_plus_delta(lm, tiny_arch):
    """MEMIT adds delta to the last edited block's output and clamps it to that output's norm (compute_z.py)."""
    model, tokenizer = lm
    _, block = _sites(model, tiny_arch, layer=2)
    plain = REQUEST.rendered_prompt
    h = {}
    _run(model, tokenizer(plain)["input_ids"], block, _subject_last(tokenizer, plain, REQUEST.subject), capture=h)
    editor = MEMIT(layers=[1, 2], v_num_grad_steps=3, v_lr=10.0, clamp_norm_factor=0.05, mom2_adjustment=False,
                   mom2_update_weight=10.0, early_stop_loss=-math.inf, context_templates=TEMPLATES)
    editor.compute_update(model, tokenizer, [REQUEST])
    (trace,) = editor.last_trace
    assert float(trace.delta.norm()) == pytest.approx(0.05 * float(h["out"].norm()), rel=1e-5)
    torch.testing.assert_close(trace.target, h["out"] + trace.delta, rtol=1e-4, atol=1e-5)
    # A flat list is grouped as memit_main groups its templates: the plain prompt alone, the others together.
    assert editor.context_template_groups == [["{}"], TEMPLATES[1:]]


def test_reusing_the_prefix_and_reading_few_logits_changes_nothing_but_the_work(lm, tiny_arch):
    """The blocks below the site run once (not every round), the head runs only where the loss reads: the same
    delta, losses and steps as the full computation of every round (the authors' way), to float rounding."""
    model, tokenizer = lm
    module, _ = _sites(model, tiny_arch, layer=2)
    blocks = [get_module(model, _names(tiny_arch, i)[1]) for i in range(2)]
    inner = [next(b.children()) for b in blocks]  # a submodule of each: it runs only when its block computes
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in inner]
    try:
        results = {}
        for reuse, subset in ((False, False), (True, False), (False, True), (True, True)):
            calls.clear()
            settings = ValueSettings(num_grad_steps=5, early_stop_loss=-math.inf, reuse_prefix=reuse,
                                     logits_subset=subset)
            results[reuse, subset] = optimize_value(model, tokenizer, REQUEST, module, TEMPLATES, settings,
                                                    prefix=blocks)
            assert len(calls) == (len(blocks) if reuse else 5 * len(blocks)), (reuse, subset)
    finally:
        for handle in handles:
            handle.remove()
    full = results[False, False]
    for key, result in results.items():
        torch.testing.assert_close(result.delta, full.delta, rtol=1e-5, atol=1e-6)
        assert result.steps == full.steps == 4 and result.loss == pytest.approx(full.loss, rel=1e-5), key
    assert all("forward" not in vars(b) for b in blocks)  # every block computes again after the optimisation
