"""The gist rule: the spec's example, brute-force references over random rows, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gist_lightning import masks

G, PAD = 99, 0


def test_spec_example_matrix():
    ids = torch.tensor([[1, 2, 3, G, 4]])  # a b c G d
    gist = masks.condition_mask(ids, G, "gist")[0].int().tolist()
    assert gist == [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    neg = masks.condition_mask(ids, G, "neg_control")[0].int().tolist()
    assert neg[:4] == gist[:4] and neg[4] == [0, 0, 0, 0, 1]
    assert masks.condition_mask(ids, G, "pos_control").all()


def _classes(row: list[int]) -> list[str]:
    """instr / gist / post for each index, by scanning the row (independent of the library)."""
    out, seen = [], False
    for tok in row:
        if tok == G:
            out.append("gist")
            seen = True
        else:
            out.append("post" if seen else "instr")
    return out


def _reference_rule(row, condition):
    cls = _classes(row)
    n = len(row)
    if G not in row or condition == "pos_control":
        return [[True] * n for _ in range(n)]
    ref = []
    for i in range(n):
        line = []
        for j in range(n):
            if cls[i] != "post":
                line.append(cls[j] != "post")
            elif condition == "gist":
                line.append(cls[j] != "instr")
            else:
                line.append(cls[j] == "post")
        ref.append(line)
    return ref


@st.composite
def rows(draw):
    """A batch of rows [pad | instr | gists | post] or right-padded, with rows without gists."""
    bsz = draw(st.integers(1, 4))
    side = draw(st.sampled_from(["left", "right"]))
    k = draw(st.integers(1, 4))
    raw = []
    for _ in range(bsz):
        instr = draw(st.lists(st.integers(1, 9), min_size=0, max_size=5))
        post = draw(st.lists(st.integers(1, 9), min_size=0, max_size=5))
        with_gist = draw(st.booleans()) or bsz == 1
        raw.append(instr + ([G] * k if with_gist else []) + post)
    width = max(len(r) for r in raw) + draw(st.integers(0, 2))
    ids, mask = [], []
    for r in raw:
        pad = [PAD] * (width - len(r))
        ids.append(pad + r if side == "left" else r + pad)
        m = [0] * len(pad)
        mask.append(m + [1] * len(r) if side == "left" else [1] * len(r) + m)
    return torch.tensor(ids), torch.tensor(mask), k


@settings(max_examples=150, deadline=None)
@given(rows(), st.sampled_from(masks.CONDITIONS))
def test_decoder_mask_matches_brute_force(batch, condition):
    ids, pad, _ = batch
    got = masks.decoder_attention_mask(ids, pad, G, condition)
    assert got.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1])
    for b in range(ids.shape[0]):
        rule = _reference_rule(ids[b].tolist(), condition)
        for i in range(ids.shape[1]):
            for j in range(ids.shape[1]):
                # padding sees nothing and is seen by nothing
                want = j <= i and bool(pad[b, i]) and bool(pad[b, j]) and rule[i][j]
                assert bool(got[b, 0, i, j]) == want, (b, i, j)


@settings(max_examples=150, deadline=None)
@given(rows(), st.sampled_from(masks.CONDITIONS))
def test_encoder_and_cross_masks_match_brute_force(batch, condition):
    ids, pad, _ = batch
    enc = masks.encoder_attention_mask(ids, pad, G, condition)
    cross = masks.cross_attention_mask(ids, pad, G, condition)
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        rule = _reference_rule(row, condition)
        cls = _classes(row)
        for i in range(len(row)):
            for j in range(len(row)):
                assert bool(enc[b, 0, i, j]) == (bool(pad[b, j]) and rule[i][j])
        for j in range(len(row)):
            if G not in row or condition == "pos_control":
                want = True
            elif condition == "gist":
                want = cls[j] != "instr"
            else:
                want = cls[j] == "post"
            assert bool(cross[b, j]) == (want and bool(pad[b, j]))


@settings(max_examples=50, deadline=None)
@given(rows(), st.sampled_from(masks.CONDITIONS))
def test_rows_without_gist_get_the_plain_mask(batch, condition):
    ids, pad, _ = batch
    ids = torch.where(ids == G, 5, ids)
    plain = (torch.tril(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool)) & pad.bool()[:, None, :]
             & pad.bool()[:, :, None])
    assert torch.equal(masks.decoder_attention_mask(ids, pad, G, condition)[:, 0], plain)


def test_two_gist_spans_is_an_error():
    with pytest.raises(ValueError, match="more than one separate span"):
        masks.decoder_attention_mask(torch.tensor([[1, G, 2, G, 3]]), None, G, "gist")


def test_wrong_k_and_k_below_one_are_errors():
    ids = torch.tensor([[1, G, G, 3]])
    with pytest.raises(ValueError, match="expected num_gist_tokens=1"):
        masks.decoder_attention_mask(ids, None, G, "gist", num_gist_tokens=1)
    with pytest.raises(ValueError, match=">= 1"):
        masks.decoder_attention_mask(ids, None, G, "gist", num_gist_tokens=0)
    with pytest.raises(ValueError, match="condition must be one of"):
        masks.decoder_attention_mask(ids, None, G, "gisst")


def test_additive_form_and_positions():
    allowed = torch.tensor([[True, False]])
    add = masks.to_additive(allowed, torch.float32)
    assert add[0, 0] == 0 and add[0, 1] == torch.finfo(torch.float32).min
    pos = masks.padding_position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]), torch.tensor([3, 0]))
    assert pos[0, 2:].tolist() == [3, 4, 5] and pos[1, :3].tolist() == [0, 1, 2]


@st.composite
def packed_rows(draw):
    """Examples [instr | gists | post] (some without gists) packed into rows, with segment ids
    (1, 2, ... per row; 0 for the padding at the end)."""
    k = draw(st.integers(1, 3))
    rows_, segs = [], []
    for _ in range(draw(st.integers(1, 3))):
        row, seg = [], []
        for s in range(1, draw(st.integers(1, 4)) + 1):
            instr = draw(st.lists(st.integers(1, 9), min_size=0, max_size=4))
            post = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
            ex = instr + ([G] * k if draw(st.booleans()) else []) + post
            row += ex
            seg += [s] * len(ex)
        rows_.append(row)
        segs.append(seg)
    width = max(len(r) for r in rows_) + draw(st.integers(0, 2))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows_])
    seg = torch.tensor([s + [0] * (width - len(s)) for s in segs])
    return ids, seg, k


@settings(max_examples=150, deadline=None)
@given(packed_rows(), st.sampled_from(masks.CONDITIONS))
def test_a_packed_row_is_its_examples_masks_on_the_diagonal(batch, condition):
    """Each example of a packed row sees exactly what it would see alone, and nothing of the others;
    positions restart at 0 in every example."""
    ids, seg, k = batch
    got = masks.decoder_attention_mask(ids, None, G, condition, num_gist_tokens=None, segment_ids=seg)[:, 0]
    positions = masks.segment_position_ids(seg)
    for b in range(ids.shape[0]):
        want = torch.zeros_like(got[b])
        for s in seg[b].unique().tolist():
            if s == 0:
                continue
            cols = (seg[b] == s).nonzero().flatten()
            alone = masks.decoder_attention_mask(ids[b, cols][None], None, G, condition)[0, 0]
            want[cols[:, None], cols[None, :]] = alone
            assert positions[b, cols].tolist() == list(range(len(cols)))
        assert torch.equal(got[b], want)


@settings(max_examples=60, deadline=None)
@given(packed_rows(), st.sampled_from(masks.CONDITIONS))
def test_the_flex_mask_mod_is_the_dense_rule(batch, condition):
    """The FlexAttention mask_mod evaluated per (query, key) pair gives the dense mask, with and
    without a sliding window."""
    ids, seg, k = batch
    first, last = masks.segment_gist_spans(ids, seg, G)
    positions = masks.segment_position_ids(seg)
    dense = masks.decoder_attention_mask(ids, None, G, condition, segment_ids=seg)[:, 0]
    for window in (None, 2):
        mod = masks.decoder_mask_mod(seg, first, last, condition, positions, window)
        if window is None:
            want = dense
        else:
            want = dense & masks.sliding_window_mask(positions, positions, window)[:, 0]
        for b in range(ids.shape[0]):
            for q in range(ids.shape[1]):
                for kv in range(ids.shape[1]):
                    got = mod(torch.tensor(b), torch.tensor(0), torch.tensor(q), torch.tensor(kv))
                    assert bool(got) == bool(want[b, q, kv]), (b, q, kv, window)


def test_an_example_with_two_gist_spans_in_a_packed_row_is_named():
    ids = torch.tensor([[1, G, 2, 3, G, 4, G, 5]])
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2]])
    with pytest.raises(ValueError, match=r"\(row, segment\) \[\(0, 2\)\]"):
        masks.decoder_attention_mask(ids, None, G, "gist", segment_ids=seg)


# -- long contexts: segments of raw tokens, each compressed into its own gists ----------------------
def _short_instruction_rule(q, k, first, last, condition):
    """The short-instruction rule as it was written before segments (the oracle for one segment)."""
    if condition == "pos_control":
        return torch.ones(torch.broadcast_shapes(q.shape, k.shape, first.shape), dtype=torch.bool)
    up_to_gist = q <= last
    cutoff = first if condition == "gist" else last + 1
    return (up_to_gist & (k <= last)) | (~up_to_gist & (k >= cutoff))


@settings(max_examples=150, deadline=None)
@given(rows(), st.sampled_from(masks.CONDITIONS))
def test_one_segment_is_the_short_instruction_rule(batch, condition):
    """With the instruction as the only segment (coarse: its k gists at its end), the segment rule
    is exactly the rule it generalises: as a condition mask, and as the whole decoder mask."""
    ids, attn, k = batch
    first, last = masks.gist_span(ids, G, k)
    idx = torch.arange(ids.shape[1])
    want = _short_instruction_rule(idx[None, :, None], idx[None, None, :], first[:, None, None],
                                   last[:, None, None], condition)
    assert torch.equal(masks.condition_mask(ids, G, condition, k), want)
    assert torch.equal(masks.long_context_attention_mask(ids, attn, G, k, condition),
                       masks.decoder_attention_mask(ids, attn, G, condition, k))


def test_gist_placement_coarse_and_fine():
    ctx = list(range(1, 8))  # 7 raw tokens, segments of 4: the last segment is short
    assert masks.interleave_gists(ctx, 4, 2, "coarse", G) == [1, 2, 3, 4, G, G, 5, 6, 7, G, G]
    assert masks.interleave_gists(ctx, 4, 2, "fine", G) == [1, 2, G, 3, 4, G, 5, 6, G, 7, G]
    for bad, match in [((4, 0, "coarse"), ">= 1"), ((2, 3, "coarse"), "at least"),
                       ((6, 4, "fine"), "multiple"), ((4, 2, "middle"), "placement")]:
        with pytest.raises(ValueError, match=match):
            masks.interleave_gists(ctx, *bad, G)


@st.composite
def segmented_rows(draw):
    """Rows of [specials | segmented context with gists | question], with what each position is by
    construction: (segment, is_gist, is_raw_context) for the reference below."""
    t = draw(st.integers(1, 2))
    L = t * draw(st.integers(1, 3))
    placement = draw(st.sampled_from(masks.PLACEMENTS))
    rows_, labels = [], []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 3 * L))
        layout = masks.interleave_gists(list(range(1, n + 1)), L, t, placement, G)
        seg, gists, lab = 0, 0, []
        for token in layout:
            lab.append((seg, token == G))
            if token == G:
                gists += 1
                seg += gists % t == 0
        question = draw(st.integers(1, 3))
        rows_.append(layout + [50] * question)
        labels.append(lab + [(seg, False)] * question)  # seg is now the number of segments: "after"
    width = max(len(r) for r in rows_) + draw(st.integers(0, 2))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows_])  # left padding
    attn = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows_])[:, None]).long()
    labels = [[None] * (width - len(lab)) + lab for lab in labels]
    return ids, attn, t, labels, draw(st.sampled_from([None, 1, 2])), draw(st.integers(0, 3)), \
        draw(st.integers(0, 2))


@settings(max_examples=200, deadline=None)
@given(segmented_rows(), st.sampled_from(masks.CONDITIONS))
def test_the_segment_rule_matches_its_definition(batch, condition):
    """Brute force from the definition in words: causal, real keys; a context token sees its own
    segment and the gists of earlier segments (the last ``window`` of them when set); a token after
    the context sees every context gist (none under neg_control, everything under pos_control).
    Layouts: the row's first ``sink`` tokens (raw, first segment) are seen by every later token, and
    every token of the ``recent`` segments before a token's own (raw ones too)."""
    ids, attn, t, labels, window, sink, recent = batch
    got = masks.long_context_attention_mask(ids, attn, G, t, condition, window, sink_tokens=sink,
                                            recent_segments=recent)[:, 0]
    for b, lab in enumerate(labels):
        after = next(s for s, g in reversed([x for x in lab if x]) if not g)  # the question's label
        first = next(i for i, x in enumerate(lab) if x)  # the row's first real column
        for q in range(ids.shape[1]):
            for k in range(ids.shape[1]):
                if lab[q] is None or lab[k] is None or k > q:
                    want = False
                elif condition == "pos_control":
                    want = True
                else:
                    (qs, _), (ks, kg) = lab[q], lab[k]
                    is_sink = k - first < sink and ks == 0 and not kg
                    earlier = ks < qs and ((kg and (window is None or qs == after or qs - ks <= window))
                                           or is_sink or qs - ks <= recent)
                    if condition == "neg_control" and qs == after:
                        earlier = False
                    want = qs == ks or earlier
                assert bool(got[b, q, k]) == want, (b, q, k, lab[q], lab[k], window, sink, recent)


