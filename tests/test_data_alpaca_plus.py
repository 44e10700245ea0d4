"""Alpaca+: builder invariants on raw fixture files, the DataModule over a folder of split files,
the real validation files when present, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gist_lightning.data import AlpacaPlus
from gist_lightning.data.alpaca_plus import build_alpaca_plus, split_file
from gist_lightning.data.records import DataFormatError, load_records
from gist_lightning.module import GistLitModule
from gist_lightning.splits import SPLITS, VALIDATION_SPLITS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_plus"


def write_raw(tmp_path: Path):
    """Small raw sources with the real files' shapes (Alpaca JSON list, Self-Instruct JSONL)."""
    alpaca = [{"instruction": f"alpaca task {i % 40}", "input": f"in {i}" if i % 3 else "",
               "output": f"out {i}"}
              for i in range(120)]
    alpaca.append(dict(alpaca[1]))  # a duplicate pair
    si = []
    for t in range(30):
        for j in range(1 + t % 4):  # instructions with 1..4 instances
            si.append({"instruction": f"si task {t}", "input": f"x{j}" if (t + j) % 5 else "",
                       "output": f"y{j}"})
    # also an Alpaca instruction
    si.append({"instruction": "alpaca task 7", "input": "shared", "output": "z"})
    human = [{"id": f"u{i}", "instruction": f"human task {i}",
              "instances": [{"input": f"h{i}.{j}", "output": f"o{i}.{j}"} for j in range(1 + i % 2)]}
             for i in range(6)]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(alpaca))
    (tmp_path / "all_instances_82K.jsonl").write_text("\n".join(json.dumps(r) for r in si))
    (tmp_path / "user_oriented_instructions.jsonl").write_text("\n".join(json.dumps(r) for r in human))
    return [tmp_path / n
            for n in ("alpaca_data.json", "all_instances_82K.jsonl", "user_oriented_instructions.jsonl")]


def test_builder_invariants(tmp_path):
    raw = write_raw(tmp_path)
    out = tmp_path / "out"
    sizes = build_alpaca_plus(*raw, out, seen_size=8, unseen_size=10, seed=1)
    splits = {s: load_records(split_file(out, s)) for s in sizes}
    train, seen, unseen, human = (splits[s] for s in ("train", "validation_seen", "validation_unseen",
                                                      "validation_human"))
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
    with pytest.raises(DataFormatError,
                       match=r"all_instances_82K.jsonl: record \d+ \(line \d+\): field 'input' must be a "
                             r"string"):
        build_alpaca_plus(*raw, out, seen_size=2, unseen_size=2, overwrite=True)
    assert (out / "alpaca_plus_train.json").read_bytes() == before


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real Alpaca+ validation files not present at {SHARED}")
def test_real_validation_files():
    sizes = {s: len(load_records(split_file(SHARED, s)))
             for s in ("validation_seen", "validation_unseen", "validation_human")}
    assert sizes == {"validation_seen": 1000, "validation_unseen": 1000, "validation_human": 252}
    unseen = load_records(split_file(SHARED, "validation_unseen"))
    assert all(r["source"] in ("alpaca", "self_instruct") for r in unseen)


def _connected(folder, tmp_path, tiny_models):
    data = AlpacaPlus(folder=str(folder), cache_dir=str(tmp_path / "cache"))
    data.connect(**GistLitModule(model_config=tiny_models["llama"]).data_facts())
    return data


def test_a_bad_record_in_a_split_file_names_it(tmp_path, tiny_models):
    folder = tmp_path / "data"
    folder.mkdir()
    good = {"instruction": "Say hi.", "input": "", "output": "hi", "source": "alpaca"}
    for split in SPLITS:
        (folder / f"{split}.json").write_text(json.dumps([good] * 4))
    (folder / "validation_unseen.json").write_text(json.dumps([good, {"instruction": "x", "input": ""}]))
    data = _connected(folder, tmp_path, tiny_models)
    with pytest.raises(DataFormatError, match=r"validation_unseen.json: record 1: missing field 'output'"):
        data.setup("fit")


def test_a_missing_split_file_is_named(tmp_path, tiny_models):
    data = _connected(tmp_path, tmp_path, tiny_models)
    with pytest.raises(FileNotFoundError, match="no file for split 'train'"):
        data.setup("fit")


def test_built_splits_through_the_datamodule(tmp_path, tiny_models):
    build_alpaca_plus(*write_raw(tmp_path), tmp_path / "out", seen_size=4, unseen_size=5)
    data = _connected(tmp_path / "out", tmp_path, tiny_models)
    data.setup("fit")
    assert {s: len(data.datasets[s]) for s in VALIDATION_SPLITS} == {
        "validation_seen": 4, "validation_unseen": 5, "validation_human": 9}
    assert next(iter(data.train_dataloader()))["input_ids"].shape[0] == min(32, len(data.datasets["train"]))


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real Alpaca+ validation files not present at {SHARED}")
def test_real_alpaca_plus_validation_through_the_datamodule(tmp_path, tiny_models):
    data = _connected(SHARED, tmp_path, tiny_models)
    data.setup("validate")
    sizes = {s: len(data.datasets[s]) + data.dropped[s] for s in data.validation_names}
    assert sizes == {"validation_seen": 1000, "validation_unseen": 1000, "validation_human": 252}
    batch = next(iter(data.val_dataloader()[1]))
    assert batch["instruction_tokens"].float().mean() > 5
