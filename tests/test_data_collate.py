"""Truncation never cuts a gist token; padding keeps labels, masks and positions consistent."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gist_lightning.data.collate import IGNORE_INDEX, GistCollator, LengthLimits, fit_to_limits
from gist_lightning.masks import gist_masks, padding_position_ids
from gist_lightning.templates import EncodedExample

G, PAD = 7, 0
tokens = st.lists(st.integers(10, 50), min_size=0, max_size=12)


@st.composite
def examples(draw):
    k = draw(st.integers(1, 3))
    exs = [EncodedExample([1] + draw(tokens), [G] * k, draw(tokens), draw(tokens) + [2]) for _ in range(draw(st.integers(1, 4)))]
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
def test_padding_labels_masks_positions(batch, condition, enc_dec):
    exs, k = batch
    rows = [dict(prefix=e.prefix, gists=e.gists, suffix=e.suffix, target=e.target, x="x", output="y") for e in exs]
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
    want = gist_masks(ids, mask, G, condition, enc_dec, k)
    for name, m in want.items():
        assert torch.equal(b[name], m)
