"""``prune-edit demo``: the paper's comparison on the embedded default, offline, in one command.

The same requests (edits of the demo model, a tiny GPT-2 that knows a synthetic world,
:func:`~prune_lightning.demo.demo_checkpoint`) are written by every method of :data:`FITS`, each fit carrying
``ConditionNumberMonitor``, ``GeneralAbilityEvaluator`` (the world's synthetic tasks) and ``EditQualityEvaluator``
(teacher-forced and free-generation scores; after each own edit, every ``every_n_edits`` edits and after the
sequence). The rows:

==================================  ==========================================================================
row                                 fit
==================================  ==========================================================================
ROME                                ``rome``: one request per write, PRUNE post hoc; the row is the fit before
                                    its restraint
ROME + PRUNE post hoc               ``rome``, after its restraint
ROME + PRUNE online                 ``rome_online``: PRUNE after every write
ROME + RECT                         ``rect``: RECT after every write
MEMIT / + PRUNE post hoc            ``memit``: ``batch_size`` requests per write
AlphaEdit / + PRUNE post hoc        ``alphaedit``: ``batch_size`` requests per write, null-space projection
MEND / + PRUNE post hoc             ``mend``: MEND's hypernetwork (trained once on facts the demo never edits,
                                    :func:`~prune_lightning.demo.mend.demo_mend_checkpoint`)
==================================  ==========================================================================

A post-hoc restraint changes nothing until the last write, so the run without restraint *is* the post-hoc run up to
its restraint: every edit, every ``kappa`` and every score along the way are the same. Each unrestrained row is
therefore read off its post-hoc fit just before the restraint (:class:`_BeforePostHoc` records where), one fit for
two rows. The trade-off plot sweeps PRUNE's settings (``sweep``: values of ``alpha``, and ``"linear"``): with
``sweep_mode="online"`` one more ROME + PRUNE online fit per setting (the demo's own ``alpha`` is the PRUNE online
row); with ``"post_hoc"``, at no extra fit, :class:`_PostHocSweep` restrains the ``rome`` fit's unrestrained update
with each setting and scores efficacy and general abilities.

Into one results folder go ``results.md`` (the table, the sweep, one paragraph per claim, the plots;
:mod:`prune_lightning.demo.report`), ``results.json``, the plots, ``logs/<fit>/version_0/metrics.csv`` (CSV logs),
``wandb/offline-run-*`` (W&B offline runs: one per fit, and ``summary`` with the plots and the table; ``wandb sync``
uploads them later) and the inputs: ``requests.json`` (CounterFact schema), ``tasks/*.jsonl``, ``corpus-<hash>.txt``
(second-moment statistics).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback
from typing_extensions import override

from prune_lightning.demo.report import write_report


@dataclass(frozen=True)
class _Fit:
    key: str  # the fit's name (log folder)
    method: str  # "rome", "memit", "alphaedit" or "mend"
    restraint: str  # "prune_post_hoc", "prune_online" or "rect"
    rows: tuple[tuple[str, str], ...]  # (row, label); a post-hoc fit's first row is the fit before its restraint
    alpha: Optional[float] = None  # PRUNE's alpha (default: the demo's)
    kind: str = "log"  # PRUNE's restraint function


FITS: dict[str, tuple[_Fit, ...]] = {
    "rome": (_Fit("rome", "rome", "prune_post_hoc", (("none", "ROME"), ("prune_post_hoc", "ROME + PRUNE post hoc"))),
             _Fit("rome_online", "rome", "prune_online", (("prune_online", "ROME + PRUNE online"),))),
    "rect": (_Fit("rect", "rome", "rect", (("rect", "ROME + RECT"),)),),
    "memit": (_Fit("memit", "memit", "prune_post_hoc",
                   (("memit", "MEMIT"), ("memit_prune", "MEMIT + PRUNE post hoc"))),),
    "alphaedit": (_Fit("alphaedit", "alphaedit", "prune_post_hoc",
                       (("alphaedit", "AlphaEdit"), ("alphaedit_prune", "AlphaEdit + PRUNE post hoc"))),),
    "mend": (_Fit("mend", "mend", "prune_post_hoc", (("mend", "MEND"), ("mend_prune", "MEND + PRUNE post hoc"))),),
}
ROW_ORDER = ("none", "prune_online", "prune_post_hoc", "rect", "memit", "memit_prune", "alphaedit", "alphaedit_prune",
             "mend", "mend_prune")
BATCHED = ("memit", "alphaedit")


def _rome_settings() -> dict:
    return {"layer": 0, "fact_token": "last", "mom2_adjustment": False, "context_template_lengths": [[5, 3]],
            "v_num_grad_steps": 15, "v_lr": 0.5}


def _memit_settings() -> dict:
    return {"layers": [0], "fact_token": "last", "mom2_adjustment": False, "mom2_update_weight": 1.0,
            "context_template_lengths": [[5, 3]], "v_num_grad_steps": 15, "v_lr": 0.5, "clamp_norm_factor": 4.0}


def _alphaedit_settings() -> dict:
    return {"layers": [0], "fact_token": "last", "context_template_lengths": [[5, 3]], "v_num_grad_steps": 15,
            "v_lr": 0.5, "clamp_norm_factor": 4.0, "nullspace_threshold": 1.0}


@dataclass
class DemoConfig:
    """Settings of ``prune-edit demo`` (``configs/demo.yaml``).

    Args:
        seed: Seed of the world, the demo model's training and the edits.
        n_entities: Size of the world (default: the generator's).
        train_steps: Training steps of the demo model (default: its training config's).
        n_requests: Requests edited by every method, in file order.
        n_task_examples: Examples per synthetic general-ability task.
        every_n_edits: How often (in requests) the monitors and evaluators measure.
        alpha: Base of PRUNE's logarithm in the PRUNE rows.
        methods: Which fits run (:data:`FITS`): ``rome`` (ROME, ROME + PRUNE online and post hoc, the sweep),
            ``rect``, ``memit``, ``alphaedit``, ``mend``.
        batch_size: Requests per write of MEMIT and AlphaEdit.
        editor: ``ROME`` keyword arguments (also the ROME of the RECT row).
        memit: ``MEMIT`` keyword arguments.
        alphaedit: ``AlphaEdit`` keyword arguments.
        rect: ``RECTCallback`` keyword arguments.
        sweep: PRUNE settings of the trade-off plot: values of ``alpha``, and ``"linear"`` for the linear variant
            (``(s + sigma_max) / 2``).
        sweep_mode: ``"online"``: a ROME + PRUNE online fit per setting; ``"post_hoc"``: each setting restrains the
            unrestrained ROME update at the end (no extra fit).
        free_generation: Also score the edits by greedy generation.
        corpus_lines: Lines of the world's text used for second-moment statistics (AlphaEdit's null space, and any
            editor with ``mom2_adjustment``).
        wandb: Also log to W&B offline runs.
    """

    seed: int = 0
    n_entities: Optional[int] = None
    train_steps: Optional[int] = None
    n_requests: int = 60
    n_task_examples: int = 32
    every_n_edits: int = 20
    alpha: float = math.e
    methods: list = field(default_factory=lambda: list(FITS))
    batch_size: int = 10
    editor: dict = field(default_factory=_rome_settings)
    memit: dict = field(default_factory=_memit_settings)
    alphaedit: dict = field(default_factory=_alphaedit_settings)
    rect: dict = field(default_factory=lambda: {"ratio": 0.2})
    sweep: list = field(default_factory=lambda: [1.2, 1.5, 2.0, math.e, "linear"])
    sweep_mode: str = "online"
    free_generation: bool = True
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
        if self.n_requests < 1 or self.every_n_edits < 1 or self.batch_size < 1:
            raise ValueError(f"n_requests, every_n_edits and batch_size must be positive, got {self.n_requests}, "
                             f"{self.every_n_edits} and {self.batch_size}")
        if self.n_requests % self.every_n_edits:
            # The unrestrained rows are the post-hoc fits' measurements at the last edit (module docstring).
            raise ValueError(f"n_requests ({self.n_requests}) must be a multiple of every_n_edits "
                             f"({self.every_n_edits}), so that the last edit is measured before the post-hoc "
                             "restraint")
        if any(m in BATCHED for m in self.methods) and self.every_n_edits % self.batch_size:
            raise ValueError(f"every_n_edits ({self.every_n_edits}) must be a multiple of batch_size "
                             f"({self.batch_size}): MEMIT and AlphaEdit are measured after whole batches")
        unknown = [m for m in self.methods if m not in FITS]
        if unknown or not self.methods:
            raise ValueError(f"methods must name some of {list(FITS)}, got {self.methods!r}")
        if self.sweep_mode not in ("online", "post_hoc"):
            raise ValueError(f"sweep_mode must be 'online' or 'post_hoc', got {self.sweep_mode!r}")
        if self.sweep and "rome" not in self.methods:
            raise ValueError("sweep needs the 'rome' method (it restrains ROME's edits); set sweep: [] without it")
        for setting in self.sweep:
            if setting != "linear" and (isinstance(setting, bool) or not isinstance(setting, (int, float))
                                        or not setting > 1):
                raise ValueError(f"sweep holds values of alpha > 1 and 'linear', got {setting!r}")


@dataclass
class _Inputs:
    model_dir: Path
    requests: Path
    tasks: dict
    corpus: Path
    hypernetwork: Optional[Path] = None


def run_demo(config: DemoConfig, output: os.PathLike) -> Path:
    """Runs the comparison and writes the results folder; returns the path of ``results.md``."""
    from prune_lightning.demo import World, demo_checkpoint

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world = World.generate(seed=config.seed, **({"n_entities": config.n_entities} if config.n_entities else {}))
    print(f"[demo] world: {len(world.facts())} facts; demo model (trained once, then cached) ...", flush=True)
    model_dir = demo_checkpoint(seed=config.seed, steps=config.train_steps, n_entities=config.n_entities)
    requests = world.write_counterfact(output / "requests.json", config.n_requests, seed=config.seed)
    tasks = world.write_tasks(output / "tasks", config.n_task_examples, seed=config.seed, n_requests=config.n_requests)
    # Named by its content: the statistics cache knows a local corpus by its file name and refuses a cached C whose
    # corpus had other content under the same name (another seed, world or corpus_lines).
    text = "\n".join(world.training_texts()[: config.corpus_lines]) + "\n"
    corpus = output / f"corpus-{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt"
    corpus.write_text(text)
    inputs = _Inputs(model_dir, requests, tasks, corpus)
    if "mend" in config.methods:
        from prune_lightning.demo.mend import demo_mend_checkpoint

        print("[demo] MEND's hypernetwork (trained once on facts the demo does not edit, then cached) ...", flush=True)
        inputs.hypernetwork = demo_mend_checkpoint(seed=config.seed, n_requests=config.n_requests,
                                                   model_dir=model_dir, n_entities=config.n_entities,
                                                   train_steps=config.train_steps, progress=False)

    results: dict[str, Any] = {"n_requests": config.n_requests, "runs": {}, "sweep": [],
                               "sweep_mode": config.sweep_mode, "single_edit": []}
    results["unedited"] = _unedited(config, inputs)
    print(f"[demo] before editing, target_true beats target_new on {results['unedited']['rewrite_accuracy']:.1%} of "
          "the rewrite prompts", flush=True)
    for method in config.methods:
        for fit in FITS[method]:
            labels = " and ".join(f"'{label}'" for _, label in fit.rows)
            print(f"[demo] {labels}: {config.n_requests} requests ...", flush=True)
            runs, extras = _run_fit(config, fit, inputs, output)
            results["runs"].update(runs)
            results.update(extras)
    results["runs"] = {row: results["runs"][row] for row in ROW_ORDER if row in results["runs"]}
    if config.sweep_mode == "online":
        results["sweep"] = _online_sweep(config, inputs, output, results["runs"])
    seconds = time.perf_counter() - started
    table = write_report(results, output, asdict(config), seconds)
    if config.wandb:
        _wandb_summary(output, results)
    print(table, flush=True)
    print(f"[demo] results in {output} ({time.perf_counter() - started:.0f} s)", flush=True)
    return output / "results.md"


def _unedited(config: DemoConfig, inputs: _Inputs) -> dict[str, Any]:
    """General abilities, ``kappa`` and ``sigma_max`` of the edited matrix of the ROME rows and the share of rewrite
    prompts where ``target_true`` beats ``target_new``, on the unedited model."""
    from prune_lightning.demo import rewrite_accuracy
    from prune_lightning.editors import ROME
    from prune_lightning.models import get_parameter, load_causal_lm, load_tokenizer
    from prune_lightning.spectral import condition_number, spectral_norm

    model, tokenizer = load_causal_lm(str(inputs.model_dir)), load_tokenizer(str(inputs.model_dir))
    name = ROME(**{**config.editor, "mom2_adjustment": False}).parameter_names(model)[0]
    weight = get_parameter(model, name).detach().float()
    return {"general": general_scores(model, tokenizer, _examples(inputs.tasks)),
            "kappa": condition_number(weight), "sigma_max_w0": spectral_norm(weight), "matrix": name,
            "rewrite_accuracy": rewrite_accuracy(model, tokenizer, json.loads(inputs.requests.read_text()))}


def _examples(tasks: dict) -> dict[str, list]:
    from prune_lightning.data.tasks import load_task

    return {name: load_task(name, str(path), limit=0) for name, path in tasks.items()}


@torch.no_grad()
def general_scores(model, tokenizer, examples: dict[str, list], batch_size: int = 32) -> dict[str, float]:
    """``{task: score}`` of the model on each task's examples, scored as ``GeneralAbilityEvaluator`` scores them."""
    from prune_lightning.callbacks.general_ability import task_score

    return {name: task_score(name, model, tokenizer, shard, batch_size=batch_size) for name, shard in examples.items()}


# --------------------------------------------------------------------------------------------------------------------
# callbacks of the demo's fits
# --------------------------------------------------------------------------------------------------------------------


class _BeforePostHoc(Callback):
    """Listed before the restraint: at the end of fit, before a post-hoc restraint, records how long each measuring
    callback's history is and the spectrum of the still unrestrained update ``dW``."""

    def __init__(self, measuring: Sequence[Callback]) -> None:
        self.measuring = list(measuring)
        self.lengths: dict[int, int] = {}
        self.spectra: dict[str, dict] = {}

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self.lengths = {id(c): len(c.history) for c in self.measuring}
        self.spectra = _spectra(pl_module)


class _EditSizes(Callback):
    """``sigma_max`` of every single write's update over ``sigma_max(W_0)`` (the first edited matrix), measured
    on the accumulated ``dW`` before and after the write; listed before any restraint."""

    def __init__(self) -> None:
        self.ratios: list[float] = []
        self._before: Optional[torch.Tensor] = None

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        entry = _first_entry(pl_module)
        self._before = entry.delta.dense().clone() if entry is not None else None

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from prune_lightning.spectral import spectral_norm

        entry = _first_entry(pl_module)
        if entry is None:
            return
        before = self._before if self._before is not None else torch.zeros_like(entry.delta.dense())
        self.ratios.append(spectral_norm(entry.delta.dense() - before) / entry.sigma_max0)


def _first_entry(pl_module):
    registry = getattr(pl_module, "edit_registry", None)
    names = list(registry) if registry is not None else []
    return registry[names[0]] if names else None


class _PostHocSweep(Callback):
    """Listed before the post-hoc restraint: at the end of fit, writes ``W_0 + F(dW)`` for each setting (``alpha``
    or ``"linear"``), scores every request and the general-ability tasks, and puts ``W_0 + dW`` back."""

    def __init__(self, settings: Sequence[Union[float, str]], quality, examples: dict[str, list],
                 free_generation: bool) -> None:
        self.settings = list(settings)
        self.quality = quality
        self.examples = examples
        self.free_generation = free_generation
        self.points: list[dict[str, Any]] = []

    @override
    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        from prune_lightning.metrics.quality import EditQualityMetrics
        from prune_lightning.models import write_weight

        registry = pl_module.edit_registry
        for setting in self.settings:
            label, alpha, kind = _setting(setting)
            for name in registry:
                entry = registry[name]
                # A copy of dW restrained by the same code as PRUNECallback's
                delta = copy.deepcopy(entry.delta)
                delta.restrain(entry.sigma_max0, alpha=alpha, kind=kind)
                restrained = delta.dense()
                write_weight(registry.parameter(name), entry.w0_on(restrained.device) + restrained)
            metrics = EditQualityMetrics(free_generation=self.free_generation)
            metrics.update(pl_module.model, pl_module.tokenizer, self.quality.requests, batch_size=32)
            self.points.append({"setting": label, "alpha": alpha,
                                "kind": kind, "quality": {k: float(v) for k, v in metrics.compute().items()},
                                "general": general_scores(pl_module.model, pl_module.tokenizer, self.examples)})
        registry.write(list(registry))


def _spectra(module) -> dict[str, dict]:
    """``sigma_max(W_0)`` and the singular values of ``dW`` of every edited matrix."""
    return {name: {"sigma_max_w0": module.edit_registry[name].sigma_max0,
                   "s": module.edit_registry[name].delta.svd()[1].tolist()} for name in module.edit_registry}


# --------------------------------------------------------------------------------------------------------------------
# one fit
# --------------------------------------------------------------------------------------------------------------------


def _editor(config: DemoConfig, method: str, inputs: _Inputs):
    from prune_lightning.editors import MEND, MEMIT, ROME, AlphaEdit

    corpus = {"mom2_corpus": str(inputs.corpus), "mom2_n_samples": config.corpus_lines, "seed": config.seed}
    if method == "rome":
        return ROME(**{**corpus, **config.editor})
    if method == "memit":
        return MEMIT(**{**corpus, **config.memit})
    if method == "alphaedit":
        return AlphaEdit(**{**corpus, **config.alphaedit})
    return MEND(hypernetwork=str(inputs.hypernetwork))


def _run_fit(config: DemoConfig, fit: _Fit, inputs: _Inputs, output: Path) -> tuple[dict, dict]:
    """One fit; returns its rows ``{row: run}`` and, from the ``rome`` fit, ``{"sweep": ..., "single_edit": ...}``
    (else ``{}``)."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    from prune_lightning import TRAINER_DEFAULTS, EditDataModule, SequentialEditor
    from prune_lightning.callbacks import (ConditionNumberMonitor, EditQualityEvaluator, GeneralAbilityEvaluator,
                                           PRUNECallback, RECTCallback, TaskConfig)

    seed_everything(config.seed, verbose=False)
    module = SequentialEditor(model=str(inputs.model_dir), editor=_editor(config, fit.method, inputs),
                              save_edited_model=False, verbose=False)
    per_write = config.batch_size if fit.method in BATCHED else 1
    every = config.every_n_edits // per_write
    monitor = ConditionNumberMonitor(every_n_edits=every)
    general = GeneralAbilityEvaluator(
        tasks=[TaskConfig(name=name, source=str(path), limit=0) for name, path in inputs.tasks.items()],
        every_n_edits=every, batch_size=32)
    # pre_edit off: the table shows each request right after its own edit, after the sequence and the retention curve
    quality = EditQualityEvaluator(every_n_edits=every, batch_size=32, pre_edit=False,
                                   free_generation=config.free_generation)
    if fit.restraint == "rect":
        restraint = RECTCallback(**{"mode": "online", **config.rect})
    else:
        restraint = PRUNECallback(alpha=fit.alpha or config.alpha, kind=fit.kind,
                                  mode=fit.restraint.removeprefix("prune_"))
    post_hoc = fit.restraint.endswith("post_hoc")
    before = _BeforePostHoc([monitor, general, quality]) if post_hoc else None
    sizes = _EditSizes() if fit.key == "rome" else None
    sweep = (_PostHocSweep(config.sweep, quality, _examples(inputs.tasks), config.free_generation)
             if fit.key == "rome" and config.sweep and config.sweep_mode == "post_hoc" else None)
    callbacks = [c for c in (sizes, before, sweep, restraint, monitor, general, quality) if c is not None]
    # A re-run replaces the fit's CSV log (Lightning would warn, then overwrite it all the same).
    shutil.rmtree(output / "logs" / fit.key / "version_0", ignore_errors=True)
    loggers: list = [CSVLogger(output / "logs", name=fit.key, version=0)]
    if config.wandb:
        from prune_lightning.loggers import EditWandbLogger

        loggers.append(EditWandbLogger(name=fit.key, project="prune-lightning-demo", save_dir=str(output),
                                       offline=True))
    trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": 1, "default_root_dir": output,
                         "logger": loggers, "callbacks": callbacks, "enable_checkpointing": False})
    start = time.perf_counter()
    trainer.fit(module, datamodule=EditDataModule(source=str(inputs.requests), batch_size=per_write))
    seconds = time.perf_counter() - start
    if config.wandb:
        import wandb

        wandb.finish()
    restraint_history = getattr(restraint, "history", [])
    rows = dict(fit.rows)
    last_row = fit.rows[-1][0]
    runs = {last_row: {"label": rows[last_row], "fit": fit.key, "requests_per_write": per_write,
                       "monitor": monitor.history, "general": general.history, "quality": quality.history,
                       "spectra": _spectra(module), "prune": restraint_history, "seconds": seconds}}
    if post_hoc:
        first = fit.rows[0][0]
        runs[first] = {"label": rows[first], "fit": fit.key, "requests_per_write": per_write,
                       **{name: callback.history[: before.lengths[id(callback)]] for name, callback in
                          (("monitor", monitor), ("general", general), ("quality", quality))},
                       "spectra": before.spectra, "prune": [], "seconds": seconds, "before_restraint": True}
        # The unrestrained fit's last measurements are its final ones.
        runs[first]["monitor"] = [dict(r, final=True) if r["step"] == trainer.global_step and not r.get("final")
                                  else r for r in runs[first]["monitor"]]
    extras: dict[str, Any] = {}
    if sweep is not None:
        extras["sweep"] = sweep.points
    if sizes is not None:
        extras["single_edit"] = sizes.ratios
    return runs, extras


def _setting(setting: Union[float, str]) -> tuple[str, float, str]:
    """``(label, alpha, kind)`` of a sweep setting."""
    if setting == "linear":
        return "linear", math.e, "linear"
    return f"alpha={float(setting):.4g}", float(setting), "log"


def _online_sweep(config: DemoConfig, inputs: _Inputs, output: Path, runs: dict) -> list[dict[str, Any]]:
    """A ROME + PRUNE online fit per sweep setting (the demo's own ``alpha``: the PRUNE online row); the trade-off
    plot's points ``{"setting", "alpha", "kind", "quality", "general"}``."""
    from prune_lightning.demo.report import final_general, final_quality

    points = []
    for setting in config.sweep:
        label, alpha, kind = _setting(setting)
        if kind == "log" and math.isclose(alpha, config.alpha) and "prune_online" in runs:
            run = runs["prune_online"]
        else:
            print(f"[demo] sweep: ROME + PRUNE online, {label}: {config.n_requests} requests ...", flush=True)
            fit = _Fit(f"sweep_{label.replace('=', '_')}", "rome", "prune_online", (("sweep", label),), alpha, kind)
            run = _run_fit(config, fit, inputs, output)[0]["sweep"]
        points.append({"setting": label, "alpha": alpha, "kind": kind, "quality": final_quality(run["quality"]),
                       "general": final_general(run["general"])})
    return points


def _wandb_summary(output: Path, results: dict) -> None:
    """A W&B offline run ``summary`` with the plots and the comparison table."""
    import wandb

    from prune_lightning.demo.report import COLUMNS, row_summary

    run = wandb.init(project="prune-lightning-demo", name="summary", dir=str(output), mode="offline",
                     config={"n_requests": results["n_requests"]})
    images = {path.stem: wandb.Image(str(path)) for path in sorted(output.glob("*.png"))}
    columns = ["run", *[h for h, _ in COLUMNS], "general (mean)", "kappa"]
    data = []
    for row in results["runs"].values():
        summary = row_summary(row)
        data.append([row["label"], *[summary[h] for h, _ in COLUMNS], summary["general_mean"], summary["kappa"]])
    run.log({**images, "results": wandb.Table(columns=columns, data=data)})
    run.finish()


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """``prune-edit demo [--config configs/demo.yaml] [--output DIR]``."""
    parser = argparse.ArgumentParser(prog="prune-edit demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="demo settings (YAML); default %(default)s")
    parser.add_argument("--output", default="runs/demo", help="results folder; default %(default)s")
    args = parser.parse_args(argv)
    config = DemoConfig.from_yaml(args.config) if Path(args.config).exists() else DemoConfig()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    # Eleven fits: Lightning's per-fit lines (accelerators, "fit stopped", the evaluators' example counts) would drown
    # the demo's own progress; warnings still show.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return run_demo(config, args.output)
