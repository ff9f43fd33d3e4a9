"""The demo's results page: one row per method, the claims checked against the numbers, and the plots.

Everything here is a pure function of the ``results`` dict that :func:`prune_lightning.demo.run.run_demo` collects
(and writes to ``results.json``), so the page can be redrawn from that file alone (:func:`write_report`):

- ``results["runs"][<row>]``: one row of the comparison - ``label``, ``monitor`` (``ConditionNumberMonitor.
  history``), ``general`` (``GeneralAbilityEvaluator.history``), ``quality`` (``EditQualityEvaluator.history``),
  ``spectra`` (``sigma_max(W_0)`` and the singular values of each edited matrix's ``dW`` at the end), ``prune``;
- ``results["sweep"]``: ROME with PRUNE for each ``alpha`` (and the linear variant), online (a fit each) or post hoc
  (on the unrestrained update), as ``results["sweep_mode"]`` says: ``setting``, ``quality``
  (``{"<protocol>/<kind>/<score>": value}``), ``general`` (``{task: value}``);
- ``results["unedited"]``: the general abilities and ``kappa`` of the unedited model;
- ``results["single_edit"]``: ``sigma_max`` of every single ROME update over ``sigma_max(W_0)``.

The claims (:func:`claims`) are the paper's three, each checked on the ROME rows: ``kappa`` grows without
restraint; general abilities fall; PRUNE (online) bounds ``kappa``, keeps general abilities (mean within
:data:`GENERAL_TOLERANCE` of the unedited model) and keeps most edits (at least :data:`EFFICACY_SHARE` of the
unrestrained efficacy). Each paragraph says plainly whether it holds, with the numbers.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["EFFICACY_SHARE", "GENERAL_TOLERANCE", "claims", "curve", "final_general", "final_quality", "plot",
           "row_summary", "sweep_points", "table", "write_report"]

EFFICACY_SHARE = 0.8  # "keeps most edits": at least this share of the unrestrained run's efficacy
GENERAL_TOLERANCE = 0.1  # "keeps general abilities": mean general ability within this of the unedited model's

EFFICACY = "teacher_forced/counterfact/probability_success"
COLUMNS = (  # (header, quality key) of the edit-quality columns, after the whole sequence
    ("efficacy", EFFICACY),
    ("top-1", "teacher_forced/counterfact/top1_accuracy"),
    ("exact match", "free_generation/counterfact/exact_match"),
    ("contains", "free_generation/counterfact/contains"),
    ("generalization", "teacher_forced/counterfact/generalization"),
    ("locality", "teacher_forced/counterfact/locality"),
)


# ----------------------------------------------------------------------------------------------------------------
# reading the histories
# ----------------------------------------------------------------------------------------------------------------


def final_quality(history: Sequence[dict], timing: str = "after_sequence") -> dict[str, float]:
    """``{"<protocol>/<kind>/<score>": value}`` at ``timing``'s last step.

    ``"after_sequence"`` falls back to the last ``retention`` point where the history stops before the end of fit
    (the unrestrained row, cut off before the post-hoc restraint: its last retention point *is* its after-sequence
    score, as the evaluator logs it).
    """
    rows = [r for r in history if r["timing"] == timing]
    if not rows and timing == "after_sequence":
        rows = [r for r in history if r["timing"] == "retention"]
    if not rows:
        return {}
    last = max(r["step"] for r in rows)
    # After a post-hoc restraint the last step has two retention points; the later row is the restrained one.
    values: dict[str, float] = {}
    for r in rows:
        if r["step"] == last:
            values[f"{r['protocol']}/{r['kind']}/{r['score']}"] = r["value"]
    return values


def final_general(history: Sequence[dict]) -> dict[str, float]:
    """``{task: value}`` at the last step of a ``GeneralAbilityEvaluator.history``."""
    return _general_at(history)


def _general_at(history: Sequence[dict], step: Optional[int] = None) -> dict[str, float]:
    """``{task: value}`` at ``step`` (default: the last one; the later row wins at a repeated step)."""
    if not history:
        return {}
    step = max(r["step"] for r in history) if step is None else step
    return {r["task"]: r["value"] for r in history if r["step"] == step}


def _mean(values: Any) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def curve(run: dict, what: str) -> tuple[list[int], list[float]]:
    """``(edits, values)`` of a row: ``what`` is ``"kappa"`` (the largest over its edited matrices), ``"general"``
    (mean general ability) or a quality key (retention curve, e.g. :data:`EFFICACY`)."""
    points: dict[int, float] = {}
    if what == "kappa":
        for r in run["monitor"]:
            if not r.get("final"):
                points[r["step"]] = max(points.get(r["step"], 0.0), r["kappa"])
        finals = [r for r in run["monitor"] if r.get("final")]
        if finals:  # the end of fit (after a post-hoc restraint) replaces the last step's measurement
            points[finals[0]["step"]] = max(r["kappa"] for r in finals)
    elif what == "general":
        for step in sorted({r["step"] for r in run["general"]}):
            points[step] = _mean(_general_at(run["general"], step).values())
    else:
        protocol, kind, score = what.split("/")
        for r in run["quality"]:
            if r["timing"] == "retention" and (r["protocol"], r["kind"], r["score"]) == (protocol, kind, score):
                points[r["step"]] = r["value"]
    steps = sorted(points)
    per_write = run.get("requests_per_write", 1)  # MEMIT and AlphaEdit write batches: the x-axis counts requests
    return [s * per_write for s in steps], [points[s] for s in steps]


def row_summary(run: dict) -> dict[str, Any]:
    """The numbers of one row: the quality columns, ``own_edit`` (efficacy right after each own edit, mean),
    ``general`` (``{task: value}``), ``general_mean``, ``kappa`` (the largest final one) and ``kappa_start``."""
    quality = final_quality(run["quality"])
    own = final_quality(run["quality"], "after_own_edit")
    general = _general_at(run["general"])
    kappas = [r["kappa"] for r in run["monitor"] if r.get("final")]
    starts = [r["kappa"] for r in run["monitor"] if r["step"] == 0 and not r.get("final")]
    return {**{header: quality.get(key) for header, key in COLUMNS}, "own_edit": own.get(EFFICACY),
            "general": general, "general_mean": _mean(general.values()), "kappa": max(kappas, default=None),
            "kappa_start": max(starts, default=None)}


def sweep_points(results: dict) -> list[dict[str, Any]]:
    """The trade-off plot's data: the unrestrained run, then one point per PRUNE setting of the sweep (and PRUNE
    online when the sweep is post hoc), each ``{"label", "efficacy", "general_mean"}``."""
    points = []
    mode = results.get("sweep_mode", "post_hoc")
    shown = (("none", "no restraint"),) + ((("prune_online", "PRUNE online"),) if mode == "post_hoc" else ())
    for row, label in shown:
        if row in results["runs"]:
            summary = row_summary(results["runs"][row])
            points.append({"label": label, "efficacy": summary["efficacy"], "general_mean": summary["general_mean"]})
    for point in results.get("sweep", []):
        points.append({"label": f"{mode.replace('_', ' ')}, {point['setting']}",
                       "efficacy": point["quality"].get(EFFICACY), "general_mean": _mean(point["general"].values())})
    return points


# ----------------------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.3g}" if abs(value) >= 10 else f"{value:.3f}"


def table(results: dict) -> str:
    """The comparison as a Markdown table: the unedited model, then one row per run."""
    runs = results["runs"]
    tasks = sorted({task for run in runs.values() for task in _general_at(run["general"])})
    header = ["run", *[h for h, _ in COLUMNS], "after own edit", *[t.removeprefix("demo-") for t in tasks],
              "general (mean)", "kappa", "time (s)"]
    unedited = results["unedited"]
    rows = [["unedited", *["-"] * (len(COLUMNS) + 1), *[unedited["general"].get(t) for t in tasks],
             _mean(unedited["general"].values()), unedited.get("kappa"), None]]
    for run in runs.values():
        s = row_summary(run)
        rows.append([run["label"], *[s[h] for h, _ in COLUMNS], s["own_edit"], *[s["general"].get(t) for t in tasks],
                     s["general_mean"], s["kappa"], run.get("seconds")])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _sweep_table(results: dict) -> str:
    points = sweep_points(results)
    if not points:
        return ""
    lines = ["| setting | efficacy | general (mean) |", "|---|---|---|"]
    lines += [f"| {p['label']} | {_cell(p['efficacy'])} | {_cell(p['general_mean'])} |" for p in points]
    return "\n".join(lines)


def claims(results: dict) -> list[tuple[str, bool, str]]:
    """The paper's three claims checked on the ROME rows: ``(claim, holds, paragraph)``."""
    runs = results["runs"]
    if "none" not in runs:
        return []
    none = row_summary(runs["none"])
    general0 = _mean(results["unedited"]["general"].values())
    kappa0 = results["unedited"].get("kappa") or none["kappa_start"]
    out = []
    grows = none["kappa"] is not None and kappa0 is not None and none["kappa"] > 2 * kappa0
    out.append(("kappa grows without restraint", grows,
                f"Without restraint the condition number of the edited matrix went from {_cell(kappa0)} to "
                f"{_cell(none['kappa'])} over {results['n_requests']} ROME edits "
                f"({_cell(none['kappa'] / kappa0)}x). " + ("The claim holds." if grows else
                                                       "The claim does not hold here (less than doubled).")))
    fell = none["general_mean"] is not None and general0 - none["general_mean"] > GENERAL_TOLERANCE
    out.append(("general abilities fall", fell,
                f"The mean general ability fell from {_cell(general0)} (unedited) to {_cell(none['general_mean'])} "
                "(" + ", ".join(f"{t.removeprefix('demo-')} {_cell(results['unedited']['general'][t])} to "
                                f"{_cell(v)}" for t, v in sorted(none["general"].items())) + "). "
                + ("The claim holds." if fell else f"The claim does not hold here (less than {GENERAL_TOLERANCE}).")))
    if "prune_online" in runs:
        prune = row_summary(runs["prune_online"])
        bounded = prune["kappa"] is not None and prune["kappa"] < none["kappa"]
        kept = general0 - prune["general_mean"] <= GENERAL_TOLERANCE
        share = prune["efficacy"] / none["efficacy"] if none["efficacy"] else float("nan")
        most = share >= EFFICACY_SHARE
        parts = [f"kappa {_cell(prune['kappa'])} against {_cell(none['kappa'])} without restraint "
                 f"({'bounded' if bounded else 'not bounded'})",
                 f"mean general ability {_cell(prune['general_mean'])} against {_cell(general0)} unedited "
                 f"({'within' if kept else 'not within'} {GENERAL_TOLERANCE})",
                 f"efficacy {_cell(prune['efficacy'])} against {_cell(none['efficacy'])}, {share:.0%} of the "
                 f"unrestrained run's ({'at least' if most else 'less than'} {EFFICACY_SHARE:.0%})"]
        holds = bounded and kept and most
        out.append(("PRUNE bounds kappa, keeps general abilities and most edits", holds,
                    "PRUNE online: " + "; ".join(parts) + ". "
                    + ("The claim holds." if holds else "The claim does not hold in full here; not met: "
                       + ", ".join(name for name, ok in (("kappa bounded", bounded), ("general abilities kept", kept),
                                                         ("most edits kept", most)) if not ok)
                       + ".")))
    return out


