"""Data larger than memory: a stream read lazily, checked and tokenized on the fly, batched, resumed at once.

``data.streaming: true`` (the recipe reads ``data.train_path`` as a :class:`FileStream`) or a
``datasets.IterableDataset`` given to ``OptCoreTrainer`` makes the Trainer's train dataloader a
:class:`StreamDataLoader` over a :class:`TrainStream`. Each reader (a rank, and a dataloader worker within it)
reads its own part of the stream (:mod:`hf_optcore.data.stream_sources`), checks every row as in-memory data
is checked (a bad row is a ``DataError`` naming file and line, or skipped and counted with
``data.on_bad_row: skip``), tokenizes it (in the worker when ``dataloader_num_workers > 0``) and feeds a
:class:`~hf_optcore.data.stream_batching.StreamBatcher`, whose batches the collator turns into tensors. A
stream that ends starts its next pass (reshuffled); training lasts ``max_steps``.

Exact, instant resume. The position of the stream is the per-rank checkpoint component ``"stream"``
(:class:`StreamPosition`): the source position (a byte offset or Parquet row; a ``datasets.IterableDataset``'s
own ``state_dict()``), the look-ahead window and the planned batches (token ids), the batcher's generator, the
pass, and in a worker that worker's RNG (a collator drawing random numbers there continues its draws). A
resumed run seeks there and continues with exactly the batches the uninterrupted run would have trained on,
without re-reading anything consumed: resuming at step 1,000 costs what resuming at step 10 costs.

Why torchdata's ``StatefulDataLoader``: with prefetching workers, the batches the training loop has consumed
lag behind what each worker has produced, so a position read from the dataset in the main process would be
ahead of the loop. ``StatefulDataLoader`` has every worker send its dataset's ``state_dict()`` with the
batches it produces and keeps, per worker, the state of the last batch handed to the loop: its
``state_dict()`` is the loop's own position, with any number of workers (``snapshot_every_n_steps=1``, so
nothing is replayed on resume). ``datasets.IterableDataset.state_dict()`` alone knows the position of the
examples it has yielded, not of the batches the loop has consumed, and resumes inside a shard by re-reading
the shard up to that position; it is used for ``datasets`` sources (beside the window and batches, which it
does not hold). Accelerate's ``use_stateful_dataloader`` is not used: transformers' ``AcceleratorConfig``
does not expose it, and Accelerate's preparation of an iterable dataset makes every rank read the whole
stream (rank 0 reads and dispatches, or each rank takes slices of global batches), while here each rank
reads its own part; batches reach the device through transformers' ``_prepare_inputs`` as ever.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from hf_optcore.data.encoding import EncodingStats, ExampleEncoder
from hf_optcore.data.loader_options import dataloader_options
from hf_optcore.data.loading import detect_format, record_problem
from hf_optcore.data.stream_batching import StreamBatcher
from hf_optcore.data.stream_sources import FileStream, Part, _BadRow, reader_part
from hf_optcore.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

__all__ = ["EvalStream", "FileStream", "StreamDataLoader", "StreamPosition", "TrainStream", "build_stream_loader",
           "is_stream"]

_MARK = "hf_optcore_stream"  # the key of a TrainStream's own state inside the dataloader's state
_SHOWN_SKIPS = 5  # skipped rows named in the log, per reader


def _is_datasets_iterable(dataset: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(dataset, datasets.IterableDataset)


def is_stream(dataset: Any) -> bool:
    """True for what hf_optcore streams: a :class:`FileStream` or a ``datasets.IterableDataset``."""
    return isinstance(dataset, FileStream) or _is_datasets_iterable(dataset)


class _StreamError:
    """A problem found in a worker, carried to the main process as an item (raised there as one DataError)."""

    def __init__(self, message: str):
        self.message = message


class RowEncoder:
    """Check one raw row and tokenize it, as in-memory rows are checked (:mod:`hf_optcore.data.loading`).

    Args:
        encoder: the :class:`ExampleEncoder` (None for rows that are already tokenized).
        fmt: the row format (``text``, ``instruction``, ``chat``, or ``tokenized``: rows with ``input_ids``).
        fields: the configured column names.
        on_bad_row: ``error`` (a DataError naming file and line) or ``skip`` (counted in ``stats``).
        max_seq_len: longest tokenized example kept (``tokenized`` rows are truncated to it).
    """

    def __init__(self, encoder: ExampleEncoder | None, fmt: str, fields: dict[str, str], on_bad_row: str = "error",
                 max_seq_len: int | None = None):
        self.encoder, self.fmt, self.fields = encoder, fmt, fields
        self.on_bad_row = on_bad_row
        self.max_seq_len = max_seq_len
        self.stats = EncodingStats(format=fmt)
        self.skipped = 0

    def __call__(self, rec: Any, where: str) -> dict[str, list[int]] | None:
        problem = str(rec) if isinstance(rec, _BadRow) else self._problem(rec)
        if problem is not None:
            message = f"{where}: {problem}" + (f" (format {self.fmt!r})" if not isinstance(rec, _BadRow) else "")
            if self.on_bad_row != "skip":
                raise DataError(message)
            self.skipped += 1
            if self.skipped <= _SHOWN_SKIPS:
                logger.warning("skipped a bad row (data.on_bad_row=skip): %s", message)
            return None
        if self.fmt == "tokenized":
            ids = list(rec["input_ids"])
            labels = list(rec["labels"]) if rec.get("labels") is not None else list(ids)
            n = self.max_seq_len or len(ids)
            self.stats.examples_in += 1
            self.stats.kept += 1
            return {"input_ids": ids[:n], "labels": labels[:n]}
        return self.encoder.encode(rec, self.fmt, where, self.stats)

    def _problem(self, rec: Any) -> str | None:
        if self.fmt != "tokenized":
            return record_problem(rec, self.fmt, self.fields)
        ids = rec.get("input_ids") if isinstance(rec, dict) else None
        if not isinstance(ids, (list, tuple, torch.Tensor)) or len(ids) < 2:
            return "field 'input_ids' must be a list of at least 2 token ids"
        return None


def _reader() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """The batches of one rank's part of a stream (planned lists of examples; the collator makes tensors).

    Runs where the dataloader fetches: in each worker (each reading its own part) or in the main process.

    Args:
        source: a :class:`FileStream` or a ``datasets.IterableDataset`` (already split for this rank).
        rows: the :class:`RowEncoder` (checks and tokenization).
        batcher: keyword arguments of :class:`StreamBatcher` (strategy, batch_size, buffer_size, ...).
        rank, world: this process and the number of processes.
        seed: data-order seed (shard order per pass, the batchers' generators).
    """

    def __init__(self, source: Any, rows: RowEncoder, batcher: dict[str, Any], rank: int = 0, world: int = 1,
                 seed: int = 0):
        self.source, self.rows, self.batcher_args = source, rows, dict(batcher)
        self.rank, self.world, self.seed = int(rank), int(world), int(seed)
        self._resume: dict | None = None
        self._pass, self._position, self._batcher = 0, None, None
        self._pass_kept = 0  # examples kept so far in this pass
        self._worker = (0, 1)

    # ---- state (what StatefulDataLoader asks every worker for, with each batch) ---------------

    def state_dict(self) -> dict[str, Any]:
        worker, workers = self._worker
        state: dict[str, Any] = {
            "rank": self.rank, "world": self.world, "worker": worker, "workers": workers, "pass": self._pass,
            "position": self._position, "pass_kept": self._pass_kept, "batcher": self._batcher.state_dict() if self._batcher is not None else None,
            "bad_rows_skipped": self.rows.skipped, "kept": self.rows.stats.kept,
        }
        if get_worker_info() is not None:
            from hf_optcore.checkpoint_manager import rng

            state["rng"] = rng.capture()  # the worker's own RNG: a random collator continues its draws
        return {_MARK: state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state[_MARK]

    # ---- iteration -----------------------------------------------------------------------

    def _seed(self, worker: int) -> int:
        return zlib.crc32(f"{self.seed}/{self.rank}/{worker}".encode())

    def __iter__(self):
        self._worker = worker, workers = _reader()
        self._batcher = StreamBatcher(**self.batcher_args, seed=self._seed(worker))
        state, self._resume = self._resume, None
        self._pass, self._position, self._pass_kept = 0, None, 0
        if state is not None:
            mine = {"rank": self.rank, "world": self.world, "worker": worker, "workers": workers}
            for key, value in mine.items():
                if state[key] != value:
                    yield _StreamError(f"the saved stream position is of {key}={state[key]} but this reader has "
                                       f"{key}={value}; a stream resumes with the same processes and dataloader workers")
                    return
            self._pass, self._position, self._pass_kept = int(state["pass"]), state["position"], int(state["pass_kept"])
            if state["batcher"] is not None:
                self._batcher.load_state_dict(state["batcher"])
            self.rows.skipped, self.rows.stats.kept = int(state["bad_rows_skipped"]), int(state["kept"])
            if "rng" in state and get_worker_info() is not None:
                from hf_optcore.checkpoint_manager import rng

                rng.restore(state["rng"])
        try:
            yield from self._batches(worker, workers)
        except DataError as exc:
            yield _StreamError(str(exc))

    def _batches(self, worker: int, workers: int):
        batcher = self._batcher
        while True:
            yield from self._drain(batcher)  # batches planned before a resume come first
            for rec, where, position in self._source_rows(worker, workers):
                example = self.rows(rec, where)
                self._position = position
                if example is not None:
                    self._pass_kept += 1
                    batcher.add(example)
                    yield from self._drain(batcher)
            batcher.end_pass()
            yield from self._drain(batcher)
            if self._pass_kept == 0:
                if workers > 1:
                    return  # this worker's part is empty (more workers than shards); the others carry the stream
                raise DataError(f"{self._name()}: rank {self.rank} has no example to train on (all rows "
                                f"{'skipped as bad' if self.rows.skipped else 'dropped or read by other ranks'})")
            self._pass, self._position, self._pass_kept = self._pass + 1, None, 0

    @staticmethod
    def _drain(batcher: StreamBatcher):
        while batcher.ready():
            yield batcher.pop()

    def _name(self) -> str:
        return getattr(self.source, "name", None) or type(self.source).__name__

    def _source_rows(self, worker: int, workers: int):
        if isinstance(self.source, FileStream):
            part = reader_part(self.source.n_shards, self.rank, self.world, worker, workers)
            yield from self.source.rows(part, self._position, shuffle_seed=self.seed, pass_=self._pass)
            return
        ds = self.source  # datasets splits ranks (split_dataset_by_node) and workers itself
        ds.set_epoch(self._pass)
        if self._position is not None:
            ds.load_state_dict(self._position)
        for n, rec in enumerate(ds, 1):
            yield rec, f"{self._name()}: example {n} of rank {self.rank} worker {worker}", ds.state_dict()


class StreamDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` over a :class:`TrainStream`, raising a worker's data problem as the
    ``DataError`` it was (not as a worker traceback)."""

    position: StreamPosition

    def __iter__(self):
        # Started here, not at the first next(): the iterator draws its workers' base seed from the global RNG,
        # which a resume restores right before the first batch is taken.
        return _RaisingIterator(super().__iter__())


class _RaisingIterator:
    def __init__(self, iterator):
        self.iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.iterator)
        if isinstance(item, _StreamError):
            raise DataError(item.message)
        return item


