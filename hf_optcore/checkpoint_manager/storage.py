"""Checkpoint directories that count only once their manifest is written, last; and never a path outside them.

A checkpoint directory ``checkpoint-<step>`` counts only when its ``manifest.json`` is present and valid and every
file it lists has the recorded size and sha256. Two ways to get there:

- standalone (:class:`~hf_optcore.checkpoint_manager.CheckpointManager`): everything is written into a temporary
  sibling directory, fsynced, the manifest written last, then renamed into place (:func:`commit`);
- under the Trainer, transformers writes ``checkpoint-<step>`` itself (model, optimizer, scheduler, RNG, trainer
  state, in its own layout and through its own FSDP/DeepSpeed paths); hf_optcore adds its components and then
  writes the manifest in place (:func:`commit_in_place`), listing exactly the files this save wrote. A crash
  before that leaves a directory without a manifest, which is never listed, resumed from or deleted.

A manifest is data from disk, possibly from someone else (a checkpoint downloaded from the Hub or a shared disk),
so nothing it says is trusted beyond its directory. Every path it lists must be a relative path of plain
components (no ``..``, no absolute path, no empty or ``.`` component, no backslash) that stays inside the
checkpoint without passing through a symbolic link and names no directory; a ``checkpoint-<step>`` that is itself
a symbolic link is never a checkpoint. A manifest that breaks any of this makes its checkpoint invalid: it is
never listed, resumed from or deleted (:func:`manifest_problem` says why). Deleting walks the directory through
file descriptors opened with ``O_NOFOLLOW``, so a link swapped in meanwhile is not followed either.

Verification (:func:`verify`) checks more than sizes and hashes: the weights must be listed, a transformers
checkpoint must list its ``trainer_state.json`` (and optimizer and scheduler, unless saved with
``save_only_model``), no file a resume reads may be present without being listed, hf_optcore's components and
every rank's state must be listed, and every listed torch file must load with ``torch.load(weights_only=True)``
(a pickle that names arbitrary code is refused as tampering before transformers ever opens it).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
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
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

# What a resume reads from a checkpoint (top-level names; hf_optcore's own files are under components/). A file of
# these names present but not listed in the manifest was added or replaced after the save: the checkpoint is refused.
# Sharded layouts (FSDP's pytorch_model_fsdp_*/, optimizer_*/; DeepSpeed's global_step*/) add their directories here.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                "adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "pytorch_model-*-of-*.bin")
LOADED_FILES = WEIGHT_FILES + ("adapter_config.json", "config.json", "optimizer.pt", "optimizer.bin", "scheduler.pt",
                               "scaler.pt", "rng_state.pth", "rng_state_*.pth", "trainer_state.json", "config.yaml")
LOADED_DIRS = ("components",)
TRAINER_STATE = "trainer_state.json"
# Pickled torch files a resume loads with weights_only=True (training_args.bin is a full pickle nobody loads).
_TENSOR_FILES = ("*.pt", "*.pth", "pytorch_model*.bin", "adapter_model.bin", "optimizer.bin")
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_HINT = (" (changed on purpose, e.g. re-sharded? delete its manifest.json to resume from it as a plain "
         "transformers checkpoint)")


@dataclass
class CheckpointInfo:
    """A complete (valid-manifest) checkpoint directory.

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


# ---- paths inside a checkpoint ------------------------------------------------------------------


def _lexical_problem(rel: Any) -> str | None:
    """Why ``rel`` (a manifest key) is not a plain relative path inside the checkpoint, or None."""
    if not isinstance(rel, str) or not rel:
        return f"{rel!r} is not a file name"
    if "\x00" in rel or "\\" in rel:
        return f"{rel!r} is not a plain relative path"
    if rel.startswith("/") or os.path.isabs(rel):
        return f"{rel!r} is an absolute path, outside the checkpoint"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"{rel!r} leaves or escapes the checkpoint directory ('..', '.' or an empty component)"
    if os.path.normpath(rel) != rel:  # pragma: no cover - the component rules above already imply it
        return f"{rel!r} normalises to another path"
    return None


def _member_problem(root: Path, rel: str) -> str | None:
    """Why ``rel`` may not be read, verified or deleted inside ``root``: lexical rules, then what is on disk
    (a symbolic link on the way or at the end, a directory). A missing file is no problem here."""
    problem = _lexical_problem(rel)
    if problem:
        return problem
    current = root
    parts = rel.split("/")
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{rel!r} cannot be inspected ({exc.strerror or exc})"
        if stat.S_ISLNK(st.st_mode):
            return f"{rel!r} passes through a symbolic link ({'/'.join(parts[:i + 1])})"
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return f"{rel!r} goes through {'/'.join(parts[:i + 1])!r}, which is not a directory"
        if i == len(parts) - 1 and not stat.S_ISREG(st.st_mode):
            return f"{rel!r} is {'a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'}"
    return None


