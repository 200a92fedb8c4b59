"""Run transformers' own tests/trainer suite against OptCoreTrainer, and against the plain Trainer for a baseline.

The transformers test files are not part of this repository (licence): fetch them into a folder of your own,
laid out as upstream (``<root>/tests/trainer/test_*.py``, ``trainer_test_utils.py``, empty ``__init__.py`` files,
``<root>/tests/fixtures/sample_text.txt``), then:

    python scripts/hf_trainer_suite.py --tests DIR/tests/trainer --mode plain   --out RESULTS [--deps PIP_TARGET]
    python scripts/hf_trainer_suite.py --tests DIR/tests/trainer --mode optcore --out RESULTS [--deps PIP_TARGET]

(--deps: a ``pip install --target`` folder with what the tests import and the venv lacks, e.g. parameterized.)

Modes:
  plain     transformers.Trainer untouched: the baseline.
  subclass  Trainer swapped for an empty subclass: separates "a subclass was swapped in" from hf_optcore's behaviour.
  optcore   Trainer swapped for ``class _T(OptCoreTrainer)`` whose ``__init__`` builds
            ``TrainerConfig.from_training_arguments(args, ["ema.enabled=true"])`` from the test's own
            TrainingArguments (``TrainingArguments(output_dir="tmp_trainer")`` when the test passes none, as Trainer
            does) and calls ``super().__init__(model, args, optcore_config=cfg, ...)``.

Each test file runs in its own pytest process, one after the other (``--timeout`` per test, ``--file-timeout`` per
file), offline (HF_HUB_OFFLINE=1). This file is also the pytest plugin (``-p hf_trainer_suite``): before any test
module is imported it replaces ``transformers.Trainer`` and ``transformers.trainer.Trainer``; after collection it
rewrites any module-level ``Trainer`` still bound to the original class; at session start it builds one trainer
through ``transformers.Trainer`` and checks it is the swapped class, and it counts, per test, the trainers built
through the swap. Results: ``<out>/<mode>.json`` (per-test outcome, reason, trainers built) and, when the other mode's
JSON is there, ``<out>/diff_<mode>_vs_<other>.json``: tests that fail or error here but pass there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_FILES = [
    "test_trainer.py",
    "test_trainer_checkpointing.py",
    "test_trainer_callback.py",
    "test_trainer_data.py",
    "test_trainer_evaluation.py",
    "test_trainer_optimizers.py",
    "test_trainer_accelerator.py",
    "test_skip_logits_eval.py",
]
MODES = ("plain", "subclass", "optcore")
# Environment variables that carry the run's settings from the driver into the pytest plugin.
ENV_MODE, ENV_JSON, ENV_OVERRIDES, ENV_NO_CFG = (
    "HF_SUITE_MODE",
    "HF_SUITE_JSON",
    "HF_SUITE_OVERRIDES",
    "HF_SUITE_NO_OPTCORE_CONFIG",
)
FAILED = ("failed", "error")
# Coarse reasons for a failure, first match wins: what the baseline report groups failures by.
CATEGORIES = [
    (
        "offline/network",
        r"OfflineModeIsEnabled|offline mode|LocalEntryNotFound|couldn't connect|ConnectionError|"
        r"Max retries|Name or service not known|HF_HUB_OFFLINE|outgoing traffic has been disabled|"
        r"Cannot find the requested files in the (disk )?cache|not a local folder and is not a valid model|"
        r"huggingface\.co",
    ),
    ("missing dependency", r"ModuleNotFoundError|No module named|ImportError|requires the .* library|is not installed"),
    ("gpu/accelerator", r"CUDA|cuda|NCCL|accelerator"),
    ("timeout", r"Timeout|timed out"),
]


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def _tests_root(tests_dir: Path) -> Path:
    """The first folder above the test files that is not a package: pytest's import root and our --rootdir."""
    root = tests_dir
    while (root / "__init__.py").exists():
        root = root.parent
    return root


