"""Explainable choice of the modules LoRA adapts.

``auto`` finds the decoder stack (the repeated blocks that hold most of the parameters), then
takes every linear layer inside it (``nn.Linear`` and GPT-2's ``Conv1D``) except MoE routers,
plus fused 3-D expert weights (Mixtral-style ``experts.gate_up_proj``) as peft
``target_parameters``. The output head, embeddings, vision towers and multimodal projectors are
outside the stack and so never chosen. Every decision is written into a :class:`LoRATargetReport`
whose table says, per module-path pattern, how many modules were taken, their shapes and how
many trainable parameters LoRA adds.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_optcore.errors import ModelLoadError

__all__ = ["LoRATargetError", "LoRATargetReport", "LoRATargetRow", "resolve_lora_targets"]

# Path components that mark a non-language part of a multimodal model.
_FOREIGN_PARTS = ("vision", "visual", "image", "audio", "speech", "projector", "mm_proj", "multi_modal")
# Last path component of an MoE router (Qwen2-MoE / DeepSeek ``mlp.gate``, ``router``, ...).
_ROUTER_NAMES = {"gate", "router", "shared_expert_gate", "gating", "switch"}
_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


class LoRATargetError(ModelLoadError, ValueError):
    """LoRA targeting found nothing to adapt, or an explicit target name matched no module."""


@dataclass
class LoRATargetRow:
    """One line of the targeting table: all modules sharing a path pattern (layer index as ``*``)."""

    pattern: str
    kind: str
    count: int
    shapes: list[str]
    lora_params: int


@dataclass
class LoRATargetReport:
    """What LoRA adapts and why (also what is passed to ``peft.LoraConfig``).

    Attributes:
        mode: ``auto``, ``all-linear`` or ``explicit``.
        strategy: how the candidates were found (the decoder stack path, or the fallback used).
        rows: one :class:`LoRATargetRow` per module-path pattern.
        module_names: full paths of the targeted modules.
        parameter_names: full paths of targeted 3-D expert parameters (peft ``target_parameters``).
        excluded: ``(pattern, reason)`` for linear layers deliberately left out.
        total_params: parameters of the model before LoRA.
        target_modules: the value for ``LoraConfig.target_modules`` (an anchored regex).
        target_parameters: the value for ``LoraConfig.target_parameters`` (or None).
    """

    mode: str
    strategy: str
    rank: int
    rows: list[LoRATargetRow] = field(default_factory=list)
    module_names: list[str] = field(default_factory=list)
    parameter_names: list[str] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)
    total_params: int = 0

    @property
    def lora_params(self) -> int:
        """Trainable parameters LoRA adds (before ``modules_to_save``)."""
        return sum(r.lora_params for r in self.rows)

    @property
    def target_modules(self) -> str | None:
        return _regex_for(self.module_names) if self.module_names else None

    @property
    def target_parameters(self) -> list[str] | None:
        return list(self.parameter_names) or None

    def patterns(self) -> set[str]:
        """The module-path patterns targeted, e.g. ``{"model.layers.*.self_attn.q_proj", ...}``."""
        return {r.pattern for r in self.rows}

    def table(self) -> str:
        """The report as a fixed-width text table (what gets logged)."""
        head = ["pattern", "type", "count", "shape (in -> out)", "LoRA params", "% of model"]
        body = [
            [r.pattern, r.kind, str(r.count), ", ".join(r.shapes), f"{r.lora_params:,}", _pct(r.lora_params, self.total_params)]
            for r in self.rows
        ]
        total = ["total", "", str(sum(r.count for r in self.rows)), "", f"{self.lora_params:,}",
                 _pct(self.lora_params, self.total_params)]
        widths = [max(len(x[i]) for x in [head, *body, total]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [f"LoRA targets ({self.mode}, r={self.rank}): {self.strategy}", fmt.format(*head)]
        lines += [fmt.format(*row).rstrip() for row in body] + [fmt.format(*total).rstrip()]
        lines[1] = lines[1].rstrip()
        if self.excluded:
            lines.append("left out: " + "; ".join(f"{p} ({why})" for p, why in self.excluded))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.3f}%" if total else "n/a"


def _regex_for(names: list[str]) -> str:
    """An anchored regex that peft fullmatches against exactly ``names`` (layer indices as \\d+)."""
    pats = sorted({re.escape(_pattern(n)).replace(r"\*", r"\d+") for n in names})
    return "(?:" + "|".join(pats) + ")"


def _pattern(name: str) -> str:
    return _LAYER_INDEX.sub(".*", name)


def _linear_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "Linear"
    # transformers' GPT-2 style Conv1D (weight stored as in x out); peft handles it with fan_in_fan_out.
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return "Conv1D"
    return None


def _in_out(module: nn.Module, kind: str) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w.shape[1]) if kind == "Conv1D" else (w.shape[1], w.shape[0])


def _is_foreign(path: str) -> bool:
    return any(part in p for p in path.lower().split(".") for part in _FOREIGN_PARTS)


def _is_router(path: str, module: nn.Module) -> bool:
    last = path.rsplit(".", 1)[-1]
    return last in _ROUTER_NAMES or "router" in type(module).__name__.lower()


def _find_decoder_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of identical blocks holding the most parameters, outside vision/audio towers."""
    best, best_size = None, 0
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or _is_foreign(path):
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (path, module), size
    return best


