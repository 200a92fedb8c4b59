"""Reading a stream lazily, each reader its own part, from a position that is found without re-reading.

Two kinds of source feed :class:`~hf_optcore.data.streaming.TrainStream`:

* :class:`FileStream`: local shards (JSONL, CSV, Parquet, text) read row by row. A position is a byte offset
  (JSONL, text, CSV) or a row of a row group (Parquet), so resuming seeks there at once, whatever the step.
  Every row keeps its file and line (``train-00001.jsonl: line 7``) for the data checks.
* a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``, ``to_iterable_dataset()``, a
  generator): positioned through its own ``state_dict()`` / ``load_state_dict()``; ranks read their part
  through ``datasets.distributed.split_dataset_by_node`` and dataloader workers theirs through datasets'
  own worker split.

Which part a reader (a rank, and a dataloader worker within it) reads follows ``split_dataset_by_node``: whole
shards when their number divides among the readers, else every ``n``-th row of the stream (each reader then
reads every row but parses and keeps only its own). The order of a reader's shards is reshuffled every pass
(``seed``, pass); in the row split every reader uses the same order, so the readers' rows interleave into the
1-reader stream.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_optcore.errors import DataError

__all__ = ["STREAM_SUFFIXES", "FileStream", "Part", "reader_part", "resolve_shards"]

STREAM_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
                   ".text": "text", ".md": "text"}


@dataclass(frozen=True)
class Part:
    """What one reader reads: these shards (ids), and of their rows those with ``index % step == offset``."""

    shards: tuple[int, ...]
    step: int = 1
    offset: int = 0

    def keeps(self, row: int) -> bool:
        return row % self.step == self.offset


def reader_part(n_shards: int, rank: int, world: int, worker: int = 0, workers: int = 1) -> Part:
    """The part of a stream of ``n_shards`` shards that worker ``worker`` of rank ``rank`` reads.

    ``split_dataset_by_node``'s rule, applied to the ranks and then to the workers of a rank: shards when their
    number divides evenly, else rows (counted over the shards this reader goes through, in order).
    """
    shards, step, offset = tuple(range(n_shards)), 1, 0
    for index, count in ((rank, world), (worker, workers)):
        if count <= 1:
            continue
        if step == 1 and len(shards) % count == 0:
            shards = shards[index::count]
        else:
            offset, step = offset + step * index, step * count
    return Part(shards, step, offset)


def resolve_shards(spec: str | list[str]) -> list[Path]:
    """The shard files of ``spec``: a file, a directory (every data file in it), a glob, or a list of them."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in STREAM_SUFFIXES)
        elif any(c in str(s) for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(s)) if Path(f).suffix.lower() in STREAM_SUFFIXES)
        elif p.is_file():
            found = [p]
        else:
            raise DataError(f"{s}: data file not found")
        if not found:
            raise DataError(f"{s}: no data files ({', '.join(sorted(STREAM_SUFFIXES))}) found")
        files.extend(found)
    for f in files:
        if f.suffix.lower() not in STREAM_SUFFIXES:
            raise DataError(f"{f}: cannot stream a {f.suffix!r} file; streamable: {', '.join(sorted(STREAM_SUFFIXES))} "
                            f"(a .json list is read whole: use data.streaming=false or convert it to .jsonl)")
    return files


class _BadRow(Exception):
    """A row that cannot be parsed (invalid JSON, a CSV row of the wrong width)."""


