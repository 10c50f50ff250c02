"""Reading back JSONL outputs that a rerun resumes from."""

import json

import pytest

from caftkit.files.resumable_jsonl import read_complete_records

# Characters that str.splitlines() treats as line ends but JSON leaves unescaped with ensure_ascii=False.
UNICODE_LINE_BREAKS = "\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c"


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + tail, encoding="utf-8")


def test_unicode_line_separators_inside_strings_stay_in_their_record(tmp_path):
    path = tmp_path / "out.jsonl"
    records = [{"id": str(i), "text": f"a{UNICODE_LINE_BREAKS}b{i}"} for i in range(3)]
    _write(path, records)
    assert read_complete_records(path, ("id", "text"), "a record") == records


def test_half_written_last_line_is_cut_from_the_file(tmp_path):
    path = tmp_path / "out.jsonl"
    records = [{"id": "0", "text": "x\u2028y"}]
    _write(path, records, tail='{"id": "1", "te')
    assert read_complete_records(path, ("id",), "a record") == records
    assert path.read_text(encoding="utf-8") == json.dumps(records[0], ensure_ascii=False) + "\n"


def test_bad_line_is_named_by_its_line_number(tmp_path):
    path = tmp_path / "out.jsonl"
    _write(path, [{"id": "0", "text": "x\u2028y\x85z"}, {"text": "no id"}])
    with pytest.raises(ValueError, match=r"out\.jsonl:2: not a record"):
        read_complete_records(path, ("id",), "a record")


def test_missing_file_has_no_records(tmp_path):
    assert read_complete_records(tmp_path / "absent.jsonl", ("id",), "a record") == []