def _files_under(root: Path) -> list[str]:
    """Regular files under ``root`` (symbolic links neither listed nor followed), the manifest excepted."""
    out = []
    for dirpath, _, names in os.walk(root):  # os.walk does not descend into linked directories
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel == MANIFEST_NAME or name.startswith(f".{MANIFEST_NAME}"):
                continue
            if stat.S_ISREG(os.lstat(full).st_mode):
                out.append(rel)
    return sorted(out)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every regular file under ``root`` (empty when it does not exist)."""
    out = {}
    if not root.is_dir() or root.is_symlink():
        return out
    for rel in _files_under(root):
        st = os.lstat(root / rel)
        out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def written_since(root: Path, before: dict[str, tuple[int, int]]) -> list[str]:
    """Files under ``root`` created or rewritten since ``before`` (a :func:`snapshot`)."""
    return [rel for rel, sig in snapshot(root).items() if before.get(rel) != sig]


# ---- the manifest ---------------------------------------------------------------------------------


def _load_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)`` when ``path`` holds a valid manifest, else ``(None, why not)``."""
    if path.is_symlink():
        return None, f"{path.name} is a symbolic link (to {os.readlink(path)!r}), not a checkpoint directory"
    mpath = path / MANIFEST_NAME
    try:
        if mpath.is_symlink():
            return None, f"{MANIFEST_NAME} is a symbolic link"
        with open(mpath, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        return None, f"{MANIFEST_NAME} is missing"
    except (OSError, ValueError) as exc:
        return None, f"{MANIFEST_NAME} is unreadable ({exc})"
    if not isinstance(manifest, dict) or "files" not in manifest or "step" not in manifest:
        return None, f"{MANIFEST_NAME} is not a checkpoint manifest (no 'files' or 'step')"
    step, files = manifest["step"], manifest["files"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None, f"{MANIFEST_NAME}: step {step!r} is not a step number"
    if not isinstance(files, dict):
        return None, f"{MANIFEST_NAME}: 'files' is not a mapping of file names"
    for key, kind in (("metrics", dict), ("topology", dict), ("components", list)):
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            return None, f"{MANIFEST_NAME}: {key!r} is not a {kind.__name__}"
    if any(not isinstance(n, str) or _lexical_problem(n) or "/" in n for n in manifest.get("components") or []):
        return None, f"{MANIFEST_NAME}: 'components' holds a name that is not a plain file name"
    if any(not isinstance(v, int) or isinstance(v, bool) for v in (manifest.get("topology") or {}).values()):
        return None, f"{MANIFEST_NAME}: 'topology' holds a value that is not a number"
    for rel, entry in files.items():
        problem = _member_problem(path, rel)
        if problem:
            return None, f"{MANIFEST_NAME} lists {problem}"
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or isinstance(entry["size"], bool)
                or entry["size"] < 0 or not isinstance(entry.get("sha256"), str) or not _SHA_RE.match(entry["sha256"])):
            return None, f"{MANIFEST_NAME}: the entry of {rel!r} has no valid size and sha256"
    return manifest, None


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed manifest of ``path``, or None when it is missing, unreadable or invalid (see the module doc)."""
    return _load_manifest(Path(path))[0]


def manifest_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` has no valid manifest (``"manifest.json is missing"``, an unsafe path it lists, ...), or None."""
    return _load_manifest(Path(path))[1]


def _write_manifest(root: Path, step: int, meta: dict[str, Any], files: list[str], durable: bool) -> None:
    entries = {}
    for rel in sorted(set(files)):
        problem = _member_problem(root, rel)
        if problem:
            raise CheckpointError(f"checkpoint {str(root)!r}: not listing {problem} in its manifest")
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


def invalidate(path: Path, durable: bool = True) -> bool:
    """Remove ``path``'s manifest so that it no longer counts (before it is rewritten); True if one was there."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if path.is_symlink() or not mpath.exists():
        return False
    mpath.unlink()
    if durable:
        fsync_dir(path)
    return True


# ---- deleting, through file descriptors that never follow a link ----------------------------------


def _open_dir(name: str | os.PathLike, dir_fd: int | None = None) -> int | None:
    try:
        return os.open(name, _OPEN_DIR, dir_fd=dir_fd)
    except OSError:
        return None  # missing, a symbolic link (ELOOP) or not a directory: nothing is followed


def _unlink_member(root_fd: int, rel: str) -> None:
    """Unlink the regular file ``rel`` below ``root_fd``, walking each directory with ``O_NOFOLLOW``."""
    parts = rel.split("/")
    fds = [root_fd]
    try:
        for part in parts[:-1]:
            fd = _open_dir(part, fds[-1])
            if fd is None:
                return
            fds.append(fd)
        try:
            st = os.lstat(parts[-1], dir_fd=fds[-1])
        except OSError:
            return
        if stat.S_ISREG(st.st_mode):
            os.unlink(parts[-1], dir_fd=fds[-1])
    finally:
        for fd in fds[1:]:
            os.close(fd)


def _remove_empty_dirs(fd: int) -> None:
    """Remove every directory below ``fd`` left empty (links are never followed; a non-empty one stays)."""
    with os.scandir(fd) as entries:
        subdirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    for name in subdirs:
        sub = _open_dir(name, fd)
        if sub is None:
            continue
        try:
            _remove_empty_dirs(sub)
        finally:
            os.close(sub)
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:
            pass  # not empty: it holds someone else's files


def delete(path: str | os.PathLike) -> bool:
    """Delete a checkpoint: manifest first, then the files it lists, then emptied directories.

    Nothing is deleted when the manifest is missing or invalid, or when ``path`` is a symbolic link.

    Returns:
        True when the directory is gone; False when it stays (files hf_optcore did not write, or nothing was
        deleted).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return False
    parent = _open_dir(path.parent) if path.parent.is_dir() else None
    if parent is None:
        return False
    try:
        root = _open_dir(path.name, parent)
        if root is None:
            return False
        try:
            try:  # a half-deleted checkpoint must never look complete
                os.unlink(MANIFEST_NAME, dir_fd=root)
            except FileNotFoundError:
                pass
            for rel in manifest["files"]:
                _unlink_member(root, rel)
            _remove_empty_dirs(root)
        finally:
            os.close(root)
        try:
            os.rmdir(path.name, dir_fd=parent)
        except OSError:
            pass
    finally:
        os.close(parent)
    return not os.path.lexists(path)


def _remove_link_or_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # the link itself, never what it points to
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)  # fd-based: links inside are removed, not followed


