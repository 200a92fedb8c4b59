"""The topology of a run: how many processes, how many examples each takes per micro-batch, how many micro-batches
make an optimizer step. One definition, used by every save (recorded in the manifest) and every resume check.

A resume with another topology is refused unless ``checkpoint.allow_topology_change``, and even then each
optimizer step must keep its examples: transformers positions a resume by optimizer steps (it skips
``global_step x accumulation`` batches of the new size), so examples consumed and examples skipped agree only when
every optimizer step holds as many examples as before (world size x per-device batch x accumulation; for
``token_budget``, batches: world size x accumulation).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["TOPOLOGY_KEYS", "Topology", "differences", "epoch_length_problem", "step_size_problem",
           "topology_problems"]

TOPOLOGY_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
_EXACT = "resuming would not be exact. Use the same, or set checkpoint.allow_topology_change=true"


@dataclass(frozen=True)
class Topology:
    """What a resume must find unchanged (or changed only as ``checkpoint.allow_topology_change`` permits).

    Args:
        world_size: the number of training processes.
        per_device_train_batch_size: examples per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
    """

    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int

    @classmethod
    def of_arguments(cls, args: Any) -> Topology:
        """The topology of a Trainer's ``TrainingArguments`` (its world size is the one Accelerate formed)."""
        return cls(int(args.world_size), int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps))

    @classmethod
    def of_config(cls, config: Any, world_size: int) -> Topology:
        """The topology a :class:`~hf_optcore.config.TrainerConfig` will run with on ``world_size`` processes."""
        t = config.training
        return cls(int(world_size), int(t.per_device_train_batch_size), int(t.gradient_accumulation_steps))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def differences(saved: Mapping | None, now: Mapping | Topology) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, this run's value)`` for every topology key both record and that differs."""
    saved = saved or {}
    now = now.to_dict() if isinstance(now, Topology) else now
    return [(k, saved[k], now[k]) for k in TOPOLOGY_KEYS if k in saved and k in now and saved[k] != now[k]]


def _describe(key: str, old: Any, new: Any, where: str) -> str:
    if key == "world_size":
        return f"checkpoint.resume_from: {where!r} was saved by {old} process(es), this run has {new}; {_EXACT}"
    return f"training.{key}: {new}, but checkpoint {where!r} was saved with {old}; {_EXACT}"


def topology_problems(saved: Mapping | None, now: Mapping | Topology, *, allow_change: bool, batching: str,
                      where: str | Path = "") -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of resuming a checkpoint of topology ``saved`` with ``now``.

    Without ``allow_change`` every changed key is a problem (one line each). With it, a change that keeps the
    examples per optimizer step is fine; another step size is a problem, or only a warning with
    ``data.batching=hf`` (transformers' own positioning then runs anyway).
    """
    diffs = differences(saved, now)
    if not diffs:
        return [], []
    where = str(where)
    if not allow_change:
        return [_describe(k, old, new, where) for k, old, new in diffs], []
    now = now.to_dict() if isinstance(now, Topology) else now
    problem = step_size_problem(saved, now, batching, where)
    changed = "; ".join(f"{k}: checkpoint {old}, this run {new}" for k, old, new in diffs)
    if problem is None:
        return [], [f"resuming {where} with a different topology ({changed})"]
    if batching == "hf":
        return [], [f"{problem} (data.batching=hf: transformers' own positioning runs anyway)"]
    return [problem], []


def step_size_problem(saved: Mapping, now: Mapping, batching: str, where: str | Path = "") -> str | None:
    """Why resuming a checkpoint of topology ``saved`` with ``now`` would not be exact, or None.

    transformers positions a resume by optimizer steps: examples consumed and examples skipped agree only when
    every optimizer step holds as many examples as before (for ``token_budget``, batches); the sampler then
    re-cuts the interrupted epoch by examples consumed.
    """
    if any(k not in saved or k not in now for k in TOPOLOGY_KEYS):
        return None
    budget = batching == "token_budget"

    def size(t: Mapping) -> int:
        n = int(t["world_size"]) * int(t["gradient_accumulation_steps"])
        return n if budget else n * int(t["per_device_train_batch_size"])

    before, after = size(saved), size(now)
    if before == after:
        return None
    unit = "batches" if budget else "examples"
    formula = ("world_size x gradient_accumulation_steps" if budget else
               "world_size x per_device_train_batch_size x gradient_accumulation_steps")
    per = int(now["world_size"]) * (1 if budget else int(now["per_device_train_batch_size"]))
    hint = f" (here gradient_accumulation_steps={before // per})" if before % per == 0 else ""
    return (f"checkpoint.allow_topology_change: {str(where)!r} was saved with {before} {unit} per optimizer step "
            f"({formula}), this run has {after}; transformers positions a resume by optimizer steps, so the rest "
            f"of the interrupted epoch would repeat or skip examples. Keep {formula} = {before}{hint}, or start a "
            f"new run")


def epoch_length_problem(saved: Mapping, saved_batches: Any, batches: int, accumulation: int,
                         where: str | Path = "") -> str | None:
    """Why a topology change would not resume exactly although the step size is kept, or None.

    transformers positions a resume by optimizer steps per epoch: they must not change. They can, by one, when
    an epoch's last global batch holds fewer examples than there are processes and joins the one before.
    """
    ga_then = saved.get("gradient_accumulation_steps")
    if saved_batches is None or not ga_then:
        return None
    before, after = -(-int(saved_batches) // int(ga_then)), -(-int(batches) // int(accumulation))
    if before == after:
        return None
    return (f"checkpoint {str(where)!r}: an epoch had {before} optimizer steps when it was saved and has {after} with "
            f"this topology (an epoch's last batch smaller than the number of processes joins the one before); "
            f"transformers positions a resume by steps per epoch, so examples would be repeated or skipped. Resume "
            f"with the saved topology, or a global batch that divides the data")
