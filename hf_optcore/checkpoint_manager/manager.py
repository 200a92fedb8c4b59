"""``CheckpointManager``: full training state in atomic, verified, retained checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from hf_optcore.checkpoint_manager import rng as _rng
from hf_optcore.checkpoint_manager import storage
from hf_optcore.checkpoint_manager.retention import metric_greater_is_better, select_to_keep
from hf_optcore.distributed import barrier as _barrier
from hf_optcore.distributed import rank_and_world as _dist
from hf_optcore.errors import CheckpointError
from hf_optcore.wrapping import is_peft_model as _is_peft
from hf_optcore.wrapping import unwrap_model as _unwrap

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
TOPOLOGY_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
COMPONENTS_DIR = "components"


def component_file(name: str) -> str:
    """Where component ``name``'s state lives inside a checkpoint."""
    return f"{COMPONENTS_DIR}/{name}.pt"


def rank_file(rank: int) -> str:
    """Where one rank's RNG state (and pending collate RNG) lives inside a checkpoint."""
    return f"{COMPONENTS_DIR}/rng_rank{rank}.pt"


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses arbitrary objects: say which file
        raise CheckpointError(f"cannot read {str(path)!r} safely (weights_only): {exc}") from exc


class CheckpointManager:
    """Atomic, verified checkpoints with retention by step and metric, usable with or without the Trainer.

    Every save writes model weights (safetensors; a ``PeftModel``: adapters only), optimizer,
    scheduler, scaler, the RNG state of every rank, each registered component (EMA, sampler
    position, ...), the resolved config and extra JSON (the Trainer's state) into a temporary
    directory, fsyncs, writes ``manifest.json`` last and renames it to ``checkpoint-<step>``.
    Only manifest-complete checkpoints are listed, loaded or counted.

    Args:
        config: the ``checkpoint`` section (:class:`~hf_optcore.config.CheckpointConfig`).
        output_dir: directory holding the ``checkpoint-<step>`` folders.
        model: the model (a ``PeftModel`` saves its adapters only).
        optimizer: optimizer (or None).
        scheduler: learning-rate scheduler (or None).
        scaler: gradient scaler (or None).
        tokenizer: tokenizer saved beside the weights (or None).
        components: name -> object with ``state_dict()`` / ``load_state_dict()`` saved in every
            checkpoint (the Trainer passes ``trainer.optcore_state``: ``"ema"``, ``"sampler"``, ...).
        trainer_config: the whole :class:`~hf_optcore.config.TrainerConfig`, recorded (YAML and hash).
        metric_for_best_model: metric that ranks checkpoints (default ``eval_loss``, else ``loss``).
        greater_is_better: direction of that metric (default: lower is better for losses).
        topology: ``world_size``, ``per_device_train_batch_size``, ``gradient_accumulation_steps``
            of this run, checked against a checkpoint on load.
        durable: fsync files and directories (turn off only to measure what fsync costs).
    """

    def __init__(
        self,
        config: Any,
        output_dir: str | os.PathLike,
        model: torch.nn.Module,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        tokenizer: Any = None,
        *,
        components: dict[str, Any] | None = None,
        trainer_config: Any = None,
        metric_for_best_model: str | None = None,
        greater_is_better: bool | None = None,
        topology: dict[str, int] | None = None,
        durable: bool = True,
    ):
        self.config = config
        self.output_dir = Path(output_dir)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.tokenizer = tokenizer
        self.components: dict[str, Any] = components if components is not None else {}
        self.trainer_config = trainer_config
        self.metric_for_best_model = metric_for_best_model
        self.greater_is_better = greater_is_better
        self.topology = dict(topology or {})
        self.durable = durable
        self.protected_steps: set[int] = set()
        if _dist()[0] == 0:
            for leftover in storage.remove_leftovers(self.output_dir):
                logger.warning("removed %s left by an interrupted checkpoint save", leftover)

    # ---- listing ------------------------------------------------------------------------

    def checkpoints(self) -> list[storage.CheckpointInfo]:
        """Manifest-complete checkpoints, oldest step first."""
        return storage.list_complete(self.output_dir)

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        found = self.checkpoints()
        return found[-1].path if found else None

    def best(self) -> Path | None:
        """The complete checkpoint with the best ``metric_for_best_model``, or None when none has it."""
        scored = [(self._metric_of(c.metrics), c) for c in self.checkpoints()]
        scored = [(m, c) for m, c in scored if m is not None and math.isfinite(m)]
        if not scored:
            return None
        better = self._greater_is_better()
        return max(scored, key=lambda mc: ((mc[0] if better else -mc[0]), mc[1].step))[1].path

    def _metric_key(self, metrics: dict[str, float]) -> str | None:
        key = self.metric_for_best_model
        if key is None:
            return next((k for k in ("eval_loss", "loss") if k in metrics), None)
        return key if key in metrics or key.startswith("eval_") else f"eval_{key}"

    def _metric_of(self, metrics: dict[str, float]) -> float | None:
        key = self._metric_key(metrics)
        value = metrics.get(key) if key else None
        return float(value) if isinstance(value, (int, float)) else None

    def _greater_is_better(self) -> bool:
        return metric_greater_is_better(self.metric_for_best_model or "eval_loss", self.greater_is_better)

    # ---- save ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        metrics: dict[str, float] | None = None,
        *,
        extra_json: dict[str, Any] | None = None,
        rank_state: dict[str, Any] | None = None,
    ) -> Path:
        """Write a complete checkpoint of ``step`` atomically, then prune by the retention rules.

        In a process group every rank calls this (each writes its own RNG file); rank 0 writes
        the rest, the manifest and does the rename.

        Args:
            step: optimizer step.
            metrics: metrics to record (rank checkpoints by ``metric_for_best_model``).
            extra_json: file name -> JSON-serialisable object or ready text (e.g. ``trainer_state.json``).
            rank_state: extra per-rank tensors/ints saved beside this rank's RNG state.

        Returns:
            The path of the new ``checkpoint-<step>``.
        """
        rank, world = _dist()
        tmp = storage.tmp_dir_for(self.output_dir, step)
        if rank == 0:
            storage.begin(self.output_dir, step)
        _barrier()
        (tmp / COMPONENTS_DIR).mkdir(exist_ok=True)
        torch.save({"rng": _rng.capture(), **(rank_state or {})}, tmp / rank_file(rank))
        _barrier()
        final = self.output_dir / f"{storage.PREFIX}{step}"
        if rank == 0:
            self._write_shared(tmp, extra_json or {})
            self._pause_for_tests("before_manifest")
            final = storage.commit(tmp, step, self._meta(metrics, world), durable=self.durable)
            self.prune()
        _barrier()
        return final

    def _meta(self, metrics: dict[str, float] | None, world: int) -> dict[str, Any]:
        return {
            "metrics": {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
            "config_hash": self.trainer_config.fingerprint() if self.trainer_config is not None else None,
            "topology": {**self.topology, "world_size": self.topology.get("world_size", world)},
            "components": sorted(self.components),
            "model_format": "peft_adapter" if _is_peft(_unwrap(self.model)) else "full",
        }

    def write_components(self, path: Path) -> None:
        """Write every registered component's state and the resolved config into checkpoint ``path``."""
        if self.components:
            (path / COMPONENTS_DIR).mkdir(parents=True, exist_ok=True)
            for name, comp in self.components.items():
                if not getattr(comp, "per_rank", False):  # per-rank ones are in each rank's own file
                    torch.save(comp.state_dict(), path / component_file(name))
        self._pause_for_tests("after_state")
        if self.trainer_config is not None:
            self.trainer_config.to_yaml(path / "config.yaml")

    def commit(self, path: Path, step: int, metrics: dict[str, float] | None, files: list[str]) -> Path:
        """Write the manifest of checkpoint ``path`` (already holding ``files``) last: from now on it counts."""
        self._pause_for_tests("before_manifest")
        return storage.commit_in_place(path, step, self._meta(metrics, _dist()[1]), files, durable=self.durable)

    def _pause_for_tests(self, where: str) -> None:
        # Lets the crash tests kill a process at known points inside a save; unset in real runs.
        delay = os.environ.get("HF_OPTCORE_CKPT_TEST_DELAY")
        if delay:
            import time

            print(f"[checkpoint] {where}", flush=True)
            time.sleep(float(delay))

    def _write_shared(self, tmp: Path, extra_json: dict[str, Any]) -> None:
        model = _unwrap(self.model)
        if _is_peft(model):
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            if getattr(model, "config", None) is not None and hasattr(model.config, "to_json_file"):
                model.config.to_json_file(tmp / "config.json")
        self._pause_for_tests("after_model")
        if self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about saving the optimizer with it
                torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
        if self.scaler is not None:
            torch.save(self.scaler.state_dict(), tmp / SCALER_FILE)
        self.write_components(tmp)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(tmp / "tokenizer")
        for name, obj in extra_json.items():
            text = obj if isinstance(obj, str) else json.dumps(obj, indent=1, sort_keys=True)
            (tmp / name).write_text(text, encoding="utf-8")

    # ---- retention ----------------------------------------------------------------------

    def prune(self) -> list[Path]:
        """Delete complete checkpoints that no retention rule keeps; return the deleted paths."""
        found = self.checkpoints()
        keep = select_to_keep(
            {c.step: self._metric_of(c.metrics) for c in found},
            keep_last=len(found) if self.config.keep_last is None else self.config.keep_last,
            keep_best=self.config.keep_best,
            keep_every_n_steps=self.config.keep_every_n_steps,
            greater_is_better=self._greater_is_better(),
            protect=self.protected_steps,
        )
        removed = []
        for c in found:
            if c.step not in keep:
                # Only what the manifest lists goes: a file hf_optcore did not write survives.
                if not storage.delete(c.path):
                    logger.warning("pruned %s but kept the directory: it holds files hf_optcore did not write", c.path)
                removed.append(c.path)
        return removed

    # ---- load ---------------------------------------------------------------------------

    def resolve(self, path_or_latest: str | os.PathLike = "latest", verify: bool = True) -> tuple[Path, dict[str, Any]]:
        """A verified checkpoint and its manifest.

        ``"latest"`` walks back from the newest complete checkpoint past corrupt ones (warning
        with the bad file); an explicit path must itself verify.

        Args:
            path_or_latest: a ``checkpoint-<step>`` directory or ``"latest"``.
            verify: check every file's size and sha256 (``False``: the manifest must only be there).

        Raises:
            CheckpointError: nothing complete and intact, naming every bad file found.
        """
        check = storage.verify if verify else storage.require_manifest
        if str(path_or_latest) != "latest":
            path = Path(path_or_latest)
            if not path.is_dir():
                raise CheckpointError(f"Can't find a valid checkpoint at {str(path)!r}: it does not exist or is not a "
                                      f"directory")
            return path, check(path)
        problems = []
        for info in reversed(self.checkpoints()):
            if not verify:
                return info.path, info.manifest
            try:
                manifest = storage.verify(info.path)
            except CheckpointError as exc:
                problems.append(str(exc))
                logger.warning("%s; falling back to the previous complete checkpoint", exc)
                warnings.warn(f"{exc}; falling back to the previous complete checkpoint", stacklevel=2)
                continue
            return info.path, manifest
        if problems:
            raise CheckpointError("no intact checkpoint in " + repr(str(self.output_dir)) + ": " + "; ".join(problems))
        raise CheckpointError(f"no complete checkpoint in {str(self.output_dir)!r}")

    def check_topology(self, manifest: dict[str, Any], path: Path | str = "") -> None:
        """Raise unless world size, per-device batch and accumulation match (or changes are allowed)."""
        saved = manifest.get("topology") or {}
        now = {**self.topology, "world_size": self.topology.get("world_size", _dist()[1])}
        diffs = [f"{k}: checkpoint {saved[k]}, this run {now[k]}" for k in TOPOLOGY_KEYS
                 if k in saved and k in now and saved[k] != now[k]]
        if diffs and not getattr(self.config, "allow_topology_change", False):
            raise CheckpointError(
                f"checkpoint {str(path)!r} was saved with another topology ({'; '.join(diffs)}); resuming would not "
                f"be exact. Use the same settings or set checkpoint.allow_topology_change=true"
            )
        if diffs:
            logger.warning("resuming %s with a different topology (%s)", path, "; ".join(diffs))

    def load(self, path_or_latest: str | os.PathLike = "latest", restore_rng: bool = True) -> int:
        """Restore model, optimizer, scheduler, scaler, components (and RNG) from a checkpoint.

        Args:
            path_or_latest: a ``checkpoint-<step>`` directory or ``"latest"``.
            restore_rng: also set this rank's RNG state (the Trainer restores it itself, later).

        Returns:
            The step of the loaded checkpoint.
        """
        path, manifest = self.resolve(path_or_latest)
        self.check_topology(manifest, path)
        self.load_model(path)
        self.load_training_state(path)
        self.load_components(path, manifest)
        if restore_rng:
            _rng.restore(self.rank_state(path)["rng"])
        self.protected_steps.add(int(manifest["step"]))
        return int(manifest["step"])

    def load_model(self, path: Path | str) -> None:
        """Load the weights of ``path`` into the model (adapters into a ``PeftModel``)."""
        path = Path(path)
        model = _unwrap(self.model)
        from safetensors.torch import load_file, load_model

        if _is_peft(model):
            from peft import set_peft_model_state_dict

            file = path / ADAPTER_FILE
            if not file.is_file():
                raise CheckpointError(f"checkpoint {str(path)!r}: {ADAPTER_FILE} is missing for this PeftModel")
            result = set_peft_model_state_dict(model, load_file(str(file)))
            if getattr(result, "unexpected_keys", None):
                raise CheckpointError(f"{str(file)!r}: unexpected adapter keys {result.unexpected_keys[:5]}")
            return
        file = path / MODEL_FILE
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r}: {MODEL_FILE} is missing")
        missing, unexpected = load_model(model, str(file), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{str(file)!r} does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )

    def load_training_state(self, path: Path | str) -> None:
        """Load optimizer, scheduler and scaler states (each only where both file and object exist)."""
        path = Path(path)
        for obj, name in ((self.optimizer, OPTIMIZER_FILE), (self.scheduler, SCHEDULER_FILE), (self.scaler, SCALER_FILE)):
            if obj is None:
                continue
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {str(path)!r}: {name} is missing but this run has a {name[:-3]}")
            obj.load_state_dict(_torch_load(file))

    def load_components(self, path: Path | str, manifest: dict[str, Any] | None = None) -> None:
        """Restore every registered component that the checkpoint holds."""
        path = Path(path)
        for name, comp in self.components.items():
            if getattr(comp, "per_rank", False):
                continue  # restored from each rank's own file (rank_state()["components"])
            file = path / component_file(name)
            if not file.is_file():
                logger.warning("checkpoint %s has no state for %r; it starts fresh", path, name)
                continue
            comp.load_state_dict(_torch_load(file))

    def rank_state(self, path: Path | str) -> dict[str, Any]:
        """This rank's saved RNG state and extra per-rank entries."""
        rank = _dist()[0]
        file = Path(path) / rank_file(rank)
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} has no RNG state for rank {rank} ({file.name})")
        return _torch_load(file)