class _StreamCollate:
    """The Trainer's collator for a stream's batches; lets a carried problem through to the main process."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, batch):
        return batch if isinstance(batch, _StreamError) else self.collate(batch)


class StreamPosition:
    """The checkpoint component ``"stream"``: where this rank's stream is (per rank: each rank's differs).

    Args:
        loader: the :class:`StreamDataLoader`.
        identity: what a resumed run must share (world size, workers, batching, batch and buffer sizes).
    """

    per_rank = True

    def __init__(self, loader: StreamDataLoader, identity: dict[str, Any]):
        self.loader, self.identity = loader, dict(identity)
        self.loaded = False

    def state_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("identity", {})
        moved = [k for k in self.identity if k in saved and saved[k] != self.identity[k]]
        if moved:
            raise CheckpointError(
                "the checkpoint's stream position was saved with "
                + ", ".join(f"{k}={saved[k]!r} (this run: {self.identity[k]!r})" for k in moved)
                + "; a streamed run resumes only with the same processes, dataloader workers and batching")
        self.loader.load_state_dict(state["loader"])
        self.loaded = True

    def readers(self) -> list[dict[str, Any]]:
        """The state of each reader of this rank as of the last batch the loop took."""
        found: list[dict[str, Any]] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if _MARK in node and isinstance(node[_MARK], dict):
                    found.append(node[_MARK])
                    return
                for value in node.values():
                    walk(value)

        walk(self.loader.state_dict())
        return found

    def bad_rows_skipped(self) -> int:
        """Rows this rank's readers skipped (``data.on_bad_row: skip``) up to the last batch taken."""
        return sum(int(r.get("bad_rows_skipped", 0)) for r in self.readers())