def _run_file(test_file: Path, mode: str, opts: argparse.Namespace, work: Path) -> dict:
    stem = test_file.stem
    cwd = work / mode / stem  # tests write tmp_trainer/, ./test-trainer etc. relative to the cwd
    cwd.mkdir(parents=True, exist_ok=True)
    part_json = work / mode / f"{stem}.json"
    part_json.unlink(missing_ok=True)
    ini = work / "pytest.ini"
    ini.write_text("[pytest]\naddopts =\n", encoding="utf-8")

    env = dict(os.environ)
    extra_path = [str(Path(__file__).resolve().parent)] + [str(Path(p).resolve()) for p in opts.deps]
    env["PYTHONPATH"] = os.pathsep.join(extra_path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(
        {
            ENV_MODE: mode,
            ENV_JSON: str(part_json),
            ENV_OVERRIDES: json.dumps(opts.overrides),
            ENV_NO_CFG: "1" if opts.no_optcore_config else "",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "WANDB_DISABLED": "true",
            "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", ""),
            "OMP_NUM_THREADS": str(opts.threads),
            "MKL_NUM_THREADS": str(opts.threads),
        }
    )
    cmd = [
        opts.python, "-m", "pytest", str(test_file), "-q", "-rfE",
        "-p", "hf_trainer_suite", "-p", "no:cacheprovider",
        "-c", str(ini), f"--rootdir={_tests_root(test_file.parent)}",
        f"--timeout={opts.timeout}",
    ]  # fmt: skip
    if opts.k:
        cmd += ["-k", opts.k]
    log = work / mode / f"{stem}.log"
    start = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        try:
            rc = subprocess.run(
                cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=opts.file_timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "file-timeout"
    wall = round(time.time() - start, 1)
    part = json.loads(part_json.read_text(encoding="utf-8")) if part_json.exists() else {"tests": {}, "session": {}}
    return {"rc": rc, "wall_s": wall, "log": str(log), **part}


def _hf_optcore_tree() -> dict:
    """Which hf_optcore ran: the checkout's commit and its uncommitted changes under hf_optcore/."""
    import hf_optcore

    root = Path(hf_optcore.__file__).resolve().parents[1]

    def git(*a):
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "hf_optcore")
    return {"path": str(root), "commit": git("rev-parse", "HEAD"), "uncommitted": dirty.splitlines() if dirty else []}


def _category(reason: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, reason or ""):
            return name
    return "other"


def _counts(tests: dict) -> dict:
    out = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    for rec in tests.values():
        out[rec["outcome"]] = out.get(rec["outcome"], 0) + 1
    return out


