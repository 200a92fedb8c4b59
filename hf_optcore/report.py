"""Training report: ``report.png`` (the curves) and ``report.md`` (final metrics, config, timings).

Written at the end of every run with hf_optcore's extensions (by
:class:`~hf_optcore.callbacks.TrainingReportCallback`) and on demand for any run directory with
``hf-optcore report RUN_DIR``. The numbers come from the Trainer's ``log_history`` (the
``trainer_state.json`` of the run directory or of its newest checkpoint); nothing is recomputed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from hf_optcore.errors import OptCoreError

__all__ = ["ReportError", "find_log_history", "series", "write_report"]

# Each curve accepts the names the Trainer and hf_optcore's callbacks log it under.
_CURVES: dict[str, tuple[str, ...]] = {
    "train loss": ("loss", "train_loss_step"),
    "eval loss": ("eval_loss",),
    "eval loss (EMA)": ("eval_ema_loss",),
    "learning rate": ("learning_rate", "lr"),
    "padding fraction": ("padding_fraction", "train_padding_fraction"),
    "real tokens/s": ("real_tokens_per_second", "train_real_tokens_per_second", "tokens_per_second"),
}
_TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos",
                "eval_runtime", "eval_samples_per_second")
_CKPT = re.compile(r"checkpoint-(\d+)$")


class ReportError(OptCoreError, FileNotFoundError):
    """A run directory holds no training log that can be reported on (missing or unreadable)."""


def find_log_history(run_dir: str | Path) -> tuple[list[dict], Path]:
    """The ``log_history`` of a run and the ``trainer_state.json`` it came from.

    Looks at ``RUN_DIR/trainer_state.json`` first (written at the end of a run), then at the
    checkpoint with the highest step anywhere below ``RUN_DIR``.

    Args:
        run_dir: an ``output_dir`` or a checkpoint directory.

    Raises:
        ReportError: when no ``trainer_state.json`` exists there.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"run directory {str(root)!r} does not exist")
    direct = root / "trainer_state.json"
    candidates = [direct] if direct.is_file() else []
    if not candidates:
        found = [p for p in root.rglob("trainer_state.json") if p.is_file()]
        candidates = sorted(found, key=_state_step, reverse=True)
    if not candidates:
        raise ReportError(
            f"no trainer_state.json in {str(root)!r} or its checkpoints; give the output_dir of a run "
            "(or one of its checkpoint-N folders)"
        )
    return _read_log_history(candidates[0]), candidates[0]


def _read_log_history(path: Path) -> list[dict]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ReportError(f"{str(path)!r} is not a readable trainer state (not valid JSON: {exc})") from None
    except OSError as exc:
        raise ReportError(f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None
    history = state.get("log_history", []) if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ReportError(f"{str(path)!r} is not a trainer state: expected an object with a 'log_history' list")
    # Rows that are not objects carry nothing to plot; they are skipped, not fatal.
    return [row for row in history if isinstance(row, dict)]


def _state_step(path: Path) -> int:
    m = _CKPT.search(path.parent.name)
    if m:
        return int(m.group(1))
    try:
        return int(json.loads(path.read_text(encoding="utf-8")).get("global_step", -1))
    except (OSError, ValueError):
        return -1


def _step_of(row: dict, default: int) -> int:
    step = row.get("step", default)
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) \
        else default


def series(log_history: list[dict], keys: tuple[str, ...]) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the first of ``keys`` found in each log row (finite numbers only)."""
    steps, values = [], []
    for row in log_history:
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps.append(_step_of(row, len(steps)))
                values.append(float(value))
                break
    return steps, values


def _final_metrics(log_history: list[dict]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for row in log_history:
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                final[key] = value
    if log_history:
        final["step"] = max(_step_of(r, 0) for r in log_history)
        epochs = [r["epoch"] for r in log_history if isinstance(r.get("epoch"), (int, float))]
        if epochs:
            final["epoch"] = max(epochs)
    for loss, ppl in (("eval_loss", "eval_perplexity"), ("eval_ema_loss", "eval_ema_perplexity")):
        if loss in final and ppl not in final:
            final[ppl] = math.exp(min(final[loss], 50.0))
    return final


def _plot(log_history: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ReportError("drawing report.png needs matplotlib, which is not installed; pip install matplotlib") from None

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        ("loss", ["train loss", "eval loss", "eval loss (EMA)"], True),
        ("learning rate", ["learning rate"], False),
        ("padding fraction", ["padding fraction"], False),
        ("real tokens/s", ["real tokens/s"], False),
    ]
    for ax, (name, curves, log_y) in zip(axes.flat, panels):
        drawn = 0
        for curve in curves:
            xs, ys = series(log_history, _CURVES[curve])
            if not xs:
                continue
            marker = "o" if curve.startswith("eval") or len(xs) < 20 else None
            ax.plot(xs, ys, label=curve, marker=marker, markersize=3)
            drawn += 1
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if drawn == 0:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
        elif len(curves) > 1:
            ax.legend()
        if drawn and log_y and all(v > 0 for c in curves for v in series(log_history, _CURVES[c])[1]):
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _markdown(title: str, final: dict, config_yaml: str | None, extra_metrics: dict | None, source: str) -> str:
    lines = [f"# {title}", "", "![training curves](report.png)", "", f"Source: `{source}`", "", "## Final metrics", "",
             "| metric | value |", "|---|---|"]
    metric_keys = [k for k in final if k not in _TIMING_KEYS]
    lines += [f"| `{k}` | {_fmt(final[k])} |" for k in sorted(metric_keys)]
    timings = [k for k in _TIMING_KEYS if k in final]
    if timings:
        lines += ["", "## Timings", "", "| timing | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(final[k])} |" for k in timings]
    if extra_metrics:
        lines += ["", "## metrics.json", "", "```json", json.dumps(extra_metrics, indent=2, default=str), "```"]
    if config_yaml:
        lines += ["", "## Resolved config", "", "```yaml", config_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_report(
    run_dir: str | Path,
    log_history: list[dict] | None = None,
    config: Any = None,
    title: str | None = None,
) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` into ``run_dir``.

    Args:
        run_dir: where to write (and, when ``log_history`` is None, where to read the log from).
        log_history: the Trainer's ``state.log_history``; read from ``run_dir`` when None.
        config: a ``TrainerConfig`` (or YAML text) to include; else ``run_dir/config.yaml`` if present.
        title: the report title (default: the run directory's name).

    Returns:
        The paths of ``report.png`` and ``report.md``.
    """
    out = Path(run_dir)
    source = "trainer state (end of training)"
    if log_history is None:
        log_history, state_path = find_log_history(out)
        source = str(state_path)
    out.mkdir(parents=True, exist_ok=True)
    if config is None and (out / "config.yaml").is_file():
        config_yaml = (out / "config.yaml").read_text(encoding="utf-8")
    elif config is not None and hasattr(config, "to_yaml"):
        config_yaml = config.to_yaml()
    else:
        config_yaml = config if isinstance(config, str) else None
    extra = None
    if (out / "metrics.json").is_file():
        try:
            extra = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        except ValueError:
            extra = None
    title = title or f"hf_optcore training report: {out.resolve().name}"
    png, md = out / "report.png", out / "report.md"
    _plot(log_history, png, title)
    md.write_text(_markdown(title, _final_metrics(log_history), config_yaml, extra, source), encoding="utf-8")
    return png, md
