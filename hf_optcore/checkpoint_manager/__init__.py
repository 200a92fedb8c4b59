"""Atomic, verified checkpoints with retention by step and metric and exact resume.

``from hf_optcore.checkpoint_manager import CheckpointManager`` is the standalone entry point;
``OptCoreTrainer`` drives the same object from its ``_save_checkpoint`` and resume path.
"""

from hf_optcore.checkpoint_manager.manager import CheckpointManager
from hf_optcore.checkpoint_manager.retention import select_to_keep
from hf_optcore.checkpoint_manager.storage import CheckpointInfo, list_complete, remove_leftovers, verify

__all__ = ["CheckpointInfo", "CheckpointManager", "list_complete", "remove_leftovers", "select_to_keep", "verify"]
