"""Records on disk: bad files named with file, record and line; JSON and JSONL alike; atomic writes."""

from __future__ import annotations

import json

import pytest

from gist_lightning.data.records import DataFormatError, load_records, write_records


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}]',
         r"bad.json: record 1: missing field 'output'"),
        ('[{"instruction": "a", "input": "", "output": 5}]',
         r"bad.json: record 0: field 'output' must be a string"),
        ('[{"instruction": "a",\n "input": ""', r"bad.json: malformed JSON at line 2"),
        ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a"',
         r"bad.json: malformed JSON on line 2"),
        ('["just a string"]', r"bad.json: record 0: expected an object"),
    ],
)
def test_bad_split_files_name_file_and_record(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message):
        load_records(path)


def test_jsonl_and_json_load_the_same(tmp_path):
    recs = [{"instruction": "i", "input": "", "output": "o", "source": "alpaca"}] * 3
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert load_records(tmp_path / "a.json") == load_records(tmp_path / "a.jsonl") == recs


def test_write_then_load_round_trip_and_no_clobber(tmp_path):
    recs = [{"instruction": "Sagen Sie «hallo».", "input": "x", "output": "hallo", "source": "human"}]
    path = write_records(tmp_path / "r.json", recs)
    assert load_records(path) == recs
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_records(path, [])
    assert load_records(path) == recs
