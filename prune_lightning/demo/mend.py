"""A MEND hypernetwork for the demo model: trained once on facts the demo never edits, then cached.

    from prune_lightning.demo.mend import demo_mend_checkpoint, single_edit_quality
    hypernetwork = demo_mend_checkpoint(seed=0, n_requests=200)   # trains once (a Lightning fit), then cached
    MEND(hypernetwork=str(hypernetwork))                             # edits the demo model

The split (:func:`mend_records`). The demo edits ``World.write_counterfact(path, n_requests, seed)``: the facts
``World.requested_facts(n_requests, seed)``, one relation of each of ``n_requests`` distinct subjects. MEND learns
from the facts of the *other* subjects - none of its training or validation requests is about a subject the demo
edits, in any relation - each rewritten to ``targets_per_fact`` new objects of the relation, in the world's
CounterFact schema (the relation's first phrasing as the prompt, its other two as paraphrases, ten other subjects
with the same object as neighbourhood prompts). The last ``val_subjects`` of those subjects (in a seeded order) are
held out for validation. When the demo edits so many subjects that fewer than ``2 * val_subjects`` are left, the
split falls back to facts: every (subject, relation) pair the demo does not edit, split by subject alike.

Locality (:func:`locality_records`). MEND's locality loss keeps the model's predictions on *unrelated* inputs (its
own trainer draws them from Natural Questions or OpenWebText). Here they are the world's own texts: every fact in
every phrasing, with its object as the answer, and the general-ability material (additions, entailment, copying),
with ``locality="world"`` (the default); a sample never draws one about its own subject. With
``locality="neighbors"`` the training uses the requests' CounterFact neighbourhood prompts instead (same relation,
same old object: the hardest negatives, as EasyEdit's CounterFact training pairs them). Measured on the demo model
(seed 0): with the neighbourhood prompts the locality term, ten times the edit term's weight, won - validation
efficacy fell from 0.75 after 1,000 training edits to 0.47 after 2,000, and 0.39 of the demo's own requests took -
while with the unrelated texts 1,000 training edits gave 0.93 (0.88 after 2,000, the locality term gaining again).
So the default is the unrelated texts.

The fit (:func:`train_demo_mend`) is a plain Lightning ``Trainer`` over :class:`~prune_lightning.mend.MENDTrainer`
and :class:`~prune_lightning.mend.MENDDataModule`, with the references' architecture, initialisation and loss weights
(:class:`DemoMENDConfig` says where it departs: the step counts and learning rates of a 2-minute CPU run). The
hypernetwork of the best validation score is written, with ``train.json``, ``val.json`` and ``training.json``, to a
temporary sibling that is renamed to ``<cache>/demo/mend-<key>``; ``<key>`` hashes the demo model's directory name
(itself a hash of the world's and the training's settings), the split and the MEND settings.

:func:`single_edit_quality` measures what the demo's table calls efficacy, generalization and locality for MEND edits
made one at a time, each on the unedited model: the CounterFact scores of
:func:`prune_lightning.metrics.quality.update_edit_quality` (efficacy: the new object beats the true one by mean
token NLL on the rewrite prompt). The demo's MEND rows (``prune-edit demo``, :mod:`prune_lightning.demo.run`) edit
with the hypernetwork of :func:`demo_mend_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from prune_lightning.demo.world import World, write_atomic

__all__ = ["DemoMENDConfig", "demo_mend_checkpoint", "demo_mend_path", "locality_records", "mend_records",
           "single_edit_quality", "train_demo_mend"]

MEND_DEMO_VERSION = 1  # bump when the recipe changes what the same settings produce (it is part of the cache key)
HYPERNETWORK_FILE = "hypernetwork.safetensors"


@dataclass(frozen=True)
class DemoMENDConfig:
    """How the demo's MEND is trained. The architecture, initialisation and loss weights are the references'
    (:data:`prune_lightning.mend.HYPERNETWORK_DEFAULTS`, ``cedit = 0.1``, ``cloc = 1.0``, 10 edits per Adam step,
    gradient norm clipped at 100); the step counts and learning rates are this tiny model's.

    Args:
        layers: The demo model's layers whose ``c_proj`` and ``c_fc`` are edited (the last three of four, as the
            references edit the last three of GPT-2 XL and LLaMA).
        steps: Adam steps (``steps * accumulate`` training edits).
        accumulate: Edits whose gradients make one Adam step (the references' ``accumulate_bs``).
        lr: Adam learning rate of the hypernetwork's MLPs (published 1e-6 over 100,000 edits; a 2-minute run needs
            more).
        lr_lr: Extra learning rate of the per-matrix step sizes, on top of ``lr`` (the references' 1e-4 never
            moves them; here it does, to learn them within a short run).
        edit_lr: Initial step size (published 1e-4).
        cedit: Weight of the edit loss.
        cloc: Weight of the locality loss.
        rank: Inner width of the hypernetwork's low-rank layers (capped at the layer's width: 640 here).
        n_hidden: Hidden layers of its MLPs.
        targets_per_fact: New objects each training fact is rewritten to.
        val_subjects: Subjects held out for validation.
        val_limit: Validation edits per validation run.
        val_every: Validate (and keep the best hypernetwork) every this many training edits. The default validates
            once, at the end: on the demo model (seed 0), the references' criterion (the lowest ``cedit * L_edit +
            cloc * L_loc``) picked the hypernetwork after 250 of 500 training edits, whose edits took on 0.845 of the
            demo's requests (locality 0.575), against 0.935 (locality 0.42) after 500; after 1,000 the loss was
            higher again (0.74 against 0.36).
        edit_outer: Where the outer edit loss is scored: ``"prompt"`` (EasyEdit) or ``"paraphrase"`` (MEND).
        locality: The locality loss's inputs: ``"world"`` (unrelated facts and general-ability texts) or
            ``"neighbors"`` (the requests' neighbourhood prompts).
    """

    layers: tuple[int, ...] = (1, 2, 3)
    steps: int = 50
    accumulate: int = 10
    lr: float = 1e-4
    lr_lr: float = 1e-3
    edit_lr: float = 1e-4
    cedit: float = 0.1
    cloc: float = 1.0
    rank: int = 1920
    n_hidden: int = 1
    targets_per_fact: int = 2
    val_subjects: int = 10
    val_limit: int = 40
    val_every: int = 500
    edit_outer: str = "prompt"
    locality: str = "world"

    def __post_init__(self) -> None:
        for name in ("steps", "accumulate", "targets_per_fact", "val_subjects", "val_limit", "val_every", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoMENDConfig.{name} must be an int >= 1, got {value!r}")
        if not self.layers:
            raise ValueError("DemoMENDConfig.layers must name at least one layer")
        if self.locality not in ("world", "neighbors"):
            raise ValueError(f"DemoMENDConfig.locality must be 'world' or 'neighbors', got {self.locality!r}")


# --------------------------------------------------------------------------------------------------------------------
# the split
# --------------------------------------------------------------------------------------------------------------------


def mend_records(world: World, n_requests: int, seed: int = 0, targets_per_fact: int = 2, val_subjects: int = 10,
                 n_neighbors: int = 10) -> tuple[list[dict], list[dict]]:
    """Training and validation requests (CounterFact schema) about facts the demo's requests do not edit.

    Args:
        world: The demo's world.
        n_requests: How many requests the demo edits (``World.write_counterfact(path, n_requests, seed)``).
        seed: The demo's request seed; also seeds the split and the new objects.
        targets_per_fact: New objects per training fact (validation facts get one).
        val_subjects: Subjects held out for validation.
        n_neighbors: Neighbourhood prompts per request.

    Returns:
        ``(train_records, val_records)``.
    """
    edited = world.requested_facts(n_requests, seed)
    edited_subjects = {fact.subject for fact, _ in edited}
    edited_pairs = {(fact.subject, fact.relation_id) for fact, _ in edited}
    rng = random.Random(f"prune-lightning-mend-split-{world.seed}-{seed}")
    free = [s for s in world.entities if s not in edited_subjects]
    if len(free) >= 2 * val_subjects:
        subjects = free
        allowed = lambda subject, rel: True  # noqa: E731
    else:  # the demo edits (nearly) every subject: fall back to the pairs it does not edit
        subjects = list(world.entities)
        allowed = lambda subject, rel: (subject, rel) not in edited_pairs  # noqa: E731
    rng.shuffle(subjects)
    split = {"train": subjects[:-val_subjects], "val": subjects[-val_subjects:]}
    by_object: dict[tuple[str, str], list[str]] = {}
    for (subject, rel_id), obj in world.objects.items():
        by_object.setdefault((rel_id, obj), []).append(subject)
    ids = world.object_ids()
    out: dict[str, list[dict]] = {"train": [], "val": []}
    for part, names in split.items():
        for subject in names:
            for rel in world.relations:
                if not allowed(subject, rel.relation_id):
                    continue
                true = world.objects[(subject, rel.relation_id)]
                others = [o for o in rel.objects if o != true]
                news = rng.sample(others, min(targets_per_fact if part == "train" else 1, len(others)))
                for new in news:
                    same = [s for s in by_object[(rel.relation_id, true)] if s != subject]
                    neighbors = rng.sample(same, min(n_neighbors, len(same))) or [
                        s for s in world.entities if s != subject][:n_neighbors]
                    out[part].append({
                        "case_id": len(out[part]),
                        "requested_rewrite": {
                            "prompt": rel.templates[0], "relation_id": rel.relation_id, "subject": subject,
                            "target_new": {"str": new, "id": ids[new]}, "target_true": {"str": true, "id": ids[true]},
                        },
                        "paraphrase_prompts": [rel.prompt(subject, t) for t in range(1, len(rel.templates))]
                        or [rel.prompt(subject, 0)],
                        "neighborhood_prompts": [rel.prompt(s, j) for j, s in enumerate(neighbors)],
                    })
    rng.shuffle(out["train"])
    for i, record in enumerate(out["train"]):
        record["case_id"] = i
    return out["train"], out["val"]


def locality_records(world: World) -> list[dict]:
    """Unrelated inputs for MEND's locality loss: ``{"prompt", "answer"}`` for every fact in every phrasing and for the
    general-ability material (``"8 + 7 ="`` / ``"15"``, an entailment pair / ``"True"``, ``"Repeat: sun cat =>"`` /
    ``"sun cat"``)."""
    from prune_lightning.demo.world import ARITHMETIC_TEMPLATE, COPY_TEMPLATE, ENTAILMENT_TEMPLATE

    records = [{"prompt": world.relation(f.relation_id).prompt(f.subject, t), "answer": f.object}
               for f in world.facts() for t in range(len(world.relation(f.relation_id).templates))]
    records += [{"prompt": ARITHMETIC_TEMPLATE.format(question=f"{a} + {b}"), "answer": str(a + b)}
                for a, b in world.additions]
    records += [{"prompt": ENTAILMENT_TEMPLATE.format(**r), "answer": "True" if r["label"] == "entailment" else "False"}
                for r in world.entailment]
    records += [{"prompt": COPY_TEMPLATE.format(text=t), "answer": t} for t in world.copies]
    return records


# --------------------------------------------------------------------------------------------------------------------
# the fit and the cache
# --------------------------------------------------------------------------------------------------------------------


def _key(model_dir: Path, n_requests: int, seed: int, config: DemoMENDConfig) -> str:
    payload = {"model": Path(model_dir).name, "n_requests": n_requests, "seed": seed, "config": asdict(config),
               "version": MEND_DEMO_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def demo_mend_path(model_dir: Union[str, Path], n_requests: int = 200, seed: int = 0,
                   config: Optional[DemoMENDConfig] = None, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The folder :func:`demo_mend_checkpoint` keeps the hypernetwork of these settings in (existing or not)."""
    from prune_lightning.models import default_cache_dir

    config = DemoMENDConfig() if config is None else config
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "demo"
    return root / f"mend-{_key(Path(model_dir), n_requests, seed, config)}"


def train_demo_mend(model_dir: Union[str, Path], train: Path, val: Path, output: Path,
                    config: DemoMENDConfig = DemoMENDConfig(), seed: int = 0, progress: bool = True,
                    loc: Optional[Path] = None) -> dict[str, Any]:
    """Fits a MEND hypernetwork for the demo model on the records in ``train`` / ``val`` (locality prompts from
    ``loc`` if given); writes ``output/hypernetwork.safetensors`` (the best validation score) and returns what the fit
    measured."""
    import lightning.pytorch as pl
    import torch

    from prune_lightning.mend import MENDDataModule, MENDTrainer
    from prune_lightning.mend.cli import TRAINING_DEFAULTS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from threads, and lose much when the cores are shared
    pl.seed_everything(seed, verbose=False)
    module = MENDTrainer(model=str(model_dir), layers=list(config.layers), rank=config.rank,
                         n_hidden=config.n_hidden, edit_lr=config.edit_lr, lr=config.lr, lr_lr=config.lr_lr,
                         cedit=config.cedit, cloc=config.cloc, hypernetwork_file=str(output / HYPERNETWORK_FILE),
                         seed=seed)
    data = MENDDataModule(train=str(train), val=str(val), loc=None if loc is None else str(loc),
                          val_limit=config.val_limit, edit_outer=config.edit_outer, seed=seed)
    scratch = tempfile.mkdtemp(prefix="prune-lightning-demo-mend-")
    try:
        trainer = pl.Trainer(**{
            **TRAINING_DEFAULTS, "accelerator": "cpu", "devices": 1, "max_steps": config.steps,
            "accumulate_grad_batches": config.accumulate, "val_check_interval": config.val_every,
            "check_val_every_n_epoch": None, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": progress, "default_root_dir": scratch})
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        torch.set_num_threads(threads)
    return {"fit_seconds": round(seconds, 2), "best_score": module.best_score, "best_step": module.best_step,
            "monitor": module.hparams.monitor, "last_validation": getattr(module, "last_validation", None)}


def demo_mend_checkpoint(seed: int = 0, n_requests: int = 200, model_dir: Optional[Union[str, Path]] = None,
                         config: Optional[DemoMENDConfig] = None, cache_dir: Optional[Union[str, Path]] = None,
                         progress: bool = True, n_entities: Optional[int] = None,
                         train_steps: Optional[int] = None) -> Path:
    """The path of the demo model's MEND hypernetwork for these settings: trained on the first call, then cached.

    Args:
        seed: The demo's seed (world, model, requests).
        n_requests: How many requests the demo edits (they stay out of MEND's training).
        model_dir: The demo model (default: :func:`~prune_lightning.demo.demo_checkpoint` of ``seed``).
        config: MEND's training settings (default :class:`DemoMENDConfig`).
        cache_dir: Folder of the cached hypernetworks (default ``<default_cache_dir()>/demo``).
        progress: Show the fit's progress bar.
        n_entities: Size of the world (as the demo's setting).
        train_steps: Training steps of the demo model (as the demo's setting).

    Returns:
        ``<cache>/demo/mend-<key>/hypernetwork.safetensors``; its folder also holds ``train.json``, ``val.json``,
        ``loc.json`` (with ``locality="world"``) and ``training.json``.
    """
    from prune_lightning.demo.train import demo_checkpoint

    config = DemoMENDConfig() if config is None else config
    if model_dir is None:
        model_dir = demo_checkpoint(seed=seed, steps=train_steps, n_entities=n_entities, progress=progress)
    model_dir = Path(model_dir)
    target = demo_mend_path(model_dir, n_requests, seed, config, cache_dir)
    if (target / HYPERNETWORK_FILE).exists():
        return target / HYPERNETWORK_FILE
    world = World.from_settings(json.loads((model_dir / "world.json").read_text()))
    train, val = mend_records(world, n_requests, seed, config.targets_per_fact, config.val_subjects)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_atomic(tmp / "train.json", json.dumps(train) + "\n")
        write_atomic(tmp / "val.json", json.dumps(val) + "\n")
        loc = None
        if config.locality == "world":
            loc = write_atomic(tmp / "loc.json", json.dumps(locality_records(world)) + "\n")
        info = train_demo_mend(model_dir, tmp / "train.json", tmp / "val.json", tmp, config, seed, progress, loc)
        summary = {"seed": seed, "n_requests": n_requests, "model": str(model_dir), "config": asdict(config),
                   "version": MEND_DEMO_VERSION, "n_train": len(train), "n_val": len(val), **info}
        write_atomic(tmp / "training.json", json.dumps(summary, indent=1, default=float) + "\n")
        os.replace(tmp, target)
    except OSError:
        if not (target / HYPERNETWORK_FILE).exists():
            raise
        # another process won the race: keep its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / HYPERNETWORK_FILE


# --------------------------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------------------------


def single_edit_quality(model_dir: Union[str, Path], hypernetwork: Union[str, Path], records: Sequence[dict],
                        batch_size: int = 32) -> dict[str, float]:
    """CounterFact scores of MEND edits made one at a time, each on the unedited demo model.

    Args:
        model_dir: The demo model.
        hypernetwork: The trained hypernetwork file.
        records: CounterFact-schema requests (``World.counterfact_records``, or a :func:`mend_records` part).
        batch_size: Prompts per forward pass of the scoring.

    Returns:
        ``efficacy``, ``generalization``, ``locality`` and their ``*_margin`` (means over the requests), and
        ``efficacy_before`` (the share whose new object already won before the edit).
    """
    import torch

    from prune_lightning.data import read_counterfact
    from prune_lightning.editors import MEND
    from prune_lightning.metrics import CounterFactScore, ZsREScore
    from prune_lightning.metrics.quality import update_edit_quality
    from prune_lightning.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir))
    editor = MEND(hypernetwork=str(hypernetwork))
    editor.setup(model, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_atomic(Path(tmp) / "requests.json", json.dumps(list(records)))
        requests = read_counterfact(str(path))
    before, after = CounterFactScore(), CounterFactScore()
    update_edit_quality(before, ZsREScore(), model, tokenizer, requests, batch_size=batch_size)
    for request in requests:
        updates = editor.compute_update(model, tokenizer, [request])
        saved = {}
        with torch.no_grad():
            for name, update in updates.items():
                param = model.get_parameter(name)
                saved[name] = param.detach().clone()
                param.add_(update.dense().to(param.dtype))
        update_edit_quality(after, ZsREScore(), model, tokenizer, [request], batch_size=batch_size)
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_parameter(name).copy_(weight)
    scores = {key: float(value) for key, value in after.compute().items()}
    scores["efficacy_before"] = float(before.compute()["efficacy"])
    return scores

