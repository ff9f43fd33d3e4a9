r"""Sequential ROME editing on one and on two processes (DDP, FSDP2): edits per second, and the weights they end with.

Sequential editing cannot be data-parallel (each edit is computed on the model the previous ones made), so under DDP
every rank edits every request and what is spread is the work inside one edit: ROME's context-template rows (see
:mod:`prune_lightning.distributed`). This script runs the same edits of the same tiny model side by side:

- **edits**: ``--edits`` ROME edits (PRUNE online and the condition-number monitor attached, as in a real run) on one
  process, on two with DDP (``strategy="ddp_spawn"``, gloo on the CPU) and on two with the model sharded (FSDP2,
  ``ModelParallelStrategy``, started with ``torchrun``; ROME's rows split evenly, and every forward all-gathers
  the layers' weights). The time is taken inside the fit, from
  ``on_train_start`` to ``on_train_end`` (the processes' start-up is reported apart). Each rank saves its edited
  matrix; the table gives the largest absolute difference to the single-process matrix and between the ranks.
  ROME runs with the paper's 20 generated context templates (plus the plain prompt and the KL prompt: 22 rows to
  split) on a tiny GPT-2 (``--model``).
- **sync**: what keeping the callbacks' results identical on every rank costs, per write, for one matrix: computing
  them on every rank (PRUNE's restraint of the accumulated update; the condition number of the edited matrix)
  against computing them on rank 0 and broadcasting the result (``torch.distributed.broadcast`` of the restrained
  factors or dense update; of three floats for the condition number). Two processes, gloo; the time of a write is
  that of the slower rank; median of ``--repeats``.

On a machine with 2 CPU cores shared with other work the speed-up can well be below 1: the tiny model's forward passes
are dominated by fixed per-call costs that splitting the rows does not shrink, and the processes compete for the
cores. The script reports what it measures.

Usage::

    python benchmarks/ddp_editing.py                  # both parts
    python benchmarks/ddp_editing.py --part edits --edits 20
    python benchmarks/ddp_editing.py --part sync
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
try:
    import prune_lightning  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

_CITIES = ["Paris", "Rome", "Berlin", "Madrid", "London", "Tokyo", "Cairo", "Lima", "Oslo", "Vienna", "Dublin",
           "Prague"]
_PEOPLE = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jonas", "Kemal", "Lena"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------------
# part 1: edits per second on 1 and 2 processes
# --------------------------------------------------------------------------------------------------------------------


def write_requests(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` CounterFact-schema requests about made-up people (the schema of tests/conftest.py's)."""
    import random

    rng = random.Random(seed)
    records = []
    for i in range(n):
        subject = f"{_PEOPLE[i % len(_PEOPLE)]} {_PEOPLE[(7 * i + 3) % len(_PEOPLE)]}son"
        true, new = rng.sample(_CITIES, 2)
        records.append({
            "case_id": i,
            "requested_rewrite": {"prompt": "The hometown of {}", "relation_id": "P19", "subject": subject,
                                  "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"The home town of {subject}"],
            "neighborhood_prompts": ["The hometown of Ann Smith"],
        })
    path.write_text(json.dumps(records))
    return path


class _Recorder(Callback):
    """Times the fit from on_train_start to on_train_end and saves this rank's edited matrix (ddp_spawn copies
    neither attributes nor timings back to the parent process)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        seconds = time.perf_counter() - self.start
        (name,) = pl_module.edited_parameter_names
        from prune_lightning.models import full_weight, get_parameter

        weight = full_weight(get_parameter(pl_module.model, name)).cpu().clone()  # sharded: gathered
        label = "fsdp" if type(trainer.strategy).__name__ == "ModelParallelStrategy" else f"world{trainer.world_size}"
        torch.save({"seconds": seconds, "edits": int(pl_module.requests_edited), "weight": weight,
                    "threads": torch.get_num_threads()},
                   Path(self.out_dir) / f"{label}-rank{trainer.global_rank}.pt")


def _edit_run(mode: str, args: argparse.Namespace, requests: Path, out_dir: Path) -> float:
    """One fit (``mode``: ``"1"`` one process, ``"ddp"`` two with ddp_spawn, ``"fsdp"`` this rank of two with the
    model sharded, under torchrun); returns its wall time including the start-up of its processes."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    from prune_lightning import EditDataModule, SequentialEditor
    from prune_lightning.callbacks import ConditionNumberMonitor, PRUNECallback
    from prune_lightning import TRAINER_DEFAULTS
    from prune_lightning.editors import ROME

    editor = ROME(layer=1, v_num_grad_steps=args.steps, v_lr=0.5, v_weight_decay=0.5, early_stop_loss=0.0,
                  mom2_corpus=str(REPO / "configs/data/tiny-corpus.txt"), mom2_n_samples=200,
                  context_template_lengths=((5, 10), (10, 10)))
    module = SequentialEditor(model=args.model, editor=editor, save_edited_model=False, verbose=False)
    strategy = {"1": "auto", "ddp": "ddp_spawn", "fsdp": ModelParallelStrategy()}[mode]
    trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": "cpu", "devices": 1 if mode == "1" else 2,
                         "strategy": strategy, "default_root_dir": str(out_dir),
                         "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
                         "callbacks": [PRUNECallback(alpha=1e4), ConditionNumberMonitor(), _Recorder(str(out_dir))]})
    start = time.perf_counter()
    trainer.fit(module, datamodule=EditDataModule(source=str(requests)))
    return time.perf_counter() - start


