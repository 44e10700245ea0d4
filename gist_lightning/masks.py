"""The gist rule: every attention mask of the project, as pure tensor functions.

Positions of a row are ``[instruction | G1..Gk | input (+ output)]``; ``True`` means "may attend".

- ``gist``: tokens after the last gist token cannot see tokens before the first gist token,
  and tokens up to the last gist token cannot see anything after it.
- ``pos_control``: no extra masking (the gist tokens are present, the whole prompt is visible).
- ``neg_control``: as ``gist``, but tokens after the last gist cannot see the gist tokens either.
- A row without a gist token gets the unmodified (causal + padding) mask.

A packed decoder row holds several examples (segments, numbered from 1; 0 is padding): the rule
holds per segment, with that segment's gist span, and no token sees another segment.

The rule is written once, in :func:`_condition_rule`. Decoder-only self-attention (as a dense
mask or as a FlexAttention ``mask_mod``, one predicate :func:`_decoder_rule` evaluated either on
index grids or per block), encoder self-attention, decoder cross-attention and the choice of
what a gist cache keeps are all read off it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CONDITIONS = ("gist", "pos_control", "neg_control")


def check_condition(condition: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}; got {condition!r}")
    return condition


def gist_span(
    input_ids: torch.Tensor, gist_token_id: int, num_gist_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last gist position of each row, as (B,) long tensors.

    Rows without a gist token get ``first = last = S`` (past the end), which makes the rule
    below a no-op for them. Raises if a row holds two separate gist spans, or, when
    ``num_gist_tokens`` is given, a span of another length.
    """
    if num_gist_tokens is not None and num_gist_tokens < 1:
        raise ValueError(f"num_gist_tokens must be >= 1; got {num_gist_tokens}")
    bsz, seq_len = input_ids.shape
    if seq_len == 0:
        empty = torch.zeros(bsz, dtype=torch.long, device=input_ids.device)
        return empty, empty
    is_gist = input_ids == gist_token_id  # (B, S)
    idx = torch.arange(seq_len, device=input_ids.device).expand(bsz, seq_len)
    count = is_gist.sum(-1)
    has = count > 0
    first = torch.where(is_gist, idx, seq_len).min(-1).values
    last = torch.where(is_gist, idx, -1).max(-1).values
    split = has & (last - first + 1 != count)
    if split.any():
        rows = split.nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows} hold more than one separate span of gist tokens; "
            "the gist tokens of a row must be one contiguous span"
        )
    if num_gist_tokens is not None:
        wrong = has & (count != num_gist_tokens)
        if wrong.any():
            rows = wrong.nonzero().flatten().tolist()
            raise ValueError(
                f"rows {rows} hold {count[wrong].tolist()} gist tokens; expected "
                f"num_gist_tokens={num_gist_tokens}"
            )
    first = torch.where(has, first, seq_len)
    last = torch.where(has, last, seq_len)
    return first, last


def _context_rule(q_seg, k_seg, k_gist, after, condition: str, window: int | None = None, k_sink=None,
                  recent: int = 0) -> torch.Tensor:
    """The gist rule over context segments (all arguments broadcast; causality is the caller's).

    A prompt's context is cut into segments numbered 0..n-1, each holding raw tokens and its gist
    tokens; everything after the context (the input / question and the answer) is segment ``after``
    (= n). A query may see keys of its own segment, and the gist keys of earlier segments (for a
    context query, only of the ``window`` segments before its own when ``window`` is set).
    Layouts beside the gists (UniGist-style): ``k_sink`` marks sink keys (the prompt's first tokens),
    which every later query sees; ``recent`` > 0 lets a query see every key (raw tokens too) of the
    ``recent`` segments before its own (what follows the context: of its last ``recent`` segments).
    ``neg_control``: tokens after the context see no context at all; ``pos_control``: everything.
    With one segment (the instruction and its k gists) this is the short-instruction rule."""
    check_condition(condition)
    if condition == "pos_control":
        shape = torch.broadcast_shapes(q_seg.shape, k_seg.shape, torch.as_tensor(after).shape)
        return torch.ones(shape, dtype=torch.bool, device=q_seg.device)
    earlier = k_seg < q_seg
    visible = k_gist
    if window is not None:
        visible = visible & ((q_seg - k_seg <= window) | (q_seg == after))
    if k_sink is not None:
        visible = visible | k_sink
    if recent:
        visible = visible | (q_seg - k_seg <= recent)
    visible = earlier & visible
    if condition == "neg_control":
        visible = visible & (q_seg != after)
    return (q_seg == k_seg) | visible


