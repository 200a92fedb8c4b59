"""Streamed training data: lazy per-reader parts, batching from a look-ahead window, data checks, exact resume."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import record_training_batches

from hf_optcore.config import TrainerConfig
from hf_optcore.data.stream_batching import StreamBatcher
from hf_optcore.data.stream_sources import FileStream, Part, reader_part
from hf_optcore.errors import CheckpointError, DataError
from hf_optcore.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "_stream_train_script.py"


def _examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (n,), generator=g).tolist()
    return [{"input_ids": [k % 250] * m, "labels": [k % 250] * m, "k": k} for k, m in enumerate(lengths)]


def _texts(n):
    return [{"text": "ab " * (1 + (i * 7) % 23) + f"row {i}"} for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _padding(batches):
    real = sum(len(e["input_ids"]) for b in batches for e in b)
    return 1 - real / sum(len(b) * max(len(e["input_ids"]) for e in b) for b in batches)


BATCHERS = {"random": {}, "bucket": {}, "token_budget": {"max_tokens": 96}, "multipack": {"max_seq_len": 64}}


# ---- the look-ahead batcher (pure torch) -------------------------------------------------------


def _run(batcher, examples, stop=None):
    out = []
    for e in examples:
        batcher.add(e)
        while batcher.ready():
            out.append(batcher.pop())
            if stop is not None and len(out) == stop:
                return out
    batcher.end_pass()
    while batcher.ready():
        out.append(batcher.pop())
    return out


@pytest.mark.parametrize("strategy", list(BATCHERS))
def test_batcher_gives_every_example_once_and_full_batches(strategy):
    examples = _examples(101)
    batches = _run(StreamBatcher(strategy, 4, 24, seed=1, **BATCHERS[strategy]), examples)
    if strategy == "multipack":
        rows = [row for b in batches for row in b]
        assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
        assert all(len(r["input_ids"]) <= 64 for r in rows) and all(len(b) == 4 for b in batches[:-1])
        return
    seen = sorted(e["k"] for b in batches for e in b)
    assert seen == list(range(101))
    if strategy == "token_budget":
        assert all(len(b) * max(len(e["input_ids"]) for e in b) <= 96 for b in batches)
    else:
        assert all(len(b) == 4 for b in batches[:-1]) and len(batches[-1]) == 101 % 4


@pytest.mark.parametrize("strategy", list(BATCHERS))
def test_batcher_state_continues_exactly(strategy):
    examples = _examples(90, seed=2)
    whole = _run(StreamBatcher(strategy, 3, 20, seed=5, **BATCHERS[strategy]), examples)
    # Stop mid-stream: feed 37 examples, take what is ready, save; a fresh batcher continues from the state.
    first = StreamBatcher(strategy, 3, 20, seed=5, **BATCHERS[strategy])
    head = []
    for e in examples[:37]:
        first.add(e)
        while first.ready():
            head.append(first.pop())
    state = first.state_dict()
    second = StreamBatcher(strategy, 3, 20, seed=0, **BATCHERS[strategy])
    second.load_state_dict(state)
    tail = _run(second, examples[37:])

    def tokens(batches):  # what a stream's example carries (and its state holds): token ids and labels
        return [[(b["input_ids"], b["labels"]) for b in batch] for batch in batches]

    assert tokens(head + tail) == tokens(whole)


def test_bucket_window_pads_less_as_it_grows():
    examples = _examples(600, seed=3)
    pads = [_padding(_run(StreamBatcher("bucket", 8, size, seed=0), examples)) for size in (8, 64, 512)]
    assert pads[0] > pads[1] > pads[2] and pads[2] < 0.05, pads


# ---- reading: parts and positions ----------------------------------------------------------------


def test_reader_parts_are_shards_when_they_divide_else_rows():
    assert reader_part(4, 1, 2) == Part((1, 3))
    assert reader_part(4, 1, 2, worker=1, workers=2) == Part((3,))
    assert reader_part(1, 1, 2) == Part((0,), 2, 1)  # fewer shards than ranks: every 2nd row
    assert reader_part(2, 0, 2, worker=1, workers=3) == Part((0,), 3, 1)  # a rank's shard, split by rows
    assert reader_part(3, 1, 2, worker=1, workers=2) == Part((0, 1, 2), 4, 3)


def test_rows_of_the_readers_interleave_into_the_one_reader_stream(tmp_path):
    for i in range(3):
        _write_jsonl(tmp_path / f"part-{i}.jsonl", [{"text": f"{i}-{j}"} for j in range(5)])
    stream = FileStream(str(tmp_path))
    one = [r["text"] for r, _, _ in stream.rows(reader_part(3, 0, 1), None, pass_=1)]
    parts = [[r["text"] for r, _, _ in stream.rows(reader_part(3, rank, 2), None, pass_=1)] for rank in (0, 1)]
    assert sorted(one) == sorted(f"{i}-{j}" for i in range(3) for j in range(5))
    assert one[0::2] == parts[0] and one[1::2] == parts[1]
    # Every pass reshuffles the shard order, the same for every reader.
    orders = {tuple(stream.shard_order(reader_part(3, 0, 1), p, seed=0)) for p in range(6)}
    assert len(orders) > 1


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "txt"])
def test_a_stream_resumes_at_any_position_of_every_file_type(tmp_path, kind):
    rows = [{"text": f"line {i}, with \"quotes\"\nand a break" if kind == "csv" else f"line {i}"} for i in range(23)]
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        _write_jsonl(path, rows)
    elif kind == "txt":
        path.write_text("".join(r["text"] + "\n" for r in rows), encoding="utf-8")
    elif kind == "csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, ["text"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    stream = FileStream(str(path))
    part = reader_part(1, 0, 1)
    read = list(stream.rows(part, None))
    assert [r for r, _, _ in read] == rows
    for k in (0, 4, 5, 11, 22):
        assert [r for r, _, _ in stream.rows(part, read[k][2])] == rows[k + 1:]


# ---- the Trainer: checks, batching, evaluation, resume ------------------------------------------------


def _config(out, batching="bucket", data=None, hardware=None, training=None, **checkpoint):
    return TrainerConfig.from_dict({
        "output_dir": str(out),
        "model": {"name_or_path": "tiny:llama", "lora": {"enabled": False}},
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3,
                     "scheduler": "constant", "report_to": "none", "write_report": False, **(training or {})},
        "hardware": {"use_cpu": True, "dataloader_pin_memory": False, **(hardware or {})},
        "data": {"streaming": True, "batching": batching, "buffer_size": 16, "max_seq_len": 64,
                 "max_tokens_per_batch": 128, **(data or {})},
        "checkpoint": {"every_n_steps": 0, "save_at_end": False, **checkpoint},
    })


def _trainer(cfg, train, tok, **kw):
    from hf_optcore.trainer import OptCoreTrainer

    return OptCoreTrainer(build_tiny_model("llama", seed=0), cfg, train_dataset=train, processing_class=tok, **kw)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_row_is_one_error_naming_file_and_line(tmp_path, tiny_tokenizer, workers):
    rows = _texts(40)
    rows[22] = {"text": None}
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    trainer = _trainer(_config(tmp_path / "out", hardware={"dataloader_num_workers": workers},
                               training={"max_steps": 20}), FileStream(str(path)), tiny_tokenizer)
    with pytest.raises(DataError) as err:
        trainer.train()
    assert str(err.value) == f"{path}: line 23: field 'text' is null; expected a string (format 'text')"


def test_bad_rows_skipped_are_counted_in_the_logs(tmp_path, tiny_tokenizer, caplog):
    rows = _texts(24)
    rows[1], rows[2] = {"text": 5}, {"other": "x"}
    path = tmp_path / "train.jsonl"
    path.write_text("{not json\n" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    trainer = _trainer(_config(tmp_path / "out", data={"on_bad_row": "skip"}, training={"max_steps": 5}),
                       FileStream(str(path)), tiny_tokenizer)
    trainer.train()
    # The window (16 examples) is filled before the first batch: the three bad rows at the top are read by then.
    assert [h["bad_rows_skipped"] for h in trainer.state.log_history if "loss" in h] == [3] * 5
    skipped = [r.getMessage() for r in caplog.records if "skipped a bad row" in r.getMessage()]
    assert f"{path}: line 1: is not valid JSON" in skipped[0] and f"{path}: line 3: field 'text' must be a string" \
        in skipped[1] and f"{path}: line 4: field 'text' is missing" in skipped[2]


def test_streamed_eval_equals_the_in_memory_eval(tmp_path, tiny_tokenizer):
    from hf_optcore.config import DataConfig, HardwareConfig, TrainingConfig
    from hf_optcore.data_manager import DataManager

    path = _write_jsonl(tmp_path / "eval.jsonl", _texts(37))
    dm = DataManager(TrainingConfig(), HardwareConfig(), tiny_tokenizer, data_config=DataConfig(max_seq_len=64))
    in_memory = dm.build_dataset(_texts(37))
    results = []
    for dataset, workers in ((in_memory, 0), (FileStream(str(path)), 0), (FileStream(str(path)), 2)):
        cfg = _config(tmp_path / f"o{len(results)}", hardware={"dataloader_num_workers": workers},
                      training={"per_device_eval_batch_size": 5})
        trainer = _trainer(cfg, FileStream(str(path)), tiny_tokenizer, eval_dataset=dataset)
        results.append(trainer.evaluate())
    for r in results[1:]:
        assert r["eval_label_tokens"] == results[0]["eval_label_tokens"]
        assert abs(r["eval_loss"] - results[0]["eval_loss"]) < 1e-6
    limited = _trainer(_config(tmp_path / "lim", data={"max_eval_samples": 10}), FileStream(str(path)),
                       tiny_tokenizer, eval_dataset=FileStream(str(path))).evaluate()
    assert limited["eval_label_tokens"] == sum(len(dm.build_dataset(_texts(10))[i]["input_ids"]) - 1 for i in range(10))


def test_streamed_batches_are_logged_like_in_memory_ones(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", _texts(60))
    pads = {}
    for batching in ("random", "bucket", "multipack"):
        trainer = _trainer(_config(tmp_path / batching, batching, training={"max_steps": 4}), FileStream(str(path)),
                           tiny_tokenizer)
        seen = record_training_batches(trainer)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 4 and all(h["real_tokens_per_second"] > 0 for h in logs)
        real = sum(int(x.ne(tiny_tokenizer.pad_token_id).sum()) for x in seen) if batching != "multipack" else None
        if real is not None:
            assert sum(h["real_tokens"] for h in logs) == real
        pads[batching] = sum(h["padding_fraction"] for h in logs) / 4
    assert pads["multipack"] < pads["bucket"] < pads["random"], pads


def test_a_datasets_iterable_dataset_is_batched_and_resumed_by_hf_optcore(tmp_path, tiny_tokenizer):
    import datasets

    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in _examples(48, seed=4)]
    ds = datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=3)

    def run(out, resume=None):
        trainer = _trainer(_config(out, "bucket", every_n_steps=3, keep_last=3), ds, tiny_tokenizer)
        seen = record_training_batches(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, seen

    full, seen_full = run(tmp_path / "full")
    assert "stream" in full.optcore_state and "sampler" not in full.optcore_state
    widths = [x.shape[1] for x in seen_full]
    assert max(widths) < 39  # batched by length from the window, not 4 random rows of up to 39 tokens
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, seen_resumed = run(tmp_path / "resumed", str(tmp_path / "resumed" / "checkpoint-3"))
    assert len(seen_resumed) == 3 and all(torch.equal(a, b) for a, b in zip(seen_resumed, seen_full[3:]))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_resume_with_another_number_of_workers_is_refused(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "train.jsonl", _texts(40))
    trainer = _trainer(_config(tmp_path / "out", every_n_steps=3), FileStream(str(path)), tiny_tokenizer)
    trainer.train()
    # Even with the change allowed (else the config guard refuses first), the saved position cannot continue.
    other = _trainer(_config(tmp_path / "out", hardware={"dataloader_num_workers": 1},
                             allow_changes=["hardware.dataloader_num_workers"]), FileStream(str(path)), tiny_tokenizer)
    with pytest.raises(CheckpointError, match="workers=0 .this run: 1."):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))


def test_streaming_needs_max_steps(tmp_path):
    from hf_optcore.config import ConfigError

    with pytest.raises(ConfigError, match="data.streaming: a stream has no length"):
        _config(tmp_path, training={"max_steps": -1})


def test_resume_reads_nothing_that_was_consumed(tmp_path, tiny_tokenizer):
    from hf_optcore.data.collator import PaddingCollator
    from hf_optcore.data.encoding import ExampleEncoder
    from hf_optcore.data.streaming import RowEncoder, StreamDataLoader, TrainStream, _StreamCollate

    path = _write_jsonl(tmp_path / "train.jsonl", _texts(160))  # 30 batches of 4 stay in the first pass
    fields = {k: k for k in ("text", "instruction", "input", "response", "messages")}

    def loader():
        rows = RowEncoder(ExampleEncoder(tiny_tokenizer, 64), "text", fields)
        stream = TrainStream(FileStream(str(path)), rows, {"strategy": "bucket", "batch_size": 4, "buffer_size": 8})
        return StreamDataLoader(stream, batch_size=None, collate_fn=_StreamCollate(PaddingCollator(0)))

    whole = [b["input_ids"] for b, _ in zip(loader(), range(30))]
    first = loader()
    it = iter(first)
    head = [next(it)["input_ids"] for _ in range(12)]
    state = first.state_dict()
    offset = next(_find(state, "position"))["offset"]  # the byte offset the stream had read up to
    data = path.read_bytes()
    path.write_bytes(b"\n" * offset + data[offset:])  # what was consumed is gone: blank lines, same offsets
    second = loader()
    second.load_state_dict(state)
    tail = [b["input_ids"] for b, _ in zip(second, range(18))]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, whole)) and len(head + tail) == 30


def _find(node, key):
    if isinstance(node, dict):
        if key in node and isinstance(node[key], dict):
            yield node[key]
        for v in node.values():
            yield from _find(v, key)


# ---- a real kill -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_auto_resume_trains_on_exactly_the_same_batches(tmp_path):
    """Multipack with a dataloader worker and a collator that draws random numbers (in the worker), killed in
    the stream's second pass and resumed with resume_from=auto: the same batches, bit-equal weights."""
    path = _write_jsonl(tmp_path / "train.jsonl", _texts(24))
    args = [str(path), "--batching", "multipack", "--workers", "1", "--random-collator", "--max-steps", "12"]

    def run(out, *extra, code=0):
        proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *args, *extra], capture_output=True, text=True,
                              timeout=600, cwd=REPO)
        assert proc.returncode == code, proc.stderr[-3000:]

    from tests._stream_train_script import main

    main([str(tmp_path / "full"), *args])  # the uninterrupted run, in this process
    run(tmp_path / "killed", "--kill-after", "8", code=-9)
    assert not (tmp_path / "killed" / "final.pt").exists()
    run(tmp_path / "killed")
    batches = [[json.loads(x) for x in (tmp_path / d / "batches.jsonl").read_text().splitlines()]
               for d in ("full", "killed")]
    assert batches[0] == batches[1] and batches[0][-1]["step"] == 12
    full = torch.load(tmp_path / "full" / "final.pt")
    resumed = torch.load(tmp_path / "killed" / "final.pt")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
