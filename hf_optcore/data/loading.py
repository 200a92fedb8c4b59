"""Reading raw examples (files, the Hub, Python lists) and detecting their format.

Every problem is a :class:`~hf_optcore.errors.DataError` that names the source, what was found
and what is valid.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hf_optcore.errors import DataError

__all__ = ["FORMATS", "detect_format", "read_records"]

FORMATS = ("text", "instruction", "chat")
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
             ".txt": "text", ".text": "text", ".md": "text"}


def _read_json(p: Path) -> list[dict]:
    raw = json.loads(p.read_text(encoding="utf-8"))
    if isinstance(raw, dict):
        lists = [v for v in raw.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{p}: a JSON object must hold exactly one list of examples, found keys {sorted(raw)}")
        raw = lists[0]
    if not isinstance(raw, list):
        raise DataError(f"{p}: expected a JSON list of objects, got {type(raw).__name__}")
    return raw


def _read_jsonl(p: Path) -> list[dict]:
    rows = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p}: line {lineno} is not valid JSON ({exc.msg})") from None
    return rows


def _read_csv(p: Path) -> list[dict]:
    with p.open(encoding="utf-8", newline="") as fh:
        return [dict(r) for r in csv.DictReader(fh)]


def _read_parquet(p: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(p).to_pylist()


def _read_text(p: Path) -> list[dict]:
    return [{"text": line.rstrip("\n")} for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_hub(spec: str, config_name: str | None, split: str) -> list[dict]:
    import datasets

    dataset_id = spec[len("hub:"):]
    try:
        ds = datasets.load_dataset(dataset_id, name=config_name, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; one clear line for the user
        raise DataError(f"{spec}: cannot load split {split!r} from the Hub ({type(exc).__name__}: {exc})") from None
    return [dict(r) for r in ds]


def read_records(source: str, hub_config: str | None = None, hub_split: str = "train") -> list[dict]:
    """Read the examples of a file (JSON/JSONL/CSV/Parquet/text) or ``hub:<dataset id>``.

    Args:
        source: a path, or ``hub:<id>`` for a Hub dataset read through ``datasets``.
        hub_config: the Hub dataset's configuration name (default None).
        hub_split: the Hub split to read (default ``"train"``).

    Returns:
        A list of dicts (a text file gives one ``{"text": line}`` per non-empty line).
    """
    if source.startswith("hub:"):
        rows = _read_hub(source, hub_config, hub_split)
    else:
        p = Path(source)
        if not p.is_file():
            raise DataError(f"{source}: data file not found")
        kind = _SUFFIXES.get(p.suffix.lower())
        if kind is None:
            raise DataError(f"{source}: unknown data file type {p.suffix!r}; valid: {', '.join(sorted(_SUFFIXES))}")
        try:
            rows = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet,
                    "text": _read_text}[kind](p)
        except DataError:
            raise
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{source}: cannot read as {kind} ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise DataError(f"{source}: the dataset is empty (no examples)")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{source}: example {bad} is a {type(rows[bad]).__name__}, expected an object with named fields")
    return rows


def detect_format(columns: set[str], fmt: str, fields: dict[str, str], source: str) -> str:
    """Resolve ``fmt`` (``auto`` or a format name) against the columns found in ``source``.

    Args:
        columns: column names present in the data.
        fmt: ``auto``, ``text``, ``instruction`` or ``chat``.
        fields: the configured column names: ``text``, ``instruction``, ``response``, ``messages``.
        source: where the data came from (for the error message).
    """
    needs = {"chat": [fields["messages"]], "instruction": [fields["instruction"], fields["response"]],
             "text": [fields["text"]]}
    found = ", ".join(sorted(columns)) or "none"
    if fmt == "auto":
        for name in ("chat", "instruction", "text"):
            if all(c in columns for c in needs[name]):
                return name
        wanted = "; ".join(f"{k}: {', '.join(v)}" for k, v in needs.items())
        raise DataError(f"{source}: cannot detect the data format from columns [{found}]; expected columns for {wanted}")
    if fmt not in needs:
        raise DataError(f"{source}: unknown data.format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    missing = [c for c in needs[fmt] if c not in columns]
    if missing:
        raise DataError(f"{source}: format {fmt!r} needs column(s) {', '.join(missing)}, found columns [{found}]")
    return fmt
