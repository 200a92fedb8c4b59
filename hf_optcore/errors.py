"""Exceptions that carry one clear, user-facing line (what was wrong, where, what is valid).

The recipe and the CLI turn any of these (and :class:`~hf_optcore.config.ConfigError`) into
that line on stderr and exit status 2, before anything is written.
"""


class OptCoreError(Exception):
    """Base class of hf_optcore's user-facing errors."""


class ModelLoadError(OptCoreError):
    """A model or tokenizer could not be found or loaded (unknown id, offline, bad file)."""


class DataError(OptCoreError, ValueError):
    """A dataset file is missing, empty, malformed or lacks the columns its format needs."""


class CheckpointError(OptCoreError):
    """A checkpoint is missing, incomplete, corrupt or incompatible with this run."""


class RunDirError(CheckpointError):
    """An output directory this run may not start in: it holds another run's checkpoints, another run is
    training in it now, or a resume would change config fields that were not allowed to change."""


def did_you_mean(name: str, valid, cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``valid`` to ``name``, else ``""``.

    The one suggestion helper of every user-facing error (config keys, registry names, ...).
    """
    import difflib

    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def not_a_file(path) -> str | None:
    """What ``path`` is when it exists but is not a regular file (``"a directory"``, ``"a named pipe (FIFO)"``,
    ...), else None. Found with ``stat`` only: a FIFO or a device is never opened (reading one can block)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"