def run_edits(args: argparse.Namespace) -> list[str]:
    from prune_lightning.models import tiny_checkpoint

    if args.model.startswith("tiny:"):
        tiny_checkpoint(args.model)  # build it once, before any process is spawned
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        requests = write_requests(out / "requests.json", args.edits)
        runs = {}
        for mode, label, processes in (("1", "1", 1), ("ddp", "2, DDP", 2), ("fsdp", "2, FSDP2", 2)):
            torch.set_num_threads(args.single_threads if processes == 1 else max(1, cores // processes))
            _log(f"edits: {args.edits} ROME edits, {label} process(es) ...")
            if mode == "fsdp":  # Lightning's launcher for ModelParallelStrategy re-runs the script: use torchrun
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                "2", __file__, "--fsdp-worker", str(out), "--edits", str(args.edits), "--steps",
                                str(args.steps), "--model", args.model], check=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes))})
                wall = time.perf_counter() - start
            else:
                wall = _edit_run(mode, args, requests, out)
            prefix = "fsdp" if mode == "fsdp" else f"world{processes}"
            ranks = [torch.load(out / f"{prefix}-rank{r}.pt") for r in range(processes)]
            runs[label] = {"wall": wall, "ranks": ranks}
            _log(f"edits: {label}: {max(r['seconds'] for r in ranks):.1f} s editing, {wall:.1f} s wall")
        torch.set_num_threads(cores)
    reference = runs["1"]["ranks"][0]["weight"]
    base = args.edits / runs["1"]["ranks"][0]["seconds"]
    lines = ["| processes | threads each | edits | editing s | edits/s | speed-up | wall s (with start-up) "
             "| max abs diff to 1 process | max abs diff between ranks |", "|---|---|---|---|---|---|---|---|---|"]
    for processes, run in runs.items():
        seconds = max(r["seconds"] for r in run["ranks"])
        weights = [r["weight"] for r in run["ranks"]]
        to_single = max(float((w - reference).abs().max()) for w in weights)
        between = max(float((w - weights[0]).abs().max()) for w in weights)
        lines.append(f"| {processes} | {run['ranks'][0]['threads']} | {run['ranks'][0]['edits']} | {seconds:.1f} | "
                     f"{args.edits / seconds:.2f} | {args.edits / seconds / base:.2f}x | {run['wall']:.1f} | "
                     f"{to_single:.1e} | {between:.1e} |")
    return lines