def prepare_resave(path: Path) -> list[str]:
    """Make ``path`` safe to be written by a new save of its step; return what was done, one line each.

    A ``checkpoint-<step>`` that is a symbolic link is replaced by nothing (the link goes, what it points to is
    untouched), so the save creates a real directory. An existing one loses its valid manifest first (a crash
    then leaves it incomplete, not stale) and the files that manifest listed (hf_optcore's, rewritten anyway, so
    no save writes through a hard link into an old file); symbolic links inside it are removed, so nothing is
    written through them. Files the manifest did not list stay.
    """
    path = Path(path)
    notes = []
    if path.is_symlink():
        target = os.readlink(path)
        path.unlink()
        return [f"{path} was a symbolic link (to {target!r}): the link was removed, what it points to is untouched; "
                f"the checkpoint is written into a new directory"]
    if not path.is_dir():
        return notes
    manifest = read_manifest(path)
    if manifest is not None:
        invalidate(path)
        root = _open_dir(path)
        if root is not None:
            try:
                for rel in manifest["files"]:
                    _unlink_member(root, rel)
            finally:
                os.close(root)
        notes.append(f"re-saving {path}: its previous checkpoint is withdrawn until the new save completes")
    else:
        notes.append(f"{path} exists without a valid manifest ({manifest_problem(path)}); files of the same names "
                     f"are overwritten, any other file is kept")
    for dirpath, dirnames, names in os.walk(path):  # not descending into linked directories
        for name in dirnames + names:
            full = Path(dirpath) / name
            if full.is_symlink():
                full.unlink()
                notes.append(f"removed the symbolic link {full} so that nothing is written through it")
    return notes


# ---- the standalone protocol: a temporary directory renamed into place ------------------------------


