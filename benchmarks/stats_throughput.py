r"""Tokens per second of the statistics job against plain forward passes over the same batches, on the same model.

The statistics job (:class:`prune_lightning.stats.SecondMomentJob`) reads a corpus, tokenizes it on the
fly, runs the model up to the last measured module and adds ``K^T K`` to each module's sum, all inside a Lightning
``Trainer.fit``. Its physical limit is the forward pass itself. All ways below run side by side in one process, on the
same model, over the same padded batches (the job's own stream, tokenized once beforehand for the baselines):

- **forward, whole model**: ``model(input_ids, attention_mask)`` - what a plain forward over the corpus costs;
- **forward to the module**: the same, stopped after the input of the last measured module is computed (the job
  stops there too): the fair physical limit, and the reference of the ratio;
- **bare loop + sums**: that stopped forward plus the job's accumulation (``_Gram.add`` per module), pre-tokenized,
  no Lightning: the floor of the job's arithmetic;
- **statistics job**: ``Trainer.fit(SecondMomentJob(...))`` from the corpus file to the written cache files
  (tokenizing included, Trainer start-up included).

The forward's precision. The job can run its forward pass in bfloat16 (autocast) or with TF32 matmuls while the
sums stay float32 (``forward_precision``, :mod:`prune_lightning.stats.precision`). A second table runs the job with
each setting over the same corpus and reports its time against the full-precision job (a ratio above 1 is faster)
and the relative Frobenius error of each ``C`` against the full-precision ``C`` (largest over the measured modules).
On a CPU, TF32 changes nothing (it is a GPU feature: error 0, ratio ~1) and bfloat16 autocast is only faster where
the CPU has bfloat16 matmul units (AMX, AVX512-BF16); on Ampere and later GPUs both are.

Tokens are the non-padding tokens of the batches (the same count for every way). Timings are interleaved over
``--repeats`` rounds so that a change of load on a shared machine hits every way alike; the table shows medians and
the ratio of each way's throughput to the stopped forward (goal for the job: >= 0.9), for the fastest round (the
least disturbed by other load) and for the medians. The sums cost ``in_dim^2 = 16 d^2`` multiply-adds per token and
module (about 0.56-0.63 of that with the upper-triangle accumulation) against about ``12 d^2`` per token and layer for
the forward's matmuls, so the ratio falls as more modules are measured relative to depth; the script prints that
matmul-only estimate (pessimistic: attention, activations and norms add to the forward, not to the sums).

The model is a GPT-2 built from config (``--layers-total``, ``--d-model``), random weights, with a byte-level BPE
tokenizer trained offline on the generated documents; the documents are seeded random sentences of a few hundred
words' vocabulary.

Usage::

    python benchmarks/stats_throughput.py
    python benchmarks/stats_throughput.py --docs 3000 --d-model 512 --measure 3 --measure 1,2,3 --repeats 5
    python benchmarks/stats_throughput.py --precision-only --device cuda   # the forward-precision table, on a GPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

try:
    import prune_lightning  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prune_lightning.stats.corpus import CorpusStream
from prune_lightning.stats.job import GramSum, SecondMomentJob, gram_blocks
from prune_lightning.stats.run import quiet_lightning
from lightning.pytorch import Trainer

from prune_lightning.models import get_module, train_bpe_tokenizer

_SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "zu", "be", "fi", "go", "hu", "ja", "wo",
              "xe")


def synthetic_documents(n: int, seed: int = 0, min_words: int = 8, max_words: int = 120) -> list[str]:
    """``n`` documents of seeded random words (a vocabulary of 600 made-up words plus punctuation)."""
    rng = random.Random(seed)
    vocabulary = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(600)})
    docs = []
    for _ in range(n):
        words = [rng.choice(vocabulary) for _ in range(rng.randint(min_words, max_words))]
        for i in range(7, len(words), 9):
            words[i] += rng.choice((".", ",", ";", "?"))
        docs.append(" ".join(words).capitalize())
    return docs


def build_model(layers: int, d_model: int, vocab_size: int, context: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=d_model, n_head=max(1, d_model // 64), n_positions=context,
                        vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    config._name_or_path = f"bench-gpt2-{layers}x{d_model}"
    return GPT2LMHeadModel(config).eval()


def arithmetic_bound(d_model: int, measured: list[int]) -> float:
    """Matmul multiply-adds per token of the stopped forward over those of the forward plus the sums (attention scores,
    norms and activations left out): the highest ratio the job can reach against the stopped forward on this model."""
    last = max(measured)
    forward = last * 12 * d_model**2 + 8 * d_model**2  # whole blocks below, then qkv, attention out, fc of the last
    dim = 4 * d_model
    blocks = gram_blocks(dim)
    sums = len(measured) * sum((b - a) * (dim - a) for a, b in blocks)
    return forward / (forward + sums)


class _Stop(Exception):
    pass


def forward_whole(model, batches) -> None:
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def forward_to(model, batches, last_module: str, grams=None, modules=()) -> None:
    """The forward stopped at ``last_module``'s input; with ``grams``, the job's sums of every module in ``modules``."""
    state = {}

    def make_hook(name):
        def hook(_module, args):
            if grams is not None:
                x = args[0]
                keys = x.reshape(-1, x.shape[-1])
                index = state["index"]
                grams[name].add(keys if index is None else keys.index_select(0, index))
            if name == last_module:
                raise _Stop

        return hook

    names = list(modules) if grams is not None else [last_module]
    handles = [get_module(model, name).register_forward_pre_hook(make_hook(name)) for name in names]
    try:
        with torch.no_grad():
            for batch in batches:
                state["index"] = batch["token_index"] if batch["token_index"].numel() else None
                try:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def run_job(model, tokenizer, modules, corpus: Path, n_docs: int, batch_size: int, cache: Path,
            num_workers: int, forward_precision: str = "model") -> SecondMomentJob:
    job = SecondMomentJob(model=model, tokenizer=tokenizer, modules=modules, corpus=str(corpus),
                          n_samples=n_docs, batch_size=batch_size, cache_dir=str(cache),
                          num_workers=num_workers, forward_precision=forward_precision)
    device = next(model.parameters()).device
    with quiet_lightning():
        trainer = Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                          enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
                          num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(cache))
        trainer.fit(job)
    assert job.finished and set(job.written) == set(modules)
    return job


def precision_table(model, tokenizer, modules, corpus: Path, args, work: Path, n_tokens: int) -> None:
    """The job with each forward precision, interleaved: time against the full-precision job, error of ``C``."""
    precisions = ("model", "bfloat16", "tf32")
    times = {p: [] for p in precisions}
    moments = {}
    for _ in range(args.repeats):
        for precision in precisions:
            start = time.perf_counter()
            job = run_job(model, tokenizer, modules, corpus, args.docs, args.batch_size, work / f"cache-{precision}",
                          args.num_workers, forward_precision=precision)
            times[precision].append(time.perf_counter() - start)
            moments[precision] = job.moments
    reference = moments["model"]
    fastest = {p: min(t) for p, t in times.items()}
    medians = {p: statistics.median(t) for p, t in times.items()}
    print()
    print(f"forward precision (sums in float32), measured: {', '.join(modules)}")
    print()
    print("| forward | fastest s | median s | tokens/s (fastest) | speed vs float32 forward (fastest / median) "
          "| rel. Frobenius error of C vs float32 forward (largest over modules) |")
    print("|---|---:|---:|---:|---:|---:|")
    for precision in precisions:
        error = max(float((moments[precision][m].double() - reference[m].double()).norm()
                          / reference[m].double().norm()) for m in modules)
        print(f"| {precision} | {fastest[precision]:.2f} | {medians[precision]:.2f} "
              f"| {n_tokens / fastest[precision]:,.0f} "
              f"| {fastest['model'] / fastest[precision]:.2f} / {medians['model'] / medians[precision]:.2f} "
              f"| {error:.2e} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=400, help="number of documents (default: 400)")
    parser.add_argument("--layers-total", type=int, default=12, help="GPT-2 layers (default: 12)")
    parser.add_argument("--d-model", type=int, default=256, help="GPT-2 width (default: 256)")
    parser.add_argument("--measure", action="append", default=None,
                        help="comma-separated layers whose c_proj inputs are measured, one setting per flag "
                             "(default: --measure 8 --measure 6,7,8: ROME-like, MEMIT-like)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256, help="truncation length (default: 256)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved rounds; the fastest and the median are reported (default: 5)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the job (default: 0)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu; the ways other than the job run "
                        "on the CPU only)")
    parser.add_argument("--precision-only", action="store_true", help="only the forward-precision table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    settings = [[int(x) for x in m.split(",")] for m in (args.measure or ["8", "6,7,8"])]

    docs = synthetic_documents(args.docs)
    tokenizer = train_bpe_tokenizer(docs[:500], vocab_size=4096)
    model = build_model(args.layers_total, args.d_model, len(tokenizer), args.max_length)
    work = Path(tempfile.mkdtemp(prefix="stats-bench-"))
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(docs) + "\n")
    stream = CorpusStream(str(corpus), tokenizer, n_samples=args.docs, batch_size=args.batch_size,
                                    max_length=args.max_length)
    batches = list(stream)
    n_tokens = sum(b["n_tokens"] for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    print(f"GPT-2 {args.layers_total} layers x d={args.d_model} (c_proj input {4 * args.d_model}), CPU, "
          f"{torch.get_num_threads()} thread(s); {args.docs} documents, {len(batches)} batches of {args.batch_size}, "
          f"{n_tokens} tokens ({padded} with padding); {args.repeats} interleaved rounds")

    template = "transformer.h.{}.mlp.c_proj"
    if args.precision_only or args.device != "cpu":
        model.to(args.device)
        for measured in settings:
            precision_table(model, tokenizer, [template.format(layer) for layer in measured], corpus, args, work,
                            n_tokens)
        return 0
    forward_whole(model, batches[:2])  # warm-up
    for measured in settings:
        modules = [template.format(layer) for layer in measured]
        last = modules[-1]
        in_dim = 4 * args.d_model
        ways = {
            "forward, whole model": lambda: forward_whole(model, batches),
            f"forward to layer {measured[-1]} c_proj": lambda: forward_to(model, batches, last),
            "bare loop + sums": lambda: forward_to(
                model, batches, last,
                grams={m: GramSum(in_dim, torch.float32, torch.device("cpu")) for m in modules},
                modules=modules),
            "statistics job (Lightning)": lambda: run_job(model, tokenizer, modules, corpus, args.docs,
                                                          args.batch_size, work / "cache", args.num_workers),
        }
        times = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, run in ways.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        fastest = {name: min(t) for name, t in times.items()}
        medians = {name: statistics.median(t) for name, t in times.items()}
        reference = f"forward to layer {measured[-1]} c_proj"
        print()
        print(f"measured: {', '.join(modules)}")
        print()
        print("| way | fastest s | median s | tokens/s (fastest) | ratio vs forward to module (fastest / median) "
              "| ratio vs whole forward (fastest) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in ways:
            print(f"| {name} | {fastest[name]:.2f} | {medians[name]:.2f} | {n_tokens / fastest[name]:,.0f} | "
                  f"{fastest[reference] / fastest[name]:.2f} / {medians[reference] / medians[name]:.2f} | "
                  f"{fastest['forward, whole model'] / fastest[name]:.2f} |")
        job_s, bare_s = fastest["statistics job (Lightning)"], fastest["bare loop + sums"]
        print(f"\nstatistics job vs bare loop with the same sums: {bare_s / job_s:.2f} (what Lightning, tokenizing on "
              f"the fly and writing the cache cost)")
        bound = arithmetic_bound(args.d_model, measured)
        print(f"matmul-only estimate of the job vs forward to the module on this model: {bound:.2f} (pessimistic: the "
              f"forward's attention, GELU and norms, left out, make the real bound higher)")
        precision_table(model, tokenizer, modules, corpus, args, work, n_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