# --------------------------------------------------------------------------------------------------------------------
# part 2: recompute everywhere, or compute on rank 0 and broadcast
# --------------------------------------------------------------------------------------------------------------------

# (label, shape of the matrix, columns of the accumulated update's factors; None: dense)
SYNC_CASES = [
    ("tiny GPT-2 c_proj, rank 10", (256, 64), 10),
    ("tiny GPT-2 c_proj, dense (after 20 edits)", (256, 64), None),
    ("GPT-2 XL c_proj, rank 100", (6400, 1600), 100),
    ("GPT-2 XL c_proj, dense", (6400, 1600), None),
]
_MODES = {"empty": 0, "lowrank": 1, "dense": 2}


def broadcast_tracker(tracker, src: int = 0) -> None:
    """Makes every rank's ``DeltaTracker`` equal to rank ``src``'s: a small header, then one tensor."""
    state = tracker.state_dict() if dist.get_rank() == src else None
    header = torch.zeros(3, dtype=torch.int64)
    if state is not None:
        columns = state["left"].shape[1] if state["mode"] == "lowrank" else 0
        header = torch.tensor([_MODES[state["mode"]], columns, state["compressed_columns"]])
    dist.broadcast(header, src)
    mode, columns, compressed = (int(v) for v in header)
    m, n = tracker.shape
    if mode == _MODES["lowrank"]:
        flat = (torch.cat([state["left"].reshape(-1), state["right"].reshape(-1)]) if state is not None
                else torch.empty((m + n) * columns, dtype=tracker.dtype))
        dist.broadcast(flat, src)
        if state is None:
            tracker.load_state_dict({"shape": [m, n], "mode": "lowrank", "compressed_columns": compressed,
                                     "left": flat[: m * columns].view(m, columns),
                                     "right": flat[m * columns:].view(n, columns)})
    elif mode == _MODES["dense"]:
        delta = state["delta"].contiguous() if state is not None else torch.empty(m, n, dtype=tracker.dtype)
        dist.broadcast(delta, src)
        if state is None:
            tracker.load_state_dict({"shape": [m, n], "mode": "dense", "delta": delta})
    elif state is None:
        tracker.load_state_dict({"shape": [m, n], "mode": "empty"})