def write_report(results: dict, output: Path, settings: dict, seconds: Optional[float] = None) -> str:
    """Writes ``results.md`` (and ``results.json``) into ``output`` and the plots next to them; returns the table."""
    output = Path(output)
    comparison = table(results)
    single = results.get("single_edit", [])
    regime = ""
    if single:
        regime = (f"One ROME edit against the edited matrix: its spectral norm is {_cell(single[0])} x "
                  f"`sigma_max(W_0)` (`||dW_1|| / sigma_max(W_0)`, the first edit; median "
                  f"{_cell(statistics.median(single))}, largest "
                  f"{_cell(max(single))} over {len(single)} edits), `sigma_max(W_0)` = "
                  f"{_cell(results['unedited'].get('sigma_max_w0'))}.\n\n")
    paragraphs = "\n\n".join(f"**{name}** ({'holds' if ok else 'does not hold'}). {text}"
                             for name, ok, text in claims(results))
    lines = [
        "# prune-edit demo", "",
        f"{results['n_requests']} sequential edits of the demo model (seed {settings.get('seed')}), the same requests "
        f"for every run, PRUNE alpha = {settings.get('alpha', 0):.4g}."
        + (f" Wall time {seconds:.0f} s." if seconds is not None else ""), "",
        regime + "Edit quality after the whole sequence (teacher-forced probability success and top-1 accuracy, "
        "free-generation exact match and containment, paraphrases and neighbours), right after each request's own "
        "edit (mean), the general-ability tasks and the largest final kappa of the edited matrices:", "",
        comparison, "", "## The claims", "", paragraphs, "",
        "## PRUNE's alpha: the trade-off", "",
        ("ROME + PRUNE online, one fit per setting" if results.get("sweep_mode") == "online" else
         "PRUNE post hoc on the same unrestrained ROME update, for each setting")
        + " (and the linear variant `(s + sigma_max) / 2`); efficacy after the sequence:", "",
        _sweep_table(results), "",
        "![trade-off](tradeoff.png)", "![kappa vs edits](kappa.png)",
        "![general ability vs edits](general_ability.png)",
        "![retention](retention.png)", "![singular values of dW](singular_values.png)", "",
        f"Settings: `{json.dumps(settings, default=str)}`", "",
    ]
    (output / "results.md").write_text("\n".join(lines))
    (output / "results.json").write_text(json.dumps(results, indent=1, default=float))
    plot(results, output)
    return comparison


