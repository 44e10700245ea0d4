"""Alpaca+ builder invariants on raw fixture files, the real validation files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gist_lightning.data.alpaca_plus import DataFormatError, build_alpaca_plus, load_records, split_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_plus"


def write_raw(tmp_path: Path):
    """Small raw sources with the real files' shapes (Alpaca JSON list, Self-Instruct JSONL)."""
    alpaca = [{"instruction": f"alpaca task {i % 40}", "input": f"in {i}" if i % 3 else "", "output": f"out {i}"}
              for i in range(120)]
    alpaca.append(dict(alpaca[1]))  # a duplicate pair
    si = []
    for t in range(30):
        for j in range(1 + t % 4):  # instructions with 1..4 instances
            si.append({"instruction": f"si task {t}", "input": f"x{j}" if (t + j) % 5 else "", "output": f"y{j}"})
    si.append({"instruction": "alpaca task 7", "input": "shared", "output": "z"})  # also an Alpaca instruction
    human = [{"id": f"u{i}", "instruction": f"human task {i}",
              "instances": [{"input": f"h{i}.{j}", "output": f"o{i}.{j}"} for j in range(1 + i % 2)]} for i in range(6)]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(alpaca))
    (tmp_path / "all_instances_82K.jsonl").write_text("\n".join(json.dumps(r) for r in si))
    (tmp_path / "user_oriented_instructions.jsonl").write_text("\n".join(json.dumps(r) for r in human))
    return [tmp_path / n for n in ("alpaca_data.json", "all_instances_82K.jsonl", "user_oriented_instructions.jsonl")]


def test_builder_invariants(tmp_path):
    raw = write_raw(tmp_path)
    out = tmp_path / "out"
    sizes = build_alpaca_plus(*raw, out, seen_size=8, unseen_size=10, seed=1)
    splits = {s: load_records(split_file(out, s)) for s in sizes}
    train, seen, unseen, human = (splits[s] for s in ("train", "validation_seen", "validation_unseen", "validation_human"))
    assert (len(seen), len(unseen), len(human)) == (8, 10, 9)
    train_pairs = [(r["instruction"], r["input"]) for r in train]
    train_instr = {r["instruction"] for r in train}
    assert len(train_pairs) == len(set(train_pairs)), "duplicates in train"
    for r in seen:
        assert r["source"] == "self_instruct" and r["input"]
        assert (r["instruction"], r["input"]) not in set(train_pairs)
        assert r["instruction"] in train_instr  # seen: same instruction, new input
    for r in unseen:
        assert r["source"] == "alpaca" and r["input"] and r["instruction"] not in train_instr
    assert len({r["instruction"] for r in unseen}) == len(unseen)
    assert all(r["input"].startswith("h") for r in human)
    # everything not held out is in train
    assert sizes["train"] == len(train) > 100


def test_builder_refuses_to_overwrite_and_names_bad_records(tmp_path):
    raw = write_raw(tmp_path)
    out = tmp_path / "out"
    build_alpaca_plus(*raw, out, seen_size=2, unseen_size=2)
    before = (out / "alpaca_plus_train.json").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build_alpaca_plus(*raw, out, seen_size=2, unseen_size=2)
    raw[1].write_text(raw[1].read_text() + '\n{"instruction": "a", "input": 3, "output": "b"}')
    with pytest.raises(DataFormatError, match=r"all_instances_82K.jsonl: record \d+ \(line \d+\): field 'input' must be a string"):
        build_alpaca_plus(*raw, out, seen_size=2, unseen_size=2, overwrite=True)
    assert (out / "alpaca_plus_train.json").read_bytes() == before


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}]',
         r"bad.json: record 1: missing field 'output'"),
        ('[{"instruction": "a", "input": "", "output": 5}]', r"bad.json: record 0: field 'output' must be a string"),
        ('[{"instruction": "a",\n "input": ""', r"bad.json: malformed JSON at line 2"),
        ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a"', r"bad.json: malformed JSON on line 2"),
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


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real Alpaca+ validation files not present at {SHARED}")
def test_real_validation_files():
    sizes = {s: len(load_records(split_file(SHARED, s))) for s in ("validation_seen", "validation_unseen", "validation_human")}
    assert sizes == {"validation_seen": 1000, "validation_unseen": 1000, "validation_human": 252}
    unseen = load_records(split_file(SHARED, "validation_unseen"))
    assert all(r["source"] in ("alpaca", "self_instruct") for r in unseen)
