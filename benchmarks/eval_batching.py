r"""Batched greedy generation against one ``generate`` call per prompt, on the same model and prompts.

The general-ability evaluation generates continuations for hundreds of task prompts at every evaluation point.
:func:`prune_lightning.generation.generate_batched` left-pads ``batch_size`` prompts (sorted by length) into one
``generate`` call; the baseline calls ``model.generate`` once per prompt, unpadded - the simplest correct loop and
the reference for the predictions. Both run side by side in one process on the same model and the same prompts:

- **time**: wall-clock seconds of each way over all prompts (the fastest of ``--repeats`` runs, interleaved so a
  change of load on a shared machine hits every way alike), and the ratio ``unbatched / batched`` (above 1: batching
  is faster);
- **agreement**: how many batched predictions equal the unbatched ones. With left padding and an attention mask
  they should all match; in float32 a padded row's sums can differ in the last bits and flip a near-tie argmax now and
  then, so the count is reported, and the script fails (exit 1) if more than ``--max-mismatch`` of them differ.

The prompts are synthetic (seeded): sentences of the tiny models' vocabulary, 3 to ~90 tokens long, so that they fit
the tiny models' context of 128 tokens with the new tokens. The model is ``tiny:gpt2`` by default (built offline);
any ``load_causal_lm`` name works (``--model gpt2``). Timings on a shared machine vary; ratios measured in one run are
what to compare.

Usage::

    python benchmarks/eval_batching.py
    python benchmarks/eval_batching.py --model tiny:llama --prompts 128 --batch-sizes 1 8 32 --max-new-tokens 25
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from prune_lightning.generation import generate_batched
    from prune_lightning.models import load_causal_lm, load_tokenizer
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prune_lightning.generation import generate_batched
    from prune_lightning.models import load_causal_lm, load_tokenizer

_WORDS = (
    "The capital of France is Paris . Rome Berlin Madrid London Tokyo Cairo Lima Oslo Vienna Dublin Prague question "
    "answer summary Q: A: True False yes no 0 1 2 3 4 5 6 7 8 9 10 100 is a of the in was by for with on at from and "
    "to his her their plays works speaks located English French German Spanish soccer tennis guitar piano"
).split()


def synthetic_prompts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 60) -> list[str]:
    """``n`` prompts of random words, their lengths spread evenly over ``min_words .. max_words``."""
    rng = random.Random(seed)
    lengths = [min_words + (max_words - min_words) * i // max(n - 1, 1) for i in range(n)]
    rng.shuffle(lengths)
    return [" ".join(rng.choice(_WORDS) for _ in range(length)) for length in lengths]


def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The baseline: one unpadded ``generate`` call per prompt."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id)
            texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def _timed(fn) -> tuple[float, list[str]]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny:gpt2", help="a load_causal_lm name (default: tiny:gpt2)")
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts (default: 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way; the fastest counts")
    parser.add_argument("--max-mismatch", type=float, default=0.03,
                        help="fail if more than this fraction of batched predictions differ (default: 0.03)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: a tiny model gains nothing from more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_causal_lm(args.model).to(args.device).eval()
    tokenizer = load_tokenizer(args.model)
    prompts = synthetic_prompts(args.prompts)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    print(f"model {args.model} on {args.device} ({torch.get_num_threads()} CPU threads), {len(prompts)} prompts of "
          f"{min(lengths)}-{max(lengths)} tokens, {args.max_new_tokens} new tokens each, greedy; "
          f"fastest of {args.repeats} runs")

    ways = {"one generate per prompt": (1, lambda: one_at_a_time(model, tokenizer, prompts, args.max_new_tokens))}
    for batch_size in args.batch_sizes:
        ways[f"generate_batched, batch {batch_size}"] = (batch_size, lambda b=batch_size: generate_batched(
            model, tokenizer, prompts, args.max_new_tokens, batch_size=b))
    one_at_a_time(model, tokenizer, prompts[:2], args.max_new_tokens)  # warm-up
    # Interleaved repeats: a load change on a shared machine hits every way alike.
    times: dict[str, list[float]] = {name: [] for name in ways}
    predictions: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for name, (_, run) in ways.items():
            seconds, predictions[name] = _timed(run)
            times[name].append(seconds)
    reference = predictions["one generate per prompt"]
    base = min(times["one generate per prompt"])

    header = f"{'way':<30} {'batch size':>10} {'seconds':>9} {'median s':>9} {'ratio vs unbatched':>19} {'same':>9}"
    print(header)
    print("-" * len(header))
    worst = 0
    for name, (batch_size, _) in ways.items():
        best, median = min(times[name]), statistics.median(times[name])
        same = sum(a == b for a, b in zip(predictions[name], reference))
        worst = max(worst, len(prompts) - same)
        print(f"{name:<30} {batch_size:>10} {best:>9.3f} {median:>9.3f} {base / best:>19.2f} "
              f"{same:>4}/{len(prompts):<4}")
    if worst > args.max_mismatch * len(prompts):
        print(f"FAIL: up to {worst} of {len(prompts)} batched predictions differ from the unbatched ones "
              f"(allowed: {args.max_mismatch:.0%})", file=sys.stderr)
        return 1
    print(f"predictions: at most {worst} of {len(prompts)} differ from one-at-a-time generation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
