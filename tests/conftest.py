"""Shared fixtures: offline environment, tiny models built from config, the repository's paths."""

import os
from pathlib import Path

# Offline before anything imports transformers / datasets / wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and two threads spin badly when anything else shares the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Every test session gets its own cache, so tests never depend on what an earlier run left behind."""
    cache = tmp_path_factory.mktemp("prune_lightning_cache")
    old = os.environ.get("PRUNE_LIGHTNING_CACHE")
    os.environ["PRUNE_LIGHTNING_CACHE"] = str(cache)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield cache
    if old is None:
        os.environ.pop("PRUNE_LIGHTNING_CACHE", None)
    else:
        os.environ["PRUNE_LIGHTNING_CACHE"] = old


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_arch(request) -> str:
    """Runs a test on both layouts: GPT-2 (Conv1D, in x out) and LLaMA (Linear, out x in)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(_cache_dir, tiny_arch) -> Path:
    """A local ``save_pretrained`` directory of a tiny model and its tokenizer, loaded like any hub checkpoint."""
    from prune_lightning.models import tiny_checkpoint

    return tiny_checkpoint(f"tiny:{tiny_arch}")


_CITIES = ["Paris", "Rome", "Berlin", "Madrid", "London", "Tokyo", "Cairo", "Lima", "Oslo", "Vienna", "Dublin", "Prague"]
_PEOPLE = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jonas", "Kemal", "Lena",
           "Mateo", "Nadia", "Omar", "Petra", "Quinn", "Rosa", "Sami", "Tariq", "Una", "Viktor", "Wen", "Yara"]


def write_counterfact(path: Path, n: int, seed: int = 0) -> Path:
    """Writes ``n`` CounterFact-schema records about made-up people ("X was born in <city>") to ``path``."""
    import json
    import random

    rng = random.Random(seed)
    records = []
    for i in range(n):
        subject = f"{_PEOPLE[i % len(_PEOPLE)]} {_PEOPLE[(7 * i + 3) % len(_PEOPLE)]}son"
        true, new = rng.sample(_CITIES, 2)
        others = [p for p in _PEOPLE if p not in subject][:3]
        records.append({
            "case_id": i,
            "requested_rewrite": {
                # Subject last: on a random-weight tiny model, a value written at the subject's last token reaches
                # the next-token prediction only when that token is the last one of the prompt.
                "prompt": "The hometown of {}",
                "relation_id": "P19",
                "subject": subject,
                "target_new": {"str": new, "id": f"Q{100 + _CITIES.index(new)}"},
                "target_true": {"str": true, "id": f"Q{100 + _CITIES.index(true)}"},
            },
            "paraphrase_prompts": [f"Born long ago. The hometown of {subject}", f"The home town of {subject}"],
            "neighborhood_prompts": [f"The hometown of {o} Smith" for o in others],
            "attribute_prompts": [f"The hometown of {others[0]} Jones"],
            "generation_prompts": [f"{subject} grew up in"],
        })
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture
def counterfact_file(tmp_path):
    """A factory: ``counterfact_file(n)`` writes n CounterFact records into tmp_path and returns the path."""
    def make(n: int, seed: int = 0) -> Path:
        return write_counterfact(tmp_path / f"counterfact-{n}-{seed}.json", n, seed)

    return make


@pytest.fixture(scope="session")
def tiny_corpus(repo_dir) -> Path:
    return repo_dir / "configs" / "data" / "tiny-corpus.txt"


@pytest.fixture
def make_trainer(tmp_path):
    """A factory for a CPU editing Trainer writing CSV logs under tmp_path (the trainer defaults of prune-edit)."""
    def make(callbacks=(), root=None, **kwargs):
        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import CSVLogger

        from prune_lightning import TRAINER_DEFAULTS

        root = Path(root or tmp_path)
        settings = dict(TRAINER_DEFAULTS)
        settings.update(accelerator="cpu", devices=1, default_root_dir=root, logger=CSVLogger(root, name="logs"),
                        enable_progress_bar=False, enable_checkpointing=False, callbacks=list(callbacks))
        settings.update(kwargs)
        return Trainer(**settings)

    return make


@pytest.fixture
def rome_factory(tiny_corpus):
    """``rome_factory(**overrides)``: ROME on layer 1 of a tiny model, statistics from the shipped tiny corpus."""
    def make(**overrides):
        from prune_lightning.editors import ROME

        settings = dict(layer=1, v_num_grad_steps=20, v_lr=0.5, mom2_corpus=str(tiny_corpus), mom2_n_samples=200,
                        v_weight_decay=0.5, context_template_lengths=((5, 2),))
        settings.update(overrides)
        return ROME(**settings)

    return make


def read_csv_metrics(trainer) -> list[dict]:
    """The rows of a CSVLogger's metrics.csv (after fit)."""
    import csv

    trainer.logger.save()
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------------------------------
# independent references for the editor tests
# --------------------------------------------------------------------------------------------------------------------


def edited_names(tiny_arch: str, layers) -> list[str]:
    """The MLP out-projection weights of ``layers`` of a tiny model, written out by hand (not by the library)."""
    template = "transformer.h.{}.mlp.c_proj.weight" if tiny_arch == "gpt2" else "model.layers.{}.mlp.down_proj.weight"
    return [template.format(layer) for layer in layers]


def target_nll(model, tokenizer, prompt: str, target: str) -> float:
    """Mean token NLL of ``" " + target`` after ``prompt``, teacher-forced: an independent reference."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + target_ids])).logits[0]
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1].float(), dim=-1)
    return -logp[torch.arange(len(target_ids)), torch.tensor(target_ids)].mean().item()


def new_vs_true_margin(model, tokenizer, request) -> float:
    """NLL(new) - NLL(true) on the edited prompt: negative when the new target wins."""
    prompt = request.rendered_prompt
    return target_nll(model, tokenizer, prompt, request.target_new) - target_nll(model, tokenizer, prompt,
                                                                                 request.target_true)


class UpdatesWritten:
    """Context manager: the updates added to their parameters, the original weights restored afterwards."""

    def __init__(self, model, updates):
        self.model, self.updates, self.saved = model, updates, {}

    def __enter__(self):
        import torch

        with torch.no_grad():
            for name, update in self.updates.items():
                param = self.model.get_parameter(name)
                self.saved[name] = param.detach().clone()
                param.add_(update.dense().to(param.dtype))
        return self.model

    def __exit__(self, *exc):
        import torch

        with torch.no_grad():
            for name, weight in self.saved.items():
                self.model.get_parameter(name).copy_(weight)


def greedy_ids_one_at_a_time(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """The reference: the new token ids of one plain ``generate`` call (no padding), up to the first ``eos``."""
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def greedy_one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    """The reference: one plain ``generate`` call per prompt, no padding, in eval mode; the decoded new text."""
    model.eval()
    return [tokenizer.decode(greedy_ids_one_at_a_time(model, tokenizer, prompt, max_new_tokens),
                             skip_special_tokens=True) for prompt in prompts]
