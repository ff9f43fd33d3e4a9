"""``prune-edit``: the offline tiny experiment end to end, callback fragments appended, print_config."""

import os
import subprocess
import sys

import pytest
import yaml

from prune_lightning.cli import main


def _run(repo_dir, tmp_path, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PRUNE_LIGHTNING_CACHE=os.environ["PRUNE_LIGHTNING_CACHE"])
    # The presets' logger writes into ${run:trainer.default_root_dir}: this override moves the logs too.
    command = [sys.executable, "-m", "prune_lightning.cli", *args, f"--trainer.default_root_dir={tmp_path}"]
    return subprocess.run(command, cwd=repo_dir, env=env, capture_output=True, text=True, timeout=600)


def test_fit_tiny_config_with_appended_fragments(repo_dir, tmp_path):
    result = _run(repo_dir, tmp_path, "fit", "--config", "configs/tiny.yaml", "--data.limit=3",
                  "--trainer.callbacks+=callbacks/rect.yaml", "--trainer.logger+=loggers/wandb.yaml",
                  "--model.editor.init_args.v_num_grad_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for case in range(3):  # per-edit progress
        assert f"case {case} " in output
    run_dir = tmp_path / "logs" / "version_0"
    # The fragments were appended to the experiment's callbacks and logger, not swapped in for them.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    classes = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
    assert classes == ["ConditionNumberMonitor", "PRUNECallback", "RECTCallback"]
    assert config["model"]["editor"]["init_args"]["v_num_grad_steps"] == 5
    assert [logger["init_args"]["save_dir"] for logger in config["trainer"]["logger"]] == [str(tmp_path)] * 2
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"edits", "condition/transformer.h.1.mlp.c_proj/kappa", "rect/transformer.h.1.mlp.c_proj/kept"} <= set(header)
    # The W&B fragment's offline run (WANDB_MODE=offline) went into the same folder, with edits as its x-axis.
    from wandb_records import history, metric_definitions

    (wandb_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert metric_definitions(wandb_file)["*"]["step_metric"] == "edits"
    kappa = [row for row in history(wandb_file) if "condition/transformer.h.1.mlp.c_proj/kappa" in row]
    assert [row["edits"] for row in kappa] == [0, 1, 2, 3, 3]  # edit 0, every edit, the end of fit

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "edited_model")
    assert model.config.model_type == "gpt2"


def test_test_subcommand_scores_edit_quality(repo_dir, tmp_path):
    result = _run(repo_dir, tmp_path, "test", "--config", "configs/tiny.yaml", "--data.limit=3")
    assert result.returncode == 0, result.stderr[-3000:]
    # The console table truncates names to the terminal's width; the CSV log has them whole.
    (metrics,) = tmp_path.glob("logs/version_*/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"test/teacher_forced/counterfact/probability_success",
            "test/teacher_forced/counterfact/top1_accuracy"} <= set(header)


def test_print_config_lists_every_part(repo_dir, capsys, monkeypatch):
    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/tiny.yaml", "--trainer.callbacks+=callbacks/prune.yaml", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["editor"]["class_path"] == "prune_lightning.editors.ROME"
    assert config["data"]["source"] == "configs/data/counterfact-tiny.json"
    assert [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]] == \
        ["ConditionNumberMonitor", "PRUNECallback", "PRUNECallback"]


def test_bad_editor_argument_is_rejected(repo_dir, monkeypatch, capsys):
    monkeypatch.chdir(repo_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/tiny.yaml", "--model.editor.init_args.no_such_option=1"])
    assert exit_info.value.code != 0
    assert "no_such_option" in capsys.readouterr().err
