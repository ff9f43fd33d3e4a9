"""``prune-edit demo``: the paper's comparison on the embedded default, offline, in one command.

The same sequence of ROME edits of the demo model (a tiny GPT-2 that knows a synthetic world,
:func:`~prune_lightning.demo.demo_checkpoint`) is compared without restraint, with PRUNE online and with PRUNE post
hoc; each run carries ``ConditionNumberMonitor``, ``GeneralAbilityEvaluator`` (the world's synthetic tasks) and
``EditQualityEvaluator``.

Two fits give the three rows. Post-hoc PRUNE changes nothing until the last edit has been written, so the run
without restraint *is* the post-hoc run up to its final restraint: every edit, every ``kappa`` and every score
along the way are the same. The ``none`` row and curves are therefore read off the post-hoc fit just before its
restraint (:class:`_BeforePostHoc` records where), which saves a third of the time; the CSV log and W&B run named
``post_hoc`` hold both.

Into one results folder go:

- ``results.md``: rows none / PRUNE online / PRUNE post hoc; columns efficacy, generalization, locality, each
  general-ability score and the final ``kappa`` of each edited matrix;
- ``kappa.png``, ``general_ability.png``, ``singular_values.png``;
- ``logs/<run>/version_0/metrics.csv`` (CSV logs) and ``wandb/offline-run-*`` (W&B offline runs, ``wandb sync``
  uploads them later);
- the inputs: ``requests.json`` (CounterFact schema), ``tasks/*.jsonl``, ``corpus.txt``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import Callback
from typing_extensions import override

RUNS = (("none", "none"), ("online", "PRUNE online"), ("post_hoc", "PRUNE post hoc"))
# The fits that run; "none" is the post-hoc fit before its restraint (see the module docstring).
FITS = ("online", "post_hoc")


@dataclass
class DemoConfig:
    """Settings of ``prune-edit demo`` (``configs/demo.yaml``).

    Args:
        seed: Seed of the world, the demo model's training and the edits.
        n_entities: Size of the world (default: the generator's).
        train_steps: Training steps of the demo model (default: its training config's).
        n_requests: Edits per run, in file order.
        n_task_examples: Examples per synthetic general-ability task.
        every_n_edits: How often the monitors and evaluators measure.
        alpha: Base of PRUNE's logarithm.
        editor: ``ROME`` keyword arguments.
        corpus_lines: Lines of the world's text used for ROME's second-moment statistics.
        wandb: Also log to W&B offline runs.
    """

    seed: int = 0
    n_entities: Optional[int] = None
    train_steps: Optional[int] = None
    n_requests: int = 200
    n_task_examples: int = 32
    every_n_edits: int = 40
    alpha: float = math.e
    editor: dict = field(default_factory=lambda: {"layer": 1, "fact_token": "last", "mom2_adjustment": False,
                                                   "context_template_lengths": [[5, 3]], "v_num_grad_steps": 15,
                                                   "v_lr": 0.5})
    corpus_lines: int = 2000
    wandb: bool = True

    @classmethod
    def from_yaml(cls, path: os.PathLike) -> "DemoConfig":
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown demo settings {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def __post_init__(self) -> None:
        if self.n_requests < 1 or self.every_n_edits < 1:
            raise ValueError(f"n_requests and every_n_edits must be positive, got {self.n_requests} and "
                             f"{self.every_n_edits}")
        if self.n_requests % self.every_n_edits:
            # The row without restraint is the post-hoc fit's measurement at the last edit (module docstring).
            raise ValueError(f"n_requests ({self.n_requests}) must be a multiple of every_n_edits "
                             f"({self.every_n_edits}), so that the last edit is measured before the post-hoc "
                             "restraint")


def run_demo(config: DemoConfig, output: os.PathLike) -> Path:
    """Runs the comparison and writes the results folder; returns the path of ``results.md``."""
    from prune_lightning.demo import World, demo_checkpoint, rewrite_accuracy

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world = World.generate(seed=config.seed, **({"n_entities": config.n_entities} if config.n_entities else {}))
    print(f"[demo] world: {len(world.facts())} facts; demo model (trained once, then cached) ...", flush=True)
    model_dir = demo_checkpoint(seed=config.seed, steps=config.train_steps, n_entities=config.n_entities)
    requests = world.write_counterfact(output / "requests.json", config.n_requests, seed=config.seed)
    tasks = world.write_tasks(output / "tasks", config.n_task_examples, seed=config.seed, n_requests=config.n_requests)
    corpus = output / "corpus.txt"
    corpus.write_text("\n".join(world.training_texts()[: config.corpus_lines]) + "\n")

    from prune_lightning.models import load_causal_lm, load_tokenizer

    records = json.loads(requests.read_text())
    known = rewrite_accuracy(load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir)), records)
    print(f"[demo] before editing, target_true beats target_new on {known:.1%} of the rewrite prompts", flush=True)

    results = {}
    for key in FITS:
        label = dict(RUNS)[key] + (" (and none: the same fit before its restraint)" if key == "post_hoc" else "")
        print(f"[demo] run '{label}': {config.n_requests} ROME edits ...", flush=True)
        results.update(_run(config, key, model_dir, requests, tasks, corpus, output))
    results = {key: results[key] for key, _ in RUNS}
    table = _write_results(config, results, output, known, time.perf_counter() - started)
    _plot(results, output)
    print(table, flush=True)
    print(f"[demo] results in {output} ({time.perf_counter() - started:.0f} s)", flush=True)
    return output / "results.md"


class _BeforePostHoc(Callback):
    """Listed first: at the end of fit, before the post-hoc restraint, records how long each measuring callback's
    history is and the spectrum of the still unrestrained update ``dW``."""

    def __init__(self, measuring: Sequence[Callback]) -> None:
        self.measuring = list(measuring)
        self.lengths: dict[int, int] = {}
        self.spectra: dict[str, dict] = {}

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self.lengths = {id(c): len(c.history) for c in self.measuring}
        self.spectra = _spectra(pl_module)


def _spectra(module) -> dict[str, dict]:
    """``sigma_max(W_0)`` and the singular values of ``dW`` of every edited matrix."""
    return {name: {"sigma_max_w0": module.edit_registry[name].sigma_max0,
                   "s": module.edit_registry[name].delta.svd()[1].tolist()} for name in module.edit_registry}


def _run(config: DemoConfig, key: str, model_dir: Path, requests: Path, tasks: dict, corpus: Path,
         output: Path) -> dict[str, dict[str, Any]]:
    """One fit; returns ``{key: run}``, and for the post-hoc fit also ``{"none": the fit before its restraint}``."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    from prune_lightning import EditDataModule, SequentialEditor
    from prune_lightning.callbacks import (ConditionNumberMonitor, EditQualityEvaluator, GeneralAbilityEvaluator,
                                           PRUNECallback, TaskConfig)
    from prune_lightning import TRAINER_DEFAULTS
    from prune_lightning.editors import ROME

    seed_everything(config.seed, verbose=False)
    editor = ROME(**{"mom2_corpus": str(corpus), "mom2_n_samples": config.corpus_lines, "seed": config.seed,
                     **config.editor})
    module = SequentialEditor(model=str(model_dir), editor=editor, save_edited_model=False, verbose=False)
    monitor = ConditionNumberMonitor(every_n_edits=config.every_n_edits)
    general = GeneralAbilityEvaluator(
        tasks=[TaskConfig(name=name, source=str(path), limit=0) for name, path in tasks.items()],
        every_n_edits=config.every_n_edits, batch_size=32)
    quality = EditQualityEvaluator(every_n_edits=config.n_requests, batch_size=32, pre_edit=True)
    prune = PRUNECallback(alpha=config.alpha, mode=key)
    before = _BeforePostHoc([monitor, general, quality])
    callbacks = [before, prune, monitor, general, quality]
    loggers = [CSVLogger(output / "logs", name=key, version=0)]
    if config.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(name=key, project="prune-lightning-demo", save_dir=str(output), offline=True))
    trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": 1, "default_root_dir": output,
                         "logger": loggers, "callbacks": callbacks, "enable_checkpointing": False})
    trainer.fit(module, datamodule=EditDataModule(source=str(requests)))
    if config.wandb:
        import wandb

        wandb.finish()
    runs = {key: {"monitor": monitor.history, "general": general.history, "quality": quality.history,
                  "spectra": _spectra(module), "prune": prune.history}}
    if key == "post_hoc":
        runs["none"] = {**{name: callback.history[: before.lengths[id(callback)]] for name, callback in
                           (("monitor", monitor), ("general", general), ("quality", quality))},
                        "spectra": before.spectra, "prune": []}
        # The unrestrained fit's last measurements are its final ones.
        runs["none"]["monitor"] = [dict(r, final=True) if r["step"] == config.n_requests and not r.get("final")
                                   else r for r in runs["none"]["monitor"]]
    return runs


