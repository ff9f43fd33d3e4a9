"""PRUNECallback, ConditionNumberMonitor and RECTCallback inside the editing loop and inside a plain training loop."""

import math

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import read_csv_metrics
from prune_lightning import EditDataModule, SequentialEditor
from prune_lightning.callbacks import ConditionNumberMonitor, PRUNECallback, RECTCallback
from prune_lightning.callbacks.rect import rect_mask
from prune_lightning.models import get_parameter
from prune_lightning.spectral import restrain_dense

N_EDITS = 20
ALPHA = 1e4  # the tiny model's sigma_max(W_0) is small: ln(alpha) must exceed 1 / sigma_max(W_0) for F to shrink


def _final(history, key):
    return [h for h in history if h.get("final")][-1][key]


@pytest.fixture(scope="module")
def edit_runs(tmp_path_factory, rome_settings, requests_file):
    """The same 20 ROME edits on tiny GPT-2: without restraint, with PRUNE online and with PRUNE post hoc."""
    from lightning.pytorch import Trainer

    from prune_lightning import TRAINER_DEFAULTS
    from prune_lightning.editors import ROME

    runs = {}
    for label, prune in [("none", None), ("online", PRUNECallback(alpha=ALPHA, mode="online")),
                         ("post_hoc", PRUNECallback(alpha=ALPHA, mode="post_hoc"))]:
        root = tmp_path_factory.mktemp(f"run-{label}")
        monitor = ConditionNumberMonitor()
        callbacks = [prune, monitor] if prune else [monitor]
        module = SequentialEditor(model="tiny:gpt2", editor=ROME(**rome_settings), save_edited_model=False,
                                  verbose=False)
        trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": 1, "default_root_dir": root,
                             "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
                             "callbacks": callbacks})
        trainer.fit(module, datamodule=EditDataModule(source=str(requests_file)))
        runs[label] = (module, monitor, prune)
    return runs


@pytest.fixture(scope="module")
def rome_settings(repo_dir):
    return dict(layer=1, v_num_grad_steps=20, v_lr=0.5, mom2_corpus=str(repo_dir / "configs/data/tiny-corpus.txt"),
                mom2_n_samples=200, context_template_lengths=((5, 2),))


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    from conftest import write_counterfact

    return write_counterfact(tmp_path_factory.mktemp("requests") / "counterfact.json", N_EDITS)


def test_unrestrained_kappa_rises_with_edits(edit_runs):
    module, monitor, _ = edit_runs["none"]
    (name,) = module.edited_parameter_names
    steps = [h for h in monitor.history if h["name"] == name and not h["final"]]
    assert [h["step"] for h in steps] == list(range(N_EDITS + 1))  # edit 0 and after every edit
    kappas = [h["kappa"] for h in steps]
    assert kappas[-1] > 1.5 * kappas[0]
    assert np.corrcoef(np.arange(len(kappas)), kappas)[0, 1] > 0.5  # a rising trend, not one spike
    # kappa at edit 0 is that of W_0, computed independently.
    w0 = module.edit_registry[name].w0.double().numpy()
    assert kappas[0] == pytest.approx(np.linalg.cond(w0), rel=1e-4)


def test_prune_online_lowers_sigma_max_of_the_update(edit_runs):
    none_module, none_monitor, _ = edit_runs["none"]
    module, monitor, prune = edit_runs["online"]
    (name,) = module.edited_parameter_names
    sigma0 = module.edit_registry[name].sigma_max0
    assert sigma0 * math.log(ALPHA) > 1  # the regime where F shrinks
    restrained = [h for h in prune.history if h["restrained"] > 0]
    assert restrained, "no singular value of dW ever reached sigma_max(W_0): the test edits are too weak"
    assert all(h["sigma_max_dW_after"] < h["sigma_max_dW_before"] for h in restrained)
    assert len(prune.history) == N_EDITS  # once per edit
    # The restrained run ends with a smaller update and a better-conditioned matrix than the unrestrained one.
    assert _final(monitor.history, "sigma_max_dW") < _final(none_monitor.history, "sigma_max_dW")
    assert _final(monitor.history, "kappa") < _final(none_monitor.history, "kappa")
    w = get_parameter(module.model, name).detach()
    entry = module.edit_registry[name]
    assert torch.allclose(w, entry.w0 + entry.delta.dense(), atol=1e-6)


