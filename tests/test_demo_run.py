"""``prune-edit demo`` end to end with a handful of edits on a barely trained demo model, and its results page."""

import json
import re

import pytest

from prune_lightning.cli import main
from prune_lightning.demo.report import EFFICACY, claims, curve, final_quality, row_summary, sweep_points


SMALL = ("seed: 0\nn_entities: 40\ntrain_steps: 30\nn_requests: 4\nn_task_examples: 5\nevery_n_edits: 2\n"
         "batch_size: 2\ncorpus_lines: 100\nalpha: 100.0\n"
         "editor: {layer: 1, fact_token: last, mom2_adjustment: false, v_num_grad_steps: 5}\n")


def _demo(tmp_path_factory, settings: str):
    tmp_path = tmp_path_factory.mktemp("demo")
    config = tmp_path / "demo.yaml"
    config.write_text(SMALL + settings)
    output = tmp_path / "out"
    main(["demo", "--config", str(config), "--output", str(output)])
    return output


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    return _demo(tmp_path_factory, "methods: [rome, memit]\nsweep: [1.5, 100.0, linear]\n"
                                   "memit: {layers: [1], fact_token: last, mom2_adjustment: false, "
                                   "mom2_update_weight: 1.0, v_num_grad_steps: 5}\n")


def test_demo_writes_the_comparison(demo_output):
    output = demo_output
    page = (output / "results.md").read_text()
    for row in ("| unedited |", "| ROME |", "| ROME + PRUNE online |", "| ROME + PRUNE post hoc |", "| MEMIT |",
                "| MEMIT + PRUNE post hoc |"):
        assert row in page
    header = [line for line in page.splitlines() if line.startswith("| run |")][0]
    for column in ("efficacy", "top-1", "exact match", "contains", "after own edit", "arithmetic", "kappa"):
        assert f" {column} |" in header
    # One paragraph per claim, each saying whether it holds.
    assert len(re.findall(r"^\*\*.+\*\* \((holds|does not hold)\)\.", page, flags=re.M)) == 3
    for name in ("kappa.png", "general_ability.png", "retention.png", "tradeoff.png", "singular_values.png"):
        assert (output / name).stat().st_size > 1000
    # One fit per PRUNE online / post hoc / MEMIT (the unrestrained rows are the post-hoc fits before restraint).
    for fit in ("rome", "rome_online", "memit"):
        assert (output / "logs" / fit / "version_0" / "metrics.csv").exists()
    # A W&B offline run per fit (rome, rome_online, two sweep fits, memit), and the summary run with the plots.
    assert len(list((output / "wandb").glob("offline-run-*"))) == 6
    (summary,) = [run for run in (output / "wandb").glob("offline-run-*")
                  if (run / "files" / "media" / "images").exists()]
    images = {path.name.split("_0_")[0] for path in (summary / "files" / "media" / "images").glob("*.png")}
    assert images == {"kappa", "general_ability", "retention", "tradeoff", "singular_values"}
    assert list((summary / "files" / "media" / "table").glob("results_*.table.json"))


def test_unrestrained_rows_are_the_post_hoc_fits_before_their_restraint(demo_output):
    runs = json.loads((demo_output / "results.json").read_text())["runs"]
    top = {row: max(max(s["s"]) for s in run["spectra"].values()) for row, run in runs.items()}
    assert top["prune_online"] < top["none"] and top["prune_post_hoc"] < top["none"]
    assert runs["none"]["prune"] == [] and len(runs["prune_post_hoc"]["prune"]) == 1
    assert len(runs["prune_online"]["prune"]) == 4
    none, post = runs["none"], runs["prune_post_hoc"]
    assert none["general"] == post["general"][: len(none["general"])]
    assert len(post["general"]) > len(none["general"])
    assert [r["step"] for r in none["monitor"]] == [0, 2, 4]
    assert none["monitor"][-1]["final"] and none["monitor"][-1]["kappa"] != post["monitor"][-1]["kappa"]
    # MEMIT writes two requests at a time: its curves count requests, not writes.
    assert curve(runs["memit"], "kappa")[0] == [0, 2, 4]


def test_retention_ends_on_the_after_sequence_score(demo_output):
    runs = json.loads((demo_output / "results.json").read_text())["runs"]
    for row in ("prune_online", "prune_post_hoc", "memit_prune"):
        steps, values = curve(runs[row], EFFICACY)
        assert steps[-1] == 4
        assert values[-1] == final_quality(runs[row]["quality"])[EFFICACY]
    # The unrestrained row stops before the restraint: its after-sequence score is its last retention point.
    assert final_quality(runs["none"]["quality"])[EFFICACY] == curve(runs["none"], EFFICACY)[1][-1]