def _final_quality(history: list[dict]) -> dict[str, float]:
    rows = [r for r in history if not r["pre_edit"] and r["kind"] == "counterfact"]
    last = max((r["step"] for r in rows), default=None)
    return {r["score"]: r["value"] for r in rows if r["step"] == last}


def _final_general(history: list[dict]) -> dict[str, float]:
    last = max((r["step"] for r in history), default=None)
    return {r["task"]: r["value"] for r in history if r["step"] == last}


def _final_kappa(history: list[dict]) -> dict[str, float]:
    return {r["name"]: r["kappa"] for r in history if r.get("final")}


def _write_results(config: DemoConfig, results: dict, output: Path, known: float, seconds: float) -> str:
    first = results["none"]
    tasks = sorted(_final_general(first["general"]))
    matrices = sorted(_final_kappa(first["monitor"]))
    pre = {r["score"]: r["value"] for r in first["quality"] if r["pre_edit"] and r["kind"] == "counterfact"}
    header = ["run", "efficacy", "generalization", "locality", *tasks,
              *[f"kappa {m.removesuffix('.weight')}" for m in matrices]]
    rows = []
    kappa0 = {r["name"]: r["kappa"] for r in first["monitor"] if r["step"] == 0 and not r.get("final")}
    general0 = {r["task"]: r["value"] for r in first["general"] if r["step"] == 0}
    rows.append(["before editing", pre.get("efficacy"), pre.get("generalization"), pre.get("locality"),
                 *[general0.get(t) for t in tasks], *[kappa0.get(m) for m in matrices]])
    for key, label in RUNS:
        run = results[key]
        quality, general, kappa = _final_quality(run["quality"]), _final_general(run["general"]), \
            _final_kappa(run["monitor"])
        rows.append([label, quality.get("efficacy"), quality.get("generalization"), quality.get("locality"),
                     *[general.get(t) for t in tasks], *[kappa.get(m) for m in matrices]])

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return value
        return f"{value:.3g}" if abs(value) >= 10 else f"{value:.3f}"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    table = "\n".join(lines)
    text = (
        f"# prune-edit demo\n\n{config.n_requests} sequential ROME edits of the demo model (seed {config.seed}), "
        f"PRUNE alpha = {config.alpha:.4g}. Before editing, target_true beat target_new on {known:.1%} of the rewrite "
        f"prompts. The 'before editing' row: edit quality of each request just before its own edit, general "
        f"abilities and kappa at edit 0. Wall time {seconds:.0f} s.\n\n{table}\n\n"
        f"Settings: `{json.dumps(asdict(config))}`\n"
    )
    (output / "results.md").write_text(text)
    (output / "results.json").write_text(json.dumps(results, indent=1, default=float))
    return table


