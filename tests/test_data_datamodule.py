"""The DataModule: prepare/setup, named validation loaders, drops counted, real files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gist_lightning.data.alpaca_plus import DataFormatError
from gist_lightning.data.datamodule import GistDataModule

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_plus"


def small_suite(tmp_path, **kw):
    args = dict(cache_dir=str(tmp_path / "cache"), suite_train_size=300, suite_validation_size=20, batch_size=8,
                eval_batch_size=16)
    args.update(kw)
    return GistDataModule(**args)


def test_suite_prepare_then_setup(tmp_path):
    dm = small_suite(tmp_path, num_gist_tokens=3)
    dm.prepare_data()
    files = sorted(p.name for p in dm._suite_dir().iterdir())
    assert files == ["train.json", "validation_human.json", "validation_seen.json", "validation_unseen.json"]
    dm.setup("fit")
    assert {s: len(d) for s, d in dm.datasets.items()} == {
        "train": 300, "validation_seen": 20, "validation_unseen": 20, "validation_human": 64}
    assert dm.validation_names == ("validation_seen", "validation_unseen", "validation_human")
    batch = next(iter(dm.train_dataloader()))
    assert (batch["input_ids"] == dm.gist_token_id).sum(-1).tolist() == [3] * 8
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    vb = next(iter(loaders[2]))
    assert "y_true" in vb and vb["prefix_ids"][:, -3:].eq(dm.gist_token_id).all()
    assert dm.vocab_size == len(dm.tokenizer) and dm.tokenizer.pad_token_id != dm.tokenizer.eos_token_id


def test_examples_that_cannot_fit_are_dropped_and_counted(tmp_path):
    dm = small_suite(tmp_path, max_length=22, max_length_human=1000)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.dropped["train"] > 0 and dm.dropped["validation_human"] == 0
    assert len(dm.datasets["train"]) == 300 - dm.dropped["train"]
    for row in dm.datasets["train"]:
        assert len(row["prefix"]) + len(row["gists"]) + len(row["suffix"]) + len(row["target"]) <= 22


def test_bad_record_in_a_split_file_names_it(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    good = {"instruction": "Say hi.", "input": "", "output": "hi", "source": "alpaca"}
    for split in ("train", "validation_seen", "validation_unseen", "validation_human"):
        (folder / f"{split}.json").write_text(json.dumps([good] * 4))
    (folder / "validation_unseen.json").write_text(json.dumps([good, {"instruction": "x", "input": ""}]))
    dm = GistDataModule(data=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataFormatError, match=r"validation_unseen.json: record 1: missing field 'output'"):
        dm.setup("fit")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real Alpaca+ validation files not present at {SHARED}")
def test_real_alpaca_plus_validation_through_the_datamodule(tmp_path):
    dm = GistDataModule(data=str(SHARED), cache_dir=str(tmp_path / "cache"), num_gist_tokens=1)
    dm.setup("validate")
    sizes = {s: len(dm.datasets[s]) + dm.dropped[s] for s in dm.validation_names}
    assert sizes == {"validation_seen": 1000, "validation_unseen": 1000, "validation_human": 252}
    batch = next(iter(dm.val_dataloader()[1]))
    assert batch["instruction_tokens"].float().mean() > 5