class FileStream:
    """Local data shards, read lazily (the raw rows; tokenizing is the stream's work).

    Args:
        paths: a file, a directory, a glob, or a list of them (JSONL, CSV, Parquet, text).
        max_rows: read only the first this many rows of every pass (default all).
        name: how messages name the stream (default the first path).
    """

    def __init__(self, paths: str | list[str], max_rows: int | None = None, name: str | None = None):
        self.files = resolve_shards(paths)
        self.max_rows = max_rows
        self.name = name or str(paths if isinstance(paths, str) else self.files[0])

    @property
    def n_shards(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FileStream({len(self.files)} shard{'s' if len(self.files) != 1 else ''}: {self.name})"

    def columns(self, skip_bad: bool = False) -> set[str]:
        """The columns of the first row (what the format is detected from); of the first good one with
        ``skip_bad`` (else a bad first row is the error)."""
        for rec, where, _ in self.rows(Part(tuple(range(self.n_shards))), start=None, shuffle_seed=None):
            problem = str(rec) if isinstance(rec, _BadRow) else None if isinstance(rec, dict) else (
                f"is a {type(rec).__name__}, expected an object with named fields")
            if problem is None:
                return set(rec)
            if not skip_bad:
                raise DataError(f"{where}: {problem}")
        raise DataError(f"{self.name}: the dataset is empty (no examples)")

    def shard_order(self, part: Part, pass_: int, seed: int | None) -> list[int]:
        """The order of ``part``'s shards in pass ``pass_`` (reshuffled every pass; the same for every reader)."""
        order = list(part.shards)
        if seed is not None and len(order) > 1:
            random.Random(seed * 1_000_003 + pass_).shuffle(order)
        return order

    def rows(self, part: Part, start: dict | None, shuffle_seed: int | None = 0,
             pass_: int = 0) -> Iterator[tuple[Any, str, dict]]:
        """``(row, where, position after it)`` for this part's rows of pass ``pass_``, from ``start`` on.

        A row that cannot be parsed comes as a ``_BadRow`` (the caller decides: error or skip). ``where`` is
        ``"<file>: line <n>"`` (``row <n>`` for CSV and Parquet).
        """
        order = self.shard_order(part, pass_, shuffle_seed)
        pos = dict(start or {"shard": 0, "offset": 0, "line": 0, "row": 0})
        for k in range(pos["shard"], len(order)):
            file = self.files[order[k]]
            if k != pos["shard"]:
                pos.update(shard=k, offset=0, line=0)
            kind = STREAM_SUFFIXES[file.suffix.lower()]
            reader = {"jsonl": self._jsonl, "text": self._text, "csv": self._csv, "parquet": self._parquet}[kind]
            for rec, where_in_file, offset, line in reader(file, pos["offset"], pos["line"], part, pos["row"]):
                pos["row"] += 1
                pos.update(offset=offset, line=line)
                if rec is not None:
                    yield rec, f"{file}: {where_in_file}", dict(pos)
                if self.max_rows is not None and pos["row"] >= self.max_rows:
                    return
            pos.update(shard=k + 1, offset=0, line=0)

    # ---- one file each: (row or None when not this reader's, where, offset after it, line after it) ---------

    def _lines(self, file: Path, offset: int, line: int, part: Part, row: int, parse):
        with open(file, "rb") as fh:
            fh.seek(offset)
            for raw in fh:
                offset += len(raw)
                line += 1
                if not raw.strip():
                    continue
                mine = part.keeps(row)
                row += 1
                if not mine:
                    yield None, "", offset, line
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield _BadRow(f"is not UTF-8 ({exc.reason})"), f"line {line}", offset, line
                    continue
                yield parse(text), f"line {line}", offset, line

    def _jsonl(self, file, offset, line, part, row):
        def parse(text):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                return _BadRow(f"is not valid JSON ({exc.msg})")

        yield from self._lines(file, offset, line, part, row, parse)

    def _text(self, file, offset, line, part, row):
        yield from self._lines(file, offset, line, part, row, lambda text: {"text": text.rstrip("\r\n")})

    def _csv(self, file, offset, line, part, row):
        with open(file, "rb") as fh:
            header_lines = _ByteLines(fh)
            header = next(csv.reader(header_lines), None)
            if header is None:
                return
            fh.seek(max(offset, header_lines.offset))
            lines = _ByteLines(fh, fh.tell(), line if offset else header_lines.line)
            # line counts physical lines; the CSV row number (1-based, header excluded) is kept in `line` too
            reader = csv.reader(lines)
            n = line if offset else 0  # data rows read so far in this file
            for cells in reader:
                n += 1
                if not cells:
                    continue
                mine = part.keeps(row)
                row += 1
                if not mine:
                    yield None, "", lines.offset, n
                    continue
                if len(cells) != len(header):
                    what = "more cells than columns" if len(cells) > len(header) else (
                        f"no cell for {', '.join(repr(h) for h in header[len(cells):])}")
                    yield (_BadRow(f"has {len(cells)} cells but the header has {len(header)} columns: {what}"),
                           f"row {n}", lines.offset, n)
                    continue
                yield dict(zip(header, cells)), f"row {n}", lines.offset, n

    def _parquet(self, file, offset, line, part, row):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        first = 0
        for g in range(pf.metadata.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            if first + size <= offset:
                first += size
                continue
            records = pf.read_row_group(g).to_pylist()
            for i in range(max(0, offset - first), size):
                mine = part.keeps(row)
                row += 1
                yield (records[i] if mine else None), f"row {first + i + 1}", first + i + 1, first + i + 1
            first += size


class _ByteLines:
    """Decoded lines of a binary file handle, counting the bytes and lines handed out (for CSV positions)."""

    def __init__(self, fh: io.BufferedReader, offset: int = 0, line: int = 0):
        self.fh, self.offset, self.line = fh, offset, line

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.fh.readline()
        if not raw:
            raise StopIteration
        self.offset += len(raw)
        self.line += 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.fh.name}: line {self.line} is not UTF-8 ({exc.reason})") from None
