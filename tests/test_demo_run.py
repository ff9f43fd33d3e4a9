"""``prune-edit demo`` end to end with a handful of edits on a barely trained demo model."""

import json
import re

import pytest

from prune_lightning.cli import main


def test_demo_writes_the_comparison(tmp_path, monkeypatch):
    config = tmp_path / "demo.yaml"
    config.write_text(
        "seed: 0\nn_entities: 40\ntrain_steps: 30\nn_requests: 4\nn_task_examples: 5\nevery_n_edits: 2\n"
        "corpus_lines: 100\nalpha: 100.0\neditor: {layer: 1, v_num_grad_steps: 5}\n"
    )
    output = tmp_path / "out"
    main(["demo", "--config", str(config), "--output", str(output)])

    table = (output / "results.md").read_text()
    for row in ("| before editing |", "| none |", "| PRUNE online |", "| PRUNE post hoc |"):
        assert row in table
    header = [line for line in table.splitlines() if line.startswith("| run |")][0]
    assert "efficacy" in header and "demo-arithmetic" in header and "kappa transformer.h.1.mlp.c_proj" in header
    for name in ("kappa.png", "general_ability.png", "singular_values.png"):
        assert (output / name).stat().st_size > 1000
    # Two fits: the row without restraint is the post-hoc fit before its restraint.
    for run in ("online", "post_hoc"):
        assert (output / "logs" / run / "version_0" / "metrics.csv").exists()
    assert len(list((output / "wandb").glob("offline-run-*"))) == 2

    results = json.loads((output / "results.json").read_text())
    # PRUNE leaves a smaller accumulated update than no restraint.
    top = {key: max(spectrum["s"]) for key, run in results.items() for spectrum in run["spectra"].values()}
    assert top["online"] < top["none"] and top["post_hoc"] < top["none"]
    assert results["none"]["prune"] == [] and len(results["post_hoc"]["prune"]) == 1
    assert len(results["online"]["prune"]) == 4
    # "none" holds the post-hoc fit's measurements up to, not including, its restraint: same edits, same curve.
    none, post = results["none"], results["post_hoc"]
    assert none["general"] == post["general"][: len(none["general"])]
    assert len(post["general"]) > len(none["general"])
    assert [r["step"] for r in none["monitor"]] == [0, 2, 4]
    assert none["monitor"][-1]["final"] and none["monitor"][-1]["kappa"] != post["monitor"][-1]["kappa"]


def _refused(capsys, argv) -> str:
    """prune-edit refuses the input with exit code 1 and one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    return capsys.readouterr().err.splitlines()[0]


def test_demo_needs_the_last_edit_measured(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text("n_requests: 10\nevery_n_edits: 4\n")
    line = _refused(capsys, ["demo", "--config", str(config), "--output", str(tmp_path / "out")])
    assert re.search(r"demo\.yaml: n_requests \(10\) must be a multiple of every_n_edits", line)
    assert not (tmp_path / "out").exists()


def test_demo_rejects_unknown_settings(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text("n_requests: 4\nn_edits: 3\n")
    line = _refused(capsys, ["demo", "--config", str(config), "--output", str(tmp_path / "out")])
    assert re.search(r"unknown demo settings.*n_edits", line)
