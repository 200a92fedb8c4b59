"""Atomic, verified checkpoints with retention by step and metric, run ownership and exact resume.

``from hf_optcore.checkpoint_manager import CheckpointManager`` is the standalone entry point (your own loop);
``OptCoreTrainer`` drives :class:`~hf_optcore.checkpoint_manager.trainer_checkpointing.TrainerCheckpointing`
around transformers' own save and resume. Both write and read through the same modules:

- :mod:`.storage`: the checkpoint directory and its manifest (commit, verify, list, delete; no path outside it);
- :mod:`.components`: hf_optcore's own files in a checkpoint (components, per-rank RNG state, ``config.yaml``);
- :mod:`.retention`: which checkpoints to keep (a pure function of steps and metrics);
- :mod:`.topology`: the one definition of a run's topology and what a change of it allows;
- :mod:`.resume`: what a resume resumes and every objection to it; :mod:`.resume_changes`: config changes;
- :mod:`.ownership` and :mod:`.run_identity`: a run owns its output directory (``run.json``, ``run.lock``);
- :mod:`.faults`: preemption signals, non-finite steps, a full disk; :mod:`.rng`: RNG states as tensors.
"""

from hf_optcore.checkpoint_manager.manager import CheckpointManager
from hf_optcore.checkpoint_manager.retention import select_to_keep
from hf_optcore.checkpoint_manager.storage import CheckpointInfo, list_complete, remove_leftovers, verify
from hf_optcore.checkpoint_manager.topology import Topology

__all__ = ["CheckpointInfo", "CheckpointManager", "Topology", "list_complete", "remove_leftovers", "select_to_keep",
           "verify"]