# ----------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------


def plot(results: dict, output: Path) -> list[Path]:
    """Draws ``kappa.png``, ``general_ability.png``, ``retention.png``, ``tradeoff.png`` and ``singular_values.png``
    into ``output``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    colors = dict(zip(runs, plt.get_cmap("tab10").colors))
    paths = []

    def save(fig, ax, filename: str, xlabel: str, ylabel: str, title: str, log: bool = False) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(output / filename, dpi=110)
        plt.close(fig)
        paths.append(output / filename)

    def lines(filename: str, what: str, ylabel: str, title: str, log: bool = False, reference: Any = None) -> None:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for row, run in runs.items():
            steps, values = curve(run, what)
            if steps:
                # an unrestrained row is its post-hoc fit up to the restraint: dashed, on top
                style = dict(linestyle="--", zorder=3) if run.get("before_restraint") else {}
                ax.plot(steps, values, marker=".", color=colors[row], label=run["label"], **style)
        if reference is not None:
            ax.axhline(reference, color="gray", linestyle=":", label="unedited")
        save(fig, ax, filename, "edits", ylabel, title, log)

    lines("kappa.png", "kappa", "condition number kappa (largest edited matrix)", "kappa vs edits", log=True)
    lines("general_ability.png", "general", "mean general ability", "General ability vs edits",
          reference=_mean(results["unedited"]["general"].values()))
    lines("retention.png", EFFICACY, "efficacy (teacher-forced, edits so far)", "Retention of the edits")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = "osD^v<>ph*"
    for i, point in enumerate(sweep_points(results)):
        if point["efficacy"] is None or point["general_mean"] is None:
            continue
        ax.scatter(point["general_mean"], point["efficacy"], s=40, marker=markers[i % len(markers)],
                   label=point["label"])
    ax.axvline(_mean(results["unedited"]["general"].values()), color="gray", linestyle=":", label="unedited")
    save(fig, ax, "tradeoff.png", "mean general ability", "efficacy", "PRUNE's trade-off (ROME): one point per setting")

    # The matrix the ROME rows edit (MEMIT's and AlphaEdit's too when they write the same one), against its own
    # threshold; MEND's matrices are others.
    matrix, threshold = results["unedited"]["matrix"], results["unedited"]["sigma_max_w0"]
    fig, ax = plt.subplots(figsize=(9, 4))
    for row, run in runs.items():
        if matrix in run["spectra"]:
            s = run["spectra"][matrix]["s"]
            ax.plot(range(1, len(s) + 1), s, color=colors[row], label=run["label"])
    ax.axhline(threshold, color="gray", linestyle="--", label="sigma_max(W_0)")
    save(fig, ax, "singular_values.png", "index", "singular value of dW",
         f"Spectrum of the accumulated update of {matrix.removesuffix('.weight')} after all edits", log=True)
    return paths
