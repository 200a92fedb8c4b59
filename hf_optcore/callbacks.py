"""TrainerCallbacks of hf_optcore: behaviour that only observes or nudges the loop.

Each callback is added by ``OptCoreTrainer`` only when its feature is enabled in the
``TrainerConfig``; none is ever active behind the user's back.
"""

from __future__ import annotations

from transformers import TrainerCallback  # noqa: F401  (the base of every callback below)
