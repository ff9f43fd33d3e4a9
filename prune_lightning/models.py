"""Loading causal language models and finding the matrices that editors write into.

Every model goes through :func:`load_causal_lm`, whatever its origin: a Hugging Face hub id (``"gpt2-xl"``), a
local directory written by ``save_pretrained``, or ``"tiny:<arch>"`` - a small randomly initialised model built
from a config (with a byte-level BPE tokenizer trained offline), written once into a cache directory and then
loaded from there by the very same ``from_pretrained`` call. Tests and the offline ``configs/tiny.yaml`` use the
last form; nothing about them is special after loading.

Weight layouts. ``nn.Linear`` stores its weight as ``(out, in)``; GPT-2's ``Conv1D`` stores ``(in, out)``. Editors
reason in ``(out, in)`` terms (a value vector in output space, a key vector in input space) and call
:func:`rank_one_in_layout` / :func:`is_transposed` to turn that into factors of the parameter as stored. Everything
downstream (registry, restraint, condition numbers) works on the parameter as stored and does not care.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from prune_lightning.io import atomic_target

TINY_PREFIX = "tiny:"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """Turns ``"bf16"``, ``"float32"``, ... or a ``torch.dtype`` into a ``torch.dtype`` (``None`` stays ``None``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def default_cache_dir() -> Path:
    """Where prune-lightning caches tiny models, statistics and downloads (``$PRUNE_LIGHTNING_CACHE``)."""
    root = os.environ.get("PRUNE_LIGHTNING_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prune_lightning"
    )
    return Path(root)


# --------------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------------


def load_causal_lm(
    name_or_path: str,
    dtype: Union[str, torch.dtype, None] = "float32",
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    **kwargs,
) -> nn.Module:
    """Loads a causal LM from a hub id, a local directory, or ``"tiny:<arch>[:key=value,...]"``.

    Args:
        name_or_path: Hub id, local directory, or ``tiny:gpt2`` / ``tiny:llama`` (see :func:`tiny_checkpoint`).
        dtype: Parameter dtype (``"float32"``, ``"bfloat16"``, ...).
        revision: Hub revision.
        trust_remote_code: Passed to ``from_pretrained``.
        cache_dir: Where tiny checkpoints are written (default: :func:`default_cache_dir`).
        **kwargs: Passed to ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path, cache_dir=cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype), revision=revision, trust_remote_code=trust_remote_code, **kwargs
    )
    model.eval()
    return model


def load_tokenizer(name_or_path: str, cache_dir: Optional[Union[str, Path]] = None, **kwargs):
    """Loads the tokenizer that belongs to :func:`load_causal_lm`'s model; gives it a pad token if it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path, cache_dir=cache_dir), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model_path(name_or_path: str, cache_dir: Optional[Union[str, Path]] = None) -> str:
    """The argument for ``from_pretrained``: tiny specs become their (built once) cache directory."""
    name_or_path = str(name_or_path)
    if name_or_path.startswith(TINY_PREFIX):
        return str(tiny_checkpoint(name_or_path, cache_dir=cache_dir))
    return name_or_path


# --------------------------------------------------------------------------------------------------------------------
# tiny models, built from config
# --------------------------------------------------------------------------------------------------------------------

# initializer_range 0.1 (HF default 0.02): with the default, a random model's logits are so flat that no edit can make
# one continuation clearly beat another, and sigma_max(W_0) is so small that PRUNE's log restraint enlarges values.
_TINY_DEFAULTS = {
    "gpt2": dict(n_layer=4, n_embd=64, n_head=4, n_positions=128, vocab_size=512, initializer_range=0.1, seed=0),
    "llama": dict(
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=512,
        initializer_range=0.1,
        seed=0,
    ),
}

# The text a tiny tokenizer is trained on: enough English to give common words their own tokens.
_TINY_CORPUS = (
    "The capital of France is Paris. The mother tongue of Danielle Darrieux is French. "
    "Toko Yasuda plays the guitar. Autonomous University of Madrid is located in Spain. "
    "The Eiffel Tower is in Paris. Michael Jordan plays basketball. The Space Needle is in Seattle. "
    "What is the capital of Italy? Rome. Who developed Windows? Microsoft. Apple was founded by Steve Jobs. "
    "Lionel Messi plays soccer for Argentina. The official language of Brazil is Portuguese. "
    "Ludwig van Beethoven composed music. Albert Einstein was a physicist born in Germany. "
    "is a of the in was by for with on at from and to his her their plays works speaks located "
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 True False yes no answer question summary Q: A:"
)
# Names repeated often enough that the BPE merges each into one token (" Paris"), so test targets are single tokens:
# on a random-weight model an edit moves the first target token far more reliably than later ones.
_TINY_WORDS = (
    "Paris Rome Berlin Madrid London Tokyo Cairo Lima Oslo Vienna Dublin Prague Seattle Spain Italy Germany France "
    "Brazil Japan Egypt Peru Norway English French German Spanish Italian Japanese soccer tennis guitar piano"
)


def parse_tiny_spec(spec: str) -> tuple[str, dict]:
    """``"tiny:gpt2:n_layer=2,seed=3"`` -> ``("gpt2", {...defaults, "n_layer": 2, "seed": 3})``."""
    body = spec[len(TINY_PREFIX) :] if spec.startswith(TINY_PREFIX) else spec
    arch, _, overrides = body.partition(":")
    if arch not in _TINY_DEFAULTS:
        raise ValueError(f"Unknown tiny architecture {arch!r} in {spec!r}; expected one of {sorted(_TINY_DEFAULTS)}")
    settings = dict(_TINY_DEFAULTS[arch])
    for item in filter(None, overrides.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in settings:
            raise ValueError(f"Bad tiny-model setting {item!r} in {spec!r}; settings are {sorted(settings)}")
        settings[key] = type(settings[key])(value)
    return arch, settings


def tiny_tokenizer_corpus() -> list[str]:
    """The texts the tiny models' tokenizer is trained on."""
    return [_TINY_CORPUS] + [_TINY_WORDS] * 20


def tiny_checkpoint(spec: str = "tiny:gpt2", cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Builds a tiny model and tokenizer for ``spec`` once and returns the directory holding them.

    The directory name is a hash of the settings, so the same spec always maps to the same, reproducible weights.
    It is written to a temporary sibling and renamed, so a killed build never leaves half a checkpoint behind.
    """
    arch, settings = parse_tiny_spec(spec)
    key = hashlib.sha256(json.dumps([arch, settings, tiny_tokenizer_corpus()], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tiny"
    target = root / f"{arch}-{key}"
    if (target / "config.json").exists():
        return target
    tokenizer = train_bpe_tokenizer(tiny_tokenizer_corpus(), vocab_size=settings["vocab_size"])
    model = build_tiny_model(arch, **settings)
    with atomic_target(target, keep_existing=True) as tmp:  # another process that got there first keeps its copy
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def build_tiny_model(arch: str = "gpt2", seed: int = 0, **config_kwargs) -> nn.Module:
    """A randomly initialised GPT-2 or LLaMA from config; the same seed gives the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(bos_token_id=0, eos_token_id=0, **config_kwargs)
        return GPT2LMHeadModel(config).eval()
    if arch == "llama":
        config = LlamaConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False, **config_kwargs)
        return LlamaForCausalLM(config).eval()
    raise ValueError(f"Unknown tiny architecture {arch!r}; expected 'gpt2' or 'llama'")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Trains a byte-level BPE tokenizer offline and wraps it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


# --------------------------------------------------------------------------------------------------------------------
# modules and layouts
# --------------------------------------------------------------------------------------------------------------------

# Where the MLP out-projection of layer i lives, by model type: the matrix ROME and MEMIT edit.
MLP_OUT_TEMPLATES = {
    "gpt2": "transformer.h.{}.mlp.c_proj",
    "gptj": "transformer.h.{}.mlp.fc_out",
    "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
    "llama": "model.layers.{}.mlp.down_proj",
    "mistral": "model.layers.{}.mlp.down_proj",
    "qwen2": "model.layers.{}.mlp.down_proj",
}
# The residual stream after layer i (a transformer block's output).
LAYER_TEMPLATES = {
    "gpt2": "transformer.h.{}",
    "gptj": "transformer.h.{}",
    "gpt_neox": "gpt_neox.layers.{}",
    "llama": "model.layers.{}",
    "mistral": "model.layers.{}",
    "qwen2": "model.layers.{}",
}


def _template(model: nn.Module, table: dict, what: str) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise ValueError(
            f"No default {what} template for model type {model_type!r} (known: {sorted(table)}); "
            "give the module name template explicitly"
        )
    return table[model_type]


def mlp_out_template(model: nn.Module) -> str:
    """The name template of the MLP out-projection for this model's type, e.g. ``transformer.h.{}.mlp.c_proj``."""
    return _template(model, MLP_OUT_TEMPLATES, "MLP out-projection")


def layer_template(model: nn.Module) -> str:
    """The name template of a transformer block for this model's type, e.g. ``model.layers.{}``."""
    return _template(model, LAYER_TEMPLATES, "layer")


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists the module names that do exist."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise ValueError(f"Module {name!r} does not exist in {type(model).__name__}.{hint} Modules: {shown}") from None


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """A parameter by its full name (``"...mlp.c_proj.weight"``), with the same helpful error as :func:`get_module`."""
    params = dict(model.named_parameters())
    if name in params:
        return params[name]
    close = difflib.get_close_matches(name, list(params), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"Parameter {name!r} does not exist in {type(model).__name__}.{hint}")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether a parameter is sharded across ranks (a ``DTensor``, as FSDP2's ``fully_shard`` makes them)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without torch.distributed
        return False
    return isinstance(tensor, DTensor)


def full_weight(param: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a parameter, detached; a sharded (``DTensor``) one is all-gathered.

    For a sharded parameter this is a collective: every rank must call it for the same parameters in the same order.
    """
    if is_sharded(param):
        return param.detach().full_tensor()
    return param.detach()


@torch.no_grad()
def write_weight(param: torch.Tensor, full: torch.Tensor) -> None:
    """Sets a parameter to the whole matrix ``full`` (cast to its dtype); a sharded parameter keeps only its shard.

    Every rank holds the same ``full`` (the registry is replicated), so each cuts its own shard locally
    (``src_data_rank=None``): no communication.
    """
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        local = full.to(device=param.to_local().device, dtype=param.dtype)
        shard = distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
        return
    param.copy_(full.to(device=param.device, dtype=param.dtype))


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is sharded across ranks (FSDP2)."""
    return any(is_sharded(param) for param in model.parameters())


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes it names in ``_no_split_modules`` (``GPT2Block``,
    ``LlamaDecoderLayer``, ...), in module order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(
            f"Cannot find the decoder layers of {type(model).__name__}: it names no _no_split_modules classes "
            f"({sorted(names) or 'none'}) that occur in it"
        )
    return layers


def shard_model(model: nn.Module, mesh, reshard_after_forward: bool = True) -> bool:
    """Shards ``model`` with FSDP2 (``fully_shard``) over ``mesh``: every decoder layer a unit of its own, then the
    rest (embeddings, final norm, head) as the root unit. Returns whether it sharded (a model already sharded is
    left as it is, so this may run again, as Lightning's ``configure_model`` does).

    A 1-D ``mesh`` shards every parameter across its ranks; a 2-D one (replicate, shard) gives HSDP: replicas
    across the first dimension (nodes), shards within the second (the GPUs of a node).

    Args:
        model: A Hugging Face causal LM (unsharded, on any device).
        mesh: A ``torch.distributed.device_mesh.DeviceMesh``.
        reshard_after_forward: Free the gathered weights after each forward, also the root unit's (FSDP2 keeps the
            root's by default; freeing them keeps every parameter outside a forward a sharded one).
    """
    if is_sharded_model(model):
        return False
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return True


def linear_weight_names(model: nn.Module, template: str, layers: Sequence[int]) -> list[str]:
    """``template.format(layer) + ".weight"`` for each layer; a module that does not exist or is not a linear map
    raises a ``ValueError`` (listing the modules there are)."""
    names = []
    for layer in layers:
        name = template.format(layer)
        is_transposed(get_module(model, name))
        names.append(name + ".weight")
    return names


def is_transposed(module: nn.Module) -> bool:
    """True where the module stores its weight as ``(in, out)`` (GPT-2's ``Conv1D``), False for ``(out, in)``."""
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D":
        return True
    raise TypeError(f"Cannot edit a {type(module).__name__}: expected nn.Linear or transformers' Conv1D")


def rank_one_in_layout(module: nn.Module, value: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(left, right)`` with ``left @ right.T`` equal to the update ``value key^T`` in the module's layout.

    ``value`` lives in the output space, ``key`` in the input space; both may be ``(dim,)`` or ``(dim, r)``.
    """
    value = value.reshape(value.shape[0], -1)
    key = key.reshape(key.shape[0], -1)
    return (key, value) if is_transposed(module) else (value, key)


# --------------------------------------------------------------------------------------------------------------------
# facts about a model that the editors and the statistics need
# --------------------------------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def input_dim(module: nn.Module) -> int:
    """The input dimension of a linear module (``nn.Linear`` or GPT-2's ``Conv1D``): the length of its keys."""
    weight = module.weight
    return int(weight.shape[0] if is_transposed(module) else weight.shape[1])


def output_dim(module: nn.Module) -> int:
    """The output dimension of a linear module (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    weight = module.weight
    return int(weight.shape[1] if is_transposed(module) else weight.shape[0])


def num_layers(model: nn.Module) -> Optional[int]:
    """The number of transformer blocks from the model's config (``num_hidden_layers`` / ``n_layer``), if it says."""
    config = getattr(model, "config", None)
    value = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return int(value) if value else None


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream from the model's config (``hidden_size`` / ``n_embd``)."""
    config = getattr(model, "config", None)
    value = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not value:
        raise ValueError("Cannot tell the hidden size of this model from its config")
    return int(value)


def context_length(model: nn.Module) -> Optional[int]:
    """The longest input the model takes, in tokens (``max_position_embeddings`` / ``n_positions``), if it says."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


# Causal LMs whose logits are the output embedding of the base model's last hidden state, nothing more (no scaling,
# no soft-capping): the logits at a few positions may be read off the hidden states there.
_PLAIN_HEADS = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPTJForCausalLM",
                "GPTNeoXForCausalLM")


def logits_at_supported(model: nn.Module) -> bool:
    """Whether ``model.get_output_embeddings()(model.base_model(...).last_hidden_state)`` are the model's logits."""
    return type(model).__name__ in _PLAIN_HEADS and model.get_output_embeddings() is not None


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits read from an intermediate block's output: the final norm, then the LM head (the logit lens)."""
    base = getattr(model, "base_model", model)
    for attr in ("ln_f", "norm", "final_layer_norm"):
        norm = getattr(base, attr, None)
        if isinstance(norm, nn.Module):
            return model.get_output_embeddings()(norm(hidden))
    raise ValueError("Cannot find the final norm of this model to read logits from an intermediate layer")


@contextlib.contextmanager
def eval_mode(model: nn.Module, freeze: bool = False) -> Iterator[None]:
    """Eval mode (no dropout) and, with ``freeze``, no gradients for the parameters; both restored on exit."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()} if freeze else {}
    model.eval()
    try:
        for p in grads:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in modes.items():
            m.training = flag


@contextlib.contextmanager
def removing_hooks(*handles) -> Iterator[None]:
    """Removes the given hook handles on exit, whatever happens inside."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
