"""The long-context tasks: deterministic, answers that follow from the context, and needed facts
spread over the whole context (so truncation cannot solve them)."""

from __future__ import annotations

import random
import re

import pytest

from gist_lightning.data.long_recall import TASKS, fact_values, generate_long_recall, make_long_record


def _sentences(rec: dict) -> list[str]:
    return [x.strip() for x in re.findall(r"[^.]+\.", rec["instruction"])]


def _answer_from_context(rec: dict) -> str:
    """The answer worked out from the context and the question alone."""
    ctx, q = rec["instruction"], rec["input"]

    def after(key):  # codes: "the code of KEY is V." / "KEY points to V."; words: "KEY V."
        m = re.search(rf"(?:the code of |^|\. ){key}(?: is| points to)? (\w+)\.", ctx)
        return m.group(1)

    if rec["task"] == "recall":
        return after(re.match(r"What is the code of (\w+)\?", q).group(1))
    if rec["task"] == "two_hop":
        return after(after(re.match(r"What is the code of what (\w+) points to\?", q).group(1)))
    if rec["task"] == "two_hop_chain":
        place = after(re.match(r"What is the code of what (\w+) points to\?", q).group(1))
        return f"{place} {after(place)}"
    if rec["task"] == "count":
        colour = re.match(r"How many boxes of (\w+) are there\?", q).group(1)
        return str(len(re.findall(rf"the box of {colour} holds", ctx)))
    return re.search(r"answer with the word (\w+)\.", ctx).group(1)


def test_records_are_deterministic_and_answerable_from_the_context():
    recs = generate_long_recall(seed=3, size=200, context_words=(100, 200))
    assert recs == generate_long_recall(seed=3, size=200, context_words=(100, 200))
    assert recs != generate_long_recall(seed=4, size=200, context_words=(100, 200))
    assert {r["task"] for r in recs} == set(TASKS)
    for r in recs:
        assert _answer_from_context(r) == r["output"], r
        assert 100 <= len(r["instruction"].split()) <= 200 + 20


def test_the_default_vocabulary_writes_generator_version_1s_records():
    """``vocabulary`` added after version 1: its default draws exactly the records it drew before
    (committed evaluations and cached splits stay valid); the digest is of version 1's output."""
    import hashlib
    import json

    # 2000 records of every task: count's repeated box sentences included (their fact_at)
    recs = generate_long_recall(seed=0, size=2000, context_words=(30, 80))
    assert (hashlib.sha256(json.dumps(recs).encode()).hexdigest()
            == "9c8c6951fd2b757c9cb66e258d6b036e9e7c742d69c2a4f74dcfde61b2b0aa23")


