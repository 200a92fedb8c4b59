"""The README's two commands (`make demo`, `make test`) work whatever python3 comes first on PATH.

They install into a project venv, never into the interpreter they find (Debian's own Python is
EXTERNALLY-MANAGED, PEP 668); a Python without venv/ensurepip is one clear error line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBIAN_PYTHON = Path("/usr/bin/python3")

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _project_copy(tmp_path: Path) -> Path:
    work = tmp_path / "proj"
    work.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, work / name)
    return work


def _make(work: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    # Under CI these tests run inside `make test`: a make started from there inherits MAKELEVEL and
    # MAKEFLAGS (with the outer command-line variables), prints "Entering directory" lines and is
    # not the fresh `make` a user types. Start it as a user would.
    env = dict(os.environ if env is None else env)
    for name in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES"):
        env.pop(name, None)
    return subprocess.run(["make", *args], cwd=work, capture_output=True, text=True, env=env, timeout=timeout)


@needs_make
def test_a_python_without_venv_is_one_error_line_naming_python3_venv(tmp_path):
    # Debian's python3 without the python3-venv package: `import ensurepip` fails.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "ensurepip.py").write_text("raise ImportError('ensurepip is not available')\n")
    fake = tmp_path / "python3"
    fake.write_text(f'#!/bin/sh\nPYTHONPATH={shadow} exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    work = _project_copy(tmp_path)
    proc = _make(work, "install", f"PY={fake}")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "python3-venv" in errors[0] and str(fake) in errors[0]
    assert not (work / ".venv").exists() and proc.stdout == ""  # nothing was run, nothing installed


@needs_make
def test_the_venv_is_rebuilt_only_when_its_install_inputs_change(tmp_path):
    work = _project_copy(tmp_path)
    key = _make(work, "-n", "install").stdout.splitlines()[-1].split("'")[1]  # what the stamp records
    (work / ".venv").mkdir()
    (work / ".venv" / ".install-stamp").write_text(key + "\n")
    assert "Nothing to be done" in _make(work, "install").stdout
    # Editing the Makefile elsewhere (a comment, a target) keeps the venv.
    with (work / "Makefile").open("a") as fh:
        fh.write("\n# a comment\n")
    assert "Nothing to be done" in _make(work, "install").stdout
    # Another requirement recorded in the stamp, or a newer pyproject.toml, rebuilds it.
    (work / ".venv" / ".install-stamp").write_text(key.replace("torch==", "torch==0.") + "\n")
    assert "rm -rf .venv" in _make(work, "-n", "install").stdout
    (work / ".venv" / ".install-stamp").write_text(key + "\n")
    future = time.time() + 60
    os.utime(work / "pyproject.toml", (future, future))
    assert "rm -rf .venv" in _make(work, "-n", "install").stdout


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M), ci
    quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("```", 2)[1]
    assert "make demo" in quick_start and "make test" in quick_start


def _externally_managed(python: Path) -> bool:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                         capture_output=True, text=True)
    return out.returncode == 0 and (Path(out.stdout.strip()) / "EXTERNALLY-MANAGED").is_file()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@needs_make
def test_readme_commands_from_a_fresh_clone_with_debians_python_first_on_path(tmp_path):
    if not DEBIAN_PYTHON.is_file() or not _externally_managed(DEBIAN_PYTHON):
        pytest.skip("no externally managed /usr/bin/python3 (Debian/Ubuntu) on this machine")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=300)
    # Debian's python3 first on PATH and nothing of this process's venv; pip keeps this machine's own
    # configuration (its PIP_* settings and config files: local wheels and index mirrors), so it works offline.
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("PIP_", "HF_", "XDG_", "LANG", "LC_")) or k in ("HOME", "TMPDIR", "USER")}
    env.update(PATH="/usr/bin:/bin:/usr/sbin:/sbin", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    assert shutil.which("python3", path=env["PATH"]) == str(DEBIAN_PYTHON)

    proc = _make(clone, "install", env=env, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    venv_python = clone / ".venv" / "bin" / "python"
    base = subprocess.run([str(venv_python), "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert base == "/usr"  # the venv was made from Debian's interpreter
    # jemalloc for hardware.cpu_allocator: the system's, else Debian's package unpacked into the venv.
    jemalloc = subprocess.run([str(venv_python), "-m", "hf_optcore.allocator"], capture_output=True, text=True,
                              env=env, cwd=clone)
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        assert jemalloc.returncode == 0 and Path(jemalloc.stdout.strip()).is_file(), proc.stdout[-2000:]

    out = tmp_path / "smoke"
    proc = _make(clone, "demo", f"ARGS=--config recipes/configs/tiny_smoke.yaml --no-samples training.max_steps=4 "
                                f"output_dir={out}", env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "config.yaml").is_file() and (out / "metrics.json").is_file()

    proc = _make(clone, "test", "PYTEST_ARGS=tests/test_config.py -q -p no:cacheprovider", env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\d+ passed", proc.stdout), proc.stdout[-2000:]
    assert "rm -rf" not in proc.stdout  # the venv of `make install` was reused, not rebuilt
