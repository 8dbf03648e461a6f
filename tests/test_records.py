"""The record-reading layer (babyllama.data.records): every record at its file:line, problems
in file order as Unreadables, whole-file errors as one-line UserErrors."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA

from babyllama.data.records import (BadRecords, Reporter, Unreadable, csv_rows, id_records,
                                    item_lines, jsonl_records, load_json, reason_of, tsv_rows)
from babyllama.errors import UserError


def test_json_items_and_id_keyed_entries_are_located_by_their_lines(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"a": 1},\n\n {"a": [\n 2]}, {"a": 3}\n]', encoding="utf-8")
    assert item_lines(path, load_json(path)) == [2, 4, 5]
    keyed = tmp_path / "k.json"
    keyed.write_text(json.dumps({"11290": {"x": "甲"}, "10303": {"x": "乙"}}, indent=1,
                                ensure_ascii=False), encoding="utf-8")
    records = list(id_records(keyed, load_json(keyed)))
    assert [(r.where, r.key, r.value) for r in records] == [
        (f"{keyed}:2", "11290", {"x": "甲"}), (f"{keyed}:5", "10303", {"x": "乙"})]


def test_bad_lines_come_in_file_order_as_unreadables_with_a_reason(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{oops\n\n"\xff"\n[2]\n')
    records = list(jsonl_records(path))
    assert [r.where for r in records] == [f"{path}:{n}" for n in (1, 2, 4, 5)]
    assert records[0].value == {"a": 1} and records[3].value == [2]  # the BOM is dropped
    assert [r.value.reason for r in records[1:3]] == ["invalid JSON", "not UTF-8"]
    with pytest.raises(UserError, match=rf"^{path}:4: not UTF-8 text"):
        list(jsonl_records(path, whole=True))


def test_csv_rows_know_the_lines_they_start_and_end_on(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('q,a\n"多\n行",答\n\n问,"答"x\n', encoding="utf-8")
    rows = list(csv_rows(path))
    assert [(r.line, r.end, r.value) for r in rows[:2]] == [(1, 1, ["q", "a"]), (2, 3, ["多\n行", "答"])]
    tsv = tmp_path / "a.tsv"
    tsv.write_text('a\t"b\n\nc\td\n', encoding="utf-8")
    assert [(r.line, r.value) for r in tsv_rows(tsv)] == [(1, ["a", '"b']), (3, ["c", "d"])]


def test_reporter_raises_or_counts_by_reason():
    with pytest.raises(UserError, match="^f:1: invalid JSON: x$"):
        Reporter(False, None)("f:1", "invalid JSON: x")
    bad = BadRecords()
    report = Reporter(True, bad)
    for n in range(5):
        report(f"f:{n}", f"message {n} (assistant) is empty")
    report("f:9", "no 'text' field (fields: a, b)")
    assert bad.reasons == {"message N (assistant) is empty": 5, "no 'text' field": 1}
    assert len(bad.examples["message N (assistant) is empty"]) == BadRecords.EXAMPLES
    assert bad.report_lines()[0] == "- 5 × message N (assistant) is empty, e.g.:"
    assert reason_of("row has 3 fields, the header has 2") == "row has N fields, the header has N"
    assert isinstance(Unreadable("p", "r"), Unreadable)


@pytest.mark.skipif(not (SHARED_DATA / "sft" / "kdconv").exists(), reason="needs ../shared/data")
def test_real_kdconv_list_items_are_located_by_line():
    path = SHARED_DATA / "sft" / "kdconv" / "film" / "dev.json"
    items = load_json(path)
    lines = item_lines(path, items)
    assert len(lines) == len(items) == 150 and lines == sorted(lines) and lines[0] <= 3
    text = path.read_text(encoding="utf-8").split("\n")
    assert all(json.loads(json.dumps(items[k])) and text[lines[k] - 1].strip().startswith(("{", "["))
               for k in range(0, 150, 37))


def test_an_unclosed_csv_quote_is_an_unreadable_at_the_row_it_opens(tmp_path):
    # csv alone would read the rest of the file into one field: two documents merged silently.
    path = tmp_path / "a.csv"
    path.write_text('text\n"未闭合的引号,abc\n正常\n', encoding="utf-8")
    for whole in (False, True):
        header, row = csv_rows(path, whole)
        assert header.value == ["text"] and row.where == f"{path}:2"
        assert row.value == Unreadable("unclosed quote (the quoted field runs to the end of the "
                                       "file)", "unclosed quote")
    closed = tmp_path / "b.csv"
    closed.write_text('text\n"多\n行"\n"末行"', encoding="utf-8")
    assert [r.value for r in csv_rows(closed)] == [["text"], ["多\n行"], ["末行"]]


def test_records_of_an_id_keyed_object_on_one_line_are_located_by_their_id(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"11290": {"x": "甲"}, "10303": {"x": "乙"}}), encoding="utf-8")
    assert [r.where for r in id_records(path, load_json(path))] == [
        f"{path}:1 (id 11290)", f"{path}:1 (id 10303)"]


def test_bad_record_examples_come_from_each_file_before_more_from_the_first():
    bad = BadRecords()
    for n in range(1, 5):
        bad.add(f"d/pr.json: item {n}", f"no 'text' field; e.g. --text-field response {n}")
    bad.add("d/qa.jsonl:7", "no 'text' field; e.g. --text-field answer")
    bad.add("d/qa.jsonl:8", "no 'text' field; e.g. --text-field answer")
    bad.add("d/z.json:1 (id 10303)", "no 'text' field; e.g. --text-field output")
    assert bad.examples["no 'text' field"] == [
        "d/pr.json: item 1: no 'text' field; e.g. --text-field response 1",
        "d/qa.jsonl:7: no 'text' field; e.g. --text-field answer",
        "d/z.json:1 (id 10303): no 'text' field; e.g. --text-field output"]
    summary = bad.summary()
    assert summary.startswith("7 bad records skipped: 7 no 'text' field (first: d/pr.json: item 1")
    assert "--text-field answer" in summary and "--text-field output" in summary
    assert "\n" not in summary
    # One file: its first examples, as before.
    one = BadRecords()
    for n in range(1, 5):
        one.add(f"a.jsonl:{n}", "invalid JSON: x")
    assert one.examples["invalid JSON"] == [f"a.jsonl:{n}: invalid JSON: x" for n in (1, 2, 3)]
    assert one.summary() == "4 bad records skipped: 4 invalid JSON (first: a.jsonl:1: invalid JSON: x)"