def test_the_words_vocabulary_makes_one_token_keys_and_values(tmp_path):
    """``vocabulary: words``: every task answerable from its context; keys, values and two-hop places
    are one suite token each, from disjoint sets, values distinct within a record; the DataModule
    keeps its own unseen keys out of training and writes to its own folder; a bad name is refused."""
    from gist_lightning.data import LongRecall
    from gist_lightning.data.long_recall import WORD_KEYS, WORD_PLACES, WORD_VALUES, unseen_keys
    from gist_lightning.data.records import load_records
    from gist_lightning.tokens import load_tokenizer

    tok = load_tokenizer("suite")
    for w in WORD_KEYS + WORD_VALUES + WORD_PLACES:
        assert len(tok.tokenize(" " + w)) == 1, w
    assert not (set(WORD_KEYS) & set(WORD_VALUES) or set(WORD_KEYS) & set(WORD_PLACES)
                or set(WORD_VALUES) & set(WORD_PLACES))
    recs = generate_long_recall(seed=1, size=200, context_words=(40, 80), vocabulary="words")
    assert {r["task"] for r in recs} == set(TASKS)
    for r in recs:
        assert _answer_from_context(r) == r["output"], r
        facts = [f for f in _sentences(r) if len(f.split()) == 2]  # "apple tiger.", "apple river."
        if r["task"] in ("recall", "two_hop"):
            values = fact_values(r["instruction"], "words")
            assert r["output"] in WORD_VALUES and len(values) == len(set(values)) >= 1, r
            assert not re.search(r"\d", r["instruction"])
            # the value right after its key (or place): no word between them
            pairs = [re.findall(r"\w+", f) for f in facts]
            assert all(k in WORD_KEYS + WORD_PLACES and v in WORD_VALUES + WORD_PLACES for k, v in pairs), r
            assert len(facts) == 6 * (1 + (r["task"] == "two_hop")), r  # the generator's 6 facts
        # keys and values in the facts alone, as codes are (count's boxes and the buried word too)
        rest = [w for f in _sentences(r) if f not in facts
                for w in re.findall(r"\w+", re.sub(r"the box of \w+ holds", "", f))]
        assert not set(rest) & (set(WORD_KEYS) | set(WORD_VALUES)), r
    hops = [r for r in recs if r["task"] == "two_hop"]
    assert all(re.search(r"what (\w+) points", r["input"])[1] in WORD_KEYS for r in hops)

    kw = dict(train_size=60, validation_size=20, context_words=(30, 60), tasks=["recall", "two_hop"], facts=3)
    dm = LongRecall(cache_dir=str(tmp_path), vocabulary="words", **kw)
    dm.prepare_data()
    assert dm.folder.name.endswith("-words") and dm.folder != LongRecall(cache_dir=str(tmp_path), **kw).folder
    asked = lambda r: any(f"of {k}?" in r["input"] or f"what {k} " in r["input"]  # noqa: E731
                          for k in unseen_keys("words"))
    train = load_records(dm.split_path("train"))
    assert train and not any(asked(r) for r in train)
    assert all(r["output"] in WORD_VALUES for r in train)
    assert all(asked(r) for r in load_records(dm.split_path("validation_unseen")))
    with pytest.raises(ValueError, match="data.vocabulary must be one of"):
        LongRecall(cache_dir=str(tmp_path), vocabulary="emoji", **kw)


def test_restate_states_training_facts_twice_and_never_validation_ones(tmp_path):
    """``restate: 1.0``: every fact of a training context is stated twice, the copy later than the
    first; validation contexts state each once; answers still follow; a bad probability is refused."""
    from gist_lightning.data import LongRecall
    from gist_lightning.data.records import load_records

    kw = dict(train_size=80, validation_size=10, context_words=(30, 60), facts=2, vocabulary="words")
    dm = LongRecall(cache_dir=str(tmp_path), restate=1.0, **kw)
    dm.prepare_data()
    assert dm.folder.name.endswith("-restate1.0")

    def statements(r):  # the facts (words: two-word sentences) and the buried instruction
        return [f for f in _sentences(r) if len(f.split()) == 2 or "answer with the word" in f]

    def task_of(r):
        return next(t for t, q in (("two_hop", "points to"), ("recall", "code of"), ("count", "How many"),
                                   ("buried", "secret")) if q in r["input"])

    train = load_records(dm.split_path("train"))
    assert {task_of(r) for r in train} == set(TASKS)
    for r in train:  # every task answerable; count's boxes never restated (that would change it)
        facts = statements(r)
        assert all(facts.count(f) == 2 for f in facts) and (facts or task_of(r) == "count")
        assert _answer_from_context({**r, "task": task_of(r)}) == r["output"], r
    for split in ("validation_seen", "validation_unseen", "validation_human"):
        for r in load_records(dm.split_path(split)):
            facts = statements(r)
            assert len(facts) == len(set(facts)) and (facts or task_of(r) == "count"), r
    rng = random.Random(0)  # fact_at (not kept in the split files): where the needed fact is first stated
    for r in [make_long_record("recall", 40, rng, 3, "words", restate=1.0) for _ in range(50)]:
        sentences = _sentences(r)
        key = re.search(r"of (\w+)[?]", r["input"])[1]
        first = sentences.index(f"{key} {r['output']}.")
        assert r["fact_at"] == round(first / (len(sentences) - 1), 3), r
    with pytest.raises(ValueError, match="data.restate must be"):
        LongRecall(cache_dir=str(tmp_path), restate=1.5, **kw)


