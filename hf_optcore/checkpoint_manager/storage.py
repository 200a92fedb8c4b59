"""Checkpoint directories that count only once their manifest is written, last.

A checkpoint directory ``checkpoint-<step>`` counts only when its ``manifest.json`` is present and
every file it lists has the recorded size and sha256. Two ways to get there:

- standalone (:class:`CheckpointManager`): everything is written into a temporary sibling
  directory, fsynced, the manifest written last, then renamed into place (:func:`commit`);
- under the Trainer, transformers writes ``checkpoint-<step>`` itself (model, optimizer,
  scheduler, RNG, trainer state, in its own layout and through its own FSDP/DeepSpeed paths);
  hf_optcore adds its components and then writes the manifest in place (:func:`commit_in_place`),
  listing exactly the files this save wrote. A crash before that leaves a directory without a
  manifest, which is never listed, resumed from or deleted wholesale.

Deleting a checkpoint removes the manifest first, then only the files it lists: a file that
hf_optcore did not write survives (and keeps its directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_optcore.errors import CheckpointError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
TRASH_PREFIX = ".trash-checkpoint-"
_DIR_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class CheckpointInfo:
    """A complete (manifest-bearing) checkpoint directory.

    Args:
        path: the ``checkpoint-<step>`` directory.
        step: the optimizer step it was saved at.
        metrics: the metrics recorded with it (may be empty).
        manifest: the parsed manifest.
    """

    path: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename itself durable; not every platform allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _files_under(root: Path) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST_NAME and not name.startswith(f".{MANIFEST_NAME}"):
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root`` (empty when it does not exist)."""
    out = {}
    if not root.is_dir():
        return out
    for rel in _files_under(root):
        st = (root / rel).stat()
        out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def written_since(root: Path, before: dict[str, tuple[int, int]]) -> list[str]:
    """Files under ``root`` created or rewritten since ``before`` (a :func:`snapshot`)."""
    return [rel for rel, sig in snapshot(root).items() if before.get(rel) != sig]


def invalidate(path: Path, durable: bool = True) -> bool:
    """Remove ``path``'s manifest so that it no longer counts (before it is rewritten); True if one was there."""
    mpath = Path(path) / MANIFEST_NAME
    if not mpath.exists():
        return False
    mpath.unlink()
    if durable:
        fsync_dir(Path(path))
    return True


def _write_manifest(root: Path, step: int, meta: dict[str, Any], files: list[str], durable: bool) -> None:
    entries = {}
    for rel in sorted(set(files)):
        p = root / rel
        if durable:
            fsync_file(p)
        entries[rel] = {"size": p.stat().st_size, "sha256": sha256_of(p)}
    manifest = {"schema_version": SCHEMA_VERSION, "step": int(step), "created": time.time(), **meta, "files": entries}
    tmp = root / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
    os.replace(tmp, root / MANIFEST_NAME)
    if durable:
        fsync_dir(root)


def commit_in_place(path: Path, step: int, meta: dict[str, Any], files: list[str], durable: bool = True) -> Path:
    """Make ``path`` (already holding every file of the checkpoint) count: fsync ``files``, write the manifest last.

    Args:
        path: the ``checkpoint-<step>`` directory.
        step: optimizer step.
        meta: extra manifest entries (metrics, config hash, topology, ...).
        files: the files (relative to ``path``) this save wrote; only these are listed, verified and later deleted.
        durable: fsync files and directories (``False`` only for benchmarks).
    """
    path = Path(path)
    _write_manifest(path, step, meta, files, durable)
    if durable:
        fsync_dir(path.parent)
    return path


