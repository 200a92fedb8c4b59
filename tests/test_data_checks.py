"""Data is checked, not coerced: every bad row is a DataError naming the file, the row and the field."""

import csv
import json
import os

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


# ---- hostile files and data that teaches nothing ------------------------------------------------------------------


@pytest.mark.timeout(120)  # a FIFO that were opened would block here for ever
def test_a_folder_or_a_fifo_is_named_as_what_it_is_never_opened(tmp_path, tiny_tokenizer):
    (tmp_path / "dir.jsonl").mkdir()
    os.mkfifo(tmp_path / "fifo.jsonl")
    for name, what in (("dir.jsonl", "a directory"), ("fifo.jsonl", "a named pipe (FIFO)")):
        with pytest.raises(DataError) as info:
            load(tiny_tokenizer, tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: is {what}, not a data file"


def test_json_nested_too_deeply_is_one_error_naming_the_file(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError) as info:
        load(tiny_tokenizer, path)
    assert str(info.value) == (f"{path}: JSON nested too deeply to read (an example is an object of strings and lists "
                               f"of turns)")


def test_every_completion_empty_is_refused_and_most_empty_is_a_warning(tmp_path, tiny_tokenizer, caplog):
    empty_chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": empty_chat}] * 4)
    with pytest.raises(DataError) as info:
        load(tiny_tokenizer, path)
    assert str(info.value) == (f"{path}: every assistant turn is empty in every example (4 of 4), so training would "
                               f"only learn to end a turn at once; fill in the responses")
    # Training on the prompts too, empty responses still teach something: allowed.
    train, _ = load(tiny_tokenizer, jsonl(tmp_path / "ins.jsonl", [{"instruction": "q", "response": ""}] * 4),
                    completion_only_loss=False)
    assert len(train) == 4
    rows = [GOOD] + [{"instruction": f"q{i}", "response": "  "} for i in range(3)]
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_optcore.data_manager"):
        train, _ = load(tiny_tokenizer, jsonl(tmp_path / "most.jsonl", rows))
    assert len(train) == 4
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'most.jsonl'}: field 'response' is empty in 3 of 4 examples; the model learns to answer those "
        f"with nothing"]


def test_a_batch_larger_than_the_data_says_what_a_batch_holds(tmp_path, tiny_tokenizer, caplog):
    dm = DataManager(TrainingConfig(per_device_train_batch_size=10**18), HardwareConfig(), tiny_tokenizer,
                     data_config=DataConfig(train_path=str(jsonl(tmp_path / "t.jsonl", [GOOD] * 3)),
                                            eval_split_ratio=0.0))
    with caplog.at_level("WARNING", logger="hf_optcore.data_manager"):
        dm.load_datasets()
    assert [r.getMessage() for r in caplog.records] == [
        "training.per_device_train_batch_size=1000000000000000000 is more than the 3 training examples: every batch "
        "holds at most 3 (each optimizer step sees the whole training set)"]


def test_a_chat_template_stopped_by_the_sandbox_or_broken_names_the_template(tiny_tokenizer, tmp_path):
    from hf_optcore.config import ModelConfig
    from hf_optcore.errors import ModelLoadError
    from hf_optcore.model_manager import ModelManager

    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    for template, expected in [
        (escape, "model.chat_template: the template tried an operation jinja's sandbox forbids (access to attribute "
                 "'__class__' of 'str' object is unsafe); it was stopped, not run. Use a template that only formats "
                 "the messages"),
        ("{% for m in messages %}{{ m.content ", "model.chat_template: not a valid Jinja template (line 1: unexpected "
                                                 "end of template, expected 'end of print statement'.)"),
    ]:
        with pytest.raises(ModelLoadError) as info:
            ModelManager(ModelConfig(name_or_path="tiny:llama", chat_template=template)).load_tokenizer()
        assert str(info.value) == expected
    # A template that misbehaves only on some content is stopped at that row, named.
    tiny_tokenizer.chat_template = ("{% for m in messages %}{% if 'x' in m.content %}{{ m.__class__.__mro__ }}"
                                    "{% endif %}{{ m.content }}{% endfor %}")
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}, {"messages": [{"role": "user", "content": "x"},
                                                                             {"role": "assistant", "content": "y"}]}])
    with pytest.raises(DataError) as info:
        load(tiny_tokenizer, path)
    assert str(info.value) == (f"{path}: line 2: the chat template (model.chat_template or the tokenizer's) tried an "
                               f"operation jinja's sandbox forbids (access to attribute '__class__' of 'dict' object "
                               f"is unsafe); it was stopped, not run")
