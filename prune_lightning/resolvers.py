"""OmegaConf resolvers of the command lines (``prune-edit`` and ``prune-edit mend-train``), which parse configs in
LightningCLI's ``omegaconf+`` mode.

``${run:<setting>}`` is the value of ``<setting>`` (a dotted path such as ``trainer.default_root_dir``) in the run's
config, resolved after the command line's overrides, wherever the interpolation stands.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register_resolvers", "run_setting"]

_MISSING = object()


def run_setting(path: str, *, _root_: Any) -> Any:
    """The OmegaConf resolver ``${run:<path>}``: the value at ``path`` (``trainer.default_root_dir``) of the run's
    config, wherever the interpolation stands.

    A relative interpolation (``${...default_root_dir}``) breaks when the node moves - ``--trainer.logger+=`` turns
    the experiment's one logger into a list - and an absolute one would have to name the subcommand
    (``${fit.trainer.default_root_dir}``); this one does neither.
    """
    from omegaconf import OmegaConf

    node = _root_
    if "trainer" not in node and len(node) == 1:  # the parser resolves {<subcommand>: config}
        node = node[next(iter(node))]
    value = OmegaConf.select(node, path, default=_MISSING)
    if value is _MISSING:
        raise ValueError(f"${{run:{path}}}: the config has no setting {path!r}")
    return value


def register_resolvers() -> None:
    """Registers ``${run:...}`` (:func:`run_setting`) with OmegaConf, once."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run"):
        OmegaConf.register_resolver("run", run_setting)
