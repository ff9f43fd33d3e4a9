"""MEND: the gradient's factors, the hypernetwork, its training fit (resumable), the editor in the editing loop, errors.

References written here, not taken from the library: the weight gradient by autograd, the references' row-by-row
Welford statistics, plain gradient descent.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from conftest import write_counterfact
from prune_lightning import EditDataModule, EditRequest, SequentialEditor
from prune_lightning.editors import MEND, LowRankUpdate
from prune_lightning.mend import MENDDataModule, MENDHypernetwork, MENDTrainer, load_hypernetwork, save_hypernetwork
from prune_lightning.mend.gradients import (capture_factors, matrix_shapes, mend_parameter_names, target_log_probs,
                                            teacher_forced_batch, token_nll)
from prune_lightning.models import get_parameter, load_causal_lm, load_tokenizer

REQUEST = EditRequest(prompt="The hometown of {} is", subject="Alice Bruno", target_new="Paris", target_true="Rome",
                      paraphrase_prompts=("Alice Bruno grew up in",), neighborhood_prompts=("The hometown of Lena is",))
LONG = EditRequest(prompt="{} was born in", subject="Dana Chen", target_new="London Tokyo", target_true="Oslo",
                   paraphrase_prompts=("Dana Chen comes from",), neighborhood_prompts=("Omar was born in",))


def _mend_names(tiny_arch, layers):
    """The edited matrices of a tiny model, written out by hand (not by the library)."""
    if tiny_arch == "gpt2":
        return [f"transformer.h.{i}.mlp.{m}.weight" for i in layers for m in ("c_proj", "c_fc")]
    return [f"model.layers.{i}.mlp.{m}.weight" for i in layers for m in ("gate_proj", "up_proj", "down_proj")]


def _edit_loss_gradients(model, tokenizer, requests, names):
    """dL/dW of the edit loss by plain autograd: mean NLL of every target token, teacher-forced."""
    for name in names:
        get_parameter(model, name).requires_grad_(True)
    model.zero_grad()
    total, count = 0.0, 0
    for request in requests:
        prompt_ids = tokenizer(request.rendered_prompt)["input_ids"]
        target_ids = tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([prompt_ids + target_ids])).logits[0]
        logp = torch.log_softmax(logits[len(prompt_ids) - 1: -1], dim=-1)
        total = total - logp[torch.arange(len(target_ids)), torch.tensor(target_ids)].sum()
        count += len(target_ids)
    (total / count).backward()
    grads = {name: get_parameter(model, name).grad.detach().clone() for name in names}
    model.zero_grad()
    for name in names:
        get_parameter(model, name).requires_grad_(False)
    return grads


def _write_identity_hypernetwork(path, model, names, edit_lr, norm=False, layers=None):
    net = MENDHypernetwork(matrix_shapes(model, names), norm=norm, edit_lr=edit_lr, rank=16)
    info = {"layers": layers} if layers is not None else {}
    return save_hypernetwork(net, path, **info)


# --------------------------------------------------------------------------------------------------------------------
# the gradient's factors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_one_token_update_from_u_and_delta_is_the_weight_gradient(layout):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = nn.Linear(5, 3) if layout == "linear" else Conv1D(3, 5)  # Conv1D(nf=out, nx=in) stores W as (in, out)
    target = torch.randn(3)
    x = torch.randn(1, 1, 5)

    def loss():
        return ((torch.tanh(layer(x)) - target) ** 2).sum()

    layer.weight.requires_grad_(True)
    loss().backward()
    expected = layer.weight.grad.clone()
    layer.zero_grad()
    layer.requires_grad_(False)  # the factors need no parameter gradient

    _, factors = capture_factors(layer, {"w": layer}, loss)
    u, delta = factors["w"]
    assert u.shape == (1, 5) and delta.shape == (1, 3)
    outer = delta.T @ u  # sum_t delta_t u_t^T, (out, in)
    torch.testing.assert_close(outer if layout == "linear" else outer.T, expected)
    assert layer.weight.grad is None


def test_factors_give_the_gradient_of_the_edit_loss_on_a_tiny_model(tiny_model_dir, tiny_arch):
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    model.requires_grad_(False)
    names = _mend_names(tiny_arch, [2, 3])
    assert mend_parameter_names(model, [2, 3]) == names
    requests = [REQUEST, LONG]
    expected = _edit_loss_gradients(model, tokenizer, requests, names)

    batch = teacher_forced_batch(tokenizer, [r.rendered_prompt for r in requests], [r.target_new for r in requests])
    modules = {name: model.get_submodule(name.rsplit(".", 1)[0]) for name in names}
    _, factors = capture_factors(model, modules, lambda: token_nll(target_log_probs(model, batch), batch))
    for name in names:
        u, delta = factors[name]
        grad = delta.T @ u
        if tiny_arch == "gpt2":
            grad = grad.T
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6)
    # The last layer's MLP sees a gradient only at the positions that predict target tokens; lower layers at all of
    # the tokens before the last one (attention above carries it back). Padding rows are dropped.
    n_targets = sum(len(tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"]) for r in requests)
    assert factors[names[-1]][0].shape[0] == n_targets
    assert factors[names[0]][0].shape[0] == int(batch.attention_mask.sum())


# --------------------------------------------------------------------------------------------------------------------
# the hypernetwork
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [False, True])
def test_identity_hypernetwork_is_gradient_descent_with_its_initial_lr(tiny_model_dir, tiny_arch, tmp_path, norm):
    # norm=True: a freshly initialised hypernetwork, no statistics yet (what MENDTrainer starts from)
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    names = _mend_names(tiny_arch, [1, 3])
    path = _write_identity_hypernetwork(tmp_path / "id.safetensors", model, names, edit_lr=0.03, norm=norm,
                                        layers=[1, 3])
    editor = MEND(hypernetwork=str(path))
    editor.setup(model, tokenizer)
    assert editor.parameter_names(model) == names
    updates = editor.compute_update(model, tokenizer, [REQUEST, LONG])
    expected = _edit_loss_gradients(model, tokenizer, [REQUEST, LONG], names)
    for name in names:
        assert isinstance(updates[name], LowRankUpdate)
        assert updates[name].shape == tuple(get_parameter(model, name).shape)  # the parameter's own layout
        torch.testing.assert_close(updates[name].dense(), -0.03 * expected[name], rtol=1e-4, atol=1e-7)
    # rank: the token rows with a gradient (both prompts and targets but the last position of each)
    assert updates[names[-1]].rank <= updates[names[0]].rank <= 30
    assert editor.last_metrics["loss"] < editor.last_metrics["loss_init"]  # a descent step lowers the target NLL


def test_identity_initialisation_outputs_the_normalised_factors():
    torch.manual_seed(0)
    net = MENDHypernetwork({"a.weight": (6, 4), "b.weight": (6, 4), "c.weight": (4, 6)}, rank=3, edit_lr=0.5)
    assert sorted(net.transforms) == ["4x6", "6x4"]  # shared per shape, modes inside
    assert net.transforms["6x4"].mlp.layers[0].mode_scale.shape == (2, 10)
    u, delta = torch.randn(7, 6) * 3 + 1, torch.randn(7, 4) * 0.01
    net.train()
    values, keys = net({"a.weight": (u, delta), "b.weight": (u, delta), "c.weight": (torch.randn(5, 4),
                                                                                     torch.randn(5, 6))})["a.weight"]
    # statistics of these 7 rows: mean and std with k - 1, then the identity MLP
    u_norm = (u - u.mean(0)) / (u.std(0) + 1e-7)
    delta_norm = (delta - delta.mean(0)) / (delta.std(0) + 1e-7)
    torch.testing.assert_close(keys, u_norm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values, -0.5 * delta_norm, rtol=1e-4, atol=1e-5)
    # "b" shares the transform: its rows were added after "a"'s (14 rows)
    assert int(net.transforms["6x4"].u_moments.count) == 14


def test_running_statistics_are_the_references_row_by_row_welford():
    torch.manual_seed(1)
    net = MENDHypernetwork({"w": (5, 3)}, rank=2)
    net.train()
    batches = [torch.randn(n, 5) * 2 + 3 for n in (1, 4, 9)]
    for rows in batches:
        net({"w": (rows, torch.randn(rows.shape[0], 3))})
    # algs/mend.py: the first row initialises, then update_counter for each row
    mean, s, k = batches[0][0].clone(), torch.zeros(5), 1
    for row in torch.cat(batches)[1:]:
        k += 1
        new_mean = mean + (row - mean) / k
        s = s + (row - mean) * (row - new_mean)
        mean = new_mean
    moments = net.transforms["5x3"].u_moments
    assert int(moments.count) == k == 14
    torch.testing.assert_close(moments.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments.m2, s, rtol=1e-4, atol=1e-4)
    net.eval()  # no more updates in eval mode
    net({"w": (torch.randn(3, 5), torch.randn(3, 3))})
    assert int(moments.count) == 14


def test_hypernetwork_file_round_trip(tmp_path):
    net = MENDHypernetwork({"x.weight": (4, 6)}, rank=2, combine=False, one_sided=True, edit_lr=0.2, seed=3)
    with torch.no_grad():
        net.edit_lrs.fill_(-0.7)
    net.train()
    net({"x.weight": (torch.randn(5, 4), torch.randn(5, 6))})
    path = save_hypernetwork(net, tmp_path / "h.safetensors", layers=[1], model="tiny:gpt2")
    loaded, info = load_hypernetwork(path)
    assert info == {"layers": [1], "model": "tiny:gpt2"} and not loaded.training
    assert loaded.config() == net.config()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    # one-sided: only the smaller factor has an MLP (u: 4 < 6)
    assert loaded.transforms["4x6"].mlp_u is not None and loaded.transforms["4x6"].mlp_delta is None


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------


def _trainer(root, **kwargs):
    from lightning.pytorch import Trainer

    from prune_lightning.mend.cli import TRAINING_DEFAULTS

    settings = {**TRAINING_DEFAULTS, "accelerator": "cpu", "devices": 1, "default_root_dir": root, "logger": False,
                "enable_checkpointing": False, "enable_progress_bar": False, "accumulate_grad_batches": 2}
    settings.update(kwargs)
    return Trainer(**settings)


@pytest.fixture(scope="module")
def mend_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mend-data")
    return write_counterfact(root / "train.json", 48, seed=1), write_counterfact(root / "val.json", 12, seed=7)


def _module(root, **overrides):
    settings = dict(model="tiny:gpt2", layers=[2, 3], rank=32, lr=1e-3, lr_lr=1e-3, edit_lr=1e-4,
                    hypernetwork_file=str(Path(root) / "hypernetwork.safetensors"))
    settings.update(overrides)
    if settings["lr_lr"] is None:  # the trainer's default
        del settings["lr_lr"]
    return MENDTrainer(**settings)


def test_step_sizes_learn_at_lr_as_in_the_references(tmp_path):
    """The references build a second Adam over ``edit_lrs`` at ``lr_lr`` but step it after the main Adam's
    ``zero_grad()`` has cleared those gradients, so it never moves them: the step sizes learn at ``lr`` alone.

    Replayed here with two optimizers in the references' order (both ``zero_grad`` modes: torch 2's ``None`` and
    torch 1's zeros) on the same gradients as ours."""
    gen = torch.Generator().manual_seed(0)
    for set_to_none in (True, False):
        module = _module(tmp_path, layers=[3], rank=8, lr=1e-3, lr_lr=None)
        ours = module.configure_optimizers()
        lrs = module.hypernetwork.edit_lrs
        theirs = nn.Parameter(lrs.detach().clone())
        main = torch.optim.Adam([theirs], lr=module.hparams.lr)
        second = torch.optim.Adam([theirs], lr=1e-4)  # the references' lr_lr
        for _ in range(4):
            grad = torch.randn(lrs.shape, generator=gen)
            lrs.grad, theirs.grad = grad.clone(), grad.clone()
            ours.step()
            ours.zero_grad()
            main.step()
            main.zero_grad(set_to_none=set_to_none)
            second.step()
            second.zero_grad(set_to_none=set_to_none)
        torch.testing.assert_close(lrs.detach(), theirs.detach())
        assert not torch.equal(lrs.detach(), torch.full_like(lrs, 1e-4))  # they did move
    # an explicit lr_lr is an extra rate of the step sizes on top of lr
    groups = _module(tmp_path, layers=[3], rank=8, lr=1e-3, lr_lr=1e-2).configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1.1e-2)]


