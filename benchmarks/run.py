"""Every hf_optcore benchmark, side by side with its alternative, in one command.

    python benchmarks/run.py --quick          # tiny models, a few minutes on 2 CPU cores (make bench)
    python benchmarks/run.py                  # full preset (the demo model where a benchmark uses one)
    python benchmarks/run.py --quick --only memory ema

Each benchmark module (``benchmarks/bench_*.py``, ``benchmarks/model_loading.py``) exposes
``run(quick: bool) -> dict`` and measures hf_optcore against the alternative in the same run
(``transformers.Trainer``, TRL ``SFTTrainer``, ``torch.optim.swa_utils.AveragedModel``, ...), so
its ratios do not depend on the machine's speed. This entry point runs them one after another
in this process tree and writes ``benchmarks/results/latest.json`` and ``latest.md`` with the
machine, the library versions and the date (and leaves each module's own ``results/<name>.*``
as they were). A benchmark that fails is recorded with its error; the others still run, and the
exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path[:0] = [str(REPO), str(HERE)]

# name -> (module, what it compares)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "batching": ("bench_batching", "real-token throughput and padding per batching strategy vs transformers.Trainer "
                                   "(random, group_by_length) and TRL SFTTrainer (packing)"),
    "ema": ("bench_ema", "EMA update time vs torch AveragedModel"),
    "optimizers": ("bench_optimizers", "optimizer step times"),
    "checkpoint": ("bench_checkpoint", "checkpoint save time and time to first resumed step vs transformers.Trainer"),
    "memory": ("bench_memory", "peak memory with LoRA and gradient checkpointing on and off"),
    "model_loading": ("model_loading", "GGUF load vs cached conversion; activation memory with checkpointing"),
    "streaming": ("bench_streaming", "streamed vs in-memory padding and tokens/s; resume time vs step against "
                                     "transformers.Trainer's IterableDataset resume; peak RSS vs corpus size"),
}
_VERSIONED = ("torch", "transformers", "accelerate", "peft", "datasets", "trl", "hf_optcore")


def machine_info() -> dict:
    """CPU / GPU / memory / OS of this machine and the versions of the libraries measured."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - a missing peer is recorded, not fatal
            versions[name] = None
    info["versions"] = versions
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        info["gpu"] = None
    return info


def _markdown_of(module, result: dict, started: float) -> str:
    for attr in ("to_markdown", "markdown", "_markdown"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return fn(result).strip()
    # Some modules write their own table next to their JSON: use it when this run wrote it.
    own = RESULTS / f"{module.__name__}.md"
    if own.is_file() and own.stat().st_mtime >= started:
        return own.read_text(encoding="utf-8").strip()
    return "```json\n" + json.dumps(result, indent=1, default=str)[:4000] + "\n```"


def _snapshot() -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in RESULTS.glob("*") if p.is_file() and not p.name.startswith("latest.")} \
        if RESULTS.is_dir() else {}


def _restore(before: dict[Path, bytes]) -> None:
    # Some modules also write their own results/<name>.{json,md} when run; this entry point's record
    # is latest.*, so a --quick run here must not overwrite the full results a module's owner published.
    for path in RESULTS.glob("*") if RESULTS.is_dir() else []:
        if path.is_file() and not path.name.startswith("latest.") and path not in before:
            path.unlink()
    for path, data in before.items():
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)


def run_all(quick: bool, only: list[str] | None = None) -> dict:
    """Run the selected benchmarks; returns the combined report (also written to results/latest.*)."""
    names = only or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"error: unknown benchmark(s) {unknown}; valid: {', '.join(BENCHMARKS)}")
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "preset": "quick" if quick else "full",
        "machine": machine_info(),
        "benchmarks": {},
    }
    sections = []
    for name in names:
        module_name, what = BENCHMARKS[name]
        started = time.time()
        print(f"[{name}] {what} ...", flush=True)
        entry: dict = {"module": f"benchmarks/{module_name}.py", "compares": what}
        before = _snapshot()
        try:
            module = importlib.import_module(module_name)
            result = module.run(quick)
            entry.update(status="ok", result=result)
            table = _markdown_of(module, result, started)
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc()[-4000:])
            table = f"**failed**: `{type(exc).__name__}: {str(exc)[:500]}`"
        finally:
            _restore(before)
        entry["seconds"] = round(time.time() - started, 1)
        report["benchmarks"][name] = entry
        sections.append(f"## {name}\n\n{what} (`{entry['module']}`, {entry['seconds']} s)\n\n{table}\n")
        print(f"[{name}] {entry['status']} in {entry['seconds']} s", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (RESULTS / "latest.md").write_text(_header(report) + "\n".join(sections), encoding="utf-8")
    return report


def _header(report: dict) -> str:
    m = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        f"# hf_optcore benchmarks ({report['preset']} preset)", "",
        f"- date: {report['date']}",
        f"- machine: {m.get('cpu')}, {m.get('cpu_count')} CPUs, {m.get('memory_gib', '?')} GiB RAM, "
        f"GPU: {m.get('gpu') or 'none'}; {m['platform']}",
        f"- versions: Python {m['python']}, {versions}",
        f"- reproduce: `python benchmarks/run.py{' --quick' if report['preset'] == 'quick' else ''}`",
        "- every ratio compares hf_optcore with its alternative measured in the same run; contenders process "
        "the same examples",
        "",
    ]
    failed = [n for n, e in report["benchmarks"].items() if e["status"] != "ok"]
    if failed:
        lines += [f"**failed:** {', '.join(failed)} (see latest.json for the tracebacks)", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, small settings (a few minutes on 2 CPU cores)")
    ap.add_argument("--only", nargs="*", help=f"run only these: {', '.join(BENCHMARKS)}")
    a = ap.parse_args(argv)
    report = run_all(a.quick, a.only)
    print(f"wrote {RESULTS / 'latest.json'} and {RESULTS / 'latest.md'}")
    return 0 if all(e["status"] == "ok" for e in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