def _condition_rule(
    q: torch.Tensor, k: torch.Tensor, first: torch.Tensor, last: torch.Tensor, condition: str
) -> torch.Tensor:
    """May a query at index ``q`` attend to a key at index ``k``? (broadcasting index tensors).

    ``first``/``last`` bound the gist span and broadcast against ``q`` and ``k``: the prompt is one
    context segment (the instruction and its gists, up to ``last``) followed by what comes after.
    """
    return _context_rule((q > last).long(), (k > last).long(), (k >= first) & (k <= last), 1, condition)


def segment_gist_spans(
    input_ids: torch.Tensor, segment_ids: torch.Tensor, gist_token_id: int, num_gist_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last gist column of the segment each position belongs to, as (B, S) long tensors
    (a segment without gist tokens, and padding (segment 0), get ``S``: the rule is then a no-op).
    Raises if a segment holds two separate gist spans, or a span of another length than
    ``num_gist_tokens``. Linear in S (no (S, S) intermediate)."""
    if num_gist_tokens is not None and num_gist_tokens < 1:
        raise ValueError(f"num_gist_tokens must be >= 1; got {num_gist_tokens}")
    bsz, seq_len = input_ids.shape
    segment_ids = segment_ids.long()
    n_seg = int(segment_ids.max()) + 1 if segment_ids.numel() else 1
    is_gist = (input_ids == gist_token_id) & (segment_ids > 0)
    idx = torch.arange(seq_len, device=input_ids.device).expand(bsz, seq_len)
    per_segment = lambda fill, values, how: (  # noqa: E731
        torch.full((bsz, n_seg), fill, device=input_ids.device).scatter_reduce(1, segment_ids, values, how))
    first = per_segment(seq_len, torch.where(is_gist, idx, seq_len), "amin")
    last = per_segment(-1, torch.where(is_gist, idx, -1), "amax")
    count = per_segment(0, is_gist.long(), "sum")
    has = count > 0
    split = has & (last - first + 1 != count)
    if split.any():
        where = [(r, s) for r, s in split.nonzero().tolist()]
        raise ValueError(f"(row, segment) {where} hold more than one separate span of gist tokens; "
                         "the gist tokens of an example must be one contiguous span")
    if num_gist_tokens is not None:
        wrong = has & (count != num_gist_tokens)
        if wrong.any():
            where = [(r, s) for r, s in wrong.nonzero().tolist()]
            raise ValueError(f"(row, segment) {where} hold {count[wrong].tolist()} gist tokens; expected "
                             f"num_gist_tokens={num_gist_tokens}")
    first, last = torch.where(has, first, seq_len), torch.where(has, last, seq_len)
    return first.gather(1, segment_ids), last.gather(1, segment_ids)


def segment_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 in every segment of a packed row (padding gets 0)."""
    bsz, seq_len = segment_ids.shape
    idx = torch.arange(seq_len, device=segment_ids.device).expand(bsz, seq_len)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_col = torch.where(starts, idx, 0).cummax(-1).values
    return torch.where(segment_ids > 0, idx - start_col, 0)


def _decoder_rule(b, q, k, segment_ids, first, last, condition: str) -> torch.Tensor:
    """May query column ``q`` of row ``b`` attend to key column ``k`` in decoder self-attention?
    Causal, same segment, a real key, and the condition's rule with the query's segment span.
    The arguments broadcast: index grids for a dense mask, or scalars in a FlexAttention mask_mod."""
    segment = segment_ids[b, q]
    return ((q >= k) & (segment_ids[b, k] == segment) & (segment_ids[b, k] > 0)
            & _condition_rule(q, k, first[b, q], last[b, q], condition))


# -- long contexts: many segments, each compressed into its own gist tokens ------------------------
PLACEMENTS = ("coarse", "fine")


def interleave_gists(context_ids: list[int], segment_tokens: int, gists_per_segment: int, placement: str,
                     gist_token_id: int) -> list[int]:
    """The context with its gist tokens placed: segments of ``segment_tokens`` raw tokens, each
    followed by ``gists_per_segment`` gists (``coarse``) or with one gist after every
    ``segment_tokens / gists_per_segment`` raw tokens (``fine``); a shorter last segment gets the
    gists its raw tokens reach, then the rest at its end. Every segment ends with a gist, so the
    context ends where its last gist is."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}; got {placement!r}")
    if gists_per_segment < 1 or segment_tokens < gists_per_segment:
        raise ValueError(f"segment_tokens ({segment_tokens}) must be at least gists_per_segment "
                         f"({gists_per_segment}), which must be >= 1")
    if placement == "fine" and segment_tokens % gists_per_segment:
        raise ValueError(f"fine placement puts a gist after every segment_tokens / gists_per_segment tokens: "
                         f"{segment_tokens} is not a multiple of {gists_per_segment}")
    if not context_ids:
        raise ValueError("the context is empty")
    every = segment_tokens // gists_per_segment if placement == "fine" else segment_tokens
    out = []
    for start in range(0, len(context_ids), segment_tokens):
        segment, placed = context_ids[start:start + segment_tokens], 0
        for i, token in enumerate(segment, 1):
            out.append(token)
            if i % every == 0 and placed < gists_per_segment:
                out += [gist_token_id] * (1 if placement == "fine" else gists_per_segment)
                placed += 1 if placement == "fine" else gists_per_segment
        out += [gist_token_id] * (gists_per_segment - placed)
    return out


def context_labels(
    input_ids: torch.Tensor,
    gist_token_id: int,
    gists_per_segment: int,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seg (B, S), is_gist (B, S), after (B, S)) for :func:`_context_rule`: a position's context
    segment is the number of gist tokens before it (in its packed example) // ``gists_per_segment``,
    so everything after the last gist is segment ``after`` = the example's gists // gists_per_segment.
    A row (or packed example) without gists is one segment that is also ``after``: nothing masked."""
    if gists_per_segment < 1:
        raise ValueError(f"gists_per_segment must be >= 1; got {gists_per_segment}")
    is_gist = input_ids == gist_token_id
    count = is_gist.long().cumsum(-1)
    if segment_ids is not None:  # counts restart in every packed example
        segment_ids = segment_ids.long()
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        before = torch.where(starts, count - is_gist.long(), 0).cummax(-1).values
        count = count - before
        is_gist = is_gist & (segment_ids > 0)
    exclusive = count - is_gist.long()  # gists strictly before each position
    if segment_ids is None:
        total = count[:, -1:].expand_as(count)
    else:
        n_seg = int(segment_ids.max()) + 1 if segment_ids.numel() else 1
        per = torch.zeros(count.shape[0], n_seg, dtype=count.dtype, device=count.device).scatter_reduce(
            1, segment_ids, count, "amax")
        total = per.gather(1, segment_ids)
    if (total % gists_per_segment).any():
        rows = sorted(set((total % gists_per_segment != 0).nonzero()[:, 0].tolist()))
        raise ValueError(f"a row holds a number of gist tokens that is not a multiple of gists_per_segment "
                         f"({gists_per_segment}): {rows}")
    return exclusive // gists_per_segment, is_gist, total // gists_per_segment


def index_in_example(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Each column's index among its example's real tokens: restarting per packed example
    (``segment_ids``), skipping padding (``attention_mask``), or the column itself."""
    if segment_ids is not None:
        return segment_position_ids(segment_ids.long())
    if attention_mask is not None:
        return padding_position_ids(attention_mask)
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


def compact_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, gist_token_id: int,
                         gists_per_segment: int, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of a segmented context with the earlier segments' raw tokens taken out: a token's
    position is the number of gists of the segments before its own plus its index in its own
    segment (what follows the context is one more segment). So a context of N raw tokens and what
    follows it need N x gists / segment_tokens + one segment positions, not N: a model trained
    this way (``SegmentSettings.compact_positions``) reads contexts longer than its positions."""
    seg, _, _ = context_labels(input_ids, gist_token_id, gists_per_segment, segment_ids)
    real = index_in_example(input_ids, attention_mask, segment_ids)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    if segment_ids is not None:
        starts[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
    idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    start_col = torch.where(starts, idx, 0).cummax(-1).values
    return seg * gists_per_segment + real - real.gather(1, start_col)


def _long_decoder_rule(b, q, k, segment_ids, labels: ContextLabels, condition: str, window: int | None,
                       recent: int = 0):
    """:func:`_decoder_rule` for segmented contexts: causal, same packed example, a real key, and
    :func:`_context_rule` with the key's and query's context segments."""
    same_example = (segment_ids[b, k] == segment_ids[b, q]) & (segment_ids[b, k] > 0)
    return ((q >= k) & same_example
            & _context_rule(labels.seg[b, q], labels.seg[b, k], labels.is_gist[b, k], labels.after[b, q],
                            condition, window, labels.is_sink[b, k], recent))


class ContextLabels(NamedTuple):
    """What the segment rule reads of a batch, per position (B, S): its context segment, whether it
    is a gist, whether it is a sink (one of the prompt's first ``sink_tokens`` tokens), and the
    segment number of what follows its context (``after``)."""

    seg: torch.Tensor
    is_gist: torch.Tensor
    is_sink: torch.Tensor
    after: torch.Tensor


def long_context_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, gist_token_id: int,
                        gists_per_segment: int, segment_ids: torch.Tensor | None = None,
                        sink_tokens: int = 0) -> tuple[torch.Tensor, ContextLabels]:
    """(packed example ids, :class:`ContextLabels`) of a batch: what the segment rule reads, dense
    (:func:`long_context_attention_mask`) or as a ``mask_mod`` (:func:`long_context_mask_mod`)."""
    segments = decoder_segments(input_ids, attention_mask, segment_ids)
    seg, is_gist, after = context_labels(input_ids, gist_token_id, gists_per_segment,
                                         segments if segment_ids is not None else None)
    index = index_in_example(input_ids, attention_mask, segment_ids)
    is_sink = (index < sink_tokens) & (seg == 0) & ~is_gist & (segments > 0)
    return segments, ContextLabels(seg, is_gist, is_sink, after)


def long_context_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                                gist_token_id: int, gists_per_segment: int, condition: str,
                                window: int | None = None,
                                segment_ids: torch.Tensor | None = None, sink_tokens: int = 0,
                                recent_segments: int = 0) -> torch.Tensor:
    """Decoder-only self-attention over a segmented context (:func:`interleave_gists`) and what
    follows it, as a dense (B, 1, S, S) bool mask; ``window``: context tokens see the gists of only
    the last ``window`` segments before theirs; ``sink_tokens`` / ``recent_segments``: see
    :func:`_context_rule`. Packed rows: ``segment_ids`` as for :func:`decoder_attention_mask`."""
    check_condition(condition)
    segments, labels = long_context_labels(input_ids, attention_mask, gist_token_id, gists_per_segment,
                                           segment_ids, sink_tokens)
    bsz, seq_len = input_ids.shape
    idx = torch.arange(seq_len, device=input_ids.device)
    b = torch.arange(bsz, device=input_ids.device)[:, None, None]
    return _long_decoder_rule(b, idx[None, :, None], idx[None, None, :], segments, labels, condition, window,
                              recent_segments)[:, None]


def long_context_mask_mod(segment_ids: torch.Tensor, labels: ContextLabels, condition: str,
                          window: int | None = None, positions: torch.Tensor | None = None,
                          sliding: int | None = None, recent_segments: int = 0):
    """The FlexAttention ``mask_mod`` of :func:`long_context_attention_mask` (labels from
    :func:`long_context_labels`), and of a layer's sliding window of ``sliding`` positions (by
    position id) when set. ``window`` is the segment rule's window of earlier segments' gists."""
    check_condition(condition)

    def mask_mod(b, h, q, k):
        allowed = _long_decoder_rule(b, q, k, segment_ids, labels, condition, window, recent_segments)
        if sliding is not None:
            allowed = allowed & within_window(positions[b, q], positions[b, k], sliding)
        return allowed

    return mask_mod


def within_window(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window attention by position id: the key is less than ``window`` positions behind."""
    return query_positions - key_positions < window


def decoder_mask_mod(segment_ids: torch.Tensor, first: torch.Tensor, last: torch.Tensor, condition: str,
                     positions: torch.Tensor | None = None, window: int | None = None):
    """The FlexAttention ``mask_mod`` of :func:`_decoder_rule` (and of a sliding window, by position
    id, when ``window`` is set). One code object for every call, so compiled kernels are reused."""
    check_condition(condition)

    def mask_mod(b, h, q, k):
        allowed = _decoder_rule(b, q, k, segment_ids, first, last, condition)
        if window is not None:
            allowed = allowed & within_window(positions[b, q], positions[b, k], window)
        return allowed

    return mask_mod


def condition_mask(
    input_ids: torch.Tensor, gist_token_id: int, condition: str, num_gist_tokens: int | None = None
) -> torch.Tensor:
    """The condition's rule alone, before causal and padding masks: (B, S, S) bool."""
    first, last = gist_span(input_ids, gist_token_id, num_gist_tokens)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    return _condition_rule(idx[None, :, None], idx[None, None, :], first[:, None, None], last[:, None, None],
                           condition)


def decoder_segments(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     segment_ids: torch.Tensor | None) -> torch.Tensor:
    """The segment ids of a batch: given for packed rows; else 1 on real tokens and 0 on padding."""
    if segment_ids is not None:
        return segment_ids.long()
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()


def decoder_attention_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gist_token_id: int,
    condition: str,
    num_gist_tokens: int | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoder-only self-attention: causal AND same segment AND real key AND the rule, as a dense
    (B, 1, S, S) bool mask. ``segment_ids`` (B, S) for packed rows; without it each row is one
    example and ``attention_mask`` marks padding (either side: the rule is stated in columns)."""
    check_condition(condition)
    segments = decoder_segments(input_ids, attention_mask, segment_ids)
    first, last = segment_gist_spans(input_ids, segments, gist_token_id, num_gist_tokens)
    bsz, seq_len = input_ids.shape
    idx = torch.arange(seq_len, device=input_ids.device)
    b = torch.arange(bsz, device=input_ids.device)[:, None, None]
    return _decoder_rule(b, idx[None, :, None], idx[None, None, :], segments, first, last, condition)[:, None]


def encoder_attention_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gist_token_id: int,
    condition: str,
    num_gist_tokens: int | None = None,
) -> torch.Tensor:
    """Encoder self-attention (bidirectional): key padding AND the rule, (B, 1, S, S) bool."""
    mask = condition_mask(input_ids, gist_token_id, condition, num_gist_tokens)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    return mask[:, None]


def continuation_visibility(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gist_token_id: int,
    condition: str,
    num_gist_tokens: int | None = None,
) -> torch.Tensor:
    """What a token after the gist span may see of the sequence: (B, S) bool.

    This is the decoder's cross-attention mask of an encoder-decoder model, and, applied to a
    compressed prompt, the set of positions a gist cache has to keep.
    """
    first, last = gist_span(input_ids, gist_token_id, num_gist_tokens)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    # a virtual query just after the gist span (for rows without gists, anything may be seen)
    after = torch.where(last < input_ids.shape[1], last + 1, 0)
    mask = _condition_rule(after[:, None], idx[None, :], first[:, None], last[:, None], condition)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    return mask


def cross_attention_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gist_token_id: int,
    condition: str,
    num_gist_tokens: int | None = None,
) -> torch.Tensor:
    """Decoder cross-attention of an encoder-decoder model, (B, S_enc) bool: the same for every
    decoder position (from the first gist on for ``gist``, after the last gist for ``neg_control``)."""
    return continuation_visibility(input_ids, attention_mask, gist_token_id, condition, num_gist_tokens)


def _prefix_rule(b, q, k, key_valid, n_prefix: int, causal: bool) -> torch.Tensor:
    """May new token ``q`` (0-based among the new ones) see key column ``k``, when the first
    ``n_prefix`` keys are a cached prefix? Any valid key, and (causal) no later new token. The
    prefix already went through the gist rule when it was cached."""
    allowed = key_valid[b, k]
    return allowed & (k <= n_prefix + q) if causal else allowed


def prefix_attention_mask(prefix_valid: torch.Tensor, attention_mask: torch.Tensor,
                          causal: bool = True) -> torch.Tensor:
    """Mask for new tokens that follow a cached prefix: (B, 1, T, L+T) bool, from the L cached
    positions' validity ``prefix_valid`` (B, L) and the new tokens' padding ``attention_mask`` (B, T)."""
    key_valid = torch.cat([prefix_valid.bool(), attention_mask.bool()], -1)
    bsz, new_len = attention_mask.shape
    n_prefix = prefix_valid.shape[1]
    device = attention_mask.device
    b = torch.arange(bsz, device=device)[:, None, None]
    q = torch.arange(new_len, device=device)[None, :, None]
    k = torch.arange(n_prefix + new_len, device=device)[None, None, :]
    allowed = _prefix_rule(b, q, k, key_valid, n_prefix, causal)
    return allowed.expand(bsz, new_len, n_prefix + new_len)[:, None]


def sliding_window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                        window: int) -> torch.Tensor:
    """Keys within ``window`` positions behind each query, by position id: (B, 1, T, S) bool."""
    return within_window(query_positions[:, :, None], key_positions[:, None, :], window)[:, None]


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where allowed, the dtype's minimum elsewhere).

    The float form is honoured by every attention implementation we allow (a boolean 4D mask is
    silently ignored under ``eager`` on transformers 5.x), and a fully masked padding row stays
    finite instead of turning into NaN.
    """
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def padding_position_ids(attention_mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids that skip padding: each real token's count of real tokens before it, plus
    ``offset`` (B,) or int. Padding positions get the row's first position (they are masked)."""
    mask = attention_mask.long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    offset = torch.as_tensor(offset, device=attention_mask.device)
    return pos + (offset[:, None] if offset.dim() == 1 else offset)