# ---- the Trainer's streams ------------------------------------------------------------------------------


def _fields(d: Any) -> dict[str, str]:
    return {"text": d.text_field, "instruction": d.instruction_field, "input": d.input_field,
            "response": d.response_field, "messages": d.messages_field}


def _first_columns(source: Any, skip_bad: bool) -> set[str]:
    if isinstance(source, FileStream):
        return source.columns(skip_bad)
    names = getattr(source, "column_names", None)
    if names:
        return set(names)
    for row in source:
        return set(row) if isinstance(row, dict) else set()
    raise DataError(f"{type(source).__name__}: the stream is empty (no examples)")


def row_encoder(source: Any, data_config: Any, tokenizer: Any) -> RowEncoder:
    """The :class:`RowEncoder` of ``source``: its format detected from its first row's columns (or
    ``data.format``); rows with ``input_ids`` are used as tokenized."""
    d, fields = data_config, _fields(data_config)
    columns = _first_columns(source, d.on_bad_row == "skip")
    name = getattr(source, "name", type(source).__name__)
    if "input_ids" in columns and d.format == "auto":
        return RowEncoder(None, "tokenized", fields, d.on_bad_row, d.max_seq_len)
    fmt = detect_format(columns, d.format, fields, name)
    if tokenizer is None:
        raise DataError(f"{name}: the stream's rows are {fmt} and need tokenizing: pass processing_class (a tokenizer)")
    encoder = ExampleEncoder(tokenizer, d.max_seq_len, truncation=d.truncation,
                             completion_only_loss=d.completion_only_loss, fields=fields)
    return RowEncoder(encoder, fmt, fields, d.on_bad_row, d.max_seq_len)


