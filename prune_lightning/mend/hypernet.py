r"""MEND's hypernetwork: it turns the rank-one factors of a fine-tuning gradient into a weight update.

The gradient of a loss ``L`` with respect to a linear layer's weight ``W`` (``(out, in)``; inputs ``u_t``, outputs
``W u_t`` at the tokens ``t`` of a batch) is a sum of rank-one terms::

    dL/dW = sum_t  delta_t u_t^T          u_t = the layer's input at token t           (in,)
                                          delta_t = dL/d(W u_t), the output gradient    (out,)

MEND (Mitchell et al., "Fast Model Editing at Scale", ICLR 2022) edits with a transformed gradient. A small network
``g`` maps each pair to pseudo-factors, and the update of edited matrix ``l`` is::

    (u~_t, delta~_t) = g(u_t, delta_t ; mode_l)
    dW_l = -lr_l * sum_t  delta~_t u~_t^T                           rank <= number of tokens with a gradient

with one learned step size ``lr_l`` per matrix (``edit_lrs``, initialised to ``edit_lr``). ``g`` is, as in the
authors' code (``eric-mitchell/mend`` ``algs/mend.py``, ``nn.py``; EasyEdit's ``trainer/algs/MEND.py`` and
``local_nn.py`` are the same):

1. **Normalisation** (``norm``): ``u`` and ``delta`` are standardised per feature with running statistics -
   ``(x - mean) / (std + 1e-7)`` - over every token row seen in training (Welford's update; ``std`` with ``k - 1``).
   Rows whose ``u`` or ``delta`` is all zero (padding, positions after the last target) are left out everywhere.
2. **The MLP** (``IDMLP``): ``n_hidden + 1`` residual layers of width ``d`` (``d = in + out`` with ``combine``: the
   two normalised factors concatenated), each::

       z <- z + clamp( scale_m * (A (B z) + b) + shift_m , min=0 )        A: (d, r), B: (r, d), r = min(rank, d)

   ``A`` starts at zero and ``B`` standard normal, so every layer - and ``g`` - starts as the identity (``init="id"``);
   ``clamp`` rather than ``relu`` so that the gradient at the initial ``0`` is not zero. ``scale_m`` / ``shift_m``
   (initially 1 and 0) are per *mode*: with ``shared``, one ``g`` serves all edited matrices of the same shape and
   ``m`` is the matrix's index among them; otherwise each matrix has its own ``g`` and no modes.
3. The output is split back into ``u~`` (``in``) and ``delta~`` (``out``). Without ``combine`` each factor has an MLP
   of its own (``one_sided``: only the smaller factor's, the cheaper MLP, the other passes normalised; ``x_only`` /
   ``delta_only``: only that one).

An identity ``g`` without normalisation is plain gradient descent with step ``edit_lr``.

Where we differ from the references, knowingly:

- **The sign.** Both references *add* ``edit_lrs * sum_t u~_t delta~_t^T`` with ``edit_lrs`` starting at ``+edit_lr``
  (an ascent step at initialisation, which the outer loop soon turns round); here the update subtracts, so the
  initial hypernetwork descends. ``lr`` is learned either way; a reference checkpoint's ``edit_lrs`` carry over
  negated.
- **Statistics before two rows.** The references raise until a matrix has seen two rows in training and normalise
  with NaN statistics if never trained; here the normaliser is the identity until then.
- **Batched statistics.** The running mean and variance are updated with a batch at once (Chan et al.'s pairwise
  form of Welford's update) instead of row by row: the same numbers up to rounding.

:func:`save_hypernetwork` / :func:`load_hypernetwork` write and read a trained hypernetwork as one safetensors file
whose metadata holds its settings and the parameters and shapes it was trained for; :func:`check_compatible` compares
them with a model's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "FILE_FORMAT",
    "GradientTransform",
    "HYPERNETWORK_DEFAULTS",
    "IDMLP",
    "LowRankResidual",
    "MENDHypernetwork",
    "check_compatible",
    "load_hypernetwork",
    "save_hypernetwork",
]

#: The ``format`` entry of a hypernetwork file's metadata.
FILE_FORMAT = "prune-lightning/mend-hypernetwork"
_FILE_VERSION = "1"
_INITS = ("id", "xavier")
_EPS = 1e-7  # added to the standard deviation, as in the references

#: The published settings (``config/alg/mend.yaml``; EasyEdit ``hparams/TRAINING/MEND/*.yaml``, the same for GPT-2 XL,
#: LLaMA-2-7B and LLaMA-3-8B).
HYPERNETWORK_DEFAULTS: dict[str, Any] = dict(
    n_hidden=1, rank=1920, init="id", norm=True, combine=True, one_sided=False, x_only=False, delta_only=False,
    shared=True, edit_lr=1e-4,
)


class LowRankResidual(nn.Module):
    """One layer of the MLP: ``z + clamp(scale_m * (A (B z) + b) + shift_m, min=0)`` (``LRLinear`` in the references).

    Args:
        dim: Width of ``z``.
        rank: Inner width of ``A B``; at most ``dim``.
        init: ``"id"`` (``A = 0``, ``B`` standard normal, residual: the identity) or ``"xavier"`` (Xavier-uniform
            ``A`` and ``B``, no residual).
        n_modes: Number of per-mode scale / shift rows (``None``: none).
        generator: Seeds ``B``.
    """

    def __init__(self, dim: int, rank: int, init: str = "id", n_modes: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        inner = min(rank, dim)
        if init == "id":
            self.a = nn.Parameter(torch.zeros(dim, inner))
            self.b = nn.Parameter(torch.randn(inner, dim, generator=generator))
        elif init == "xavier":
            a, b = torch.empty(dim, inner), torch.empty(inner, dim)
            _xavier_uniform(a, nn.init.calculate_gain("relu"), generator)
            _xavier_uniform(b, 1.0, generator)
            self.a, self.b = nn.Parameter(a), nn.Parameter(b)
        else:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        self.bias = nn.Parameter(torch.zeros(dim))
        self.residual = init == "id"
        self.n_modes = n_modes
        if n_modes is not None:
            self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
            self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, z: torch.Tensor, mode: Optional[int] = None) -> torch.Tensor:
        pre = (z @ self.b.T) @ self.a.T + self.bias
        if mode is not None:
            pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        out = pre.clamp(min=0)  # not relu: the gradient at the initial 0 must not vanish
        return out + z if self.residual else out


class IDMLP(nn.Module):
    """``n_hidden + 1`` :class:`LowRankResidual` layers of one width (the references' ``IDMLP``).

    Args:
        dim: Width.
        n_hidden: Hidden layers (the MLP has one more).
        rank: Inner width of each layer's ``A B``.
        init: ``"id"`` or ``"xavier"``.
        n_modes: Per-mode scale / shift rows of each layer.
        generator: Seeds the initialisation.
    """

    def __init__(self, dim: int, n_hidden: int, rank: int, init: str = "id", n_modes: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LowRankResidual(dim, rank, init=init, n_modes=n_modes, generator=generator) for _ in range(n_hidden + 1)
        )

    def forward(self, z: torch.Tensor, mode: Optional[int] = None) -> torch.Tensor:
        for layer in self.layers:
            z = layer(z, mode)
        return z


class _RunningMoments(nn.Module):
    """Per-feature mean and sum of squared deviations of every row seen (buffers, so they are saved)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        k = int(self.count)
        batch_mean = rows.mean(dim=0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(dim=0)
        total = k + n
        shift = batch_mean - self.mean
        self.mean.add_(shift * (n / total))
        self.m2.add_(batch_m2 + shift ** 2 * (k * n / total))
        self.count.fill_(total)

    def normalise(self, rows: torch.Tensor) -> torch.Tensor:
        if int(self.count) < 2:  # nothing to standardise with yet: the identity
            return rows
        std = (self.m2 / (int(self.count) - 1)).sqrt()
        return (rows - self.mean) / (std + _EPS)


class GradientTransform(nn.Module):
    """``g``: normalised factors through the MLP(s), for one shape ``(in, out)`` of edited matrix.

    Args:
        in_dim: Length of ``u`` (the matrix's input).
        out_dim: Length of ``delta`` (its output).
        n_hidden, rank, init, norm, combine, one_sided, x_only, delta_only: See :class:`MENDHypernetwork`.
        n_modes: Matrices served (``shared``), or ``None``.
        generator: Seeds the initialisation.
    """

    def __init__(self, in_dim: int, out_dim: int, *, n_hidden: int, rank: int, init: str, norm: bool, combine: bool,
                 one_sided: bool, x_only: bool, delta_only: bool, n_modes: Optional[int],
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm, self.combine = norm, combine
        self.u_moments = _RunningMoments(in_dim)
        self.delta_moments = _RunningMoments(out_dim)

        def mlp(dim: int) -> IDMLP:
            return IDMLP(dim, n_hidden, rank, init=init, n_modes=n_modes, generator=generator)

        self.mlp = self.mlp_u = self.mlp_delta = None
        if combine:
            self.mlp = mlp(in_dim + out_dim)
        elif one_sided:  # only the smaller factor is transformed (algs/mend.py)
            if in_dim > out_dim:
                self.mlp_delta = mlp(out_dim)
            else:
                self.mlp_u = mlp(in_dim)
        elif x_only:
            self.mlp_u = mlp(in_dim)
        elif delta_only:
            self.mlp_delta = mlp(out_dim)
        else:
            self.mlp_u, self.mlp_delta = mlp(in_dim), mlp(out_dim)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: Optional[int] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u~, delta~)`` for rows ``u`` ``(n, in)`` and ``delta`` ``(n, out)``; in training, first adds the rows
        to the running statistics."""
        u, delta = u.float(), delta.float()
        if self.training:
            self.u_moments.update(u.detach())
            self.delta_moments.update(delta.detach())
        if self.norm:
            u, delta = self.u_moments.normalise(u), self.delta_moments.normalise(delta)
        if self.combine:
            out = self.mlp(torch.cat([u, delta], dim=-1), mode)
            return out[:, : self.in_dim], out[:, self.in_dim :]
        u_out = self.mlp_u(u, mode) if self.mlp_u is not None else u
        delta_out = self.mlp_delta(delta, mode) if self.mlp_delta is not None else delta
        return u_out, delta_out


class MENDHypernetwork(nn.Module):
    """The transforms ``g`` of all edited matrices and their learned step sizes.

    Args:
        shapes: ``{parameter name: (in, out)}`` of every edited matrix, in order (the order of ``edit_lrs`` and of
            the modes of a shared transform). ``in``/``out`` are the input and output lengths of the layer,
            whatever the layout of its weight.
        n_hidden: Hidden layers of each MLP (the MLP has ``n_hidden + 1`` layers).
        rank: Inner width of each layer's low-rank ``A B`` (capped at the layer's width).
        init: ``"id"`` (identity at start, the references' choice) or ``"xavier"``.
        norm: Standardise ``u`` and ``delta`` with running statistics.
        combine: One MLP over ``[u; delta]`` instead of one per factor.
        one_sided: Without ``combine``: transform only the smaller factor.
        x_only: Without ``combine``: transform only ``u``.
        delta_only: Without ``combine``: transform only ``delta``.
        shared: One transform per shape ``(in, out)``, with per-matrix modes; else one per matrix.
        edit_lr: Initial step size of every matrix.
        seed: Seeds the initialisation.

    Raises:
        ValueError: For an empty ``shapes``, a non-positive size, an unknown ``init`` or options that exclude each
            other (``combine`` with ``one_sided`` / ``x_only`` / ``delta_only``, as in the references).
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        n_hidden: int = 1,
        rank: int = 1920,
        init: str = "id",
        norm: bool = True,
        combine: bool = True,
        one_sided: bool = False,
        x_only: bool = False,
        delta_only: bool = False,
        shared: bool = True,
        edit_lr: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not shapes:
            raise ValueError("MENDHypernetwork needs at least one edited matrix in shapes")
        checked: dict[str, tuple[int, int]] = {}
        for name, shape in shapes.items():
            if len(shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
                raise ValueError(f"shapes[{name!r}] must be (in, out) with positive ints, got {shape!r}")
            checked[str(name)] = (int(shape[0]), int(shape[1]))
        for key, value in (("n_hidden", n_hidden), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "n_hidden" else 1):
                raise ValueError(f"{key} must be an int >= {0 if key == 'n_hidden' else 1}, got {value!r}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if combine and (one_sided or x_only or delta_only):
            raise ValueError("combine=True cannot be used with one_sided, x_only or delta_only (one-sided MEND "
                             "variants)")
        if not math.isfinite(float(edit_lr)):
            raise ValueError(f"edit_lr must be a finite number, got {edit_lr!r}")
        self.options = dict(n_hidden=n_hidden, rank=rank, init=init, norm=bool(norm), combine=bool(combine),
                            one_sided=bool(one_sided), x_only=bool(x_only), delta_only=bool(delta_only),
                            shared=bool(shared), edit_lr=float(edit_lr), seed=int(seed))
        self.shapes = checked
        self.parameter_names = list(checked)
        groups: dict[str, list[str]] = {}
        for name, (i, o) in checked.items():
            groups.setdefault(f"{i}x{o}" if shared else name.replace(".", "#"), []).append(name)
        self._route = {name: (key, names.index(name) if shared else None)
                       for key, names in groups.items() for name in names}
        generator = torch.Generator().manual_seed(int(seed))
        self.transforms = nn.ModuleDict({
            key: GradientTransform(
                *checked[names[0]], n_hidden=n_hidden, rank=rank, init=init, norm=bool(norm), combine=bool(combine),
                one_sided=bool(one_sided), x_only=bool(x_only), delta_only=bool(delta_only),
                n_modes=len(names) if shared else None, generator=generator)
            for key, names in groups.items()
        })
        self.edit_lrs = nn.Parameter(torch.full((len(checked),), float(edit_lr)))

    def config(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-serialisable (what a hypernetwork file records)."""
        return {"shapes": {name: list(shape) for name, shape in self.shapes.items()}, **self.options}

    def lr(self, name: str) -> torch.Tensor:
        """The learned step size of matrix ``name`` (a 0-d tensor that carries gradients)."""
        return self.edit_lrs[self.parameter_names.index(name)]

    def transform(self, name: str, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u~, delta~)`` of one matrix's factor rows (float32)."""
        key, mode = self._route[name]
        return self.transforms[key](u, delta, mode)

    def forward(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The update rows of every matrix: ``{name: (values, keys)}`` with ``dW = values^T keys`` (``(out, in)``).

        ``values = -lr * delta~`` ``(n, out)`` and ``keys = u~`` ``(n, in)``. Matrices are transformed in the order of
        :attr:`parameter_names` (a shared transform's statistics then include the rows of the matrices before).

        Args:
            factors: ``{name: (u, delta)}``, rows ``(n, in)`` and ``(n, out)``, for every matrix of the hypernetwork.
        """
        missing = [name for name in self.parameter_names if name not in factors]
        if missing:
            raise ValueError(f"MENDHypernetwork got no factors for {missing}")
        out = {}
        for name in self.parameter_names:
            u_new, delta_new = self.transform(name, *factors[name])
            out[name] = (-self.lr(name) * delta_new, u_new)
        return out


def _xavier_uniform(tensor: torch.Tensor, gain: float, generator: Optional[torch.Generator]) -> None:
    fan_out, fan_in = tensor.shape
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


# --------------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------------


def save_hypernetwork(net: MENDHypernetwork, path: Union[str, os.PathLike], **info: Any) -> Path:
    """Writes ``net`` (weights, statistics, step sizes and settings) to one safetensors file, atomically.

    Args:
        net: The hypernetwork.
        path: The file to write (its folder is created).
        **info: JSON-serialisable facts to record beside the settings (the model it was trained for, the layers, the
            training step, the validation score, ...).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().cpu().contiguous() for name, value in net.state_dict().items()}
    metadata = {"format": FILE_FORMAT, "version": _FILE_VERSION, "config": json.dumps(net.config()),
                "info": json.dumps(info, default=str)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_hypernetwork(path: Union[str, os.PathLike]) -> tuple[MENDHypernetwork, dict[str, Any]]:
    """Reads a hypernetwork file written by :func:`save_hypernetwork` (or a MENDTrainer checkpoint, ``.ckpt``).

    Args:
        path: The file.

    Returns:
        ``(hypernetwork, info)``; the hypernetwork is in eval mode, on the CPU.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file is not a MEND hypernetwork (naming the file and what is wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MEND hypernetwork file {str(path)!r} does not exist (train one with "
                                "'prune-edit mend-train --config ...')")
    if path.suffix == ".ckpt":
        config, info, state = _read_trainer_checkpoint(path)
    else:
        config, info, state = _read_safetensors(path)
    config = dict(config)
    shapes = config.pop("shapes", None)
    if not isinstance(shapes, dict):
        raise ValueError(f"MEND hypernetwork file {str(path)!r}: its settings name no edited matrices ('shapes')")
    try:
        net = MENDHypernetwork({name: tuple(shape) for name, shape in shapes.items()}, **config)
        net.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"MEND hypernetwork file {str(path)!r} does not hold a hypernetwork of its own settings: "
                         f"{err}") from None
    net.eval()
    return net, info


def _read_safetensors(path: Path) -> tuple[dict, dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for a file that is not one
        raise ValueError(f"MEND hypernetwork file {str(path)!r} is not a readable safetensors file: {err}") from None
    if metadata.get("format") != FILE_FORMAT:
        raise ValueError(f"MEND hypernetwork file {str(path)!r} is not a MEND hypernetwork (its metadata format is "
                         f"{metadata.get('format')!r}, expected {FILE_FORMAT!r})")
    if metadata.get("version") != _FILE_VERSION:
        raise ValueError(f"MEND hypernetwork file {str(path)!r} has version {metadata.get('version')!r}; this "
                         f"version of prune-lightning reads version {_FILE_VERSION}")
    return json.loads(metadata["config"]), json.loads(metadata.get("info") or "{}"), state


def _read_trainer_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"MEND hypernetwork file {str(path)!r} is not a readable checkpoint: {err}") from None
    mend = checkpoint.get("mend") if isinstance(checkpoint, dict) else None
    if not isinstance(mend, dict) or "config" not in mend:
        raise ValueError(f"MEND hypernetwork file {str(path)!r} is a checkpoint, but not one of a MENDTrainer fit")
    prefix = "hypernetwork."
    state = {key[len(prefix):]: value for key, value in checkpoint.get("state_dict", {}).items()
             if key.startswith(prefix)}
    return mend["config"], dict(mend.get("info") or {}), state


def check_compatible(net: MENDHypernetwork, shapes: Mapping[str, Sequence[int]], path: Any = None) -> None:
    """Raises one ``ValueError`` naming the file and every difference if ``net`` was not trained for these matrices.

    Args:
        net: The hypernetwork.
        shapes: ``{parameter name: (in, out)}`` the editor will write, in order.
        path: The file ``net`` came from (for the message).
    """
    wanted = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
    problems = []
    if list(wanted) != net.parameter_names:
        extra = [n for n in wanted if n not in net.shapes]
        missing = [n for n in net.parameter_names if n not in wanted]
        if extra or missing:
            problems.append(f"it was trained for the matrices {net.parameter_names}, the editor writes {list(wanted)}"
                            + (f" (not in the file: {extra})" if extra else "")
                            + (f" (not edited now: {missing})" if missing else ""))
        else:
            problems.append(f"it lists the matrices in the order {net.parameter_names}, the editor in the order "
                            f"{list(wanted)} (the order fixes each matrix's step size and mode)")
    for name, shape in wanted.items():
        if name in net.shapes and net.shapes[name] != shape:
            problems.append(f"{name} has (in, out) = {shape} in this model but {net.shapes[name]} in the file")
    if problems:
        where = f"MEND hypernetwork file {str(path)!r}" if path is not None else "The MEND hypernetwork"
        raise ValueError(f"{where} does not fit this model: " + "; ".join(problems))