def tmp_dir_for(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"{TMP_PREFIX}{step}"


def begin(output_dir: Path, step: int) -> Path:
    """Create a fresh temporary directory for the checkpoint of ``step``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir_for(output_dir, step)
    if os.path.lexists(tmp):
        _remove_link_or_tree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int, meta: dict[str, Any], durable: bool = True) -> Path:
    """fsync every file, write the manifest last, rename ``tmp`` to ``checkpoint-<step>``.

    A previous ``checkpoint-<step>`` is moved aside first, so that the name always points at a complete
    checkpoint, and then deleted like any checkpoint (only what its manifest lists); a symbolic link of that
    name is removed (not followed).

    Args:
        tmp: the temporary directory holding every file of the checkpoint.
        step: optimizer step (names the final directory).
        meta: extra manifest entries (metrics, config hash, topology, ...).
        durable: fsync files and directories (``False`` only for benchmarks).
    """
    _write_manifest(tmp, step, meta, _files_under(tmp), durable)
    final = tmp.parent / f"{PREFIX}{step}"
    if final.is_symlink():
        final.unlink()
    if final.exists():
        trash = tmp.parent / f"{TRASH_PREFIX}{step}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        delete(trash)
    else:
        os.rename(tmp, final)
    if durable:
        fsync_dir(tmp.parent)
    return final


def remove_leftovers(output_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary and moved-aside directories of interrupted saves; return what was removed.

    A temporary directory holds only what a save wrote: it goes whole (a link of that name: the link only). A
    moved-aside one is deleted like any checkpoint, by its manifest. A ``checkpoint-<step>`` without a manifest
    cannot come from the standalone protocol (the rename happens after the manifest), so it is left alone and
    simply never listed.
    """
    root = Path(output_dir)
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            _remove_link_or_tree(entry)
            removed.append(entry)
        elif entry.name.startswith(TRASH_PREFIX) and not entry.is_symlink() and entry.is_dir():
            if delete(entry):
                removed.append(entry)
    return removed


# ---- listing ------------------------------------------------------------------------------------------


def _checkpoint_entries(root: Path) -> list[os.DirEntry]:
    with os.scandir(root) as entries:
        return [e for e in entries if _DIR_RE.match(e.name) and (e.is_dir() or e.is_symlink())]


def list_complete(output_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Every ``checkpoint-<step>`` under ``output_dir`` with a valid manifest, sorted by step (links never count)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    out = []
    for entry in _checkpoint_entries(root):
        if entry.is_symlink():
            continue
        manifest = read_manifest(entry.path)
        if manifest is None:
            continue
        out.append(CheckpointInfo(Path(entry.path), int(manifest["step"]), dict(manifest.get("metrics") or {}),
                                  manifest))
    return sorted(out, key=lambda c: c.step)


def step_of(path: Path) -> int:
    """The step in a ``checkpoint-<step>`` directory name (-1 for any other name)."""
    m = _DIR_RE.match(Path(path).name)
    return int(m.group(1)) if m else -1


def list_unmanifested(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` entries under ``output_dir`` without a valid manifest (symbolic links included), by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [Path(e.path) for e in _checkpoint_entries(root) if e.is_symlink() or read_manifest(e.path) is None]
    return sorted(found, key=step_of)


def holds_checkpoints(path: str | os.PathLike) -> list[str]:
    """The ``checkpoint-<step>`` names inside ``path`` (a run's output directory holds them; a checkpoint does not)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return [Path(e.path).name for e in sorted(_checkpoint_entries(path), key=lambda e: step_of(Path(e.path)))]


# ---- verification -----------------------------------------------------------------------------------


def require_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of ``path`` (no file check); CheckpointError when it has no valid one."""
    manifest, problem = _load_manifest(Path(path))
    if manifest is None:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete or invalid: {problem}")
    return manifest


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    return "/" not in rel and any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def _loaded_on_disk(root: Path) -> list[str]:
    """Files (and links) in ``root`` that a resume reads: hf_optcore's and transformers' names (see LOADED_FILES)."""
    out = []
    with os.scandir(root) as entries:
        for e in entries:
            if e.name in LOADED_DIRS and e.is_dir(follow_symlinks=False):
                for dirpath, dirnames, names in os.walk(e.path):
                    for name in names + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                        out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
            elif _matches(e.name, LOADED_FILES) or (e.name in LOADED_DIRS and e.is_symlink()):
                out.append(e.name)
    return sorted(out)


def remove_stale(path: Path, written: list[str]) -> list[str]:
    """Remove files a resume would read that are in checkpoint ``path`` but were not ``written`` by this save (left
    by an earlier, interrupted or foreign save of the same step: listed, they would lie; unlisted, the checkpoint
    would not verify). Returns what was removed."""
    path = Path(path)
    stale = [rel for rel in _loaded_on_disk(path) if rel not in set(written) and not _member_problem(path, rel)]
    root = _open_dir(path)
    if root is None:
        return []
    try:
        for rel in stale:
            _unlink_member(root, rel)
    finally:
        os.close(root)
    return stale


def _expected(manifest: dict[str, Any], root: Path) -> list[tuple[str, tuple[str, ...]]]:
    """``(what, names)`` pairs: at least one of ``names`` must be listed for the checkpoint to verify."""
    wanted = [("the model weights", WEIGHT_FILES)]
    if (root / TRAINER_STATE).exists() or TRAINER_STATE in manifest["files"] or manifest.get("saved_by") == "trainer":
        wanted.append((TRAINER_STATE, (TRAINER_STATE,)))
        if manifest.get("save_only_model") is False:
            wanted += [("optimizer.pt", ("optimizer.pt", "optimizer.bin")), ("scheduler.pt", ("scheduler.pt",))]
    for name in manifest.get("components") or []:
        rel = f"components/{name}.pt"
        wanted.append((rel, (rel,)))
    topology = manifest.get("topology") or {}
    world = topology.get("world_size")
    if "components" in manifest and isinstance(world, int) and 0 < world <= 1 << 16:
        wanted += [(f"components/rng_rank{r}.pt", (f"components/rng_rank{r}.pt",)) for r in range(world)]
    return wanted


def plain_tensor_problem(path: Path, numpy_state: bool = False) -> str | None:
    """Why ``path`` does not load with ``torch.load(weights_only=True)`` (a pickle naming arbitrary code), or None.

    The file is memory-mapped, so only its pickled structure is read, not its tensor data. ``numpy_state``: allow
    numpy's RNG state, exactly as transformers does for its ``rng_state*.pth`` (its ``safe_globals``).
    """
    import contextlib

    import torch

    context = contextlib.nullcontext()
    if numpy_state:
        from transformers.trainer_pt_utils import safe_globals

        context = safe_globals()
    try:
        with context:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except Exception as exc:  # noqa: BLE001 - any refusal is the same verdict; the reason is shown
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if named:
            return f"it names {named.group(1)}, which is not tensor data"
        # Never torch's first line: it suggests weights_only=False, the one thing not to do with such a file.
        detail = [line.strip() for line in str(exc).splitlines() if re.search(r"Unsupported|not allowed", line)]
        return detail[0] if detail else f"it holds more than tensor data ({type(exc).__name__})"
    return None


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint against its manifest; return the manifest.

    Raises:
        CheckpointError: naming the checkpoint and the first problem: an invalid manifest (an unsafe path, a
            symbolic link), a required file not listed, a file a resume reads present but not listed, a listed
            file missing, truncated or altered, or a torch file that is not plain tensors.
    """
    root = Path(path)
    manifest, problem = _load_manifest(root)
    if manifest is None:
        raise CheckpointError(f"checkpoint {str(root)!r} is incomplete or invalid: {problem}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {str(root)!r}: manifest schema_version {manifest.get('schema_version')!r} is not "
            f"supported; this hf_optcore reads {SCHEMA_VERSION}"
        )
    files = manifest["files"]
    for rel in _loaded_on_disk(root):
        if rel not in files:
            raise CheckpointError(f"checkpoint {str(root)!r}: file {rel!r} is there but not listed in the manifest "
                                  f"(added or replaced after the save){_HINT}")
    for what, names in _expected(manifest, root):
        if not any(rel in names or _matches(rel, names) for rel in files):
            raise CheckpointError(f"checkpoint {str(root)!r}: its manifest does not list {what}, which every "
                                  f"checkpoint of its kind holds (a damaged or edited manifest){_HINT}")
    for rel, entry in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {str(root)!r}: file {rel!r} listed in the manifest is missing{_HINT}")
        size = p.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {str(root)!r}: file {rel!r} is {size} bytes, the manifest says {entry['size']} "
                f"(truncated or altered){_HINT}"
            )
        if sha256_of(p) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {str(root)!r}: file {rel!r} does not match its sha256 in the "
                                  f"manifest{_HINT}")
    check_plain_tensors(root, sorted(files))
    return manifest


def check_plain_tensors(root: Path, rels: list[str] | None = None) -> None:
    """Raise :class:`CheckpointError` for the first torch file among ``rels`` (default: every one a resume reads
    from ``root``) that ``torch.load(weights_only=True)`` refuses: it is not tensor data, possibly tampered with."""
    root = Path(root)
    for rel in _loaded_on_disk(root) if rels is None else rels:
        if _matches(rel, _TENSOR_FILES) or (rel.startswith("components/") and rel.endswith(".pt")):
            reason = plain_tensor_problem(root / rel, numpy_state=rel.startswith("rng_state"))
            if reason:
                raise CheckpointError(f"checkpoint {str(root)!r}: file {rel!r} is not a plain tensor file (possible "
                                      f"tampering; torch.load(weights_only=True) refuses it: {reason})")

