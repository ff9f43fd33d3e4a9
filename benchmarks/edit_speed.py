r"""One ROME edit with the published settings, three ways, side by side on the same random model.

The value optimisation is most of a ROME (or MEMIT) edit: ``v_num_grad_steps`` rounds of a forward and a backward
pass over the templated prompts. The layers below the edited one do not depend on ``delta``, and the loss reads the
logits at a few positions only. Three ways, in one process, interleaved so that a change of load hits all alike:

- **ours**: ``ROME`` with its defaults - the blocks below the edited layer run in the first round only
  (``reuse_prefix``), the head only where the loss reads (``logits_subset``);
- **reference's way**: the same edit recomputing the whole forward every round, all positions' logits
  (``reuse_prefix=False, logits_subset=False``), as the authors' code does;
- **bare passes**: ``v_num_grad_steps`` plain forward + backward passes of the same rows through the whole model
  (no hooks, no optimizer, no keys): the cost of the passes alone.

It prints the seconds (the fastest of ``--repeats``; and the median) and the ratios to the reference's way, and checks
that ours and the reference's way write the same update (relative Frobenius difference). The model is a random GPT-2
built from a config - small by default (CPU), ``--shape gpt2-xl`` for GPT-2 XL's (48 layers, d=1600, on a GPU) - with
the edited layer at the same relative depth as GPT-2 XL's 17 of 48; every setting is the published one (20 rounds, 10
templates of 5 and 10 of 10 tokens, ``v_loss_layer`` the last, ``C = I`` so no statistics are needed).

Usage::

    python benchmarks/edit_speed.py                      # small, CPU
    python benchmarks/edit_speed.py --shape gpt2-xl      # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from prune_lightning.data import EditRequest
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prune_lightning.data import EditRequest
from prune_lightning.editors import ROME
from prune_lightning.editors.templates import encode
from prune_lightning.models import build_tiny_model, eval_mode, train_bpe_tokenizer, tiny_tokenizer_corpus
from prune_lightning.tokens import continuation_ids, pad_id, pad_right

SHAPES = {
    "small": dict(n_layer=12, n_embd=128, n_head=4, layer=4),
    "medium": dict(n_layer=24, n_embd=512, n_head=8, layer=8),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, layer=17),
}
REQUEST = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                      target_true="French", case_id=0)


def bare_passes(model, tokenizer, editor: ROME, rounds: int) -> None:
    """``rounds`` forward + backward passes of the edit's rows through the whole model, nothing else."""
    target = continuation_ids(tokenizer, REQUEST.target_new, REQUEST.rendered_prompt)
    seqs = [encode(tokenizer, t, REQUEST.prompt, REQUEST.subject, "subject_last")[0] + target[:-1]
            for t in editor.context_templates] + [encode(tokenizer, "{}", "{} is a", REQUEST.subject,
                                                         "subject_last")[0]]
    input_ids, attention_mask = pad_right(seqs, pad_id(tokenizer), next(model.parameters()).device)
    embeddings = model.get_input_embeddings()
    with eval_mode(model, freeze=True):
        for _ in range(rounds):
            inputs = embeddings(input_ids).detach().requires_grad_(True)  # something to differentiate
            model(inputs_embeds=inputs, attention_mask=attention_mask, use_cache=False).logits.float().sum().backward()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way; the fastest counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 as the published numbers
    shape = dict(SHAPES[args.shape])
    layer = shape.pop("layer")

    tokenizer = train_bpe_tokenizer(tiny_tokenizer_corpus(), vocab_size=512)
    model = build_tiny_model("gpt2", seed=0, vocab_size=len(tokenizer), n_positions=128, **shape)
    model = model.to(args.device).eval()
    settings = dict(layer=layer, mom2_adjustment=False, early_stop_loss=float("-inf"))
    ours = ROME(**settings)
    reference = ROME(reuse_prefix=False, logits_subset=False, **settings)
    ours.setup(model, tokenizer)
    reference.setup(model, tokenizer)
    reference.context_templates, reference.context_template_groups = ours.context_templates, \
        ours.context_template_groups  # the same rows on both sides
    rounds = ours.v_num_grad_steps

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    updates = {}
    ways = {
        "ours (prefix reused, few logits)": lambda: updates.__setitem__(
            "ours", ours.compute_update(model, tokenizer, [REQUEST])),
        "reference's way (whole forward)": lambda: updates.__setitem__(
            "reference", reference.compute_update(model, tokenizer, [REQUEST])),
        f"bare passes ({rounds} fwd + bwd)": lambda: bare_passes(model, tokenizer, ours, rounds),
    }
    for run in ways.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, run in ways.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"random GPT-2 '{args.shape}' ({shape['n_layer']} layers, d={shape['n_embd']}, {n_params / 1e6:.1f}M "
          f"parameters) on {args.device}, float32; ROME at layer {layer}, {rounds} rounds, "
          f"{len(ours.context_templates)} templated rows + the KL row; fastest of {args.repeats} runs")
    base = min(times["reference's way (whole forward)"])
    header = f"{'way':<36} {'seconds':>9} {'median s':>9} {'ratio to the reference':>23}"
    print(header)
    print("-" * len(header))
    for name in ways:
        best = min(times[name])
        print(f"{name:<36} {best:>9.3f} {statistics.median(times[name]):>9.3f} {best / base:>23.2f}")
    (name,) = updates["ours"]
    a, b = updates["ours"][name].dense(), updates["reference"][name].dense()
    difference = float((a - b).norm() / b.norm())
    print(f"the same update: relative Frobenius difference {difference:.1e}")
    return 0 if difference < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
