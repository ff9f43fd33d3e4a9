"""W&B as a dashboard of an editing run (read back from an offline run's files), spectra for every logger, and the
OmegaConf interpolation of the presets and fragments."""

import json

import pytest
import torch
import yaml

from conftest import read_csv_metrics, write_counterfact
from prune_lightning import EditDataModule, SequentialEditor
from prune_lightning.callbacks import ConditionNumberMonitor, EditQualityEvaluator, GeneralAbilityEvaluator, TaskConfig
from prune_lightning.cli import main
from prune_lightning.loggers import EditWandbLogger, spectrum_summary
from prune_lightning.spectral import singular_values
from wandb_records import history, metric_definitions

MATRIX = "transformer.h.1.mlp.c_proj"


@pytest.fixture(scope="module")
def wandb_fit(tmp_path_factory, tiny_corpus):
    """Four ROME edits of tiny GPT-2 logged to an offline W&B run and a CSV logger, spectra every 2 edits."""
    import wandb
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    from prune_lightning import TRAINER_DEFAULTS
    from prune_lightning.editors import ROME

    root = tmp_path_factory.mktemp("wandb-fit")
    rte = root / "test-NLI.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\tA cat sleeps.\tAn animal sleeps.\tentailment\n")
    monitor = ConditionNumberMonitor(spectrum_every_n_edits=2)
    quality = EditQualityEvaluator(every_n_edits=2, batch_size=4)
    general = GeneralAbilityEvaluator(tasks=[TaskConfig("rte", str(rte))], every_n_edits=4)
    editor = ROME(layer=1, v_num_grad_steps=10, v_lr=0.5, mom2_corpus=str(tiny_corpus), mom2_n_samples=200,
                  context_template_lengths=((5, 2),))
    module = SequentialEditor(model="tiny:gpt2", editor=editor, save_edited_model=False, verbose=False)
    csv = CSVLogger(root, name="logs")
    trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": 1, "default_root_dir": root,
                         "logger": [csv, EditWandbLogger(save_dir=str(root), offline=True, name="tiny")],
                         "enable_progress_bar": False, "enable_checkpointing": False,
                         "callbacks": [monitor, quality, general]})
    try:
        trainer.fit(module, datamodule=EditDataModule(source=str(write_counterfact(root / "cf.json", 4))))
    finally:
        wandb.finish()
    (run_file,) = root.glob("wandb/offline-run-*/run-*.wandb")
    return dict(trainer=trainer, module=module, monitor=monitor, quality=quality, general=general, root=root,
                run_dir=run_file.parent, rows=history(run_file), metrics=metric_definitions(run_file))


def test_every_metric_is_plotted_against_the_number_of_edits(wandb_fit):
    assert wandb_fit["metrics"]["edits"]["step_metric"] == ""
    star = wandb_fit["metrics"]["*"]
    assert star == {"step_metric": "edits", "glob": True, "step_sync": True}
    # Every point of a metric carries the edit count it was taken at.
    kappa = [row for row in wandb_fit["rows"] if f"condition/{MATRIX}/kappa" in row]
    assert [row["edits"] for row in kappa] == [0, 1, 2, 3, 4, 4]
    assert [row[f"condition/{MATRIX}/kappa"] for row in kappa] == \
        pytest.approx([h["kappa"] for h in wandb_fit["monitor"].history])
    losses = [row for row in wandb_fit["rows"] if "edit/loss" in row]
    assert [row["edits"] for row in losses] == [1, 2, 3, 4]
    retention = "edit_quality/retention/teacher_forced/counterfact/probability_success"
    assert [row["edits"] for row in wandb_fit["rows"] if retention in row] == [2, 4]
    after_sequence = "edit_quality/after_sequence/free_generation/counterfact/exact_match"
    assert [row["edits"] for row in wandb_fit["rows"] if after_sequence in row] == [4]


def test_the_spectra_are_histograms_in_wandb_and_quantiles_everywhere(wandb_fit):
    monitor, rows = wandb_fit["monitor"], wandb_fit["rows"]
    w_key, dw_key = f"spectrum/{MATRIX}/W", f"spectrum/{MATRIX}/dW"
    w_rows = [row for row in rows if f"{w_key}/histogram/_type" in row]
    dw_rows = [row for row in rows if f"{dw_key}/histogram/_type" in row]
    assert [row["edits"] for row in w_rows] == [0, 2, 4, 4]  # edit 0, every 2 edits, the end of fit
    assert [row["edits"] for row in dw_rows] == [2, 4, 4]  # no update before the first edit: no histogram
    assert all(sum(row[f"{w_key}/histogram/values"]) == 64 for row in w_rows)  # min(256, 64) singular values

    # The last spectra are those of the edited matrix now: W's against an SVD of the weight, dW's against its rank.
    weight = wandb_fit["module"].model.get_parameter(f"{MATRIX}.weight").detach().double()
    last = monitor.last_spectra[f"{MATRIX}.weight"]
    torch.testing.assert_close(last["W"], torch.linalg.svdvals(weight), rtol=1e-9, atol=1e-12)
    delta = weight - wandb_fit["module"].edit_registry[f"{MATRIX}.weight"].w0.double()
    torch.testing.assert_close(last["dW"], torch.linalg.svdvals(delta)[: last["dW"].numel()], rtol=1e-6, atol=1e-9)
    assert last["dW"].numel() == 4  # four rank-one ROME writes

    # The CSV logger has the same spectra in compact form, at the same edits.
    csv_rows = [row for row in read_csv_metrics(wandb_fit["trainer"]) if row.get(f"{w_key}/q50")]
    assert [int(float(row["edits"])) for row in csv_rows] == [0, 2, 4, 4]
    final = csv_rows[-1]
    assert float(final[f"{w_key}/q100"]) == pytest.approx(float(last["W"][0]))
    assert float(final[f"{w_key}/q00"]) == pytest.approx(float(last["W"][-1]))
    assert float(final[f"{dw_key}/count"]) == 4
    sigma_max0 = wandb_fit["module"].edit_registry[f"{MATRIX}.weight"].sigma_max0
    assert float(final[f"{dw_key}/above_sigma_max_W0"]) == float((last["dW"] >= sigma_max0).sum())


