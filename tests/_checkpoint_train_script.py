"""A tiny training run for the crash tests: ``python tests/_checkpoint_train_script.py OUT [AT_STEP [SIGNAL]]``
(SIGNAL: SIGTERM by default, or SIGINT as a Ctrl-C sends it).

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
    def __init__(self, step, sig=signal.SIGTERM):
        self.step, self.sig = step, sig

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:  # arrives in the middle of that step
            os.kill(os.getpid(), self.sig)


def main():
    torch.set_num_threads(1)
    out = sys.argv[1]
    trainer = make_trainer(out, max_steps=10, every=2, keep_last=2, resume_from="auto")
    if len(sys.argv) > 2:
        sig = getattr(signal, sys.argv[3]) if len(sys.argv) > 3 else signal.SIGTERM
        trainer.add_callback(SignalAt(int(sys.argv[2]), sig))
    trainer.train()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items() if k != "lm_head.weight"},
              os.path.join(out, "final.safetensors"))


if __name__ == "__main__":
    main()
