"""A tiny training run for the crash tests: ``python tests/_checkpoint_train_script.py OUT [SIGTERM_AT_STEP]``.

Resumes automatically from OUT's latest complete checkpoint and writes the final weights to
OUT/final.safetensors.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tests._checkpoint_helpers import make_trainer  # noqa: E402


class SignalAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:  # arrives in the middle of that step
            os.kill(os.getpid(), signal.SIGTERM)


def main():
    torch.set_num_threads(1)
    out = sys.argv[1]
    trainer = make_trainer(out, max_steps=10, every=2, keep_last=2, resume_from="auto")
    if len(sys.argv) > 2:
        trainer.add_callback(SignalAt(int(sys.argv[2])))
    trainer.train()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items() if k != "lm_head.weight"},
              os.path.join(out, "final.safetensors"))


if __name__ == "__main__":
    main()