def test_the_evaluators_tables_land_in_the_run(wandb_fit):
    rows, run_dir = wandb_fit["rows"], wandb_fit["run_dir"]
    for key, callback, columns in [
        ("edit_quality", wandb_fit["quality"], ["step", "requests", "timing", "protocol", "kind", "score", "value"]),
        ("general_ability", wandb_fit["general"], ["step", "task", "metric", "value"]),
    ]:
        (row,) = [row for row in rows if f"{key}/_type" in row]
        assert row[f"{key}/_type"] == "table-file"
        table = json.loads((run_dir / "files" / row[f"{key}/path"]).read_text())
        assert table["columns"] == columns
        assert table["data"] == [[entry[c] for c in columns] for entry in callback.history]
        assert len(table["data"]) > 0


def test_singular_values_are_the_svd_also_when_ill_conditioned():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(singular_values(w), torch.linalg.svdvals(w), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(singular_values(w.T.float()), torch.linalg.svdvals(w), rtol=1e-5, atol=1e-6)
    u, _, v = torch.linalg.svd(w, full_matrices=False)
    s = torch.logspace(0, -8, 24, dtype=torch.float64)  # kappa 1e8: past what the Gram matrix resolves
    torch.testing.assert_close(singular_values(u @ torch.diag(s) @ v), s, rtol=1e-6, atol=1e-15)
    assert singular_values(torch.zeros(3, 5)).tolist() == [0.0, 0.0, 0.0]


def test_spectrum_summary_quantiles():
    summary = spectrum_summary(torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0]), "s")
    assert summary == {"s/count": 5.0, "s/q00": 1.0, "s/q10": pytest.approx(1.4), "s/q50": 3.0,
                       "s/q90": pytest.approx(4.6), "s/q100": 5.0}
    assert spectrum_summary(torch.zeros(0), "s") == {"s/count": 0.0}


def test_spectrum_schedule_must_follow_the_measurements():
    with pytest.raises(ValueError, match="multiple of every_n_edits=2"):
        ConditionNumberMonitor(every_n_edits=2, spectrum_every_n_edits=3)
    with pytest.raises(ValueError, match="spectrum_every_n_edits"):
        ConditionNumberMonitor(spectrum_every_n_edits=0)


# --------------------------------------------------------------------------------------------------------------------
# OmegaConf: presets and fragments interpolate the run's settings
# --------------------------------------------------------------------------------------------------------------------


def _print_config(args, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("logger", ["--trainer.logger=loggers/wandb.yaml", "--trainer.logger+=loggers/wandb.yaml"])
def test_loggers_follow_the_root_dir_given_on_the_command_line(repo_dir, monkeypatch, capsys, tmp_path, logger):
    monkeypatch.chdir(repo_dir)
    config = _print_config(["fit", "--config", "configs/gpt2-xl/memit-prune-counterfact.yaml", logger,
                            f"--trainer.default_root_dir={tmp_path}"], capsys)
    loggers = config["trainer"]["logger"]
    loggers = loggers if isinstance(loggers, list) else [loggers]
    expected = ["lightning.pytorch.loggers.CSVLogger"] * logger.count("+=") + ["prune_lightning.loggers.EditWandbLogger"]
    assert [entry["class_path"] for entry in loggers] == expected
    assert [entry["init_args"]["save_dir"] for entry in loggers] == [str(tmp_path)] * len(expected)


def test_presets_interpolate_their_root_dir(repo_dir, monkeypatch, capsys):
    monkeypatch.chdir(repo_dir)
    for preset in sorted((repo_dir / "configs").glob("*/*counterfact.yaml")):
        raw = yaml.safe_load(preset.read_text())
        if "logger" not in raw.get("trainer", {}):
            continue
        assert raw["trainer"]["logger"]["init_args"]["save_dir"] == "${run:trainer.default_root_dir}", preset
        config = _print_config(["fit", "--config", str(preset)], capsys)
        assert config["trainer"]["logger"]["init_args"]["save_dir"] == raw["trainer"]["default_root_dir"], preset


def test_an_interpolation_of_a_missing_setting_is_named(repo_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(repo_dir)
    config = tmp_path / "bad.yaml"
    config.write_text((repo_dir / "configs/tiny.yaml").read_text().replace(
        "${run:trainer.default_root_dir}", "${run:trainer.no_such_dir}"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert "trainer.no_such_dir" in capsys.readouterr().err
