"""The checks that need an accelerator, as one short script for a machine with a GPU (a few minutes on one GPU).

1. **single device**: 5 ROME edits of the tiny GPT-2 with PRUNE online and the condition-number monitor, on the GPU
   in float32, against the same run on the CPU: the edited matrix agrees, and the edit registry (``W_0``, ``dW``) and
   the editor's statistics were made on the GPU.
2. **bf16**: the same edits with the model in bfloat16 on the GPU: finite weights, PRUNE restrained, the edits took.
3. **FSDP2 wiring**: the same edits under ``ModelParallelStrategy`` (``torchrun``, one process per GPU, NCCL): the
   shards' edited matrix equals the single-device run's, and the edited model is saved.

Each check prints one line (``ok`` or what failed); the summary goes to ``$OUT/gpu_check.json`` when ``OUT`` is set.
``--device cpu`` runs the same script on the CPU (gloo): a dry run of the script itself, not of the GPU paths.

Usage::

    python scripts/gpu_check.py                    # on the GPU machine
    python scripts/gpu_check.py --device cpu       # dry run here
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # distributed_fit's settings and request writer are the tests' own
NAME = "transformer.h.1.mlp.c_proj.weight"
EDITS = 5


def _fit(accelerator: str, out: Path, label: str, dtype: str = "float32", strategy=None, devices: int = 1):
    """EDITS ROME edits with PRUNE online and the monitor; returns the module and the trainer."""
    from distributed_fit import ALPHA, ROME_SETTINGS
    from lightning.pytorch import Trainer

    from prune_lightning import EditDataModule, SequentialEditor
    from prune_lightning.callbacks import ConditionNumberMonitor, PRUNECallback
    from prune_lightning import TRAINER_DEFAULTS
    from prune_lightning.editors import ROME

    editor = ROME(**ROME_SETTINGS, mom2_corpus=str(REPO / "configs/data/tiny-corpus.txt"))
    module = SequentialEditor(model="tiny:gpt2", editor=editor, dtype=dtype, verbose=False,
                              edited_model_dir=str(out / f"{label}-model"), save_edited_model=strategy is not None)
    prune = PRUNECallback(alpha=ALPHA, mode="online")
    trainer = Trainer(**{**TRAINER_DEFAULTS, "accelerator": accelerator, "devices": devices,
                         **({"strategy": strategy} if strategy is not None else {}), "max_steps": EDITS,
                         "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                         "default_root_dir": str(out), "callbacks": [prune, ConditionNumberMonitor()]})
    trainer.fit(module, datamodule=EditDataModule(source=str(out / "requests.json")))
    return module, trainer, prune


def _weight(module) -> torch.Tensor:
    from prune_lightning.models import full_weight

    return full_weight(module.model.get_parameter(NAME)).float().cpu()


def check_single(accelerator: str, out: Path) -> dict:
    reference, _, _ = _fit("cpu", out, "cpu")
    module, _, _ = _fit(accelerator, out, "single")
    entry = module.edit_registry[NAME]
    moment = module.editor._mom2_lu[0] if module.editor._mom2_lu is not None else None
    diff = float((_weight(module) - _weight(reference)).abs().max())
    torch.save(_weight(module), out / "single.pt")
    problems = []
    if diff > 1e-4:
        problems.append(f"weight differs from the CPU run by {diff:.2e}")
    for what, tensor in (("W_0", entry.w0), ("dW", entry.delta.dense()), ("C", moment)):
        if tensor is not None and tensor.device.type != accelerator.replace("gpu", "cuda"):
            problems.append(f"{what} is on {tensor.device}")
    return {"check": "single device, float32", "max_abs_diff_to_cpu": diff, "problems": problems}


def check_bf16(accelerator: str, out: Path) -> dict:
    module, _, prune = _fit(accelerator, out, "bf16", dtype="bfloat16")
    weight = _weight(module)
    problems = []
    if not torch.isfinite(weight).all():
        problems.append("non-finite weights")
    if not sum(h["restrained"] for h in prune.history):
        problems.append("PRUNE restrained nothing")
    losses = [t.nll_final < t.nll_init for t in module.editor.last_trace]
    if not all(losses):
        problems.append("the last edit did not lower its target's NLL")
    return {"check": "single device, bfloat16", "restrained": sum(h["restrained"] for h in prune.history),
            "problems": problems}


def check_fsdp(accelerator: str, out: Path) -> dict:
    devices = torch.cuda.device_count() if accelerator == "gpu" else 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(devices),
               __file__, "--fsdp-worker", str(out), "--device", accelerator]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    problems = [] if result.returncode == 0 else [f"torchrun exit {result.returncode}: {result.stderr[-2000:]}"]
    diff = None
    if not problems:
        diff = float((torch.load(out / "fsdp.pt") - torch.load(out / "single.pt")).abs().max())
        if diff > 1e-4:
            problems.append(f"weight differs from the single-device run by {diff:.2e}")
        if not (out / "fsdp-model" / "model.safetensors").is_file():
            problems.append("no edited model saved")
    return {"check": f"FSDP2, {devices} process(es)", "max_abs_diff_to_single": diff, "problems": problems}


def fsdp_worker(accelerator: str, out: Path) -> None:
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    try:
        module, trainer, _ = _fit(accelerator, out, "fsdp", strategy=ModelParallelStrategy(),
                                  devices=int(os.environ["WORLD_SIZE"]))
        weight = _weight(module)
        if trainer.global_rank == 0:
            torch.save(weight, out / "fsdp.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--fsdp-worker", metavar="OUT_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fsdp_worker:
        fsdp_worker(args.device, Path(args.fsdp_worker))
        return 0
    if args.device == "gpu" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --device cpu for a dry run)")
        return 1
    from distributed_fit import N_EDITS  # noqa: F401  (the tests' settings must import)
    from conftest import write_counterfact

    from prune_lightning.models import tiny_checkpoint

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices: {torch.cuda.device_count()}")
    tiny_checkpoint("tiny:gpt2")  # built once, before any other process wants it
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_counterfact(out / "requests.json", EDITS)
        for check in (check_single, check_bf16, check_fsdp):
            start = time.perf_counter()
            try:
                result = check(args.device, out)
            except Exception as err:  # a check that crashes is reported, the others still run
                result = {"check": check.__name__, "problems": [f"{type(err).__name__}: {err}"]}
            result["seconds"] = round(time.perf_counter() - start, 1)
            results.append(result)
            print(f"{result['check']}: {'ok' if not result['problems'] else '; '.join(result['problems'])} "
                  f"({result['seconds']} s)", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(results, indent=2))
    return 0 if all(not r["problems"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
