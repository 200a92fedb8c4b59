"""``CheckpointManager``: full training state in atomic, verified, retained checkpoints, without the Trainer.

Under ``OptCoreTrainer`` the same files, manifest and rules are written around transformers' own save by
:class:`~hf_optcore.checkpoint_manager.trainer_checkpointing.TrainerCheckpointing`; this class is for a loop of your
own (Accelerate, plain torch).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from hf_optcore.checkpoint_manager import components as _components
from hf_optcore.checkpoint_manager import resume as _resume
from hf_optcore.checkpoint_manager import retention, storage
from hf_optcore.checkpoint_manager import rng as _rng
from hf_optcore.checkpoint_manager.faults import StorageFullError, storage_full_reason
from hf_optcore.checkpoint_manager.topology import differences, topology_problems
from hf_optcore.distributed import barrier as _barrier
from hf_optcore.distributed import rank_and_world as _dist
from hf_optcore.errors import CheckpointError
from hf_optcore.wrapping import is_peft_model as _is_peft
from hf_optcore.wrapping import unwrap_model as _unwrap

logger = logging.getLogger(__name__)

__all__ = ["CheckpointManager"]

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"


class CheckpointManager:
    """Atomic, verified checkpoints with retention by step and metric, usable with or without the Trainer.

    Every save writes model weights (safetensors; a ``PeftModel``: adapters only), optimizer,
    scheduler, scaler, the RNG state of every rank, each registered component (EMA, sampler
    position, ...), the resolved config and extra JSON into a temporary directory, fsyncs, writes
    ``manifest.json`` last and renames it to ``checkpoint-<step>``. Only checkpoints with a valid manifest are
    listed, loaded or counted, and nothing a manifest says is followed outside its checkpoint
    (:mod:`~hf_optcore.checkpoint_manager.storage`).

    Args:
        config: the ``checkpoint`` section (:class:`~hf_optcore.config.CheckpointConfig`).
        output_dir: directory holding the ``checkpoint-<step>`` folders.
        model: the model (a ``PeftModel`` saves its adapters only).
        optimizer: optimizer (or None).
        scheduler: learning-rate scheduler (or None).
        scaler: gradient scaler (or None).
        tokenizer: tokenizer saved beside the weights (or None).
        components: name -> object with ``state_dict()`` / ``load_state_dict()`` saved in every checkpoint.
        trainer_config: the whole :class:`~hf_optcore.config.TrainerConfig`, recorded (YAML and hash).
        metric_for_best_model: metric that ranks checkpoints (default ``eval_loss``, else ``loss``).
        greater_is_better: direction of that metric (default: lower is better for losses).
        topology: ``world_size``, ``per_device_train_batch_size``, ``gradient_accumulation_steps`` of this run
            (any of them; the world size defaults to the process group's), checked against a checkpoint on load.
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
        self.topology = dict(topology.to_dict() if hasattr(topology, "to_dict") else topology or {})
        self.durable = durable
        self.protected_steps: set[int] = set()
        if _dist()[0] == 0:
            for leftover in storage.remove_leftovers(self.output_dir):
                logger.warning("removed %s left by an interrupted checkpoint save", leftover)

    # ---- listing ------------------------------------------------------------------------

    def _ranking(self) -> retention.Ranking:
        return retention.Ranking(self.metric_for_best_model, self.greater_is_better)

    def checkpoints(self) -> list[storage.CheckpointInfo]:
        """Complete checkpoints (valid manifest), oldest step first."""
        return storage.list_complete(self.output_dir)

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        found = self.checkpoints()
        return found[-1].path if found else None

    def best(self) -> Path | None:
        """The complete checkpoint with the best ``metric_for_best_model``, or None when none has it."""
        best = self._ranking().best(self.checkpoints())
        return best.path if best is not None else None

    def _topology_now(self) -> dict[str, int]:
        return {**self.topology, "world_size": self.topology.get("world_size", _dist()[1])}

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

        Raises:
            StorageFullError: no space left (or a quota or file-size limit): nothing of this save remains.
        """
        rank, world = _dist()
        tmp = storage.tmp_dir_for(self.output_dir, step)
        if rank == 0:
            storage.begin(self.output_dir, step)
        _barrier()
        _components.write_rank_state(tmp, rank, {"rng": _rng.capture(), **(rank_state or {})})
        _barrier()
        final = self.output_dir / f"{storage.PREFIX}{step}"
        if rank == 0:
            try:
                self._write_shared(tmp, extra_json or {})
                final = storage.commit(tmp, step, self._meta(metrics, world), durable=self.durable)
            except Exception as exc:
                reason = storage_full_reason(exc, tmp)
                if reason is None:
                    raise
                storage.remove_leftovers(self.output_dir)  # the temporary directory: its space back
                raise StorageFullError(f"{reason} in {str(self.output_dir)!r} while saving checkpoint-{step}: the "
                                       f"partial checkpoint was removed; the earlier ones are complete") from exc
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

    def _write_shared(self, tmp: Path, extra_json: dict[str, Any]) -> None:
        model = _unwrap(self.model)
        if _is_peft(model):
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            if getattr(model, "config", None) is not None and hasattr(model.config, "to_json_file"):
                model.config.to_json_file(tmp / "config.json")
        if self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about saving the optimizer with it
                torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
        if self.scaler is not None:
            torch.save(self.scaler.state_dict(), tmp / SCALER_FILE)
        _components.write_components(tmp, self.components, self.trainer_config)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(tmp / "tokenizer")
        for name, obj in extra_json.items():
            text = obj if isinstance(obj, str) else json.dumps(obj, indent=1, sort_keys=True)
            (tmp / name).write_text(text, encoding="utf-8")

    # ---- retention ----------------------------------------------------------------------

    def prune(self) -> list[Path]:
        """Delete complete checkpoints that no retention rule keeps; return the deleted paths."""
        removed = []
        for c in retention.to_prune(self.checkpoints(), self.config, self._ranking(), self.protected_steps):
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
            verify: check every file against the manifest (``False``: the manifest must only be valid).

        Raises:
            CheckpointError: nothing complete and intact, naming every bad file found.
        """
        if str(path_or_latest) != "latest":
            path = Path(path_or_latest)
            if not path.is_dir():
                raise CheckpointError(f"Can't find a valid checkpoint at {str(path)!r}: it does not exist or is not a "
                                      f"directory")
            return path, (storage.verify(path) if verify else storage.require_manifest(path))
        found, manifest, errors = _resume.newest_intact(self.checkpoints(), verify)
        for line in _resume.fallback_warnings(errors, found.path if found is not None else None):
            logger.warning("%s", line)
            warnings.warn(line, stacklevel=2)
        if found is not None:
            return found.path, manifest
        if errors:
            raise CheckpointError("no intact checkpoint in " + repr(str(self.output_dir)) + ": " + "; ".join(errors))
        raise CheckpointError(f"no complete checkpoint in {str(self.output_dir)!r}")

    def check_topology(self, manifest: dict[str, Any], path: Path | str = "") -> None:
        """Raise unless world size, per-device batch and accumulation match (or ``allow_topology_change``: warn).

        Your own loop positions its data itself, so an allowed change needs no step-size check here.
        """
        problems, _ = topology_problems(manifest.get("topology"), self._topology_now(), allow_change=False,
                                        batching="", where=path)
        if problems and not getattr(self.config, "allow_topology_change", False):
            raise CheckpointError("; ".join(problems))
        changed = "; ".join(f"{k}: checkpoint {a}, this run {b}"
                            for k, a, b in differences(manifest.get("topology"), self._topology_now()))
        if changed:
            logger.warning("resuming %s with a different topology (%s)", path, changed)

    def load(self, path_or_latest: str | os.PathLike = "latest", restore_rng: bool = True) -> int:
        """Restore model, optimizer, scheduler, scaler, components (and RNG) from a checkpoint.

        Args:
            path_or_latest: a ``checkpoint-<step>`` directory or ``"latest"``.
            restore_rng: also set this rank's RNG state.

        Returns:
            The step of the loaded checkpoint.
        """
        path, manifest = self.resolve(path_or_latest)
        self.check_topology(manifest, path)
        self.load_model(path)
        self.load_training_state(path)
        _components.load_components(path, self.components)
        if restore_rng:
            state = _components.rank_state(path, _dist()[0],
                                           new_rank_ok=getattr(self.config, "allow_topology_change", False))
            _rng.restore(state["rng"])
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
            obj.load_state_dict(_components.safe_load(file))

    def load_components(self, path: Path | str, manifest: dict[str, Any] | None = None) -> None:
        """Restore every registered component that the checkpoint holds."""
        _components.load_components(Path(path), self.components)

    def rank_state(self, path: Path | str) -> dict[str, Any]:
        """This rank's saved RNG state and extra per-rank entries."""
        return _components.rank_state(Path(path), _dist()[0],
                                      new_rank_ok=getattr(self.config, "allow_topology_change", False))

