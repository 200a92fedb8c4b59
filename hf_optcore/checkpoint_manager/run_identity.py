"""The identity of a run in its output directory and the lock it holds.

- ``run.json`` (:func:`read_run` / :func:`write_run`, atomic): run id, config fingerprint
  (:meth:`~hf_optcore.config.TrainerConfig.fingerprint`), start time, host, pid, what it resumed, its newest
  committed checkpoint, one entry per start (``compared_fingerprint`` hashes only the fields a resume compares,
  see :mod:`~hf_optcore.checkpoint_manager.resume_changes`).
- ``run.lock`` (:class:`RunLock`): an exclusive ``flock`` held by rank 0 from train start to train end, with the
  holder (host, pid, since, run id) written inside. The kernel drops it however the process ends (exception,
  SIGKILL), so a lock file left by a dead process is no obstacle; :func:`lock_holder` probes it without writing.

The run's checkpoints are listed, ranked, pruned and resumed by its lineage (its run ids; see
:class:`~hf_optcore.checkpoint_manager.trainer_checkpointing.TrainerCheckpointing`): another run's checkpoints left
in the directory are never touched.

Where and as what a run may start is :mod:`~hf_optcore.checkpoint_manager.ownership`'s.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from hf_optcore.checkpoint_manager import storage
from hf_optcore.errors import RunDirError

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "RUN_FILE", "RunLock", "broadcast", "in_use_message", "lock_holder",
           "new_run_id", "read_run", "write_run"]

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"


def now() -> str:
    """The local time, ISO 8601 with its offset, to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def new_run_id() -> str:
    """A sortable, readable, unique run id: ``20250611-143012-3f9a1c``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


# ---- run.json -------------------------------------------------------------------------------


def read_run(output_dir: str | os.PathLike) -> dict | None:
    """The identity ``run.json`` of ``output_dir``, or None when there is none (or it is unreadable: warned)."""
    path = Path(output_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s): the run owning this directory is unknown", path, exc)
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def write_run(output_dir: str | os.PathLike, record: dict) -> None:
    """Write ``run.json`` atomically (temporary file, fsync, rename)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / RUN_FILE)
    storage.fsync_dir(out)


# ---- the lock -------------------------------------------------------------------------------


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode("utf-8")) if raw else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def in_use_message(output_dir: str | os.PathLike, holder: dict) -> str:
    who = ", ".join(f"{k} {holder[k]}" for k in ("run_id", "pid", "host", "since") if holder.get(k)) or "holder unknown"
    return (f"output_dir: {str(output_dir)!r} is in use by another run ({who}), which holds {LOCK_FILE}; wait "
            f"for it to end or stop it, or choose another output_dir")


def lock_holder(output_dir: str | os.PathLike) -> dict | None:
    """Who holds ``output_dir``'s run lock (``{}`` when unknown), or None when nobody does. Writes nothing."""
    import fcntl

    try:
        fd = os.open(Path(output_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive ``flock`` on ``output_dir/run.lock``, held by one process for the life of a run.

    Args:
        output_dir: the run's directory (created when missing).
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, attempts: int = 5) -> None:
        """Take the lock or raise :class:`RunDirError` naming its holder (a few quick retries: a preflight probe
        holds it for an instant)."""
        import fcntl

        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        for attempt in range(attempts):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == attempts - 1:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunDirError(in_use_message(self.path.parent, holder)) from None
                time.sleep(0.1)
        self._fd = fd
        self.describe()

    def describe(self, **extra: Any) -> None:
        """Write who holds the lock (host, pid, since, and ``extra`` such as the run id) into the lock file."""
        if self._fd is None:
            return
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": now(), **extra}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode("utf-8"), 0)

    def release(self) -> None:
        """Release the lock (the file stays: removing it would race with a run opening it)."""
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (itself without a process group)."""
    from hf_optcore.distributed import rank_and_world

    if rank_and_world()[1] <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
