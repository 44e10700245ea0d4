"""Truncation never cuts a gist token; padding keeps labels and positions consistent; packing puts
every example in exactly one row, within the row's length, with its labels and segment."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gist_lightning.data.collate import IGNORE_INDEX, GistCollator, LengthLimits, fit_to_limits, pack_rows
from gist_lightning.masks import padding_position_ids, segment_position_ids
from gist_lightning.templates import EncodedExample

G, PAD = 7, 0
tokens = st.lists(st.integers(10, 50), min_size=0, max_size=12)


@st.composite
def examples(draw):
    k = draw(st.integers(1, 3))
    exs = [EncodedExample([1] + draw(tokens), [G] * k, draw(tokens), draw(tokens) + [2])
           for _ in range(draw(st.integers(1, 4)))]
    return exs, k


@settings(max_examples=100, deadline=None)
@given(examples(), st.integers(4, 30), st.booleans())
def test_truncation_keeps_gists_and_a_target_token(batch, limit, enc_dec):
    exs, k = batch
    limits = LengthLimits(max_length=limit, max_source_length=limit, max_target_length=max(1, limit // 3))
    for ex in exs:
        fitted = fit_to_limits(ex, limits, enc_dec)
        if fitted is None:
            assert len(ex.prompt) + (0 if enc_dec else 1) > limit
            continue
        assert fitted.gists == ex.gists and fitted.prompt == ex.prompt
        assert 1 <= len(fitted.target) and fitted.target == ex.target[: len(fitted.target)]
        if enc_dec:
            assert len(fitted.target) <= limits.max_target_length
        else:
            assert len(fitted.prompt) + len(fitted.target) <= limit


@settings(max_examples=100, deadline=None)
@given(examples(), st.sampled_from(["gist", "pos_control", "neg_control"]), st.booleans())
def test_padding_labels_positions(batch, condition, enc_dec):
    exs, k = batch
    rows = [dict(prefix=e.prefix, gists=e.gists, suffix=e.suffix, target=e.target, x="x", output="y")
            for e in exs]
    b = GistCollator(PAD, G, condition, enc_dec, k, for_generation=True)(rows)
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    for i, e in enumerate(exs):
        real = ids[i][mask[i].bool()].tolist()
        if enc_dec:
            assert real == e.prompt and mask[i, : len(e.prompt)].all()  # right padding
            assert labels[i][labels[i] != IGNORE_INDEX].tolist() == e.target
        else:
            assert real == e.prompt + e.target and mask[i, -len(real):].all()  # left padding
            assert labels[i][labels[i] != IGNORE_INDEX].tolist() == e.target
            assert labels[i, -len(e.target):].tolist() == e.target  # labels line up with their tokens
            pos = padding_position_ids(mask)[i, -len(real):]
            assert pos.tolist() == list(range(len(real)))
        assert b["prefix_ids"][i][b["prefix_mask"][i].bool()].tolist() == e.prefix + e.gists
        assert b["continuation_ids"][i][b["continuation_mask"][i].bool()].tolist() == e.suffix
    assert "segment_ids" not in b  # the backends build the masks from ids and padding


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(40, 100))
def test_packing_places_every_example_once_within_capacity(lengths, capacity):
    rows = pack_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # best fit: no two rows could be merged into one (else the second would have gone into the first)
    loads = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity
    assert pack_rows(lengths, capacity) == rows  # deterministic


@settings(max_examples=100, deadline=None)
@given(st.lists(examples(), min_size=1, max_size=3))
def test_a_packed_batch_holds_each_example_as_one_segment(batches):
    k = batches[0][1]
    rows = [[dict(prefix=e.prefix, gists=[G] * k, suffix=e.suffix, target=e.target) for e in exs]
            for exs, _ in batches]
    b = GistCollator(PAD, G, "gist", False, k, packed=True)(rows)
    positions = segment_position_ids(b["segment_ids"])
    for i, row in enumerate(rows):
        for s, ex in enumerate(row, start=1):
            cols = (b["segment_ids"][i] == s).nonzero().flatten()
            prompt = ex["prefix"] + ex["gists"] + ex["suffix"]
            assert b["input_ids"][i, cols].tolist() == prompt + ex["target"]
            assert b["labels"][i, cols].tolist() == [IGNORE_INDEX] * len(prompt) + ex["target"]
            assert positions[i, cols].tolist() == list(range(len(cols)))
        pad = b["segment_ids"][i] == 0
        assert (b["attention_mask"][i] == ~pad).all() and (b["labels"][i][pad] == IGNORE_INDEX).all()


def test_packing_refuses_what_it_cannot_pack():
    import pytest

    with pytest.raises(ValueError, match="more than a packed row"):
        pack_rows([5, 50], 40)
    with pytest.raises(ValueError, match="decoder-only"):
        GistCollator(PAD, G, "gist", True, 1, packed=True)
