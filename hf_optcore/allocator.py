"""Which ``malloc`` serves CPU tensors: glibc's (default), or jemalloc preloaded by re-starting the process.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc keeps freed blocks of up to
32 MiB in its heap, where they stay resident and are reused only by requests that fit the holes;
a training step frees activations in an order that fragments the heap. On SmolLM2-135M, one
Trainer step of 8 x 512 tokens, LoRA without checkpointing peaked at 8.84 GB against 9.63 GB for
full fine-tuning (0.92x) although its live tensors are smaller; under jemalloc, which serves each
size class from its own runs, the same steps peak at 6.89 and 9.18 GB (0.75x), no slower
(benchmarks/results/bench_memory_jemalloc.md). jemalloc's purging of freed pages is turned off
(``dirty_decay_ms:-1``): with its default 10 s decay those steps took 1.4x as long, every freed
page being faulted in again. It is not the default: on the demo's short variable-length steps
(8 x up to 256 tokens) it lowers the peak (4.8 vs 5.6 GB) but trains 15% slower.

A process cannot change its allocator once it runs, so the recipe (``python recipes/sft.py``,
``hf-optcore train``, each process of ``accelerate launch``) re-starts itself once, before torch is
imported, with jemalloc in ``LD_PRELOAD``: same pid, same arguments. ``make install`` puts
``libjemalloc.so.2`` in the project venv (``scripts/install_jemalloc.sh``, from Debian's
``libjemalloc2``); a system copy is found too. ``hardware.cpu_allocator`` chooses:

- ``system`` (default): the C library's own ``malloc``;
- ``jemalloc``: jemalloc, and an error before anything loads when it is not found.

Scripts that import ``OptCoreTrainer`` choose their allocator when they start the interpreter:
``LD_PRELOAD=$(python -m hf_optcore.allocator) MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 python train.py``.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["JEMALLOC_CONF", "active_allocator", "find_jemalloc", "plan", "reexec_with_allocator", "warn_if_not_preloaded"]

LIBRARY = "libjemalloc.so.2"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
ENV_LIBRARY = "HF_OPTCORE_JEMALLOC"  # an explicit path to libjemalloc.so.2
_ENV_MARK = "HF_OPTCORE_ALLOCATOR_REEXEC"  # set in the re-started process: never re-start twice
_SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_jemalloc() -> str | None:
    """Path of ``libjemalloc.so.2``: $HF_OPTCORE_JEMALLOC, the venv's copy, then the system's; None if none."""
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    candidates = [Path(sys.prefix) / "lib" / "jemalloc" / LIBRARY] + [Path(d) / LIBRARY for d in _SYSTEM_DIRS]
    return next((str(p) for p in candidates if p.is_file()), None)


def active_allocator() -> str:
    """``jemalloc`` when it is mapped into this process, else ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def plan(choice: str) -> tuple[str | None, str]:
    """What to preload for ``hardware.cpu_allocator=choice``: (library path or None, why, for the log).

    Raises:
        ValueError: ``choice`` is ``jemalloc`` and no jemalloc library can be found or preloaded here.
    """
    if choice != "jemalloc":
        return None, f"hardware.cpu_allocator={choice}"
    if active_allocator() == "jemalloc":
        return None, "jemalloc is already loaded"
    if platform.system() != "Linux":
        raise ValueError(f"hardware.cpu_allocator: jemalloc is preloaded on Linux only, not {platform.system()}")
    lib = find_jemalloc()
    if lib is None:
        raise ValueError(f"hardware.cpu_allocator: jemalloc was asked for but {LIBRARY} is not found (looked in "
                         f"${ENV_LIBRARY}, {Path(sys.prefix) / 'lib' / 'jemalloc'} and {', '.join(_SYSTEM_DIRS)}); "
                         f"run `make install`, `apt install libjemalloc2`, or set hardware.cpu_allocator=system")
    return lib, "hardware.cpu_allocator=jemalloc"


def reexec_with_allocator(choice: str) -> None:
    """Re-start this process with jemalloc preloaded when ``plan`` says so; otherwise return.

    Call it before any thread or process group exists (the recipe calls it right after validating
    the config). The new process has the same pid, arguments and environment, plus ``LD_PRELOAD``,
    ``MALLOC_CONF`` (unless set) and a mark that stops a second re-start. A choice that cannot be
    carried out here returns quietly: :func:`plan` raises it again in preflight, beside every other problem.
    """
    if os.environ.get(_ENV_MARK):
        if active_allocator() != "jemalloc":  # the preload failed (e.g. a library of another architecture)
            logger.warning("cpu allocator: the C library's malloc (preloading jemalloc did not take effect)")
        else:
            logger.info("cpu allocator: jemalloc (%s)", os.environ.get("LD_PRELOAD", ""))
        return
    try:
        lib, why = plan(choice)
    except ValueError:
        return  # a jemalloc that cannot be had is a preflight problem, reported with every other one
    if lib is None:
        logger.info("cpu allocator: %s (%s)", active_allocator(), why)
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[_ENV_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execve(sys.executable, argv, env)


def warn_if_not_preloaded(choice: str) -> bool:
    """For a Trainer in a script: log a warning when jemalloc is asked for but not loaded; True if it is."""
    if choice != "jemalloc" or active_allocator() == "jemalloc":
        return True
    logger.warning("hardware.cpu_allocator=jemalloc: this process runs on the C library's malloc; only the recipe "
                   "re-starts itself with jemalloc. Start your script as LD_PRELOAD=$(python -m "
                   "hf_optcore.allocator) MALLOC_CONF=%s python ...", JEMALLOC_CONF)
    return False


if __name__ == "__main__":  # `python -m hf_optcore.allocator`: the library path, for LD_PRELOAD in scripts
    found = find_jemalloc()
    if found is None:
        print(f"error: {LIBRARY} not found; run `make install` or `apt install libjemalloc2`", file=sys.stderr)
        raise SystemExit(2)
    print(found)
