"""``DataManager``: datasets in, tokenized examples, collator and batch samplers out.

Works with ``OptCoreTrainer`` (which takes its train sampler and collator from here) and alone::

    dm = DataManager(config.training, config.hardware, tokenizer, text_field_max_len=512)
    train_loader, val_loader = dm.create_loaders(train_texts, val_texts)

The pieces live in :mod:`hf_optcore.data`: ``loading`` (files, Hub, format detection),
``encoding`` (chat/instruction/text rendering, completion-only labels, truncation), ``collator``
(dynamic padding), ``samplers`` (random / bucket / token_budget / multipack), ``packing``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from hf_optcore.config import DataConfig
from hf_optcore.data.collator import PaddingCollator
from hf_optcore.data.encoding import ExampleEncoder, TokenizedDataset
from hf_optcore.data.loader_options import dataloader_options
from hf_optcore.data.loading import check_records, detect_format, empty_completions, read_records, record_problem
from hf_optcore.data.packing import PackedDataset
from hf_optcore.data.samplers import (
    BucketBatchSampler,
    MultipackBatchSampler,
    RandomBatchSampler,
    TokenBudgetBatchSampler,
)
from hf_optcore.distributed import rank_and_world
from hf_optcore.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["DataManager", "dataset_lengths", "make_batch_sampler"]


def dataset_lengths(dataset: Any) -> list[int]:
    """Token length of every example: ``dataset.lengths``, a ``length`` column, or ``len(input_ids)``."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        return list(lengths)
    names = getattr(dataset, "column_names", None)
    if names is not None and "length" in names:
        return list(dataset["length"])
    if names is not None and "input_ids" in names:
        return [len(x) for x in dataset["input_ids"]]
    try:
        return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    except (KeyError, TypeError, IndexError):
        raise DataError(
            f"cannot infer example lengths for length-aware batching: items of {type(dataset).__name__} need an "
            f"'input_ids' field (or the dataset a 'lengths' attribute / 'length' column)"
        ) from None


def make_batch_sampler(data_config: DataConfig, lengths: list[int], batch_size: int, seed: int,
                       num_replicas: int = 1, rank: int = 0, max_seq_len: int | None = None, drop_last: bool = False):
    """The batch sampler named by ``data_config.batching`` (see :mod:`hf_optcore.data.samplers`).

    Args:
        data_config: the ``data`` section (batching, max_tokens_per_batch, pad_to_multiple_of, ...).
        lengths: token length of every example.
        batch_size: examples (multipack: packed rows) per batch on one rank.
        seed: data-order seed.
        num_replicas, rank: data-parallel world size and this rank (default 1, 0).
        max_seq_len: packed row length for multipack (default ``data_config.max_seq_len``).
        drop_last: drop the incomplete last batch of every epoch (``dataloader_drop_last``; default False).
    """
    d = data_config
    common = {"num_replicas": num_replicas, "rank": rank, "seed": seed, "drop_last": drop_last}
    if d.batching == "random":
        return RandomBatchSampler(lengths, batch_size, **common)
    if d.batching == "bucket":
        return BucketBatchSampler(lengths, batch_size, bucket_size_multiplier=d.bucket_size_multiplier, **common)
    if d.batching == "token_budget":
        if d.max_tokens_per_batch is None:
            raise DataError("data.max_tokens_per_batch: required when data.batching is 'token_budget'")
        return TokenBudgetBatchSampler(lengths, d.max_tokens_per_batch, pad_to_multiple_of=d.pad_to_multiple_of,
                                       **common)
    if d.batching == "multipack":
        return MultipackBatchSampler(lengths, max_seq_len or d.max_seq_len, batch_size, **common)
    raise DataError(f"data.batching: unknown strategy {d.batching!r}; valid: random, bucket, token_budget, multipack")


