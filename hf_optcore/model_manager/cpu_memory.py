"""Peak resident memory of CPU training: give large freed tensors back to the OS.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a request below its
*mmap threshold* from the process heap, where freed memory stays resident and is reused only by
requests that fit the holes it leaves; above the threshold it maps fresh pages and unmaps them on
``free``. The threshold is dynamic: each time a mapped block is freed it rises to that block's size
(up to 32 MiB), so after the first few frees of a training step every activation of up to 32 MiB
(8 x 512 tokens x 576 hidden x 4 bytes is 9 MiB) lives in the heap. A training step allocates and
frees those in an order that fragments the heap: measured on SmolLM2-135M, one step of 8 x 512
tokens, the process peak was 0.7 GiB (full fine-tuning) to 4.2 GiB (peft LoRA) above the most tensor
memory alive at any moment. Fixing the threshold at 1 MiB maps and unmaps every large tensor, so the
peak follows the live tensors; small tensors still come from the heap. The cost is a page fault per
4 KiB page of each new large tensor: with LoRA + checkpointing on that shape, 9 million faults and
1.5x the step time on 2 cores (benchmarks/results/lora_memory.md). It is therefore opt-in
(``ModelManager(cpu_mmap_threshold=...)``), for runs that must fit a memory limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MMAP_THRESHOLD", "set_malloc_mmap_threshold"]

DEFAULT_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_applied: int | None = None


def set_malloc_mmap_threshold(threshold_bytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``) for this process.

    Allocations of ``threshold_bytes`` or more are then mapped on allocation and returned to the OS
    when freed, and the threshold no longer rises by itself. It acts on the whole process and on
    allocations made from now on; calling it again with the same value does nothing.

    Args:
        threshold_bytes: the fixed threshold (default 1 MiB; glibc accepts up to 32 MiB on 64-bit).

    Returns:
        True when the threshold is set (Linux with glibc), False elsewhere (nothing changed).
    """
    global _applied
    if not 0 < threshold_bytes <= 32 << 20:
        raise ValueError(f"threshold_bytes must be in (0, 32 MiB], got {threshold_bytes}")
    if _applied == threshold_bytes:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        _applied = threshold_bytes
        logger.info("glibc mmap threshold fixed at %d KiB: freed CPU tensors of that size or more go back to the OS",
                    threshold_bytes >> 10)
    return ok
