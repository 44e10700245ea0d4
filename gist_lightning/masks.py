"""The gist rule: every attention mask of the project, as pure tensor functions.

Positions of a row are ``[instruction | G1..Gk | input (+ output)]``; ``True`` means "may attend".

- ``gist``: tokens after the last gist token cannot see tokens before the first gist token,
  and tokens up to the last gist token cannot see anything after it.
- ``pos_control``: no extra masking (the gist tokens are present, the whole prompt is visible).
- ``neg_control``: as ``gist``, but tokens after the last gist cannot see the gist tokens either.
- A row without a gist token gets the unmodified (causal + padding) mask.

The rule is written once, in :func:`_condition_rule`. Decoder-only self-attention, encoder
self-attention, decoder cross-attention and the choice of what a gist cache keeps are all
read off it.
"""

from __future__ import annotations

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
                f"rows {rows} hold {count[wrong].tolist()} gist tokens; expected num_gist_tokens={num_gist_tokens}"
            )
    first = torch.where(has, first, seq_len)
    last = torch.where(has, last, seq_len)
    return first, last


def _condition_rule(
    q: torch.Tensor, k: torch.Tensor, first: torch.Tensor, last: torch.Tensor, condition: str
) -> torch.Tensor:
    """May a query at index ``q`` attend to a key at index ``k``? (broadcasting index tensors).

    ``first``/``last`` bound the gist span and broadcast against ``q`` and ``k``.
    """
    check_condition(condition)
    if condition == "pos_control":
        return torch.ones(torch.broadcast_shapes(q.shape, k.shape, first.shape), dtype=torch.bool, device=q.device)
    up_to_gist = q <= last
    # instruction and gist tokens never see what comes after the gist span
    allowed_before = up_to_gist & (k <= last)
    # later tokens lose the instruction (gist) or the whole prefix (neg_control)
    cutoff = first if condition == "gist" else last + 1
    allowed_after = ~up_to_gist & (k >= cutoff)
    return allowed_before | allowed_after


def condition_mask(
    input_ids: torch.Tensor, gist_token_id: int, condition: str, num_gist_tokens: int | None = None
) -> torch.Tensor:
    """The condition's rule alone, before causal and padding masks: (B, S, S) bool."""
    first, last = gist_span(input_ids, gist_token_id, num_gist_tokens)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    return _condition_rule(idx[None, :, None], idx[None, None, :], first[:, None, None], last[:, None, None], condition)


def decoder_attention_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gist_token_id: int,
    condition: str,
    num_gist_tokens: int | None = None,
) -> torch.Tensor:
    """Decoder-only self-attention: causal AND key padding AND the rule, (B, 1, S, S) bool.

    Works for left or right padding (the rule is stated in column indices).
    """
    bsz, seq_len = input_ids.shape
    idx = torch.arange(seq_len, device=input_ids.device)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, S, S)
    mask = causal & condition_mask(input_ids, gist_token_id, condition, num_gist_tokens)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    return mask[:, None]


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


def gist_masks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gist_token_id: int,
    condition: str,
    encoder_decoder: bool,
    num_gist_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """All boolean masks of a training batch: ``{"self_mask"}`` for decoder-only models,
    ``{"encoder_mask", "cross_mask"}`` for encoder-decoders."""
    args = (input_ids, attention_mask, gist_token_id, condition, num_gist_tokens)
    if encoder_decoder:
        return {"encoder_mask": encoder_attention_mask(*args), "cross_mask": cross_attention_mask(*args)}
    return {"self_mask": decoder_attention_mask(*args)}


def prefix_attention_mask(prefix_valid: torch.Tensor, attention_mask: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Mask for new tokens that follow a cached prefix: (B, 1, T, L+T) bool.

    The prefix (L cached positions, ``prefix_valid`` (B, L)) already went through the rule when
    it was cached, so new tokens may see every valid prefix entry, plus the new tokens allowed by
    padding (``attention_mask`` (B, T)) and, for decoders, causality.
    """
    bsz, new_len = attention_mask.shape
    new_keys = attention_mask.bool()[:, None, :].expand(bsz, new_len, new_len)
    if causal:
        idx = torch.arange(new_len, device=attention_mask.device)
        new_keys = new_keys & (idx[:, None] >= idx[None, :])
    old_keys = prefix_valid.bool()[:, None, :].expand(bsz, new_len, prefix_valid.shape[1])
    return torch.cat([old_keys, new_keys], dim=-1)[:, None]


def sliding_window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Keys within ``window`` positions behind each query, by position id: (B, 1, T, S) bool."""
    distance = query_positions[:, :, None] - key_positions[:, None, :]
    return (distance < window)[:, None]


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