class DataManager:
    """Datasets, collator and batch samplers for causal-LM fine-tuning.

    Args:
        training_config: the ``training`` section (batch sizes, seed, data_seed).
        hardware_config: the ``hardware`` section (dataloader workers, pin memory, prefetch).
        tokenizer: a transformers tokenizer (its chat template renders chat and instruction data).
        text_field_max_len: maximum tokens per example when ``data_config`` is not given (default 512).
        data_config: the ``data`` section (default ``DataConfig()``); its ``max_seq_len`` wins.
        seed: data-order seed (default ``training.data_seed``, else ``training.seed``).
    """

    def __init__(self, training_config: Any, hardware_config: Any, tokenizer: Any, text_field_max_len: int = 512,
                 data_config: DataConfig | None = None, seed: int | None = None):
        self.training = training_config
        self.hardware = hardware_config
        self.tokenizer = tokenizer
        self.data_config = data_config if data_config is not None else DataConfig()
        self.max_seq_len = int(data_config.max_seq_len if data_config is not None else text_field_max_len)
        if seed is None:
            seed = training_config.data_seed if getattr(training_config, "data_seed", None) is not None \
                else training_config.seed
        self.seed = int(seed)
        d = self.data_config
        self.encoder = ExampleEncoder(
            tokenizer, self.max_seq_len, truncation=d.truncation, completion_only_loss=d.completion_only_loss,
            fields={"text": d.text_field, "instruction": d.instruction_field, "input": d.input_field,
                    "response": d.response_field, "messages": d.messages_field},
        )
        self.collator = PaddingCollator(self.pad_token_id, d.pad_to_multiple_of, d.padding_side)
        self.stats: dict[str, dict[str, Any]] = {}

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its eos id, else 0 (padded positions are masked either way)."""
        for name in ("pad_token_id", "eos_token_id"):
            val = getattr(self.tokenizer, name, None)
            if val is not None:
                return int(val)
        return 0

    # ---- datasets -------------------------------------------------------------------------

    def _fields(self) -> dict[str, str]:
        d = self.data_config
        return {"text": d.text_field, "instruction": d.instruction_field, "input": d.input_field,
                "response": d.response_field, "messages": d.messages_field}

    def build_dataset(self, examples: list[Any], source: str = "<list>", split: str = "train",
                      locations: list[str] | None = None) -> TokenizedDataset:
        """Tokenize a Python list of strings (text) or dicts (any format) into a :class:`TokenizedDataset`.

        The format is detected from the columns of all rows together, then every row is checked:
        a missing, null or non-string field is a :class:`DataError` naming the row and the field.

        Args:
            examples: strings, or dicts with the columns of one format.
            source: name used in messages and ``stats`` (default ``"<list>"``).
            split: ``"train"`` or ``"eval"``: the key of this dataset in ``stats``.
            locations: ``locations[i]`` names example ``i`` in ``source`` (default ``example <i>``).
        """
        examples, fmt, locations, skipped = self.check_examples(examples, source, locations, warn=True)
        ds = self.encoder.encode_all(examples, fmt, source, locations)
        self.stats[split] = ds.stats.as_dict() | {"source": source, "bad_rows_skipped": skipped}
        return ds

    def check_examples(self, examples: list[Any], source: str = "<list>", locations: list[str] | None = None,
                       warn: bool = False) -> tuple[list[dict], str, list[str] | None, int]:
        """The checks of :meth:`build_dataset` before tokenizing: ``(examples as dicts, their format, their
        locations, rows skipped)``; with ``data.on_bad_row: skip`` a bad row is left out and counted instead.

        Besides every row's fields, the responses are looked at: when every example's completion (the
        response, the assistant turns, the text) is empty and only completions are trained on, nothing but the end
        of a turn would be learned, which is a :class:`DataError`; when at least half are empty, ``warn`` logs a
        warning saying how many.
        """
        if not examples:
            raise DataError(f"{source}: the dataset is empty (no examples)")
        if all(isinstance(e, str) for e in examples):
            columns = {self.data_config.text_field}
            examples = [{self.data_config.text_field: e} for e in examples]
        elif all(isinstance(e, dict) for e in examples):
            # Any row's columns count: a row that lacks one is then named by check_records.
            columns = set().union(*examples)
        else:
            kinds = sorted({type(e).__name__ for e in examples})
            raise DataError(f"{source}: examples must all be strings or all dicts, got {', '.join(kinds)}")
        fmt = detect_format(columns, self.data_config.format, self._fields(), source)
        skipped = 0
        if self.data_config.on_bad_row == "skip":
            keep = [i for i, e in enumerate(examples) if record_problem(e, fmt, self._fields()) is None]
            skipped = len(examples) - len(keep)
            if skipped:
                logger.warning("%s: skipped %d bad row(s) (data.on_bad_row=skip)", source, skipped)
            examples = [examples[i] for i in keep]
            locations = [locations[i] for i in keep] if locations else [f"example {i}" for i in keep]
        check_records(examples, fmt, self._fields(), source, locations)
        empty = empty_completions(examples, fmt, self._fields())
        d = self.data_config
        what = {"instruction": f"field {d.response_field!r}", "text": f"field {d.text_field!r}",
                "chat": "every assistant turn"}[fmt]
        if empty == len(examples) and (d.completion_only_loss or fmt == "text"):
            raise DataError(f"{source}: {what} is empty in every example ({empty} of {empty}), so training would "
                            f"only learn to end a turn at once; fill in the responses")
        if warn and 2 * empty >= len(examples):
            logger.warning("%s: %s is empty in %d of %d examples; the model learns to answer those with nothing",
                           source, what, empty, len(examples))
        return examples, fmt, locations, skipped

    def _read_splits(self, local_only: bool = False) -> tuple[list | None, list | None, str | None]:
        """``(train_rows, eval_rows, eval_source)`` as :meth:`load_datasets` uses them: ``(row, location)`` pairs
        after the held-out split and ``max_*_samples``. With ``local_only`` a ``hub:`` source is not read (None)."""
        d = self.data_config
        if not d.train_path:
            raise DataError("data.train_path: no training data given (a file path or 'hub:<dataset id>')")

        def read(path: str, split: str) -> list | None:
            if local_only and path.startswith("hub:"):
                return None
            records = read_records(path, d.hub_config_name, split)
            # (row, where it is in its file) pairs, so that every error names the file's own line or row.
            return list(zip(records, records.locations))

        train_rows = read(d.train_path, d.hub_train_split)
        eval_rows, eval_source = None, None
        if d.eval_path:
            eval_rows = read(d.eval_path, d.hub_eval_split or d.hub_train_split)
            eval_source = d.eval_path
        elif d.eval_split_ratio > 0 and train_rows is not None and len(train_rows) > 1:
            order = list(range(len(train_rows)))
            random.Random(self.seed).shuffle(order)
            n_eval = min(len(train_rows) - 1, max(1, round(len(train_rows) * d.eval_split_ratio)))
            held = set(order[:n_eval])
            eval_rows = [r for i, r in enumerate(train_rows) if i in held]
            train_rows = [r for i, r in enumerate(train_rows) if i not in held]
            eval_source = f"{d.train_path} (held-out {d.eval_split_ratio:g})"
        if train_rows is not None and d.max_train_samples is not None:
            train_rows = train_rows[: d.max_train_samples]
        if eval_rows is not None and d.max_eval_samples is not None:
            eval_rows = eval_rows[: d.max_eval_samples]
        return train_rows, eval_rows, eval_source

    def load_datasets(self) -> tuple[Any, Any]:
        """Read ``data.train_path`` (and ``eval_path``, else hold out ``eval_split_ratio`` of train).

        With ``data.streaming`` nothing is read whole: see :meth:`load_streams`.

        Returns:
            ``(train_dataset, eval_dataset_or_None)``; the counts of kept, truncated and dropped
            examples are logged and kept in ``self.stats``.
        """
        d = self.data_config
        if d.streaming:
            if not d.train_path:
                raise DataError("data.train_path: no training data given (a file path or 'hub:<dataset id>')")
            return self.load_streams()
        train_rows, eval_rows, eval_source = self._read_splits()
        train = self.build_dataset([r for r, _ in train_rows], d.train_path, "train", [w for _, w in train_rows])
        self._check_batch_size(len(train))
        evald = None
        if eval_rows:
            evald = self.build_dataset([r for r, _ in eval_rows], eval_source, "eval", [w for _, w in eval_rows])
        return train, evald

    def check_datasets(self) -> None:
        """Every check of :meth:`load_datasets` that needs no tokenizer, on the local files (``hub:`` sources are
        not read): the files read, every row well-formed for the format, not every completion empty.

        Raises:
            DataError: the first problem, worded as :meth:`load_datasets` words it.
        """
        d = self.data_config
        if d.streaming:
            return  # a stream is never read whole: each row is checked as it is read (data.on_bad_row)
        train_rows, eval_rows, eval_source = self._read_splits(local_only=True)
        for rows, source in ((train_rows, d.train_path), (eval_rows, eval_source)):
            if rows is not None:
                self.check_examples([r for r, _ in rows], source, [w for _, w in rows])

    def _check_batch_size(self, n_examples: int) -> None:
        # A batch cannot hold more examples than there are: say what a larger per-device batch means.
        batch = getattr(self.training, "per_device_train_batch_size", None)
        if isinstance(batch, int) and batch > n_examples and self.data_config.batching in ("random", "bucket", "hf"):
            logger.warning("training.per_device_train_batch_size=%d is more than the %d training examples: every "
                           "batch holds at most %d (each optimizer step sees the whole training set)", batch,
                           n_examples, n_examples)

    def load_streams(self) -> tuple[Any, Any]:
        """``data.train_path`` (and ``eval_path``) as streams, read lazily by the Trainer (``data.streaming``).

        Local files, directories and globs of JSONL/CSV/Parquet/text shards become a
        :class:`~hf_optcore.data.stream_sources.FileStream`; ``hub:<id>`` a streaming ``datasets.IterableDataset``.
        Only the first row of each is read here: its columns give the format (checked now, before the model
        loads). There is no held-out split of a stream: evaluation needs ``data.eval_path``.
        """
        from hf_optcore.data.streaming import row_encoder

        d = self.data_config
        train = self._stream(d.train_path, d.hub_train_split, d.max_train_samples)
        evald = self._stream(d.eval_path, d.hub_eval_split or d.hub_train_split, None) if d.eval_path else None
        for split, stream in (("train", train), ("eval", evald)):
            if stream is not None:
                fmt = row_encoder(stream, d, self.tokenizer).fmt
                self.stats[split] = {"source": getattr(stream, "name", str(stream)), "streaming": True, "format": fmt,
                                     "shards": getattr(stream, "n_shards", None)}
        if evald is None and d.eval_split_ratio > 0:
            logger.info("data.streaming: no held-out split of a stream (data.eval_split_ratio is not used); "
                        "set data.eval_path to evaluate")
        return train, evald

    def _stream(self, spec: str, hub_split: str, max_rows: int | None) -> Any:
        from hf_optcore.data.stream_sources import FileStream

        if not spec.startswith("hub:"):
            return FileStream(spec, max_rows=max_rows)
        import datasets

        try:
            ds = datasets.load_dataset(spec[len("hub:"):], name=self.data_config.hub_config_name, split=hub_split,
                                       streaming=True)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; one clear line for the user
            raise DataError(f"{spec}: cannot stream split {hub_split!r} from the Hub ({type(exc).__name__}: {exc})") \
                from None
        return ds.take(max_rows) if max_rows is not None else ds

    # ---- batching -------------------------------------------------------------------------

    def build_batch_sampler(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None,
                            batch_size: int | None = None):
        """The ``data.batching`` batch sampler over ``dataset`` for this rank.

        Args:
            dataset: a tokenized dataset (lengths from ``dataset.lengths`` or its ``input_ids``).
            num_replicas, rank: world size and rank (default: torch.distributed's, else 1 and 0).
            batch_size: per-device batch size (default ``training.per_device_train_batch_size``).
        """
        me, world = rank_and_world()
        return make_batch_sampler(
            self.data_config, dataset_lengths(dataset),
            batch_size or self.training.per_device_train_batch_size, self.seed,
            num_replicas=world if num_replicas is None else num_replicas, rank=me if rank is None else rank,
            max_seq_len=self.max_seq_len, drop_last=bool(getattr(self.hardware, "dataloader_drop_last", False)),
        )

    def create_loaders(self, train_texts: list[Any], val_texts: list[Any] | None = None):
        """Tokenize Python lists and build ``(train_loader, val_loader)`` for a standalone loop.

        The train loader uses the ``data.batching`` batch sampler (rank-aware under
        torch.distributed; call ``train_loader.batch_sampler.set_epoch(epoch)`` each epoch, its
        ``state_dict()`` resumes mid-epoch); the val loader keeps the given order in batches of
        ``training.per_device_eval_batch_size``. ``val_loader`` is None when ``val_texts`` is empty.
        """
        train = self.build_dataset(list(train_texts), "train_texts", "train")
        me = rank_and_world()[0]
        sampler = self.build_batch_sampler(train)
        train_ds = PackedDataset(train) if isinstance(sampler, MultipackBatchSampler) else train
        train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=self.collator,
                                  **dataloader_options(self.hardware, rank=me))
        val_loader = None
        if val_texts:
            val = self.build_dataset(list(val_texts), "val_texts", "eval")
            batches = BatchSampler(SequentialSampler(val), self.training.per_device_eval_batch_size, drop_last=False)
            val_loader = DataLoader(val, batch_sampler=batches, collate_fn=self.collator,
                                    **dataloader_options(self.hardware, training=False))
        return train_loader, val_loader