def test_prune_post_hoc_restrains_once_what_the_unrestrained_run_accumulated(edit_runs):
    none_module, _, _ = edit_runs["none"]
    module, monitor, prune = edit_runs["post_hoc"]
    (name,) = module.edited_parameter_names
    assert [h["step"] for h in prune.history] == [N_EDITS]
    # Post hoc, the edit sequence is the unrestrained one; the final update is its restraint.
    plain = none_module.edit_registry[name]
    expected = plain.w0 + restrain_dense(plain.sigma_max0, plain.delta.dense(), alpha=ALPHA)
    assert torch.allclose(get_parameter(module.model, name).detach(), expected, atol=1e-5)
    # The monitor's end-of-fit measurement sees the restrained matrix.
    steps = [h for h in monitor.history if not h["final"]]
    assert _final(monitor.history, "sigma_max_dW") < steps[-1]["sigma_max_dW"]


def test_prune_warns_when_f_would_enlarge(tiny_model_dir, rome_factory, counterfact_file, make_trainer, tiny_arch):
    module = SequentialEditor(model=str(tiny_model_dir), editor=rome_factory(), save_edited_model=False)
    module.prepare_editor()
    (name,) = module.edited_parameter_names
    sigma0 = module.edit_registry[name].sigma_max0
    alpha = math.exp(0.5 / sigma0)  # sigma_max * ln(alpha) = 0.5 <= 1
    with pytest.warns(UserWarning, match="enlarges singular values"):
        make_trainer([PRUNECallback(alpha=alpha)]).fit(module, datamodule=EditDataModule(source=str(counterfact_file(1))))


def test_resume_from_mid_run_checkpoint_gives_the_same_weights(tmp_path, rome_factory, counterfact_file, make_trainer):
    source = str(counterfact_file(8))

    def run(root, ckpt_path=None, checkpoint=True):
        module = SequentialEditor(model="tiny:gpt2", editor=rome_factory(), save_edited_model=False, verbose=False)
        callbacks = [PRUNECallback(alpha=ALPHA), ConditionNumberMonitor(every_n_edits=2)]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_top_k=-1,
                                             filename="{step}"))
        trainer = make_trainer(callbacks, root=root, enable_checkpointing=checkpoint)
        trainer.fit(module, datamodule=EditDataModule(source=source), ckpt_path=ckpt_path)
        return module, trainer, callbacks

    full, _, _ = run(tmp_path / "full")
    resumed, trainer, callbacks = run(tmp_path / "resumed", ckpt_path=tmp_path / "full" / "ckpt" / "step=3.ckpt",
                                      checkpoint=False)
    assert trainer.global_step == 8
    assert resumed.requests_edited == 8
    (name,) = full.edited_parameter_names
    assert torch.allclose(get_parameter(resumed.model, name), get_parameter(full.model, name), atol=1e-6)
    assert callbacks[0].restraints == 8  # 3 before the checkpoint (restored) + 5 after


def test_monitor_logs_edit_zero_and_every_n(tiny_model_dir, rome_factory, counterfact_file, make_trainer):
    module = SequentialEditor(model=str(tiny_model_dir), editor=rome_factory(), save_edited_model=False)
    trainer = make_trainer([ConditionNumberMonitor(every_n_edits=2)])
    trainer.fit(module, datamodule=EditDataModule(source=str(counterfact_file(4))))
    (name,) = module.edited_parameter_names
    short = name.removesuffix(".weight")
    rows = [r for r in read_csv_metrics(trainer) if r.get(f"condition/{short}/kappa")]
    assert sorted({int(r["step"]) for r in rows}) == [0, 2, 4]
    kappa0 = float([r for r in rows if int(r["step"]) == 0][0][f"condition/{short}/kappa"])
    assert kappa0 == pytest.approx(np.linalg.cond(module.edit_registry[name].w0.double().numpy()), rel=1e-4)


def test_rect_keeps_the_top_fraction_by_relative_change(tiny_model_dir, rome_factory, counterfact_file, make_trainer):
    module = SequentialEditor(model=str(tiny_model_dir), editor=rome_factory(), save_edited_model=False)
    rect = RECTCallback(ratio=0.1)
    make_trainer([rect]).fit(module, datamodule=EditDataModule(source=str(counterfact_file(3))))
    (name,) = module.edited_parameter_names
    entry = module.edit_registry[name]
    delta = get_parameter(module.model, name).detach() - entry.w0
    kept = (entry.delta.dense() != 0).float().mean().item()
    assert kept == pytest.approx(0.1, abs=0.01)
    assert torch.allclose(delta, entry.delta.dense(), atol=1e-6)