def _sync_worker(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from prune_lightning.editors.base import LowRankUpdate
    from prune_lightning.spectral import DeltaTracker, singular_value_extremes, spectral_norm

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    rows = []
    try:
        for label, (m, n), columns in SYNC_CASES:
            gen = torch.Generator().manual_seed(0)
            w0 = torch.randn(m, n, generator=gen) / math.sqrt(max(m, n))
            sigma0 = spectral_norm(w0)
            r = columns or min(m, n)
            scale = sigma0 * torch.logspace(1, -1, r, dtype=torch.float64)  # the top half reaches the threshold
            left = (torch.randn(m, r, generator=gen, dtype=torch.float64) / math.sqrt(m) * scale).float()
            right = (torch.randn(n, r, generator=gen, dtype=torch.float64) / math.sqrt(n)).float()

            def fresh():
                tracker = DeltaTracker((m, n), dense_rank_fraction=0.0 if columns is None else 1.0)
                tracker.add(LowRankUpdate(left, right))
                return tracker

            timings = {"restrain_everywhere": [], "restrain_rank0_broadcast": [],
                       "kappa_everywhere": [], "kappa_rank0_broadcast": []}
            for _ in range(repeats):
                tracker = fresh()
                dist.barrier()
                start = time.perf_counter()
                tracker.restrain(sigma0, alpha=math.e)
                timings["restrain_everywhere"].append(slowest(time.perf_counter() - start))
                reference = tracker.dense()

                tracker = fresh()
                dist.barrier()
                start = time.perf_counter()
                if rank == 0:
                    tracker.restrain(sigma0, alpha=math.e)
                broadcast_tracker(tracker, src=0)
                timings["restrain_rank0_broadcast"].append(slowest(time.perf_counter() - start))
                assert torch.equal(tracker.dense(), reference)

                w = w0 + reference
                dist.barrier()
                start = time.perf_counter()
                singular_value_extremes(w)
                timings["kappa_everywhere"].append(slowest(time.perf_counter() - start))

                dist.barrier()
                start = time.perf_counter()
                values = torch.zeros(3, dtype=torch.float64)
                if rank == 0:
                    s_max, s_min = singular_value_extremes(w)
                    values = torch.tensor([s_max, s_min, s_max / s_min], dtype=torch.float64)
                dist.broadcast(values, 0)
                timings["kappa_rank0_broadcast"].append(slowest(time.perf_counter() - start))
            rows.append({"label": label, **{k: 1e3 * statistics.median(v) for k, v in timings.items()}})
            if rank == 0:
                _log(f"sync: {label}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in rows[-1].items() if k != "label"))
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def run_sync(args: argparse.Namespace) -> list[str]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sync.json"
        mp.spawn(_sync_worker, args=(2, _free_port(), args.repeats, str(out)), nprocs=2, join=True)
        rows = json.loads(out.read_text())
    lines = ["| matrix, accumulated update | restrain: every rank (ms) | restrain: rank 0 + broadcast (ms) "
             "| kappa: every rank (ms) | kappa: rank 0 + broadcast (ms) |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['restrain_everywhere']:.2f} | {row['restrain_rank0_broadcast']:.2f} | "
                     f"{row['kappa_everywhere']:.2f} | {row['kappa_rank0_broadcast']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("edits", "sync", "all"), default="all")
    parser.add_argument("--edits", type=int, default=20, help="ROME edits per run")
    parser.add_argument("--steps", type=int, default=20, help="ROME's v_num_grad_steps (no early stop)")
    parser.add_argument("--model", default="tiny:gpt2:n_embd=128", help="model of the edit runs")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each sync measurement (median)")
    parser.add_argument("--single-threads", type=int, default=1,
                        help="torch threads of the one-process run (the two-process run: cores / 2 each, as "
                             "ddp_spawn sets them); 1 by default - two threads on two cores that other work shares "
                             "spin badly (one such run here took 4.6x longer than the two-process run)")
    parser.add_argument("--fsdp-worker", metavar="OUT_DIR", help=argparse.SUPPRESS)  # one torchrun rank
    args = parser.parse_args(argv)
    if args.fsdp_worker:
        out = Path(args.fsdp_worker)
        try:
            _edit_run("fsdp", args, out / "requests.json", out)
        finally:
            dist.destroy_process_group()
        return 0

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    _log(f"torch {torch.__version__}, {os.cpu_count()} CPU cores")
    if args.part in ("edits", "all"):
        print("\n".join(run_edits(args)))
        print(f"\n{args.edits} sequential ROME edits of {args.model} (layer 1, {args.steps} Adam steps each, 22 rows: "
              "20 generated templates, the plain prompt, the KL prompt), PRUNE online and the condition-number "
              "monitor; editing s: on_train_start to on_train_end (the slower rank); wall s: the whole fit, process start-up "
              "included. 2 processes: ddp_spawn, or FSDP2 (ModelParallelStrategy, "
              "torchrun: the rows split evenly, the weights sharded), gloo.\n")
    if args.part in ("sync", "all"):
        print("\n".join(run_sync(args)))
        print(f"\nPer write, one matrix, 2 processes (gloo), the slower rank, median of {args.repeats}. restrain: "
              "PRUNE's restraint of the accumulated update (low rank: QR of the factors + core SVD; dense: SVD); "
              "broadcast: the restrained factors / dense update. kappa: sigma_max and sigma_min of W_0 + dW; "
              "broadcast: three floats.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
