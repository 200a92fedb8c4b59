"""Supervised fine-tuning with hf_optcore — the readable recipe is hf_optcore/recipes/sft.py.

    python recipes/sft.py                                  # embedded default (offline demo)
    accelerate launch recipes/sft.py --config recipes/configs/jargon_lora.yaml training.learning_rate=1e-4
"""

from hf_optcore.distributed import exit_process
from hf_optcore.recipes.sft import main

if __name__ == "__main__":
    exit_process(main(allow_reexec=True))  # multi-process runs end without interpreter finalization (see exit_process)