def _diff(mine: dict, other: dict, mode: str, other_mode: str) -> dict:
    a, b = mine["tests"], other["tests"]
    regressions = {
        t: {**a[t], other_mode: b[t]["outcome"]}
        for t in a
        if a[t]["outcome"] in FAILED and b.get(t, {}).get("outcome") == "passed"
    }
    fixed = {
        t: {other_mode: b[t]["outcome"], mode: "passed"}
        for t in a
        if a[t]["outcome"] == "passed" and b.get(t, {}).get("outcome") in FAILED
    }
    outcome_changed = {
        t: {mode: a[t]["outcome"], other_mode: b[t]["outcome"]}
        for t in a
        if t in b and a[t]["outcome"] != b[t]["outcome"] and t not in regressions and t not in fixed
    }
    # A test the baseline already fails can hide a new failure: same outcome, another reason.
    reason_changed = {
        t: {mode: a[t].get("reason", ""), other_mode: b[t].get("reason", "")}
        for t in a
        if a[t]["outcome"] in FAILED
        and b.get(t, {}).get("outcome") in FAILED
        and a[t].get("reason", "") != b[t].get("reason", "")
    }
    return {
        "mode": mode,
        "against": other_mode,
        f"fail_in_{mode}_pass_in_{other_mode}": regressions,
        f"pass_in_{mode}_fail_in_{other_mode}": fixed,
        "failing_in_both_reason_changed": reason_changed,
        "other_outcome_changes": outcome_changed,
        f"only_in_{mode}": sorted(set(a) - set(b)),
        f"only_in_{other_mode}": sorted(set(b) - set(a)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tests", required=True, type=Path, help="folder holding transformers' tests/trainer files")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--out", type=Path, default=Path("/tmp/hf_trainer_suite"), help="results folder (outside the repo)")
    p.add_argument("--files", nargs="+", default=DEFAULT_FILES, help="test files to run, one pytest process each")
    p.add_argument("--compare", choices=MODES, help="mode whose JSON to diff against (default: plain, or optcore)")
    p.add_argument("-k", help="pytest -k expression")
    p.add_argument("--timeout", type=int, default=300, help="per-test timeout, seconds (pytest-timeout)")
    p.add_argument("--file-timeout", type=int, default=600, help="per-file wall-clock limit, seconds")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads for each pytest process")
    p.add_argument("--overrides", nargs="*", default=["ema.enabled=true"], help="optcore mode: TrainerConfig overrides")
    p.add_argument("--no-optcore-config", action="store_true", help="optcore mode: pass no optcore_config (drop-in)")
    p.add_argument(
        "--deps", nargs="*", default=[], help="extra folders for sys.path (e.g. a pip --target with parameterized)"
    )
    p.add_argument("--python", default=sys.executable, help="interpreter with transformers, torch, pytest-timeout")
    opts = p.parse_args(argv)

    tests_dir = opts.tests.resolve()
    work = opts.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    files = [tests_dir / f for f in opts.files]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        p.error(f"not found: {missing}")

    result: dict = {
        "mode": opts.mode,
        "tests_dir": str(tests_dir),
        "files": {},
        "tests": {},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if opts.mode == "optcore":
        result["overrides"] = opts.overrides
        result["no_optcore_config"] = opts.no_optcore_config
        result["hf_optcore"] = _hf_optcore_tree()
    for f in files:
        print(f"[{opts.mode}] {f.name} ...", flush=True)
        r = _run_file(f, opts.mode, opts, work)
        tests = r["tests"]
        for rec in tests.values():
            if rec["outcome"] in FAILED:
                rec["category"] = _category(rec.get("reason", ""))
        result["tests"].update(tests)
        counts = _counts(tests)
        result["files"][f.name] = {
            "rc": r["rc"],
            "wall_s": r["wall_s"],
            "log": r["log"],
            "counts": counts,
            **r["session"],
        }
        print(f"[{opts.mode}] {f.name}: {counts} rc={r['rc']} {r['wall_s']}s", flush=True)
        for key in ("collection_errors", "swap_check_error", "unswapped"):
            if r["session"].get(key):
                print(f"[{opts.mode}] {f.name}: {key}: {r['session'][key]}", flush=True)
    result["counts"] = _counts(result["tests"])
    skips: dict[str, int] = {}
    for rec in result["tests"].values():
        if rec["outcome"] == "skipped":
            reason = rec.get("reason", "").removeprefix("Skipped: ")
            skips[reason] = skips.get(reason, 0) + 1
    result["skip_reasons"] = dict(sorted(skips.items(), key=lambda kv: -kv[1]))
    result["versions"] = {}
    for fr in result["files"].values():
        result["versions"].update(fr.pop("versions", None) or {})
    out_json = work / f"{opts.mode}.json"
    out_json.write_text(json.dumps(result, indent=1, sort_keys=True), encoding="utf-8")
    print(f"[{opts.mode}] total: {result['counts']} -> {out_json}")
    for t, rec in sorted(result["tests"].items()):
        if rec["outcome"] in FAILED:
            print(f"  {rec['outcome']} [{rec['category']}] {t}: {rec.get('reason', '')[:160]}")

    other_mode = opts.compare or ("optcore" if opts.mode == "plain" else "plain")
    other_json = work / f"{other_mode}.json"
    if other_mode != opts.mode and other_json.exists():
        diff = _diff(result, json.loads(other_json.read_text(encoding="utf-8")), opts.mode, other_mode)
        diff_json = work / f"diff_{opts.mode}_vs_{other_mode}.json"
        diff_json.write_text(json.dumps(diff, indent=1, sort_keys=True), encoding="utf-8")
        reg = diff[f"fail_in_{opts.mode}_pass_in_{other_mode}"]
        print(f"[{opts.mode}] {len(reg)} test(s) fail in {opts.mode} but pass in {other_mode} -> {diff_json}")
        for t, rec in sorted(reg.items()):
            print(f"  {t}: {rec.get('reason', '')[:200]}")
        changed = diff["failing_in_both_reason_changed"]
        if changed:
            print(f"[{opts.mode}] {len(changed)} test(s) fail in both modes for a different reason (see the diff JSON)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# pytest plugin (loaded in each pytest process with -p hf_trainer_suite)
# ----------------------------------------------------------------------------------------------------------------

_STATE: dict = {"tests": {}, "current": None, "built": {}, "session": {}}


def _make_swap(mode: str):
    """The class that replaces transformers.Trainer, or None in plain mode."""
    import transformers

    original = transformers.Trainer
    if mode == "plain":
        return original, None
    if mode == "subclass":
        base = original
    else:
        from hf_optcore import OptCoreTrainer

        base = OptCoreTrainer
    overrides = json.loads(os.environ.get(ENV_OVERRIDES) or "[]")
    use_cfg = mode == "optcore" and not os.environ.get(ENV_NO_CFG)

    class _T(base):
        def __init__(self, model=None, args=None, *positional, **kwargs):
            _STATE["built"][_STATE["current"]] = _STATE["built"].get(_STATE["current"], 0) + 1
            if use_cfg:
                from hf_optcore.config import TrainerConfig

                if args is None:  # what Trainer.__init__ does itself when it gets no args
                    args = transformers.TrainingArguments(output_dir="tmp_trainer")
                if hasattr(TrainerConfig, "from_training_arguments"):
                    kwargs["optcore_config"] = TrainerConfig.from_training_arguments(args, overrides)
                else:  # temporary shim until TrainerConfig.from_training_arguments exists: plain drop-in
                    _STATE["session"]["shim_no_from_training_arguments"] = True
            super().__init__(model, args, *positional, **kwargs)

    _T.__name__ = _T.__qualname__ = f"HfSuiteSwapped{base.__name__}"
    _T.__module__ = __name__
    return original, _T


def _compat_shims() -> list[str]:
    """Names the fetched tests import from transformers that this transformers no longer has (same in every mode)."""
    import transformers

    done = []
    for name in ("GlueDataset", "GlueDataTrainingArguments"):
        try:
            getattr(transformers, name)
        except AttributeError:

            class _Removed:
                _name = name

                def __init__(self, *a, **k):
                    raise RuntimeError(
                        f"transformers.{self._name} no longer exists in this transformers (harness placeholder)"
                    )

            _Removed.__name__ = name
            setattr(transformers, name, _Removed)
            done.append(name)
    return done


def pytest_configure(config):
    mode = os.environ.get(ENV_MODE)
    if not mode:
        return
    import warnings

    import transformers
    import transformers.trainer

    # What transformers' own root conftest.py does that changes outcomes: no FutureWarning noise (tests count
    # warnings), no safetensors conversion thread; its markers, so they are known.
    warnings.simplefilter(action="ignore", category=FutureWarning)
    os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "true"
    for marker in ("is_pipeline_test", "is_staging_test", "accelerate_tests", "not_device_test", "torch_compile_test",
                   "torch_export_test", "flash_attn_test", "flash_attn_3_test", "training_ci", "tensor_parallel_ci"):  # fmt: skip
        config.addinivalue_line("markers", f"{marker}: transformers test marker")

    s = _STATE["session"]
    s["mode"] = mode
    s["compat_shims"] = _compat_shims()
    import accelerate
    import torch

    s["versions"] = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
    }
    original, swapped = _make_swap(mode)
    _STATE["original"], _STATE["swapped"] = original, swapped
    if swapped is not None:
        transformers.Trainer = swapped
        transformers.trainer.Trainer = swapped
        s["swapped_class"] = f"{swapped.__name__}({swapped.__mro__[1].__module__}.{swapped.__mro__[1].__name__})"


def pytest_sessionstart(session):
    """Prove the swap: a trainer built through transformers.Trainer is the swapped class."""
    swapped = _STATE.get("swapped")
    if swapped is None:
        return
    import tempfile

    import torch
    import transformers
    from transformers import Trainer as FromImport
    from transformers.trainer import Trainer as FromModule

    s = _STATE["session"]
    try:
        assert transformers.Trainer is swapped and FromImport is swapped and FromModule is swapped, "names not swapped"
        _STATE["current"] = "<swap-check>"
        with tempfile.TemporaryDirectory() as tmp:
            args = transformers.TrainingArguments(output_dir=tmp, report_to=[], use_cpu=True)
            trainer = transformers.Trainer(model=torch.nn.Linear(1, 1), args=args)
            assert isinstance(trainer, swapped), f"built {type(trainer)}"
            s["swap_check"] = f"ok: transformers.Trainer(...) built {type(trainer).__name__}"
            if getattr(trainer, "optcore_config", None) is not None:
                s["swap_check"] += " with an optcore_config"
    except Exception as exc:  # the run is meaningless without the swap: say so and stop
        s["swap_check_error"] = f"{type(exc).__name__}: {exc}"
        _write_json()
        import pytest

        pytest.exit(f"hf_trainer_suite: swap check failed: {s['swap_check_error']}", returncode=3)
    finally:
        _STATE["current"] = None


def pytest_collection_modifyitems(session, config, items):
    """Rebind any module-level name still pointing at the original Trainer; list subclasses made before the swap."""
    original, swapped = _STATE.get("original"), _STATE.get("swapped")
    if swapped is None:
        return
    rebound, unswapped = [], []
    for mod in {getattr(item, "module", None) for item in items} - {None}:
        for name, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, name, swapped)
                rebound.append(f"{mod.__name__}.{name}")
            elif isinstance(value, type) and issubclass(value, original) and not issubclass(value, swapped):
                unswapped.append(f"{mod.__name__}.{name}")
    _STATE["session"]["rebound_after_collection"] = sorted(rebound)
    _STATE["session"]["unswapped"] = sorted(unswapped)


def pytest_runtest_protocol(item, nextitem):
    _STATE["current"] = item.nodeid


def _reason(report) -> str:
    lr = report.longrepr
    if lr is None:
        return ""
    if isinstance(lr, tuple):  # skip: (file, line, reason)
        return str(lr[2])
    crash = getattr(lr, "reprcrash", None)
    if crash is not None and crash.message:
        return crash.message.strip().splitlines()[0][:500] if crash.message.strip() else ""
    text = str(lr).strip().splitlines()
    return text[-1][:500] if text else ""


def pytest_runtest_logreport(report):
    if not os.environ.get(ENV_MODE):
        return
    rec = _STATE["tests"].setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0})
    rec["duration"] = round(rec["duration"] + report.duration, 3)
    if hasattr(report, "wasxfail"):
        rec["outcome"] = "xfailed" if report.skipped else "xpassed"
        rec["reason"] = str(report.wasxfail)
    elif report.skipped:
        rec["outcome"], rec["reason"] = "skipped", _reason(report)
    elif report.failed:
        # a failing setup/teardown is an error; a failing call a failure (unless setup already errored)
        if report.when == "call":
            rec["outcome"] = "failed"
        elif rec["outcome"] != "failed":
            rec["outcome"] = "error"
        rec.setdefault("reason", f"[{report.when}] {_reason(report)}" if report.when != "call" else _reason(report))
    if report.when == "teardown":
        built = _STATE["built"].get(report.nodeid)
        if built:
            rec["trainers_built_via_swap"] = built


def pytest_collectreport(report):
    if os.environ.get(ENV_MODE) and report.failed:
        _STATE["session"].setdefault("collection_errors", []).append(f"{report.nodeid}: {_reason(report)}")
        _STATE["tests"][report.nodeid or "<collection>"] = {
            "outcome": "error",
            "reason": f"[collection] {_reason(report)}",
            "duration": 0.0,
        }


def _write_json():
    path = os.environ.get(ENV_JSON)
    if not path:
        return
    s = _STATE["session"]
    if _STATE.get("swapped") is not None:
        s["tests_that_built_a_swapped_trainer"] = sum(1 for k in _STATE["built"] if k and k != "<swap-check>")
    Path(path).write_text(
        json.dumps({"session": s, "tests": _STATE["tests"]}, indent=1, sort_keys=True), encoding="utf-8"
    )


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(ENV_MODE):
        _write_json()


if __name__ == "__main__":
    raise SystemExit(main())
