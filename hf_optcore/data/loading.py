"""Reading raw examples (files, the Hub, Python lists), detecting their format and checking every row.

Every problem is a :class:`~hf_optcore.errors.DataError` that names the source, the row (the
1-based line of a JSONL or text file, the data row of a CSV or Parquet file, the item of a JSON
list), the field, what was found and what is valid. Values are checked, never coerced: a null, a
number or a missing field is an error, never the text ``"None"`` or ``"5"`` trained on.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hf_optcore.errors import DataError, not_a_file

__all__ = ["FORMATS", "Records", "check_records", "detect_format", "empty_completions", "read_records",
           "record_problem"]

FORMATS = ("text", "instruction", "chat")
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
             ".txt": "text", ".text": "text", ".md": "text"}
# At most this many further bad rows are named after the first one.
_MORE_SHOWN = 5


class Records(list):
    """The examples of one source, a list of dicts, and where each came from.

    Args:
        rows: the examples.
        locations: ``locations[i]`` names row ``i`` in its source (``"line 7"``, ``"row 3"``, ``"item 2"``).
    """

    def __init__(self, rows: list[Any], locations: list[str]):
        super().__init__(rows)
        self.locations = list(locations)


def _read_json(p: Path) -> tuple[list, list[str]]:
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except RecursionError:
        raise DataError(f"{p}: JSON nested too deeply to read (an example is an object of strings and lists of "
                        f"turns)") from None
    if isinstance(raw, dict):
        lists = [v for v in raw.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{p}: a JSON object must hold exactly one list of examples, found keys {sorted(raw)}")
        raw = lists[0]
    if not isinstance(raw, list):
        raise DataError(f"{p}: expected a JSON list of objects, got {type(raw).__name__}")
    return raw, [f"item {i}" for i in range(1, len(raw) + 1)]


def _read_jsonl(p: Path) -> tuple[list, list[str]]:
    rows, where = [], []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p}: line {lineno} is not valid JSON ({exc.msg})") from None
                except RecursionError:
                    raise DataError(f"{p}: line {lineno} is JSON nested too deeply to read (an example is an object "
                                    f"of strings and lists of turns)") from None
                where.append(f"line {lineno}")
    return rows, where


def _read_csv(p: Path) -> tuple[list, list[str]]:
    rows, where = [], []
    with p.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for n, row in enumerate(reader, 1):
            # DictReader fills missing trailing cells with None and files extra ones under the key None.
            missing = [k for k, v in row.items() if k is not None and v is None]
            if missing or None in row:
                cells = len(header) - len(missing) + len(row.get(None) or [])
                what = f"no cell for {', '.join(repr(m) for m in missing)}" if missing else "more cells than columns"
                raise DataError(f"{p}: row {n} (line {reader.line_num}) has {cells} cells but the header has "
                                f"{len(header)} columns: {what}")
            rows.append(dict(row))
            where.append(f"row {n}")
    return rows, where


def _read_parquet(p: Path) -> tuple[list, list[str]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(p).to_pylist()
    return rows, [f"row {i}" for i in range(1, len(rows) + 1)]


def _read_text(p: Path) -> tuple[list, list[str]]:
    rows, where = [], []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            rows.append({"text": line.rstrip("\n")})
            where.append(f"line {lineno}")
    return rows, where


def _read_hub(spec: str, config_name: str | None, split: str) -> tuple[list, list[str]]:
    import datasets

    dataset_id = spec[len("hub:"):]
    try:
        ds = datasets.load_dataset(dataset_id, name=config_name, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; one clear line for the user
        raise DataError(f"{spec}: cannot load split {split!r} from the Hub ({type(exc).__name__}: {exc})") from None
    rows = [dict(r) for r in ds]
    return rows, [f"row {i}" for i in range(1, len(rows) + 1)]


def read_records(source: str, hub_config: str | None = None, hub_split: str = "train") -> Records:
    """Read the examples of a file (JSON/JSONL/CSV/Parquet/text) or ``hub:<dataset id>``.

    Args:
        source: a path, or ``hub:<id>`` for a Hub dataset read through ``datasets``.
        hub_config: the Hub dataset's configuration name (default None).
        hub_split: the Hub split to read (default ``"train"``).

    Returns:
        :class:`Records`: a list of dicts (a text file gives one ``{"text": line}`` per non-empty
        line) whose ``locations`` name each row in the file.
    """
    if source.startswith("hub:"):
        rows, where = _read_hub(source, hub_config, hub_split)
    else:
        p = Path(source)
        what = not_a_file(p)
        if what is not None:
            raise DataError(f"{source}: is {what}, not a data file")
        if not p.is_file():
            raise DataError(f"{source}: data file not found")
        kind = _SUFFIXES.get(p.suffix.lower())
        if kind is None:
            raise DataError(f"{source}: unknown data file type {p.suffix!r}; valid: {', '.join(sorted(_SUFFIXES))}")
        try:
            rows, where = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet,
                           "text": _read_text}[kind](p)
        except DataError:
            raise
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{source}: cannot read as {kind} ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise DataError(f"{source}: the dataset is empty (no examples)")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{source}: {where[bad]} is a {type(rows[bad]).__name__}, expected an object with named fields")
    return Records(rows, where)


def detect_format(columns: set[str], fmt: str, fields: dict[str, str], source: str) -> str:
    """Resolve ``fmt`` (``auto`` or a format name) against the columns found in ``source``.

    Pass the columns that appear in *any* row: a row that lacks one of them is then named by
    :func:`check_records`, instead of the whole file being undetectable.

    Args:
        columns: column names present in the data.
        fmt: ``auto``, ``text``, ``instruction`` or ``chat``.
        fields: the configured column names: ``text``, ``instruction``, ``response``, ``messages``.
        source: where the data came from (for the error message).
    """
    needs = _needs(fields)
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


def _needs(fields: dict[str, str]) -> dict[str, list[str]]:
    return {"chat": [fields["messages"]], "instruction": [fields["instruction"], fields["response"]],
            "text": [fields["text"]]}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _string_problem(rec: dict, key: str, optional: bool = False) -> str | None:
    if key not in rec:
        return None if optional else f"field {key!r} is missing"
    value = rec[key]
    if value is None:
        return None if optional else f"field {key!r} is null; expected a string"
    if not isinstance(value, str):
        return f"field {key!r} must be a string, got {type(value).__name__} {_shown(value)}"
    return None


def _chat_problem(rec: dict, key: str) -> str | None:
    if key not in rec:
        return f"field {key!r} is missing"
    if rec[key] is None:
        return f"field {key!r} is null; expected a list of {{role, content}} turns"
    messages = rec[key]
    if not isinstance(messages, list):
        return f"field {key!r} must be a list of {{role, content}} turns, got {type(messages).__name__} {_shown(messages)}"
    if not messages:
        return f"field {key!r} is an empty conversation"
    for n, turn in enumerate(messages, 1):
        if not isinstance(turn, dict):
            return f"field {key!r}: turn {n} must be an object with role and content, got {type(turn).__name__} " \
                   f"{_shown(turn)}"
        for part in ("role", "content"):
            if part not in turn:
                return f"field {key!r}: turn {n} has no {part!r}"
            if turn[part] is None:
                return f"field {key!r}: turn {n} has a null {part!r}; expected a string"
            if not isinstance(turn[part], str):
                return f"field {key!r}: turn {n} {part!r} must be a string, got {type(turn[part]).__name__} " \
                       f"{_shown(turn[part])}"
    return None


def record_problem(rec: Any, fmt: str, fields: dict[str, str]) -> str | None:
    """What is wrong with one example of format ``fmt``, or None.

    Args:
        rec: the example (a dict).
        fmt: ``text``, ``instruction`` or ``chat``.
        fields: the column names: ``text``, ``instruction``, ``input``, ``response``, ``messages``.

    Required fields must be present and strings (chat: a non-empty list of turns whose ``role`` and
    ``content`` are strings); the optional instruction ``input`` may be absent or null.
    """
    if not isinstance(rec, dict):
        return f"expected an object with named fields, got {type(rec).__name__} {_shown(rec)}"
    if fmt == "chat":
        return _chat_problem(rec, fields["messages"])
    if fmt == "text":
        return _string_problem(rec, fields["text"])
    for key in (fields["instruction"], fields["response"]):
        problem = _string_problem(rec, key)
        if problem:
            return problem
    return _string_problem(rec, fields.get("input", "input"), optional=True)


def check_records(rows: list[Any], fmt: str, fields: dict[str, str], source: str,
                  locations: list[str] | None = None) -> None:
    """Raise one :class:`DataError` naming the first bad row (and how many others there are).

    Args:
        rows: the examples.
        fmt: their format (``text``, ``instruction`` or ``chat``).
        fields: the column names (see :func:`record_problem`).
        source: the file or dataset name.
        locations: where each row is in ``source`` (default ``example <index>``).
    """
    bad = []
    for i, rec in enumerate(rows):
        problem = record_problem(rec, fmt, fields)
        if problem:
            bad.append((locations[i] if locations else f"example {i}", problem))
    if not bad:
        return
    where, problem = bad[0]
    more = ""
    if len(bad) > 1:
        names = ", ".join(w for w, _ in bad[1:1 + _MORE_SHOWN]) + (", ..." if len(bad) > 1 + _MORE_SHOWN else "")
        more = f" ({len(bad) - 1} more bad row{'s' if len(bad) > 2 else ''}: {names})"
    raise DataError(f"{source}: {where}: {problem} (format {fmt!r}){more}")


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def empty_completions(rows: list[dict], fmt: str, fields: dict[str, str]) -> int:
    """How many of ``rows`` (checked by :func:`check_records`) have nothing to complete: a blank response
    (``instruction``), a blank text (``text``), or no assistant turn with any content (``chat``)."""
    if fmt == "chat":
        key = fields["messages"]
        return sum(all(_blank(t["content"]) for t in r[key] if t["role"] == "assistant") for r in rows)
    key = fields["text"] if fmt == "text" else fields["response"]
    return sum(_blank(r[key]) for r in rows)
