"""Data is checked, not coerced: every bad row is a DataError naming the file, the row and the field."""

import csv
import json

import pytest

from hf_optcore.config import DataConfig, HardwareConfig, TrainingConfig
from hf_optcore.data.encoding import EncodingStats, ExampleEncoder
from hf_optcore.data_manager import DataManager
from hf_optcore.errors import DataError

GOOD = {"instruction": "Define foo", "input": "", "response": "A metasyntactic variable."}


def manager(tok, **data):
    return DataManager(TrainingConfig(per_device_train_batch_size=2), HardwareConfig(), tok,
                       data_config=DataConfig(**{"eval_split_ratio": 0.0, **data}))


def jsonl(path, rows, blank_first=False):
    path.write_text(("\n" if blank_first else "") + "".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(tok, path, **data):
    return manager(tok, train_path=str(path), **data).load_datasets()


@pytest.mark.parametrize("bad, expected", [
    ({"instruction": "q", "response": None}, "field 'response' is null; expected a string"),
    ({"instruction": "q", "response": 5}, "field 'response' must be a string, got int 5"),
    ({"instruction": ["q"], "response": "r"}, "field 'instruction' must be a string, got list ['q']"),
    ({"instruction": "q", "input": 3.5, "response": "r"}, "field 'input' must be a string, got float 3.5"),
    ({"instruction": "q"}, "field 'response' is missing"),
])
def test_instruction_rows_name_the_line_and_the_field(tmp_path, tiny_tokenizer, bad, expected):
    # A blank first line: the number is the file's own line, not the index of the example.
    path = jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD], blank_first=True)
    with pytest.raises(DataError) as info:
        load(tiny_tokenizer, path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: line 4: {expected}")
    assert "cannot detect the data format" not in msg and "None" not in msg.split(expected)[1]


def test_a_null_response_is_never_trained_on_as_the_text_none(tmp_path, tiny_tokenizer):
    path = jsonl(tmp_path / "train.jsonl", [GOOD, {"instruction": "Define bar", "response": None}])
    with pytest.raises(DataError, match=r"line 2: field 'response' is null"):
        load(tiny_tokenizer, path)
    # The encoder used alone refuses it too (it used to render str(None) == "None" as the target).
    enc = ExampleEncoder(tiny_tokenizer, 64)
    with pytest.raises(DataError, match=r"mine: field 'response' is null"):
        enc.encode({"instruction": "x", "response": None}, "instruction", "mine", EncodingStats())


def test_optional_input_may_be_absent_or_null(tmp_path, tiny_tokenizer):
    path = jsonl(tmp_path / "train.jsonl", [GOOD, {"instruction": "q", "input": None, "response": "r"},
                                            {"instruction": "q", "response": "r"}])
    train, _ = load(tiny_tokenizer, path)
    assert len(train) == 3
    with_null = train[1]["input_ids"]
    assert with_null == train[2]["input_ids"] and "None" not in tiny_tokenizer.decode(with_null)


def test_one_row_missing_a_field_is_named_not_an_undetectable_format(tmp_path, tiny_tokenizer):
    rows = [GOOD] * 5 + [{"instruction": "only a question"}] + [GOOD] * 3
    path = jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        load(tiny_tokenizer, path)
    assert str(info.value) == f"{path}: line 6: field 'response' is missing (format 'instruction')"


def test_every_bad_row_is_counted_after_the_first(tmp_path, tiny_tokenizer):
    rows = [GOOD, {"instruction": "q", "response": None}, GOOD, {"instruction": "q", "response": 1},
            {"instruction": None, "response": "r"}]
    path = jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2: field 'response' is null.*\(2 more bad rows: line 4, line 5\)"):
        load(tiny_tokenizer, path)


def test_csv_row_missing_a_cell_names_the_row_and_the_column(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "response"])
        w.writerow(["Define foo", "A name."])
        w.writerow(["Define bar"])  # a short row: csv would hand the missing cell over as None
        w.writerow(["Define baz", "Another."])
    with pytest.raises(DataError) as info:
        load(tiny_tokenizer, path)
    assert str(info.value) == (f"{path}: row 2 (line 3) has 1 cells but the header has 2 columns: "
                               f"no cell for 'response'")


def test_csv_row_with_extra_cells(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.csv"
    path.write_text("instruction,response\nq,r\nq,r,extra\n")
    with pytest.raises(DataError, match=r"row 2 \(line 3\) has 3 cells but the header has 2 columns: more cells"):
        load(tiny_tokenizer, path)


def test_parquet_null_names_the_row(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD, {"instruction": "q", "input": "", "response": None}]), path)
    with pytest.raises(DataError, match=r"train\.parquet: row 3: field 'response' is null"):
        load(tiny_tokenizer, path)


def test_json_list_names_the_item(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "fine"}, {"text": None}]))
    with pytest.raises(DataError, match=r"train\.json: item 2: field 'text' is null"):
        load(tiny_tokenizer, path)
    path.write_text(json.dumps([{"text": "fine"}, "just a string"]))
    with pytest.raises(DataError, match=r"train\.json: item 2 is a str, expected an object"):
        load(tiny_tokenizer, path)


CONV = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "hi"}, {"content": "hello"}], "field 'messages': turn 2 has no 'role'"),
    ([{"role": "user"}, {"role": "assistant", "content": "hello"}], "field 'messages': turn 1 has no 'content'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
     "field 'messages': turn 2 has a null 'content'; expected a string"),
    ([{"role": None, "content": "hi"}], "field 'messages': turn 1 has a null 'role'"),
    ([{"role": "user", "content": 7}], "field 'messages': turn 1 'content' must be a string, got int 7"),
    (["hi"], "field 'messages': turn 1 must be an object with role and content, got str 'hi'"),
    ("hi", "field 'messages' must be a list of {role, content} turns, got str 'hi'"),
    (None, "field 'messages' is null"),
    ([], "field 'messages' is an empty conversation"),
])
def test_chat_turns_are_checked(tmp_path, tiny_tokenizer, messages, expected):
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}, {"messages": messages}])
    with pytest.raises(DataError) as info:
        load(tiny_tokenizer, path)
    assert str(info.value).startswith(f"{path}: line 2: {expected}")


def test_held_out_eval_rows_keep_their_file_line(tmp_path, tiny_tokenizer):
    rows = [{"text": f"line {i}"} for i in range(9)] + [{"text": None}]
    path = jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"line 10: field 'text' is null"):
        load(tiny_tokenizer, path, eval_split_ratio=0.5)


def test_python_lists_name_the_example_index(tiny_tokenizer):
    with pytest.raises(DataError, match=r"<list>: example 1: field 'response' must be a string, got bool True"):
        manager(tiny_tokenizer).build_dataset([GOOD, {"instruction": "q", "response": True}])