def test_the_needed_fact_can_be_anywhere():
    """A quarter of the records need a fact in each quarter of the context: keeping only the end of
    a context (truncation to the same cached positions as a 4x compression) loses most answers."""
    recs = generate_long_recall(seed=0, size=400)
    quarters = [sum(q / 4 <= r["fact_at"] < (q + 1) / 4 or (q == 3 and r["fact_at"] == 1) for r in recs)
                / len(recs) for q in range(4)]
    assert all(0.12 <= share <= 0.4 for share in quarters), quarters


def test_bad_lengths_and_tasks_are_refused():
    with pytest.raises(ValueError, match="context_words"):
        generate_long_recall(size=1, context_words=(300, 100))
    with pytest.raises(ValueError, match="task must be one of"):
        generate_long_recall(size=1, tasks=("summarise",))


def test_the_datamodule_writes_its_splits_and_tokenizes_contexts_in_segments(tmp_path):
    from gist_lightning.data import LongRecall
    from gist_lightning.data.long_recall import UNSEEN_KEYS
    from gist_lightning.data.records import load_records
    from gist_lightning.long_context import SegmentSettings
    from gist_lightning.masks import long_context_attention_mask
    from gist_lightning.tokens import add_gist_token, gist_token_id, load_tokenizer

    dm = LongRecall(cache_dir=str(tmp_path), train_size=40, validation_size=8, context_words=(60, 90),
                    batch_size=4, eval_batch_size=4, limits={"max_length": 400},
                    human_limits={"max_length": 700})
    dm.prepare_data()
    asked = lambda r: any(f"of {k}" in r["input"] or f"what {k} " in r["input"]  # noqa: E731
                          for k in UNSEEN_KEYS)
    train = load_records(dm.split_path("train"))
    assert len(train) == 40 and not any(asked(r) for r in train)
    assert all(asked(r) for r in load_records(dm.split_path("validation_unseen")))
    longer = load_records(dm.split_path("validation_human"))
    assert min(len(r["instruction"].split()) for r in longer) >= 120  # twice the training lengths
    tok = load_tokenizer("suite")
    add_gist_token(tok)
    settings = SegmentSettings(segment_tokens=32, gists_per_segment=4, placement="fine")
    dm.connect(tok, False, 4, "gist", context_length=1024, segments=settings)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    gist = gist_token_id(tok)
    rows = batch["input_ids"]
    gists = (rows == gist).sum(-1)
    assert (gists > 4).all() and (gists % 4 == 0).all()  # several segments per context
    # the batch's rows are what the segment rule reads: every gist count a whole number of segments
    long_context_attention_mask(rows, batch["attention_mask"], gist, 4, "gist")


def test_a_list_of_fact_counts_mixes_difficulties_in_every_split(tmp_path):
    """``facts: [1, 3]``: each record draws its count (recall: as many codes in the context); one
    count keeps the records of ``facts: n``; a bad count is refused naming the field."""
    from gist_lightning.data import LongRecall
    from gist_lightning.data.records import load_records

    def codes(r):
        return len(re.findall(r"the code of \w+ is \d+", r["instruction"]))

    kw = dict(train_size=60, validation_size=20, context_words=(30, 60), tasks=["recall"])
    mixed = LongRecall(cache_dir=str(tmp_path / "mixed"), facts=[1, 3], **kw)
    mixed.prepare_data()
    assert "facts1+3" in mixed.folder.name
    for split in ("train", "validation_seen"):
        records = load_records(mixed.split_path(split))
        assert {codes(r) for r in records} == {1, 3}
        assert all(_answer_from_context({**r, "task": "recall"}) == r["output"] for r in records)
    one = LongRecall(cache_dir=str(tmp_path / "one"), facts=3, **kw)
    one.prepare_data()
    assert {codes(r) for r in load_records(one.split_path("train"))} == {3}
    for bad in ([], [0, 2], [13]):
        with pytest.raises(ValueError, match="data.facts must be"):
            LongRecall(cache_dir=str(tmp_path), facts=bad, **kw)