def test_online_sweep_is_one_fit_per_setting(demo_output):
    results = json.loads((demo_output / "results.json").read_text())
    points = sweep_points(results)
    assert [p["label"] for p in points] == ["no restraint", "online, alpha=1.5", "online, alpha=100", "online, linear"]
    # The demo's own alpha is the PRUNE online row; the other settings are fits of their own.
    online = row_summary(results["runs"]["prune_online"])
    assert points[2]["efficacy"] == online["efficacy"] and points[2]["general_mean"] == online["general_mean"]
    for fit in ("sweep_alpha_1.5", "sweep_linear"):
        assert (demo_output / "logs" / fit / "version_0" / "metrics.csv").exists()
    assert not (demo_output / "logs" / "sweep_alpha_100").exists()
    none = row_summary(results["runs"]["none"])
    assert points[0]["efficacy"] == none["efficacy"] and points[0]["general_mean"] == none["general_mean"]


def test_post_hoc_sweep_restrains_a_copy_as_prune_does(tmp_path_factory):
    output = _demo(tmp_path_factory, "methods: [rome]\nsweep: [1.5, 100.0]\nsweep_mode: post_hoc\nwandb: false\n")
    results = json.loads((output / "results.json").read_text())
    points = sweep_points(results)
    assert [p["label"] for p in points] == ["no restraint", "PRUNE online", "post hoc, alpha=1.5",
                                           "post hoc, alpha=100"]
    # At the post-hoc row's alpha the sweep's point is that row: the same restraint, scored the same way.
    post = row_summary(results["runs"]["prune_post_hoc"])
    assert points[3]["efficacy"] == pytest.approx(post["efficacy"])
    assert points[3]["general_mean"] == pytest.approx(post["general_mean"])
    # The sweep restrained a copy: the restraint after it still saw the whole unrestrained update.
    prune = results["runs"]["prune_post_hoc"]["prune"][0]
    none_top = max(results["runs"]["none"]["spectra"]["transformer.h.1.mlp.c_proj.weight"]["s"])
    assert prune["sigma_max_dW_before"] == pytest.approx(none_top, rel=1e-5)
    assert prune["sigma_max_dW_before"] > results["unedited"]["sigma_max_w0"]


def _run(quality_steps, general, kappa, label="x"):
    """A hand-made row: retention efficacy per step, final general ability, kappa at start and end."""
    quality = [{"step": s, "requests": s, "timing": "retention", "protocol": "teacher_forced", "kind": "counterfact",
                "score": "probability_success", "value": v, "pre_edit": False} for s, v in quality_steps]
    last = quality_steps[-1][0]
    quality.append(dict(quality[-1], timing="after_sequence"))
    return {"label": label, "quality": quality,
            "general": [{"step": last, "task": t, "metric": "acc", "value": v} for t, v in general.items()],
            "monitor": [{"step": 0, "name": "w", "kappa": kappa[0]},
                        {"step": last, "name": "w", "kappa": kappa[1], "final": True}],
            "spectra": {}, "prune": []}


def test_claims_say_whether_they_hold_with_the_numbers():
    unedited = {"general": {"a": 0.9, "b": 1.0}, "kappa": 10.0}
    results = {"n_requests": 100, "unedited": unedited, "runs": {
        "none": _run([(50, 0.8), (100, 0.6)], {"a": 0.1, "b": 0.2}, (10.0, 400.0)),
        "prune_online": _run([(50, 0.6), (100, 0.5)], {"a": 0.85, "b": 0.95}, (10.0, 20.0))}}
    (grows, ok1, text1), (falls, ok2, _), (prune, ok3, text3) = claims(results)
    assert ok1 and "from 10 to 400" in text1 and "(40x)" in text1 and ok2
    assert ok3 and "83% of the unrestrained run's" in text3  # 0.5 / 0.6
    results["runs"]["prune_online"] = _run([(100, 0.4)], {"a": 0.5, "b": 0.95}, (10.0, 20.0))
    _, _, (_, ok3, text3) = claims(results)
    assert not ok3 and "not met: general abilities kept, most edits kept." in text3
    assert row_summary(results["runs"]["none"])["kappa_start"] == 10.0


def _refused(capsys, argv) -> str:
    """prune-edit refuses the input with exit code 1 and one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    return capsys.readouterr().err.splitlines()[0]


@pytest.mark.parametrize("settings, message", [
    ("n_requests: 10\nevery_n_edits: 4\n", r"demo\.yaml: n_requests \(10\) must be a multiple of every_n_edits"),
    ("n_requests: 12\nevery_n_edits: 6\nbatch_size: 4\n", r"every_n_edits \(6\) must be a multiple of batch_size"),
    ("n_requests: 4\nn_edits: 3\n", r"unknown demo settings.*n_edits"),
    ("methods: [rome, serac]\n", r"methods must name some of"),
    ("sweep: [0.5]\n", r"sweep holds values of alpha > 1"),
    ("sweep_mode: later\n", r"sweep_mode must be 'online' or 'post_hoc'"),
    ("methods: [memit]\n", r"sweep needs the 'rome' method"),
])
def test_demo_refuses_bad_settings(tmp_path, capsys, settings, message):
    config = tmp_path / "demo.yaml"
    config.write_text(settings)
    line = _refused(capsys, ["demo", "--config", str(config), "--output", str(tmp_path / "out")])
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()

