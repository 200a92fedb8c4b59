"""DataManager data in: file types, format detection, completion-only labels, truncation, collation."""

import csv
import json

import pytest
import torch

from hf_optcore.config import DataConfig, HardwareConfig, TrainingConfig
from hf_optcore.data.collator import PaddingCollator, count_real_tokens
from hf_optcore.data_manager import DataManager
from hf_optcore.errors import DataError

ROWS = [
    {"instruction": "Define foo", "input": "", "response": "A metasyntactic variable."},
    {"instruction": "Define bar", "input": "in code", "response": "The second one."},
    {"instruction": "Define baz", "input": "", "response": "The third."},
]


def manager(tok, **data):
    return DataManager(TrainingConfig(per_device_train_batch_size=2), HardwareConfig(), tok,
                       data_config=DataConfig(**{"eval_split_ratio": 0.0, **data}))


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_every_file_type_gives_the_same_examples(tmp_path, tiny_tokenizer, kind):
    path = tmp_path / f"d.{kind}"
    write(path, ROWS, kind)
    train, evald = manager(tiny_tokenizer, train_path=str(path)).load_datasets()
    ref = manager(tiny_tokenizer).build_dataset(ROWS)
    assert evald is None
    assert [e["input_ids"] for e in train] == [e["input_ids"] for e in ref]
    assert [e["labels"] for e in train] == [e["labels"] for e in ref]


def test_text_file_and_held_out_split(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("\n".join(f"line number {i}" for i in range(20)) + "\n\n")
    dm = manager(tiny_tokenizer, train_path=str(path), eval_split_ratio=0.25)
    train, evald = dm.load_datasets()
    assert (len(train), len(evald)) == (15, 5)
    assert dm.stats["train"]["format"] == "text"
    ex = train[0]
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tiny_tokenizer.eos_token_id
    texts = {tiny_tokenizer.decode(e["input_ids"]) for e in list(train) + list(evald)}
    assert len(texts) == 20  # disjoint split


def test_missing_columns_name_the_file_and_the_columns(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    write(path, [{"question": "q", "answer": "a"}], "jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl: cannot detect the data format from columns \[answer, question\]"):
        manager(tiny_tokenizer, train_path=str(path)).load_datasets()
    with pytest.raises(DataError, match=r"bad\.jsonl: format 'chat' needs column\(s\) messages, found columns "
                                        r"\[answer, question\]"):
        manager(tiny_tokenizer, train_path=str(path), format="chat").load_datasets()


def test_empty_and_missing_files_are_clear_errors(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        manager(tiny_tokenizer, train_path=str(empty)).load_datasets()
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        manager(tiny_tokenizer, train_path=str(tmp_path / "nope.jsonl")).load_datasets()
    with pytest.raises(DataError, match="examples must all be strings or all dicts"):
        manager(tiny_tokenizer).build_dataset(["a", {"text": "b"}])


def _decode_targets(tok, ex):
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])


def test_chat_completion_only_masks_every_prompt_token(tiny_tokenizer):
    conv = {"messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is foo?"},
        {"role": "assistant", "content": "A name."},
        {"role": "user", "content": "And bar?"},
        {"role": "assistant", "content": "Another."},
    ]}
    ex = manager(tiny_tokenizer).build_dataset([conv])[0]
    rendered = tiny_tokenizer.apply_chat_template(conv["messages"], tokenize=False)
    assert tiny_tokenizer.decode(ex["input_ids"]) == rendered
    assert _decode_targets(tiny_tokenizer, ex) == "A name.<|im_end|>\nAnother.<|im_end|>\n"
    full = manager(tiny_tokenizer, completion_only_loss=False).build_dataset([conv])[0]
    assert full["labels"] == full["input_ids"]


def test_instruction_uses_the_chat_template_or_a_plain_prompt(tiny_tokenizer):
    ex = manager(tiny_tokenizer).build_dataset(ROWS[1:2])[0]
    assert tiny_tokenizer.decode(ex["input_ids"]).startswith("<|im_start|>user\nDefine bar\n\nin code<|im_end|>")
    assert _decode_targets(tiny_tokenizer, ex) == "The second one.<|im_end|>\n"
    tiny_tokenizer.chat_template = None
    plain = manager(tiny_tokenizer).build_dataset(ROWS[1:2])[0]
    assert tiny_tokenizer.decode(plain["input_ids"]).startswith("### Instruction:\nDefine bar\n\n### Input:\nin code")
    assert _decode_targets(tiny_tokenizer, plain) == "The second one.<|im_end|>"


def test_truncate_or_drop_and_the_counts(tiny_tokenizer):
    rows = ["x" * 10, "y" * 100, "z" * 30]
    dm = manager(tiny_tokenizer, max_seq_len=32)
    ds = dm.build_dataset(rows)
    assert ds.lengths == [11, 32, 31]
    assert dm.stats["train"]["truncated"] == 1 and dm.stats["train"]["kept"] == 3
    dm = manager(tiny_tokenizer, max_seq_len=32, truncation="drop")
    assert dm.build_dataset(rows).lengths == [11, 31]
    assert dm.stats["train"]["dropped_too_long"] == 1
    # A prompt that fills the window leaves no completion: dropped and counted.
    dm = manager(tiny_tokenizer, max_seq_len=48)
    dm.build_dataset(ROWS + [{"instruction": "q" * 60, "response": "r"}])
    assert dm.stats["train"]["dropped_no_target"] == 1
    # text_field_max_len applies when no data config is given.
    dm = DataManager(TrainingConfig(), HardwareConfig(), tiny_tokenizer, text_field_max_len=20)
    assert dm.build_dataset(["w" * 50]).lengths == [20]


def test_collator_pads_dynamically_with_side_and_multiple():
    feats = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    b = PaddingCollator(0, pad_to_multiple_of=4)(feats)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert b["labels"].tolist() == [[1, 2, 3, -100], [-100, 5, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    left = PaddingCollator(9, padding_side="left")(feats)
    assert left["input_ids"].tolist() == [[1, 2, 3], [9, 4, 5]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert count_real_tokens(b) == 5


def test_create_loaders_standalone(tiny_tokenizer):
    dm = DataManager(TrainingConfig(per_device_train_batch_size=4, per_device_eval_batch_size=3), HardwareConfig(),
                     tiny_tokenizer, text_field_max_len=64)
    texts = [f"example {'z' * i}" for i in range(10)]
    train_loader, val_loader = dm.create_loaders(texts, texts[:5])
    batches = list(train_loader)
    assert len(batches) == len(train_loader) == 3
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(dm.build_dataset(texts).lengths)
    assert [b["input_ids"].shape[0] for b in val_loader] == [3, 2]
    state = train_loader.batch_sampler.state_dict()
    assert state["consumed"] == 3 and state["epoch"] == 0
    assert isinstance(batches[0]["input_ids"], torch.Tensor)


def test_hub_source_goes_through_datasets(tmp_path, tiny_tokenizer):
    # A local folder is a valid `datasets.load_dataset` id, so the hub: path is exercised offline.
    folder = tmp_path / "ds"
    folder.mkdir()
    write(folder / "train.jsonl", ROWS, "jsonl")
    dm = manager(tiny_tokenizer, train_path=f"hub:{folder}", hub_train_split="train")
    train, _ = dm.load_datasets()
    assert [e["input_ids"] for e in train] == [e["input_ids"] for e in manager(tiny_tokenizer).build_dataset(ROWS)]
    with pytest.raises(DataError, match=r"hub:.*cannot load split 'nope'"):
        manager(tiny_tokenizer, train_path=f"hub:{folder}", hub_train_split="nope").load_datasets()
