"""Peak memory over a region of a run: what the recipe's summary and benchmarks/bench_memory.py report.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the process's resident-set high-water
mark (``VmHWM``), reset to the current resident set through ``/proc/self/clear_refs`` where Linux
allows it, so what ran before the region (model loading, a first evaluation) is not counted; elsewhere
the process lifetime's ``ru_maxrss``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PeakMemory"]


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """``start()`` then ``stop()``: the peak in between (``peak_bytes``), the memory at ``start()``
    (``before_bytes``), their difference (``extra_bytes``) and how it was read (``meter``).

    Args:
        cuda: measure CUDA memory; default: when CUDA is available.
    """

    def __init__(self, cuda: bool | None = None):
        import torch

        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.reset = False
        self.before = 0

    def start(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.reset = True
        except OSError:
            self.reset = False
        self.before = _status_bytes("VmRSS") or 0
        return self

    def stop(self) -> dict:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak, meter = torch.cuda.max_memory_allocated(), "cuda.max_memory_allocated"
        else:
            peak = _status_bytes("VmHWM")
            meter = "VmHWM after clear_refs" if self.reset else "VmHWM (process lifetime)"
            if peak is None:
                import resource

                peak, meter = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (process lifetime)"
        return {"peak_bytes": int(peak), "before_bytes": int(self.before),
                "extra_bytes": max(0, int(peak) - int(self.before)), "meter": meter}
