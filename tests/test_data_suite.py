"""The embedded suite: deterministic, enough families, split meanings, held-out wording, its DataModule."""

from __future__ import annotations

import re

import pytest

from gist_lightning.data.records import load_records, write_records
from gist_lightning.data.suite import (
    HELD_OUT_WORDS,
    SUITE_VERSION,
    TASKS,
    EmbeddedSuite,
    all_params,
    generate_suite,
    human_records,
    training_wordings,
)
from gist_lightning.splits import SPLITS


@pytest.fixture(scope="module")
def splits():
    return generate_suite(seed=0, train_size=6000, validation_size=150)


def words(text):
    return set(re.findall(r"[A-Za-z']+", text))


def test_deterministic_for_a_seed(splits):
    again = generate_suite(seed=0, train_size=6000, validation_size=150)
    assert again == splits
    assert generate_suite(seed=1, train_size=6000, validation_size=150) != splits


def test_families_and_content_in_instruction():
    assert len(TASKS) >= 20
    assert sum(t.carries_content for t in TASKS) * 3 >= len(TASKS)
    assert all(len(t.paraphrases) >= 4 and len(t.held_out) >= 3 for t in TASKS)


def test_outputs_follow_the_task(splits):
    rec = next(r for r in splits["train"] if r["instruction"].startswith("Reverse the list"))
    assert rec["output"].split() == rec["input"].split()[::-1]
    rec = next(r for r in splits["train"] if re.fullmatch(r"Remove every \w+\.", r["instruction"]))
    x = rec["instruction"].removeprefix("Remove every ").rstrip(".")
    assert rec["output"].split() == [w for w in rec["input"].split() if w != x]


def test_split_meanings(splits):
    train_instr = {r["instruction"] for r in splits["train"]}
    train_pairs = {(r["instruction"], r["input"]) for r in splits["train"]}
    seen, unseen = splits["validation_seen"], splits["validation_unseen"]
    assert len(seen) == len(unseen) == 150
    assert all(r["instruction"] in train_instr and (r["instruction"], r["input"]) not in train_pairs
               for r in seen)
    assert len({(r["instruction"], r["input"]) for r in seen}) == len(seen)
    assert not any(r["instruction"] in train_instr for r in unseen)
    # both kinds of unseen: held-out paraphrases and held-out parameter values
    held_out_paraphrases = {h.split("{")[0] for t in TASKS for h in t.held_out}
    assert any(any(r["instruction"].startswith(p) for p in held_out_paraphrases) for r in unseen)
    # several held-out sentences per family, not one: the unseen score averages over many wordings
    bare = {h for t in TASKS for h in t.held_out if t.param is None}
    assert len({r["instruction"] for r in unseen} & bare) > 2 * sum(t.param is None for t in TASKS)
    assert any(words(r["instruction"]) & set(HELD_OUT_WORDS) for r in unseen)
    assert not any(words(r["instruction"]) & set(HELD_OUT_WORDS) for r in splits["train"])


def held_out_wordings():
    return {h.format(**p) for t in TASKS for h in t.held_out for p in all_params(t)}


def test_held_out_wording_uses_trained_words(splits):
    trained = set().union(*(words(r["instruction"]) for r in splits["train"]))
    unseen_words = set().union(*(words(r["instruction"]) for r in splits["validation_unseen"]))
    assert unseen_words - trained - set(HELD_OUT_WORDS) == set()
    # every held-out sentence, not only those this sample drew; none is a wording training can hold
    assert set().union(*map(words, held_out_wordings())) - trained == set()
    assert not held_out_wordings() & set().union(*(training_wordings(t) for t in TASKS))


def test_training_wordings_are_compositional(splits):
    copy = {r["instruction"] for r in splits["train"] if r["instruction"] in training_wordings(TASKS[0])}
    assert len(copy) >= 30  # 6 paraphrases x several frames, not 3 fixed sentences


def test_human_records(splits, load_experiment):
    human = human_records()
    assert len(human) >= 150 and len({r["instruction"] for r in human}) == len(human)
    assert all(set(r) == {"instruction", "input", "output", "source"} and r["source"] == "human"
               for r in human)
    # written by hand: no human wording is one that training can hold, nor a held-out paraphrase
    trainable = set().union(*(training_wordings(t) for t in TASKS))
    assert {r["instruction"] for r in splits["train"]} <= trainable
    assert not any(r["instruction"] in trainable for r in human)
    assert not any(r["instruction"] in held_out_wordings() for r in human)
    # the shipped outputs are those of the task functions (the file is made by
    # experiments/make_suite_assets.py)
    assert load_experiment("make_suite_assets").human_records() == human


def test_the_datamodule_generates_the_splits_once(tmp_path):
    data = EmbeddedSuite(cache_dir=str(tmp_path), train_size=50, validation_size=7, generation_seed=3)
    data.prepare_data()
    assert sorted(p.name for p in data.folder.iterdir()) == sorted(f"{s}.json" for s in SPLITS)
    want = generate_suite(3, 50, 7)
    assert load_records(data.split_path("validation_unseen")) == want["validation_unseen"]
    assert load_records(data.split_path("validation_human")) == human_records()
    stamps = {s: data.split_path(s).stat().st_mtime_ns for s in SPLITS}
    data.prepare_data()  # already there: nothing is rewritten
    assert {s: data.split_path(s).stat().st_mtime_ns for s in SPLITS} == stamps
    # a cached human split that is not the shipped one (the asset was edited since) is replaced
    write_records(data.split_path("validation_human"), human_records()[:3], overwrite=True)
    data.prepare_data()
    assert load_records(data.split_path("validation_human")) == human_records()
    assert data.split_path("train").stat().st_mtime_ns == stamps["train"]
    assert data.folder.name.startswith(f"suite-v{SUITE_VERSION}-")


# what generate_suite writes at this SUITE_VERSION; a change of the generator must come with a new
# version (so that cached splits of the old one are not read as the new one's) and a new digest
SUITE_DIGESTS = {3: "84beba2f612a228c3383feb9b58e33714b574c2d9e985e1087ab627e3938b276"}


def test_the_generator_changes_only_with_its_version():
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(generate_suite(0, 300, 50), sort_keys=True).encode()).hexdigest()
    assert SUITE_DIGESTS.get(SUITE_VERSION) == digest, (
        "generate_suite's output changed: raise SUITE_VERSION in gist_lightning/data/suite.py and record the "
        "new digest")