def delete(path: Path) -> bool:
    """Delete a checkpoint: manifest first, then the files it lists, then emptied directories.

    Returns True when the directory is gone; False when files hf_optcore did not write keep it.
    """
    path = Path(path)
    manifest = read_manifest(path)
    listed = list((manifest or {}).get("files", {}))
    (path / MANIFEST_NAME).unlink(missing_ok=True)  # a half-deleted checkpoint must never look complete
    for rel in listed:
        (path / rel).unlink(missing_ok=True)
    for dirpath, _, _ in sorted(os.walk(path), key=lambda d: -len(d[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass  # not empty: it holds someone else's files
    return not path.exists()


def tmp_dir_for(output_dir: Path, step: int) -> Path:
    return output_dir / f"{TMP_PREFIX}{step}"


def begin(output_dir: Path, step: int) -> Path:
    """Create a fresh temporary directory for the checkpoint of ``step``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir_for(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, meta: dict[str, Any], durable: bool = True) -> Path:
    """fsync every file, write the manifest last, rename ``tmp`` to ``checkpoint-<step>``.

    Args:
        tmp: the temporary directory holding every file of the checkpoint.
        step: optimizer step (names the final directory).
        meta: extra manifest entries (metrics, config hash, topology, ...).
        durable: fsync files and directories (``False`` only for benchmarks).
    """
    _write_manifest(tmp, step, meta, _files_under(tmp), durable)
    final = tmp.parent / f"{PREFIX}{step}"
    if final.exists():
        # Re-saving a step (a resumed run reaching it again): move the old one aside first so the
        # name always points at a complete checkpoint, then drop it.
        trash = tmp.parent / f"{TRASH_PREFIX}{step}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    if durable:
        fsync_dir(tmp.parent)
    return final


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The parsed manifest of ``path``, or None when it is missing or unreadable (incomplete)."""
    mpath = Path(path) / MANIFEST_NAME
    try:
        with open(mpath, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "files" not in manifest or "step" not in manifest:
        return None
    return manifest


def list_complete(output_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Every manifest-complete ``checkpoint-<step>`` under ``output_dir``, sorted by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        m = _DIR_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        manifest = read_manifest(entry)
        if manifest is None:
            continue
        out.append(CheckpointInfo(entry, int(manifest["step"]), dict(manifest.get("metrics") or {}), manifest))
    return sorted(out, key=lambda c: c.step)


def step_of(path: Path) -> int:
    """The step in a ``checkpoint-<step>`` directory name (-1 for any other name)."""
    m = _DIR_RE.match(Path(path).name)
    return int(m.group(1)) if m else -1


def list_unmanifested(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` directories under ``output_dir`` without a readable manifest, by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [e for e in root.iterdir() if e.is_dir() and _DIR_RE.match(e.name) and read_manifest(e) is None]
    return sorted(found, key=step_of)


def require_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of ``path`` (no file check); CheckpointError when it has none."""
    manifest = read_manifest(Path(path))
    if manifest is None:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {MANIFEST_NAME} is missing or unreadable")
    return manifest


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return the manifest.

    Raises:
        CheckpointError: naming the checkpoint and the first missing, truncated or altered file.
    """
    root = Path(path)
    manifest = read_manifest(root)
    if manifest is None:
        raise CheckpointError(f"checkpoint {str(root)!r} is incomplete: {MANIFEST_NAME} is missing or unreadable")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {str(root)!r}: manifest schema_version {manifest.get('schema_version')!r} is not "
            f"supported; this hf_optcore reads {SCHEMA_VERSION}"
        )
    hint = (" (changed on purpose, e.g. re-sharded? delete its manifest.json to resume from it as a plain "
            "transformers checkpoint)")
    for rel, entry in sorted(manifest["files"].items()):
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {str(root)!r}: file {rel!r} listed in the manifest is missing{hint}")
        size = p.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {str(root)!r}: file {rel!r} is {size} bytes, the manifest says {entry['size']} "
                f"(truncated or altered){hint}"
            )
        if sha256_of(p) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {str(root)!r}: file {rel!r} does not match its sha256 in the "
                                  f"manifest{hint}")
    return manifest


def remove_leftovers(output_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary and half-deleted directories of interrupted saves; return what was removed.

    A ``checkpoint-<step>`` without a manifest cannot come from this protocol (the rename happens
    after the manifest), so it is left alone and simply never listed.
    """
    root = Path(output_dir)
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