def test_short_training_makes_held_out_edits_succeed_more_often(mend_data, tmp_path):
    from lightning.pytorch import seed_everything

    train, val = mend_data
    seed_everything(0)
    module = _module(tmp_path)
    data = MENDDataModule(train=str(train), val=str(val))
    trainer = _trainer(tmp_path, max_steps=12, val_check_interval=24)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert module.exported is None  # validate alone writes nothing
    trainer.fit(module, datamodule=data)
    after = module.last_validation
    # the initial hypernetwork (the identity, no statistics yet: gradient descent at edit_lr = 1e-4) barely moves the
    # model (the random model's own rate, 7 of 12); after 24 training edits, nearly every held-out edit takes
    assert before["val/counterfact/efficacy"] <= 0.6
    assert after["val/counterfact/efficacy"] >= max(0.9, before["val/counterfact/efficacy"] + 0.25)
    assert after["val/loss_edit"] < before["val/loss_edit"]
    for key in ("val/loss_loc", "val/drawdown", "val/edit_token_acc", "val/loc_token_acc_pre", "val/loss_total_edit"):
        assert math.isfinite(after[key])
    # the result is a file the editor loads by path
    editor = MEND(hypernetwork=str(tmp_path / "hypernetwork.safetensors"))
    assert editor.layers == [2, 3] and editor.info["model"] == "tiny:gpt2" and editor.info["step"] == 12
    assert editor.info["score"] == pytest.approx(module.best_score)