def _output_head_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for path, module in model.named_modules():
        if module is head or isinstance(module, nn.Embedding):
            names.add(path)
    return names


def resolve_lora_targets(model: nn.Module, target_modules="auto", rank: int = 16, use_dora: bool = False) -> LoRATargetReport:
    """Decide which modules (and expert parameters) LoRA adapts, and explain the choice.

    Args:
        model: the base model (before peft wraps it).
        target_modules: ``"auto"`` (decoder-stack attention and MLP linears, no routers),
            ``"all-linear"`` (every linear layer except the output head) or a list of module names
            (a name matches a module whose path equals it or ends with ``.name``).
        rank: LoRA rank, to count the parameters added.
        use_dora: count DoRA's per-output magnitude vector too.

    Returns:
        A :class:`LoRATargetReport`.

    Raises:
        LoRATargetError: nothing matched, or an explicit name matched no module (the message
            lists the linear layer names that exist).
    """
    total = sum(p.numel() for p in model.parameters())
    heads = _output_head_names(model)
    linears = OrderedDict((p, m) for p, m in model.named_modules() if _linear_kind(m) and p not in heads)
    excluded: list[tuple[str, str]] = []
    params: list[tuple[str, torch.Tensor]] = []

    if isinstance(target_modules, str) and target_modules == "all-linear":
        mode, strategy, chosen = "all-linear", "every linear layer except the output head", dict(linears)
    elif isinstance(target_modules, str) and target_modules == "auto":
        mode = "auto"
        stack = _find_decoder_stack(model)
        if stack is not None:
            stack_path, blocks = stack
            prefix = stack_path + "."
            strategy = f"decoder stack '{stack_path}' ({len(blocks)} blocks)"
            chosen = {}
            for path, module in linears.items():
                if not path.startswith(prefix):
                    continue
                if _is_router(path, module):
                    excluded.append((_pattern(path), "MoE router"))
                else:
                    chosen[path] = module
            for path, module in model.named_modules():
                if not path.startswith(prefix):
                    continue
                if _is_router(path, module):
                    if path not in linears and any(True for _ in module.parameters(recurse=False)):
                        excluded.append((_pattern(path), "MoE router"))
                    continue
                params += [(f"{path}.{n}", p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        else:
            strategy = "no repeated block stack found; fallback: every linear layer except the output head, routers and vision/projector parts"
            chosen = {p: m for p, m in linears.items() if not _is_router(p, m) and not _is_foreign(p)}
        for path in sorted(heads):
            excluded.append((_pattern(path), "output head" if not isinstance(model.get_submodule(path), nn.Embedding) else "embedding"))
    else:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        mode, strategy, chosen = "explicit", "module names from model.lora.target_modules", {}
        for name in target_modules:
            hits = {p: m for p, m in model.named_modules() if (p == name or p.endswith("." + name)) and _linear_kind(m)}
            if not hits:
                available = sorted({p.rsplit(".", 1)[-1] for p in linears})
                raise LoRATargetError(
                    f"model.lora.target_modules: {name!r} matches no linear layer of {type(model).__name__}; "
                    f"linear layer names in this model: {', '.join(available) or 'none'}"
                )
            chosen.update(hits)

    if not chosen and not params:
        raise LoRATargetError(
            f"model.lora.target_modules={target_modules!r}: no module of {type(model).__name__} to adapt "
            f"({strategy}); give an explicit list of module names"
        )
    report = LoRATargetReport(mode=mode, strategy=strategy, rank=rank, excluded=_dedupe(excluded), total_params=total)
    report.module_names = list(chosen)
    report.parameter_names = [n for n, _ in params]
    report.rows = _rows(chosen, params, rank, use_dora)
    return report


def _dedupe(pairs):
    return list(OrderedDict.fromkeys(pairs))


def _rows(chosen: dict, params: list, rank: int, use_dora: bool) -> list[LoRATargetRow]:
    groups: OrderedDict[str, dict] = OrderedDict()
    for path, module in chosen.items():
        kind = _linear_kind(module)
        d_in, d_out = _in_out(module, kind)
        g = groups.setdefault(_pattern(path), {"kind": kind, "count": 0, "shapes": [], "params": 0})
        g["count"] += 1
        g["params"] += rank * (d_in + d_out) + (d_out if use_dora else 0)
        if f"{d_in} -> {d_out}" not in g["shapes"]:
            g["shapes"].append(f"{d_in} -> {d_out}")
    for path, p in params:
        experts, d_a, d_b = p.shape
        g = groups.setdefault(_pattern(path), {"kind": f"experts x{experts}", "count": 0, "shapes": [], "params": 0})
        g["count"] += 1
        # peft's ParamWrapper gives each expert its own rank-r pair over the 2-D slice.
        g["params"] += experts * rank * (d_a + d_b)
        shape = f"{experts} x ({d_b} -> {d_a})"
        if shape not in g["shapes"]:
            g["shapes"].append(shape)
    return [LoRATargetRow(pat, g["kind"], g["count"], g["shapes"], g["params"]) for pat, g in groups.items()]
