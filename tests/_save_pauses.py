"""Pauses at known points inside a checkpoint save, for the crash tests (a SIGKILL there, then a resume).

    HF_OPTCORE_CKPT_TEST_DELAY=1.0 python tests/_save_pauses.py SCRIPT [ARGS...]

runs SCRIPT as ``__main__`` with a pause of that many seconds, announced by a line ``[checkpoint] <point>`` on
stdout, at: ``after_hf_save`` (transformers wrote its files), ``after_state`` (hf_optcore's components and
config written) and ``before_manifest``. hf_optcore has no hook for this: the pauses wrap its functions from here.
"""

from __future__ import annotations

import os
import runpy
import sys
import time


def install(delay: float) -> None:
    from transformers import Trainer

    from hf_optcore.checkpoint_manager import components, storage

    def pause(where: str) -> None:
        print(f"[checkpoint] {where}", flush=True)
        time.sleep(delay)

    hf_save = Trainer._save_checkpoint

    def _save_checkpoint(self, model, trial):
        hf_save(self, model, trial)
        pause("after_hf_save")

    Trainer._save_checkpoint = _save_checkpoint
    write_components = components.write_components

    def write_then_pause(*args, **kwargs):
        write_components(*args, **kwargs)
        pause("after_state")

    components.write_components = write_then_pause
    for name in ("commit_in_place", "commit"):
        commit = getattr(storage, name)

        def pause_then_commit(*args, _commit=commit, **kwargs):
            pause("before_manifest")
            return _commit(*args, **kwargs)

        setattr(storage, name, pause_then_commit)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    install(float(os.environ.get("HF_OPTCORE_CKPT_TEST_DELAY", "1.0")))
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