@settings(max_examples=40, deadline=None)
@given(segmented_rows(), st.sampled_from(masks.CONDITIONS))
def test_the_segment_mask_mod_and_packed_rows_are_the_dense_rule(batch, condition):
    """Packed: the examples of a row side by side see exactly their masks alone; the FlexAttention
    mask_mod evaluated per pair gives the dense mask."""
    ids, attn, t, _, window, sink, recent = batch
    layout = {"sink_tokens": sink, "recent_segments": recent}
    rows_ = [ids[b][attn[b].bool()].tolist() for b in range(ids.shape[0])]
    packed = torch.tensor([sum(rows_, [])])
    seg = torch.tensor([[i + 1 for i, r in enumerate(rows_) for _ in r]])
    dense = masks.long_context_attention_mask(packed, None, G, t, condition, window, segment_ids=seg,
                                              **layout)[0, 0]
    start = 0
    for r in rows_:
        alone = masks.long_context_attention_mask(torch.tensor([r]), None, G, t, condition, window,
                                                  **layout)[0, 0]
        block = dense[start:start + len(r)]
        assert torch.equal(block[:, start:start + len(r)], alone)
        assert not block[:, :start].any() and not block[:, start + len(r):].any()
        start += len(r)
    segments, labels = masks.long_context_labels(packed, None, G, t, seg, sink)
    mod = masks.long_context_mask_mod(segments, labels, condition, window, recent_segments=recent)
    for q in range(packed.shape[1]):
        for kv in range(packed.shape[1]):
            allowed = mod(torch.tensor(0), torch.tensor(0), torch.tensor(q), torch.tensor(kv))
            assert bool(allowed) == bool(dense[q, kv])


def test_a_gist_count_that_is_not_whole_segments_is_refused():
    with pytest.raises(ValueError, match="not a multiple of gists_per_segment"):
        masks.long_context_attention_mask(torch.tensor([[1, G, 2, G, 3, G, 4]]), None, G, 2, "gist")