def test_training_resumes_to_the_weights_of_an_uninterrupted_run(mend_data, tmp_path):
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, _ = mend_data

    def run(root, max_steps, ckpt_path=None, checkpoints=None):
        seed_everything(0)
        module = _module(root, rank=8)
        callbacks = [ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1, save_last=True)] if checkpoints else []
        trainer = _trainer(root, max_steps=max_steps, enable_checkpointing=bool(checkpoints), callbacks=callbacks)
        trainer.fit(module, datamodule=MENDDataModule(train=str(train), seed=3), ckpt_path=ckpt_path)
        return module

    whole = run(tmp_path / "whole", 30)  # 60 edits: more than one epoch of 48
    run(tmp_path / "first", 7, checkpoints=tmp_path / "ckpt")
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert not any(key.startswith("model.") for key in checkpoint["state_dict"])  # no copy of the model's weights
    resumed = run(tmp_path / "resumed", 30, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for key, value in whole.hypernetwork.state_dict().items():
        assert torch.equal(resumed.hypernetwork.state_dict()[key], value), key
    assert not torch.equal(whole.hypernetwork.edit_lrs, torch.full_like(whole.hypernetwork.edit_lrs, 1e-4))
    # the editor reads a checkpoint too
    editor = MEND(hypernetwork=str(tmp_path / "ckpt" / "last.ckpt"))
    assert editor.net.parameter_names == whole.parameter_names


def test_mend_train_command_line(tmp_path, repo_dir):
    from prune_lightning.cli import main

    hypernetwork = tmp_path / "h.safetensors"
    checkpoint = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                              "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}])
    main(["mend-train", "--config", str(repo_dir / "configs" / "tiny-mend-train.yaml"),
          "--trainer.max_steps=2", "--trainer.val_check_interval=4", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.logger=false", f"--trainer.callbacks={checkpoint}", "--data.val_limit=2",
          f"--model.hypernetwork_file={hypernetwork}"])
    _, info = load_hypernetwork(hypernetwork)
    assert info["model"] == "tiny:gpt2" and info["layers"] == [2, 3]
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


@pytest.mark.parametrize("name, layers, lr_key", [("gpt2-xl", [45, 46, 47], "val/loss_total_edit"),
                                                   ("llama2-7b", [29, 30, 31], "val/edit_token_acc"),
                                                   ("llama3-8b", [29, 30, 31], "val/edit_token_acc")])
def test_hub_presets_parse_with_the_published_settings(name, layers, lr_key, repo_dir, monkeypatch, capsys):
    import yaml

    from prune_lightning.cli import main

    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["mend-train", "--config", f"configs/{name}/mend-train.yaml", "--trainer.default_root_dir=elsewhere",
              "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    model, trainer = config["model"], config["trainer"]
    # The logs and the hypernetwork follow the root folder given on the command line (${run:...} in the preset).
    assert trainer["logger"]["init_args"]["save_dir"] == "elsewhere"
    assert model["hypernetwork_file"] == "elsewhere/hypernetwork.safetensors"
    assert model["layers"] == layers and model["monitor"] == lr_key
    assert (model["lr"], model["lr_lr"], model["edit_lr"], model["cedit"], model["cloc"]) == (1e-6, 0.0, 1e-4, 0.1, 1.0)
    assert (model["rank"], model["n_hidden"], model["init"], model["shared"]) == (1920, 1, "id", True)
    assert (trainer["accumulate_grad_batches"], trainer["gradient_clip_val"], trainer["max_steps"]) == (10, 100.0, 10000)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", f"configs/{name}/mend-counterfact.yaml", "--print_config"])
    assert exit_info.value.code == 0
    editor = yaml.safe_load(capsys.readouterr().out)["model"]["editor"]
    assert editor["class_path"] == "prune_lightning.editors.MEND" and editor["init_args"]["layers"] == layers
    assert editor["init_args"]["module_templates"] == model["module_templates"]
    assert MEND.presets[name] == {"layers": layers, "module_templates": model["module_templates"]}


# --------------------------------------------------------------------------------------------------------------------
# the editor in the editing loop
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_hypernetwork(mend_data, tmp_path_factory):
    from lightning.pytorch import seed_everything

    root = tmp_path_factory.mktemp("trained")
    seed_everything(0)
    module = _module(root)
    _trainer(root, max_steps=12).fit(module, datamodule=MENDDataModule(train=str(mend_data[0])))
    return root / "hypernetwork.safetensors"


def test_sequential_mend_edits_with_prune_and_the_monitor(trained_hypernetwork, counterfact_file, make_trainer):
    from prune_lightning.callbacks import ConditionNumberMonitor, PRUNECallback

    editor = MEND(hypernetwork=str(trained_hypernetwork))
    module = SequentialEditor(model="tiny:gpt2", editor=editor, save_edited_model=False, verbose=False)
    prune, monitor = PRUNECallback(alpha=100.0), ConditionNumberMonitor(every_n_edits=3)
    trainer = make_trainer(callbacks=[prune, monitor])
    trainer.fit(module, datamodule=EditDataModule(source=str(counterfact_file(6))))
    assert module.requests_edited == 6
    assert sorted(module.edit_registry) == sorted(_mend_names("gpt2", [2, 3]))
    for name in module.edit_registry:
        assert module.edit_registry[name].delta.rank >= 1  # (past a quarter of 64, the tracker keeps it dense)
    # one edit's update of each matrix: rank <= its token rows ("The hometown of X Yson" + a one-token target)
    assert 1 <= editor.last_metrics["mend_rank"] <= 12
    assert {h["name"] for h in monitor.history} == set(module.edit_registry)
    assert {h["step"] for h in prune.history} == set(range(1, 7))  # restrained after every write


# --------------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------------


def test_editor_errors_name_the_file_and_the_difference(tmp_path, tiny_model_dir, tiny_arch):
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(ValueError, match="MEND needs a trained hypernetwork"):
        MEND()
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        MEND(hypernetwork=str(tmp_path / "nowhere.safetensors"))
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="other.safetensors.*is not a MEND hypernetwork"):
        MEND(hypernetwork=str(other))

    names = _mend_names(tiny_arch, [2, 3])
    path = _write_identity_hypernetwork(tmp_path / "h.safetensors", model, names, 1e-4, layers=[2, 3])
    with pytest.raises(ValueError, match=r"h.safetensors.*trained for layers \[2, 3\], not \[1, 3\]"):
        MEND(hypernetwork=str(path), layers=[1, 3])
    with pytest.raises(ValueError, match="layers must be a non-empty list"):
        MEND(hypernetwork=str(path), layers=[])

    # the same names with other shapes: another model of the same type
    wide = "tiny:gpt2:n_embd=32" if tiny_arch == "gpt2" else "tiny:llama:hidden_size=32,intermediate_size=88"
    wrong = load_causal_lm(wide)
    with pytest.raises(ValueError, match=r"h.safetensors.*does not fit this model.*\(in, out\)"):
        MEND(hypernetwork=str(path)).setup(wrong, tokenizer)
    # matrices the file was not trained for
    fewer = _write_identity_hypernetwork(tmp_path / "fewer.safetensors", model, names[:1], 1e-4)
    with pytest.raises(ValueError, match=r"fewer.safetensors.*does not fit this model.*not in the file"):
        MEND(hypernetwork=str(fewer), layers=[2, 3]).setup(model, tokenizer)


def test_construction_errors_name_the_value():
    with pytest.raises(ValueError, match="combine=True cannot be used with one_sided"):
        MENDHypernetwork({"w": (2, 3)}, one_sided=True)
    with pytest.raises(ValueError, match="init must be one of .*'orthogonal'"):
        MENDHypernetwork({"w": (2, 3)}, init="orthogonal")
    with pytest.raises(ValueError, match=r"shapes\['w'\] must be \(in, out\)"):
        MENDHypernetwork({"w": (2, 0)})
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        MENDHypernetwork({"w": (2, 3)}, rank=0)
    with pytest.raises(ValueError, match="edit_outer must be one of .*'rephrase'"):
        MENDDataModule(train="x.json", edit_outer="rephrase")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        MENDDataModule(train="x.json", batch_size=0)
    with pytest.raises(ValueError, match="cloc must be a finite number >= 0, got -1"):
        MENDTrainer(cloc=-1.0)
    with pytest.raises(ValueError, match="monitor_mode must be one of .*'lowest'"):
        MENDTrainer(monitor_mode="lowest")
    with pytest.raises(ValueError, match=r"layers must be None or a non-empty list .*\[-1\]"):
        MENDTrainer(layers=[-1])


def test_requests_without_a_locality_prompt_are_refused(tmp_path):
    path = write_counterfact(tmp_path / "cf.json", 3)
    records = json.loads(path.read_text())
    records[1]["neighborhood_prompts"] = []
    path.write_text(json.dumps(records))
    data = MENDDataModule(train=str(path))
    with pytest.raises(ValueError, match=r"cf.json.*requests \[1\] have no neighborhood prompt"):
        data.setup("fit")


# --------------------------------------------------------------------------------------------------------------------
# several processes (slow)
# --------------------------------------------------------------------------------------------------------------------


class SaveWeights(Callback):
    """Saves this rank's edited matrices at the end of fit (``ddp_spawn`` copies only rank 0's weights back)."""

    def __init__(self, out_dir: str, label: str) -> None:
        self.out_dir, self.label = out_dir, label

    def on_fit_end(self, trainer, pl_module) -> None:
        weights = {name: get_parameter(pl_module.model, name).detach().clone()
                   for name in pl_module.edited_parameter_names}
        torch.save({"weights": weights, "edited": pl_module.requests_edited},
                   Path(self.out_dir) / f"{self.label}-rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_end_with_the_single_process_weights(trained_hypernetwork, tmp_path):
    from lightning.pytorch import Trainer

    from prune_lightning.callbacks import PRUNECallback
    from prune_lightning import TRAINER_DEFAULTS

    requests = write_counterfact(tmp_path / "cf.json", 4)
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        module = SequentialEditor(model="tiny:gpt2", editor=MEND(hypernetwork=str(trained_hypernetwork)),
                                  save_edited_model=False, verbose=False)
        trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": devices, "strategy": strategy,
                             "default_root_dir": tmp_path, "logger": False, "enable_checkpointing": False,
                             "enable_progress_bar": False,
                             "callbacks": [PRUNECallback(alpha=100.0), SaveWeights(str(tmp_path), f"world{devices}")]})
        trainer.fit(module, datamodule=EditDataModule(source=str(requests)))
    single = torch.load(tmp_path / "world1-rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"world2-rank{r}.pt", weights_only=True) for r in range(2)]
    for out in ranks:
        assert out["edited"] == 4
        for name, weight in single["weights"].items():
            torch.testing.assert_close(out["weights"][name], weight, rtol=0, atol=1e-5)
            assert torch.equal(out["weights"][name], ranks[0]["weights"][name])  # rank 0's updates, broadcast


# --------------------------------------------------------------------------------------------------------------------
# the demo world
# --------------------------------------------------------------------------------------------------------------------


def test_demo_split_never_touches_what_the_demo_edits(tmp_path):
    from prune_lightning.data import read_counterfact
    from prune_lightning.demo import World
    from prune_lightning.demo.mend import locality_records, mend_records

    world = World.generate(seed=0, n_entities=60)
    edited = world.requested_facts(30, seed=0)
    edited_subjects = {fact.subject for fact, _ in edited}
    train, val = mend_records(world, 30, seed=0, targets_per_fact=2, val_subjects=5)
    subjects = {part: {r["requested_rewrite"]["subject"] for r in records}
                for part, records in (("train", train), ("val", val))}
    assert not (subjects["train"] | subjects["val"]) & edited_subjects  # no subject the demo edits, in any relation
    assert not subjects["train"] & subjects["val"] and len(subjects["val"]) == 5
    assert len(train) == 25 * 4 * 2 and len(val) == 5 * 4
    for record in train:
        rewrite = record["requested_rewrite"]
        assert rewrite["target_new"]["str"] != rewrite["target_true"]["str"]
        assert world.objects[(rewrite["subject"], rewrite["relation_id"])] == rewrite["target_true"]["str"]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(train))
    assert len(read_counterfact(str(path))) == len(train)  # the reader the trainer uses

    # the demo edits nearly every subject: the split falls back to the (subject, relation) pairs it does not edit
    train, val = mend_records(world, 58, seed=0, val_subjects=5)
    pairs = {(f.subject, f.relation_id) for f, _ in world.requested_facts(58, seed=0)}
    used = {(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]) for r in train + val}
    assert used and not used & pairs

    loc = locality_records(world)
    assert len(loc) == len(world.facts()) * 3 + len(world.additions) + len(world.entailment) + len(world.copies)
    assert {"prompt": "3 + 4 =", "answer": "7"} in loc