def _plot(results: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"none": "tab:red", "online": "tab:blue", "post_hoc": "tab:green"}
    labels = dict(RUNS)
    # "none" is the post-hoc fit up to its restraint, so the two curves coincide until the last edit: "none" is drawn
    # last, dashed, to stay visible on top.
    order = [key for key in ("online", "post_hoc", "none") if key in results]
    style = {"none": dict(linestyle="--", zorder=3)}

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in order:
        run = results[key]
        for name in sorted({r["name"] for r in run["monitor"]}):
            rows = [r for r in run["monitor"] if r["name"] == name]
            ax.plot([r["step"] for r in rows], [r["kappa"] for r in rows], marker=".", color=colors[key],
                    label=f"{labels[key]}", **style.get(key, {}))
    ax.set_xlabel("edits")
    ax.set_ylabel("condition number kappa")
    ax.set_yscale("log")
    ax.set_title("Condition number of the edited matrix")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "kappa.png", dpi=120)
    plt.close(fig)

    tasks = sorted({r["task"] for r in results["none"]["general"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for key in order:
            rows = [r for r in results[key]["general"] if r["task"] == task]
            ax.plot([r["step"] for r in rows], [r["value"] for r in rows], marker=".", color=colors[key],
                    label=labels[key], **style.get(key, {}))
        ax.set_title(task)
        ax.set_xlabel("edits")
    axes[0][0].set_ylabel("score")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(output / "general_ability.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, run in results.items():
        for name, spectrum in run["spectra"].items():
            ax.plot(range(1, len(spectrum["s"]) + 1), spectrum["s"], color=colors[key], label=labels[key])
            threshold = spectrum["sigma_max_w0"]
    ax.axhline(threshold, color="gray", linestyle="--", label="sigma_max(W_0)")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value of the accumulated update dW")
    ax.set_yscale("log")
    ax.set_title("Spectrum of dW after all edits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "singular_values.png", dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """``prune-edit demo [--config configs/demo.yaml] [--output DIR]``."""
    parser = argparse.ArgumentParser(prog="prune-edit demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="demo settings (YAML); default %(default)s")
    parser.add_argument("--output", default="runs/demo", help="results folder; default %(default)s")
    args = parser.parse_args(argv)
    config = DemoConfig.from_yaml(args.config) if Path(args.config).exists() else DemoConfig()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return run_demo(config, args.output)
