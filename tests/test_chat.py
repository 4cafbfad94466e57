"""Chat rows: bad input names file, line and field; formats; the response-only label mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.chat import InputError, encode, load_files, normalize_row
from pipeline.models import build_char_tokenizer

GOOD = {"prompt": "Add 2 and 3.", "response": "5"}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "hi"', "not valid JSON"),
    ('{"prompt": "hi"}', "field 'response' must be a string (missing)"),
    ('{"prompt": 3, "response": "x"}', "field 'prompt' must be a string (int)"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "field 'messages[0].role' = 'robot'; valid: ['system', 'user', 'assistant']"),
    ('{"messages": [{"role": "user", "content": 7}]}', "field 'messages[0].content' must be a string, got int"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "field 'messages' must end with an assistant turn"),
    ('{"messages": []}', "field 'messages' must be a non-empty list"),
    ('{"text": "free text"}', "a row needs field 'messages' or fields 'prompt' and 'response'"),
    ('[1, 2]', "a row must be an object"),
])
def test_bad_row_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(GOOD), "", line])
    with pytest.raises(InputError) as err:
        load_files([str(path)], "auto", "error")
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_skip_mode_counts_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(GOOD), '{"prompt": 1, "response": "x"}', "{oops"])
    rows, skipped = load_files([str(path)], "auto", "skip")
    assert len(rows) == 1 and sum(skipped.values()) == 2


def test_a_byte_order_mark_is_accepted_and_bytes_that_are_not_utf8_are_a_bad_row(tmp_path):
    bom = tmp_path / "export.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert len(load_files([str(bom)], "auto", "error")[0]) == 1
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"prompt": "café", "response": "x"}'.encode("latin-1") + b"\n")
    with pytest.raises(InputError, match=r"latin1.jsonl:2: not valid UTF-8 at byte 16$"):
        load_files([str(latin)], "auto", "error")
    rows, skipped = load_files([str(latin)], "auto", "skip")
    assert len(rows) == 1 and skipped == {"not valid UTF-8": 1}


def test_deep_nesting_is_a_bad_row_and_skip_reasons_keep_different_errors_apart(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(GOOD), "[" * 100_000 + "]" * 100_000,
                                                 '{"prompt": 1, "response": "x"}', '{"prompt": "x", "response": 2}',
                                                 '{"prompt": "x", "response": 3}', "{oops", "{also: bad"])
    with pytest.raises(InputError, match="data.jsonl:2: JSON nested too deeply"):
        load_files([str(path)], "auto", "error")
    rows, skipped = load_files([str(path)], "auto", "skip")
    assert len(rows) == 1
    assert skipped == {"JSON nested too deeply": 1, "field 'prompt' must be a string": 1,
                       "field 'response' must be a string": 2, "not valid JSON": 2}


def test_empty_file_and_missing_file_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.jsonl: the file has no rows"):
        load_files([str(empty)], "auto", "error")
    with pytest.raises(InputError, match="nope.jsonl: file not found"):
        load_files([str(tmp_path / "nope.jsonl")], "auto", "error")


def test_parquet_and_hf_dataset_folders_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [GOOD, {"prompt": "Reverse cat.", "response": "tac"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    for path in (tmp_path / "d.parquet", tmp_path / "hf"):
        loaded, skipped = load_files([str(path)], "auto", "error")
        assert [r["messages"][-1]["content"] for r in loaded] == ["5", "tac"] and not skipped


def test_normalize_strips_and_keeps_meta():
    row = normalize_row({"prompt": "  hi  ", "response": " there\n", "meta": {"family": "x"}}, "f:1")
    assert row["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]
    assert row["meta"] == {"family": "x", "source": "f:1"}


def test_labels_cover_exactly_the_assistant_turns():
    tok = build_char_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "Now 4 and 4?"},
                {"role": "assistant", "content": "8"}]
    ids, labels = encode(tok, messages)
    trained = tok.decode([i for i, label in zip(ids, labels, strict=True) if label != -100])
    assert trained == "5</s>8</s>"
    assert all(label in (-100, i) for i, label in zip(ids, labels, strict=True))