def test_training_draws_a_ratio_per_batch_and_the_loss_follows_it(tmp_path):
    """segments.train_ratios (Activation Beacon style): each training batch gets one ratio of the set,
    drawn from its content (so a resumed run draws alike); its contexts keep their raw tokens with
    the gists placed again; the module's loss is the masked forward at that batch's layout."""
    import torch

    from gist_lightning.data import LongRecall
    from gist_lightning.long_context import SegmentSettings, masked_forward
    from gist_lightning.module import GistLitModule

    settings = SegmentSettings(segment_tokens=16, gists_per_segment=4, placement="fine",
                               train_ratios=(2, 4, 8))
    module = GistLitModule(model_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                         "num_hidden_layers": 2, "num_attention_heads": 4,
                                         "num_key_value_heads": 2, "max_position_embeddings": 1024},
                           num_gist_tokens=4, segments=settings)
    module.configure_model()
    dm = LongRecall(cache_dir=str(tmp_path), train_size=64, validation_size=4, context_words=(30, 50),
                    batch_size=4, eval_batch_size=4, limits={"max_length": 400},
                    human_limits={"max_length": 700})
    dm.prepare_data()
    dm.connect(**module.data_facts())
    dm.setup("fit")
    gist = module.gist_token_id
    batches = list(dm.train_dataloader())
    assert ([b["gists_per_segment"] for b in batches]
            == [b["gists_per_segment"] for b in dm.train_dataloader()])
    assert {b["gists_per_segment"] for b in batches} == {8, 4, 2}  # 16 / (2, 4, 8)
    reference = {tuple(t for t in r["prefix"] + r["gists"] + r["suffix"] + r["target"] if t != gist)
                 for r in dm.datasets["train"]}
    for b in batches:
        g = b["gists_per_segment"]
        for row, mask in zip(b["input_ids"], b["attention_mask"]):
            real = row[mask.bool()].tolist()
            assert real.count(gist) % g == 0
            assert tuple(t for t in real if t != gist) in reference  # the same tokens, only the gists moved
    batch = next(b for b in batches if b["gists_per_segment"] != settings.gists_per_segment)
    with torch.no_grad():
        loss = module._loss(batch)
        drawn = masked_forward(module.model, batch["input_ids"], batch["attention_mask"], gist,
                               settings.at_ratio(16 // batch["gists_per_segment"]),
                               labels=batch["labels"]).loss
        assert torch.equal(loss, drawn)
    # validation batches keep the model's own layout and carry no drawn ratio
    val = next(iter(dm.val_dataloader()[0]))
    assert "gists_per_segment" not in val and ((val["prefix_ids"] == gist).sum(-1) % 4 == 0).all()


@pytest.mark.parametrize("vocabulary", ["codes", "words"])
def test_hop_questions_ask_each_hop_of_the_same_contexts(tmp_path, vocabulary):
    """``hop_questions``: training two-hop records ask their first hop (the place), their second (the
    place's value) or the chain, each answerable from the context; the contexts are those drawn
    without it, and so are the validation splits (always the chain)."""
    from gist_lightning.data.long_recall import LongRecall, ask_one_hop, asks_unseen_key
    from gist_lightning.data.records import load_records

    rng = random.Random(5)
    for r in [make_long_record("two_hop", 40, rng, 2, vocabulary, restate=1.0) for _ in range(100)]:
        first, second = ask_one_hop(r, first=True), ask_one_hop(r, first=False)
        assert first["instruction"] == second["instruction"] == r["instruction"]
        key = re.fullmatch(r"What does (\w+) point to\?", first["input"])[1]
        assert key in r["input"] and first["output"] != r["output"]
        assert re.search(rf"(?:^|\. ){key}(?: points to)? {first['output']}\.", r["instruction"]), r
        assert second["input"] == f"What is the code of {first['output']}?"  # the place the first hop reaches
        assert _answer_from_context({**second, "task": "recall"}) == second["output"] == r["output"], r
    with pytest.raises(ValueError, match="not a two-hop question"):
        ask_one_hop(make_long_record("recall", 40, rng, 2, vocabulary), first=True)
    kw = dict(train_size=300, validation_size=20, context_words=(30, 40), tasks=("two_hop",), facts=2,
              vocabulary=vocabulary, batch_size=2)
    dm, without = (LongRecall(cache_dir=str(tmp_path / "a"), hop_questions=0.5, **kw),
                   LongRecall(cache_dir=str(tmp_path / "b"), **kw))
    dm.prepare_data(), without.prepare_data()
    assert "-hops0.5" in dm.folder.name and "hops" not in without.folder.name
    train, plain = load_records(dm.split_path("train")), load_records(without.split_path("train"))
    assert [r["instruction"] for r in train] == [r["instruction"] for r in plain]
    kinds = ["first" if r["input"].startswith("What does") else "chain" if "what" in r["input"] else "second"
             for r in train]
    assert all(50 <= kinds.count(k) <= 110 for k in ("first", "second")), kinds  # 75 each expected
    assert all(r == p for r, p, k in zip(train, plain, kinds) if k == "chain")
    assert not any(asks_unseen_key(r, vocabulary) for r in train)
    for split in ("validation_seen", "validation_unseen", "validation_human"):
        assert load_records(dm.split_path(split)) == load_records(without.split_path(split))
    with pytest.raises(ValueError, match="data.hop_questions must be"):
        LongRecall(cache_dir=str(tmp_path), hop_questions=2.0, **kw)
    with pytest.raises(ValueError, match="data.hop_questions 0.5 asks two-hop records' hops"):
        LongRecall(cache_dir=str(tmp_path), hop_questions=0.5, **{**kw, "tasks": ("recall",)})


@pytest.mark.parametrize("vocabulary", ["codes", "words"])
def test_two_hop_chain_answers_two_hops_contexts_with_the_chain(tmp_path, vocabulary):
    """``two_hop_chain``: for the same draws, two_hop's context and question, answered "place code",
    both worked out from the context; not a default task; a DataModule of it alone validates on keys
    never asked (validation_unseen is not empty)."""
    from gist_lightning.data.long_recall import ALL_TASKS, LongRecall, asks_unseen_key
    from gist_lightning.data.records import load_records

    assert "two_hop_chain" in ALL_TASKS and "two_hop_chain" not in TASKS
    for seed in range(50):
        hop = make_long_record("two_hop", 60, random.Random(seed), 2, vocabulary)
        chain = make_long_record("two_hop_chain", 60, random.Random(seed), 2, vocabulary)
        assert (chain["instruction"], chain["input"], chain["fact_at"]) == (
            hop["instruction"], hop["input"], hop["fact_at"])
        assert chain["output"] == _answer_from_context(chain) and chain["output"].split()[1] == hop["output"]
        assert len(set(fact_values(chain["instruction"], vocabulary))) == 2  # the chance floor's chains
    dm = LongRecall(cache_dir=str(tmp_path), train_size=20, validation_size=10, context_words=(30, 40),
                    tasks=("two_hop_chain",), facts=2, vocabulary=vocabulary, batch_size=2)
    dm.prepare_data()
    assert dm.folder.name.endswith("-two_hop_chain-facts2" + ("-words" if vocabulary == "words" else ""))
    unseen = load_records(dm.split_path("validation_unseen"))
    assert len(unseen) == 10 and all(asks_unseen_key(r, vocabulary) for r in unseen)
    for r in load_records(dm.split_path("train")):
        assert r["output"] == _answer_from_context({**r, "task": "two_hop_chain"})  # (files keep no task)