def test_demo_hypernetwork_is_trained_once_then_cached(tmp_path):
    from prune_lightning.demo import demo_checkpoint
    from prune_lightning.demo.mend import DemoMENDConfig, demo_mend_checkpoint

    model_dir = demo_checkpoint(seed=0, steps=30, n_entities=40, cache_dir=tmp_path / "models", progress=False)
    config = DemoMENDConfig(steps=2, accumulate=2, val_subjects=3, val_limit=4, val_every=4)
    path = demo_mend_checkpoint(seed=0, n_requests=10, model_dir=model_dir, config=config,
                                cache_dir=tmp_path / "mend", progress=False)
    assert path.name == "hypernetwork.safetensors" and path.parent.parent == tmp_path / "mend"
    assert sorted(p.name for p in path.parent.iterdir()) == ["hypernetwork.safetensors", "loc.json", "train.json",
                                                             "training.json", "val.json"]
    training = json.loads((path.parent / "training.json").read_text())
    assert training["best_step"] == 2 and training["n_val"] == 12
    stamp = path.stat().st_mtime_ns
    again = demo_mend_checkpoint(seed=0, n_requests=10, model_dir=model_dir, config=config,
                                 cache_dir=tmp_path / "mend", progress=False)
    assert again == path and path.stat().st_mtime_ns == stamp  # from the cache
    other = demo_mend_checkpoint(seed=0, n_requests=12, model_dir=model_dir, config=config,
                                 cache_dir=tmp_path / "mend", progress=False)
    assert other != path  # other settings, another key
    assert not list((tmp_path / "mend").glob(".*tmp*"))  # nothing half-written left behind
    editor = MEND(hypernetwork=str(path))
    assert editor.layers == [1, 2, 3]


@pytest.mark.slow
def test_demo_mend_edits_held_out_requests_with_efficacy_at_least_0_8():
    from prune_lightning.demo import World, demo_checkpoint
    from prune_lightning.demo.mend import demo_mend_checkpoint, single_edit_quality

    model_dir = demo_checkpoint(seed=0, progress=False)  # the demo's model (trained here: the session's own cache)
    hypernetwork = demo_mend_checkpoint(seed=0, n_requests=200, model_dir=model_dir, progress=False)
    records = World.generate(seed=0).counterfact_records(200, seed=0)  # the demo's requests: never trained on
    scores = single_edit_quality(model_dir, hypernetwork, records)
    assert scores["efficacy_before"] == 0.0
    assert scores["efficacy"] >= 0.8 and scores["generalization"] >= 0.7
