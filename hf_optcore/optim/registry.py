"""The optimizer registry: one :class:`OptimizerInfo` record per name, aliases, look-up with did-you-mean.

Pure torch: nothing here imports transformers. An entry's capability flags (``has_betas``,
``has_eps``, ``has_momentum``, ``supports_foreach``, ``supports_fused``, ...) tell
:class:`~hf_optcore.optimizer_manager.OptimizerManager` which keyword arguments apply, so no code
branches on optimizer names.

A user adds a third-party optimizer with one decorator and names it in YAML::

    from hf_optcore.optim import register_optimizer

    @register_optimizer("my_sgd", description="SGD with my twist", has_momentum=True)
    class MySGD(torch.optim.Optimizer): ...

    # training: {optimizer: my_sgd}
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from hf_optcore.errors import did_you_mean

__all__ = [
    "OptimizerInfo",
    "OptimizerUnavailableError",
    "UnknownNameError",
    "get_optimizer_info",
    "list_optimizers",
    "register_alias",
    "register_optimizer",
]


class UnknownNameError(KeyError):
    """A registry name that is not registered; the message lists the valid names and the closest one."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class OptimizerUnavailableError(ImportError):
    """A registered optimizer whose package is not installed; the message names the package."""


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    """``unknown optimizer 'adamww' (did you mean 'adamw'?); registered: ...``"""
    return f"unknown {kind} {name!r}{did_you_mean(name, valid, 0.5)}; registered: {', '.join(sorted(valid))}"


@dataclass(frozen=True)
class OptimizerInfo:
    """What the registry knows about one optimizer.

    Args:
        name: registry name (what ``training.optimizer`` holds).
        factory: a ``torch.optim.Optimizer`` subclass or a callable ``(param_groups, **kwargs) -> Optimizer``.
        description: one line shown by ``hf-optcore list-optimizers``.
        has_betas: takes ``betas=(adam_beta1, adam_beta2)``.
        has_eps: takes ``eps=adam_epsilon``.
        has_momentum: takes ``momentum`` (set through ``optimizer_kwargs``).
        has_weight_decay: takes a per-group ``weight_decay``.
        supports_foreach: takes ``foreach=``.
        supports_fused: takes ``fused=``.
        schedule_free: keeps train/eval modes (``optimizer.train()`` / ``.eval()``), runs its own warmup
            (``warmup_steps=``) and wants a constant learning-rate schedule.
        needs_param_names: the factory receives ``param_names`` in every group (Muon splits on them).
        needs_model: the factory also receives ``model=`` (transformers' own factory for GaLore, LOMO, ...).
        package: import name of the package it needs (None: torch alone).
        pip_name: what to ``pip install`` for ``package`` (defaults to ``package``).
        defaults: keyword arguments applied before the config's and ``optimizer_kwargs``.
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""
    has_betas: bool = False
    has_eps: bool = False
    has_momentum: bool = False
    has_weight_decay: bool = True
    supports_foreach: bool = False
    supports_fused: bool = False
    schedule_free: bool = False
    needs_param_names: bool = False
    needs_model: bool = False
    package: Optional[str] = None
    pip_name: Optional[str] = None
    defaults: dict = field(default_factory=dict)

    def is_available(self) -> bool:
        """True when the package it needs (if any) is importable."""
        if self.package is None:
            return True
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ImportError, ValueError):
            return False

    def require(self) -> None:
        """Raise :class:`OptimizerUnavailableError` naming the package when it is not installed."""
        if not self.is_available():
            raise OptimizerUnavailableError(
                f"training.optimizer: {self.name!r} needs the package {self.package!r}, which is not installed; "
                f"install it with `pip install {self.pip_name or self.package}` or choose another optimizer"
            )


_OPTIMIZERS: dict[str, OptimizerInfo] = {}
_ALIASES: dict[str, str] = {}


def register_optimizer(
    name: Union[str, OptimizerInfo],
    factory: Optional[Callable[..., Any]] = None,
    **info: Any,
):
    """Register an optimizer; usable as a call or as a class/function decorator.

    Args:
        name: registry name, or a complete :class:`OptimizerInfo`.
        factory: the optimizer class or a ``(param_groups, **kwargs) -> Optimizer`` callable; omit it to
            use ``register_optimizer(name, ...)`` as a decorator.
        **info: the other :class:`OptimizerInfo` fields (``description``, ``has_betas``, ...).

    Returns:
        The registered :class:`OptimizerInfo` (call form) or the decorated object unchanged (decorator form).

    Re-registering an existing name replaces it with a warning.
    """
    return register_entry(OptimizerInfo, _store, name, factory, info)


def register_entry(info_cls: type, store: Callable[[Any], Any], name: Any, factory: Any, info: dict):
    """The call / decorator / ready-made-record forms shared by the optimizer and scheduler registries."""
    if isinstance(name, info_cls):
        return store(name)
    if factory is None:

        def decorator(obj):
            store(info_cls(name=name, factory=obj, **info))
            return obj

        return decorator
    return store(info_cls(name=name, factory=factory, **info))


def _store(entry: OptimizerInfo) -> OptimizerInfo:
    key = entry.name.lower()
    if key in _OPTIMIZERS or key in _ALIASES:
        warnings.warn(f"optimizer {key!r} is already registered; replacing it", stacklevel=3)
        _ALIASES.pop(key, None)
    _OPTIMIZERS[key] = dataclasses.replace(entry, name=key)
    return _OPTIMIZERS[key]


def register_alias(alias: str, target: str) -> None:
    """Make ``alias`` another name for the registered optimizer ``target``."""
    target_key = _resolve(target)
    alias = alias.lower()
    if alias in _OPTIMIZERS:
        raise ValueError(f"register_alias: {alias!r} is already a registered optimizer, not an alias")
    _ALIASES[alias] = target_key


def _resolve(name: str) -> str:
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in _OPTIMIZERS:
        raise UnknownNameError(unknown_name_message("optimizer", str(name), list_optimizers()))
    return key


def get_optimizer_info(name: str) -> OptimizerInfo:
    """The :class:`OptimizerInfo` of ``name`` (or of the optimizer an alias points to).

    Raises:
        UnknownNameError: naming the valid names and the closest match.
    """
    return _OPTIMIZERS[_resolve(name)]


def list_optimizers(
    filter: Optional[str] = None,  # noqa: A002 - timm's name for it
    include_aliases: bool = True,
    available_only: bool = False,
) -> list[str]:
    """Sorted registered names.

    Args:
        filter: a glob (``"adam*"``) or, without glob characters, a substring the name must contain.
        include_aliases: also list aliases (``adamw_torch``).
        available_only: only names whose package is installed.
    """
    names = list(_OPTIMIZERS) + (list(_ALIASES) if include_aliases else [])
    if filter:
        pat = filter.lower()
        glob = any(c in pat for c in "*?[")
        names = [n for n in names if (fnmatch.fnmatchcase(n, pat) if glob else pat in n)]
    if available_only:
        names = [n for n in names if get_optimizer_info(n).is_available()]
    return sorted(names)


def aliases_of(name: str) -> list[str]:
    """The aliases that point to ``name``."""
    key = _resolve(name)
    return sorted(a for a, t in _ALIASES.items() if t == key)
