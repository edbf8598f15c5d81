"""Data files and formats: every format parses; malformed lines are listed with their line numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_trainer.llm.formats import RecordError, to_example
from lora_trainer.llm.records import DataFilesError, RawRecord, read_records

QA = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def examples(path: Path) -> tuple[list, list[str]]:
    read = read_records(path)
    return [to_example(record) for record in read.records], read.problems


@pytest.mark.parametrize(("row", "kind", "messages"), [
    ({"instruction": "Q?", "input": "", "output": "A."}, "alpaca", QA),
    ({"instruction": "Translate", "input": "hola", "output": "hello"}, "alpaca",
     [{"role": "user", "content": "Translate\n\nhola"}, {"role": "assistant", "content": "hello"}]),
    ({"prompt": "Q?", "response": "A."}, "prompt-response", QA),
    ({"prompt": "Q?", "completion": "A.", "system": "Be brief."}, "prompt-response",
     [{"role": "system", "content": "Be brief."}, *QA]),
    ({"messages": QA}, "chat", QA),
    ({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}, "sharegpt", QA),
])
def test_each_supervised_format_becomes_a_conversation(tmp_path, row, kind, messages):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    found, problems = examples(path)
    assert problems == []
    assert [(e.format, e.messages, e.source) for e in found] == [(kind, messages, "d.jsonl:1")]


def test_plain_text_file_is_one_document(tmp_path):
    (tmp_path / "book.txt").write_text("Chapter one.\n\nIt was a dark night.\n", encoding="utf-8")
    found, problems = examples(tmp_path / "book.txt")
    assert problems == [] and found[0].format == "text"
    assert found[0].text == "Chapter one.\n\nIt was a dark night.\n" and found[0].messages is None


def test_json_array_csv_and_json_lines_in_a_folder(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Q1", "output": "A1"},
                                                 {"prompt": "Q2", "response": "A2"}], indent=2), encoding="utf-8")
    (tmp_path / "b.csv").write_text('instruction,input,output\nQ3,,A3\n"Q4, with comma",x,"A4\nline 2"\nQ5,,A5\n',
                                    encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"text": "one object"}), encoding="utf-8")
    (tmp_path / "d.json").write_text('{"text": "json"}\n{"text": "lines"}\n', encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    found, problems = examples(tmp_path)
    assert problems == []
    assert [e.source for e in found] == ["a.json:2", "a.json:6", "b.csv:2", "b.csv:3", "b.csv:5", "c.json:1",
                                         "d.json:1", "d.json:2"]
    assert found[3].messages[0]["content"] == "Q4, with comma\n\nx"
    assert found[3].messages[1]["content"] == "A4\nline 2"


def test_malformed_lines_are_skipped_and_listed_with_line_numbers(tmp_path):
    lines = [
        json.dumps({"instruction": "Q", "output": "A"}),
        "{not json",
        "",
        json.dumps(["a", "list"]),
        json.dumps({"instruction": "Q", "output": ""}),
        json.dumps({"question": "Q", "answer": "A"}),
        json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}),
        json.dumps({"prompt": "Q", "response": 3}),
        json.dumps({"prompt": "Q", "response": "A"}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    read = read_records(path)
    good, bad = [], list(read.problems)
    for record in read.records:
        try:
            good.append(to_example(record).source)
        except RecordError as err:
            bad.append(f"{record.source}: {err}")
    assert good == ["mixed.jsonl:1", "mixed.jsonl:11"]
    assert [entry.split(": ", 1)[0] for entry in sorted(bad, key=lambda e: int(e.split(":")[1]))] == [
        f"mixed.jsonl:{n}" for n in (2, 4, 5, 6, 7, 8, 9, 10)]
    joined = "\n".join(bad)
    assert "mixed.jsonl:2: invalid JSON" in joined
    assert "mixed.jsonl:4: expected a JSON object, got list" in joined
    assert "mixed.jsonl:5: 'output' is missing or empty" in joined
    assert "mixed.jsonl:6: no known fields" in joined and "found answer, question" in joined
    assert "mixed.jsonl:7: messages[2]: unknown role 'tool'" in joined
    assert "mixed.jsonl:8: 'messages' has no assistant answer" in joined
    assert "mixed.jsonl:9: 'conversations' must start with a user turn" in joined
    assert "mixed.jsonl:10: 'response' must be text, got int" in joined


def test_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"instruction": "Q", "output": "A"},\n  {"instruction": "Q2"},\n  {"oops" 1}\n]\n',
                    encoding="utf-8")
    read = read_records(path)
    assert [r.source for r in read.records] == ["arr.json:2", "arr.json:3"]
    assert read.problems == ["arr.json:4: invalid JSON (Expecting ':' delimiter); the rest of the file is skipped"]
    with pytest.raises(RecordError, match="'output' is missing"):
        to_example(read.records[1])


def test_csv_rows_with_wrong_field_counts_and_undecodable_files(tmp_path):
    (tmp_path / "rows.csv").write_text("prompt,response\nQ1,A1\nQ2\nQ3,A3,extra\n\nQ4,A4\n", encoding="utf-8")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    read = read_records(tmp_path)
    assert [r.source for r in read.records] == ["rows.csv:2", "rows.csv:6"]
    assert read.problems[0] == "empty.txt:1: empty file"
    assert read.problems[1] == "latin1.jsonl:2: not UTF-8 text (invalid continuation byte at byte 28); file skipped"
    assert read.problems[2:] == ["rows.csv:3: 1 fields where the header has 2 columns",
                                 "rows.csv:4: 3 fields where the header has 2 columns"]


def test_missing_or_empty_data_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataFilesError, match="does not exist"):
        read_records(tmp_path / "nowhere")
    with pytest.raises(DataFilesError, match=r"no \.jsonl, \.json, \.csv, \.txt files in"):
        read_records(tmp_path)
    (tmp_path / "pic.png").write_bytes(b"x")
    with pytest.raises(DataFilesError, match="pic.png is not a"):
        read_records(tmp_path / "pic.png")


def test_sharegpt_system_turn_and_role_names():
    record = RawRecord("x:1", {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                                 {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2"},
                                                 {"from": "gpt", "value": "A2"}]})
    assert [m["role"] for m in to_example(record).messages] == ["system", "user", "assistant", "user", "assistant"]