def _for_rank(source: Any, rank: int, world: int) -> Any:
    if world > 1 and _is_datasets_iterable(source):
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(source, rank=rank, world_size=world)
    return source


def build_stream_loader(trainer: Any) -> StreamDataLoader:
    """The train dataloader of ``trainer.train_dataset`` (a stream) for this rank; registers its position as
    the per-rank checkpoint component ``trainer.optcore_state["stream"]``."""
    from hf_optcore.data.trainer_loader import check_packing_support, require_padding_collator

    args, d = trainer.args, trainer.optcore_config.data
    if args.max_steps is None or args.max_steps <= 0:
        raise DataError("a streamed train dataset has no length: set training.max_steps (> 0) to say how long to train")
    if d.batching == "multipack":
        require_padding_collator(trainer.data_collator)
        check_packing_support(trainer.model)
    world = max(1, args.world_size)
    rank = args.process_index if world > 1 else 0
    source = _for_rank(trainer.train_dataset, rank, world)
    rows = row_encoder(source, d, trainer.processing_class)
    batcher = {"strategy": d.batching, "batch_size": args.per_device_train_batch_size, "buffer_size": d.buffer_size,
               "max_tokens": d.max_tokens_per_batch, "max_seq_len": d.max_seq_len,
               "pad_to_multiple_of": d.pad_to_multiple_of, "drop_last": args.dataloader_drop_last}
    seed = args.data_seed if args.data_seed is not None else args.seed
    stream = TrainStream(source, rows, batcher, rank=rank, world=world, seed=seed)
    loader = StreamDataLoader(stream, batch_size=None, collate_fn=_StreamCollate(trainer.data_collator),
                              snapshot_every_n_steps=1, **dataloader_options(args, rank=args.process_index))
    identity = {"world": world, "workers": args.dataloader_num_workers, "batching": d.batching,
                "batch_size": args.per_device_train_batch_size, "buffer_size": d.buffer_size}
    loader.position = StreamPosition(loader, identity)
    trainer.optcore_state["stream"] = loader.position
    return loader


class EvalStream(IterableDataset):
    """A streamed evaluation set: its rows checked and tokenized in order, once (every worker its rows).

    Args:
        source: a :class:`FileStream` or a ``datasets.IterableDataset``.
        rows: the :class:`RowEncoder`.
    """

    def __init__(self, source: Any, rows: RowEncoder):
        self.source, self.rows = source, rows

    def __iter__(self):
        worker, workers = _reader()
        if isinstance(self.source, FileStream):
            part = Part(tuple(range(self.source.n_shards)), workers, worker)  # rows, so the first N are exact
            rows = ((rec, where) for rec, where, _ in self.source.rows(part, None, shuffle_seed=None))
        else:  # datasets gives every worker its shards itself
            rows = ((rec, f"example {n}") for n, rec in enumerate(self.source, 1))
        for rec, where in rows:
            example = self.rows(rec, where)
            if example is not None:
                yield example


def eval_stream(trainer: Any, dataset: Any) -> EvalStream:
    """``dataset`` (a stream) as the tokenized examples transformers' evaluation dataloader batches."""
    d = trainer.optcore_config.data
    if d.max_eval_samples is not None and isinstance(dataset, FileStream):
        dataset = FileStream(dataset.files, max_rows=d.max_eval_samples, name=dataset.name)
    elif d.max_eval_samples is not None:
        dataset = dataset.take(d.max_eval_samples)
    return EvalStream(dataset, row_encoder(dataset, d, trainer.processing_class))