def test_rect_mask_matches_an_argsort_reference():
    gen = torch.Generator().manual_seed(0)
    w0, delta = torch.randn(30, 20, generator=gen), torch.randn(30, 20, generator=gen)
    mask = rect_mask(w0, delta, 0.25)
    rel = (delta.abs() / w0.abs()).flatten().numpy()
    expected = np.zeros(rel.size, dtype=bool)
    expected[np.argsort(-rel)[:150]] = True
    assert np.array_equal(mask.flatten().numpy(), expected)
    assert not rect_mask(w0, delta, 0.5).equal(mask)


class _Regressor(LightningModule):
    """A plain optimizer-driven fine-tuning loop that knows nothing about editing."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        self.x = torch.randn(64, 16)
        self.y = 20 * torch.randn(64, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=16)


def test_prune_restrains_a_plain_fine_tuning_loop(make_trainer):
    module = _Regressor()
    w0 = module.net[0].weight.detach().clone()
    prune = PRUNECallback(modules=["net.0"], kind="linear")
    monitor = ConditionNumberMonitor(modules=["net.0.weight"])
    make_trainer([prune, monitor], max_epochs=3).fit(module)

    registry = module.edit_registry
    assert registry.snapshot and list(registry) == ["net.0.weight"]  # one W_0 copy, shared by both callbacks
    assert torch.equal(registry["net.0.weight"].w0, w0)
    restrained = [h for h in prune.history if h["restrained"] > 0]
    assert restrained, "fine-tuning never moved the weights past sigma_max(W_0)"
    assert all(h["sigma_max_dW_after"] < h["sigma_max_dW_before"] for h in restrained)
    # The final weight is W_0 plus an update whose top singular value is what the last restraint left.
    final_dw = (module.net[0].weight.detach() - w0).double().numpy()
    assert np.linalg.norm(final_dw, 2) == pytest.approx(prune.history[-1]["sigma_max_dW_after"], rel=1e-4)
    assert len(monitor.history) > 1


def test_outside_the_editor_modules_are_required(make_trainer):
    with pytest.raises(ValueError, match="name the parameters"):
        make_trainer([PRUNECallback()], max_epochs=1).fit(_Regressor())


def test_two_prune_callbacks_keep_separate_state(tiny_model_dir, rome_factory, counterfact_file, make_trainer,
                                                 tmp_path):
    a, b = PRUNECallback(alpha=ALPHA, mode="online"), PRUNECallback(alpha=ALPHA, mode="post_hoc")
    assert a.state_key != b.state_key
    module = SequentialEditor(model=str(tiny_model_dir), editor=rome_factory(), save_edited_model=False)
    trainer = make_trainer([a, b])
    trainer.fit(module, datamodule=EditDataModule(source=str(counterfact_file(2))))
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert states[a.state_key]["restraints"] == 2 and states[b.state_key]["restraints"] == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.0), "alpha must be a finite number > 1"),
    (dict(kind="cubic"), "kind must be"),
    (dict(mode="sometimes"), "mode must be"),
    (dict(every_n_edits=0), "every_n_edits"),
])
def test_prune_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PRUNECallback(**kwargs)


def test_monitor_measures_after_restraints_whatever_the_order(tiny_model_dir, rome_factory, counterfact_file,
                                                              make_trainer):
    monitor, prune = ConditionNumberMonitor(), PRUNECallback(alpha=ALPHA)
    module = SequentialEditor(model=str(tiny_model_dir), editor=rome_factory(), save_edited_model=False)
    trainer = make_trainer([monitor, prune])  # listed before PRUNE
    trainer.fit(module, datamodule=EditDataModule(source=str(counterfact_file(3))))
    assert trainer.callbacks.index(monitor) > trainer.callbacks.index(prune)
    assert any(h["restrained"] for h in prune.history)  # else before and after would coincide anyway
    # Each step's sigma_max(dW) is the restrained one PRUNE left behind.
    after = {h["step"]: h["sigma_max_dW_after"] for h in prune.history}
    measured = {h["step"]: h["sigma_max_dW"] for h in monitor.history if not h["final"] and h["step"] > 0}
    assert measured.keys() == after.keys()
    assert all(measured[s] == pytest.approx(after[s], rel=1e-5) for s in after)
