"""Long contexts compressed segment by segment (documents, system prompts, histories).

A context of N tokens is cut into segments of ``segment_tokens`` raw tokens, each with
``gists_per_segment`` gist tokens placed at its end (coarse) or spread inside it (fine)
(:func:`masks.interleave_gists`); what may see what is :func:`masks.long_context_attention_mask`.
A decoder prompt is ``[specials] <context with gists> <continuation>``; every token keeps its
position in that prompt, so the cache is exact.

:func:`compress_context` runs one segment at a time with only the earlier gists' keys/values as
past, so it holds at most the gists plus one segment at a time, and returns a
:class:`~gist_lightning.cache.GistCache` of the gists alone (N x gists_per_segment /
segment_tokens positions per layer); what follows the context continues from it with the usual
:func:`~gist_lightning.caching.continuation_logits` and :func:`~gist_lightning.generate`, and equals
:func:`masked_forward` over the whole prompt.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace

import torch
from transformers import DynamicCache

from . import masks
from .backends import backend_of
from .backends.decoder_kv import dense_attention, static_shapes_on_cpu
from .cache import GistCache
from .errors import ContextLengthError
from .families import self_attention_block_masks, self_attention_masks
from .padding import pad_batch
from .templates import EncodedExample, encode_continuation, encode_target
from .tokens import encode_text, special_frame
from .tokens import gist_token_id as find_gist_token_id


@dataclass(frozen=True)
class SegmentSettings:
    """How a long context is cut and compressed.

    Args:
        segment_tokens: raw tokens per segment.
        gists_per_segment: gist tokens per segment (compression ratio segment_tokens / gists_per_segment).
        placement: ``coarse`` (the gists at the end of each segment) or ``fine`` (one gist after
            every segment_tokens / gists_per_segment raw tokens).
        window: context tokens see the gists of only the last ``window`` segments before theirs
            (None: of every earlier segment). Tokens after the context always see every gist.
        sink_tokens: the prompt's first ``sink_tokens`` tokens (its specials, then the context's
            first raw tokens) are seen by every later token and kept in the cache (attention sinks,
            as UniGist keeps). 0: none.
        recent_segments: a context or question token also sees every token, raw ones included, of
            the ``recent_segments`` segments before its own (for the question: the context's last
            ones), so the cache keeps those raw tokens too: UniGist's local window, with
            ``segment_tokens`` = its unit (one gist per segment). Not ``window``, which limits the
            gists a context token sees. 0: none.
        max_context_tokens: a longer context is refused (None: only the model's positions bound it).
        compact_positions: a token's position counts only the gists of earlier segments and its own
            segment's tokens (:func:`masks.compact_position_ids`), so a context longer than the
            model's positions fits (a model trained so; recorded in its export). False: every token
            keeps its position in the whole prompt.
        train_ratios: training draws each batch's compression ratio from these (Activation Beacon
            style): ``segment_tokens / ratio`` gists per segment, so one model serves every ratio of
            the set. Validation, export and serving use ``gists_per_segment``. None: always that.
    """

    segment_tokens: int = 64
    gists_per_segment: int = 8
    placement: str = "coarse"
    window: int | None = None
    max_context_tokens: int | None = None
    train_ratios: tuple[int, ...] | None = None
    compact_positions: bool = False
    sink_tokens: int = 0
    recent_segments: int = 0

    def __post_init__(self):
        # the checks
        masks.interleave_gists([0], self.segment_tokens, self.gists_per_segment, self.placement, 1)
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 segment (or None); got {self.window}")
        if not 0 <= self.sink_tokens < self.segment_tokens:
            raise ValueError(f"sink_tokens ({self.sink_tokens}) must be >= 0 and leave room in the first "
                             f"segment of segment_tokens {self.segment_tokens}: sinks are its leading tokens")
        if self.recent_segments < 0:
            raise ValueError(f"recent_segments must be >= 0 segments; got {self.recent_segments}")
        if self.compact_positions and (self.sink_tokens or self.recent_segments):
            raise ValueError("compact_positions counts only earlier gists in a token's position; it cannot "
                             "be combined with sink_tokens or recent_segments, whose raw tokens stay visible")
        if self.train_ratios is not None:
            object.__setattr__(self, "train_ratios", tuple(int(r) for r in self.train_ratios))
            for r in self.train_ratios:
                masks.interleave_gists([0], self.segment_tokens, self._gists_at(r), self.placement, 1)

    @property
    def ratio(self) -> float:
        return self.segment_tokens / self.gists_per_segment

    def cached_positions(self, row: list[int], gist_token_id: int) -> int:
        """Positions a cache of the ``[specials] context-with-gists`` ``row`` holds under these
        settings: what the rule lets the tokens after the context see (every gist, the sinks, the
        last ``recent_segments`` segments), counted by the rule itself. A layout's compression ratio
        and a truncation at equal cache are reckoned from it."""
        ids = torch.tensor([row])
        _, labels = masks.long_context_labels(ids, None, gist_token_id, self.gists_per_segment, None,
                                              self.sink_tokens)
        seen = masks._context_rule(labels.after, labels.seg, labels.is_gist, labels.after, "gist",
                                   self.window, labels.is_sink, self.recent_segments)
        return int(seen.sum())

    def _gists_at(self, ratio: int) -> int:
        """Gists per segment at compression ``ratio`` (refused unless it divides ``segment_tokens``)."""
        if ratio < 1 or self.segment_tokens % ratio:
            raise ValueError(f"ratio {ratio} does not divide segment_tokens {self.segment_tokens} (each "
                             "ratio must give a whole number of gists per segment)")
        return self.segment_tokens // ratio

    def at_ratio(self, ratio: int) -> SegmentSettings:
        """These settings with ``segment_tokens / ratio`` gists per segment (how a model trained with
        ``train_ratios`` is run at one of them)."""
        return replace(self, gists_per_segment=self._gists_at(ratio))

    @property
    def most_gists(self) -> int:
        """The most gists per segment any training batch can have (what length limits are checked at)."""
        return max([self.gists_per_segment] + [self._gists_at(r) for r in self.train_ratios or ()])

    def draw_gists(self, key: tuple) -> int:
        """Gists per segment of the training batch identified by ``key`` (e.g. its first row): a ratio
        from ``train_ratios`` drawn as a function of ``key`` alone, so a resumed run draws alike."""
        if not self.train_ratios:
            return self.gists_per_segment
        return self._gists_at(random.Random(repr(key)).choice(self.train_ratios))


def relayout(ids: list[int], n_special: int, gist_token_id: int, settings: SegmentSettings) -> list[int]:
    """A ``[specials] context-with-gists`` row with its gists placed again under ``settings``."""
    raw = [t for t in ids[n_special:] if t != gist_token_id]
    return ids[:n_special] + masks.interleave_gists(raw, settings.segment_tokens, settings.gists_per_segment,
                                                     settings.placement, gist_token_id)


def encode_context(tokenizer, text: str, settings: SegmentSettings, gist_token_id: int) -> list[int]:
    """``[specials] context-with-gists``: the part of a prompt :func:`compress_context` compresses."""
    raw = encode_text(tokenizer, text)
    if settings.max_context_tokens is not None and len(raw) > settings.max_context_tokens:
        raise ContextLengthError(f"a context of {len(raw)} tokens is longer than max_context_tokens "
                                 f"{settings.max_context_tokens}; nothing is truncated silently: shorten it")
    before, _ = special_frame(tokenizer)
    return before + masks.interleave_gists(raw, settings.segment_tokens, settings.gists_per_segment,
                                           settings.placement, gist_token_id)


def encode_long_example(tokenizer, context: str, input: str, output: str | None, settings: SegmentSettings,
                        gist_token_id: int) -> EncodedExample:
    """A training / validation example whose instruction is a long context: ``prefix`` is the
    context with its gists but the last segment's, ``gists`` those, then the continuation and target
    as for short instructions (``prompt`` is ``[specials] context-with-gists continuation``)."""
    context_ids = encode_context(tokenizer, context, settings, gist_token_id)
    t = settings.gists_per_segment
    return EncodedExample(context_ids[:-t], context_ids[-t:], encode_continuation(tokenizer, input, False),
                          encode_target(tokenizer, output) if output is not None else [])


def prompt_positions(input_ids, attention_mask, gist_token_id: int, settings: SegmentSettings,
                     segment_ids=None) -> torch.Tensor:
    """The position ids of segmented prompts in :func:`masked_forward` (compacted, or skipping
    padding, or restarting per packed example)."""
    if settings.compact_positions:
        return masks.compact_position_ids(input_ids, attention_mask, gist_token_id,
                                          settings.gists_per_segment, segment_ids)
    if segment_ids is None:
        return masks.padding_position_ids(attention_mask)
    return masks.segment_position_ids(segment_ids)


def masked_forward(model, input_ids, attention_mask, gist_token_id: int, settings: SegmentSettings,
                   condition: str = "gist", segment_ids=None, **kwargs):
    """The single masked full forward over ``[context with gists | what follows]`` rows (either
    padding side, or packed rows of several examples numbered by ``segment_ids``): what training
    computes, and the reference the segment-wise cache must equal."""
    positions = prompt_positions(input_ids, attention_mask, gist_token_id, settings, segment_ids)
    if model.config._attn_implementation == "flex_attention":  # BlockMasks from the same rule
        segments, labels = masks.long_context_labels(input_ids, attention_mask, gist_token_id,
                                                     settings.gists_per_segment, segment_ids,
                                                     settings.sink_tokens)
        bsz, seq_len = input_ids.shape
        mask = self_attention_block_masks(
            model, lambda sliding: masks.long_context_mask_mod(segments, labels, condition, settings.window,
                                                               positions, sliding, settings.recent_segments),
            bsz, seq_len, seq_len, input_ids.device)
        with static_shapes_on_cpu(input_ids.device):
            return model(input_ids=input_ids, position_ids=positions, attention_mask=mask, **kwargs)
    allowed = masks.long_context_attention_mask(input_ids, attention_mask, gist_token_id,
                                                settings.gists_per_segment, condition, settings.window,
                                                segment_ids, settings.sink_tokens, settings.recent_segments)
    return model(input_ids=input_ids, position_ids=positions,
                 attention_mask=self_attention_masks(model, allowed, positions, positions), **kwargs)


def _segments_of(row: list[int], gist_token_id: int, gists_per_segment: int) -> list[list[int]]:
    """A ``[specials] context-with-gists`` row cut after every ``gists_per_segment``-th gist."""
    out, current, seen = [], [], 0
    for token in row:
        current.append(token)
        if token == gist_token_id:
            seen += 1
            if seen % gists_per_segment == 0:
                out.append(current)
                current = []
    if current:
        raise ValueError("a context row must end with the gists of its last segment")
    return out


@torch.no_grad()
def compress_context(model, tokenizer, texts: list[str], settings: SegmentSettings,
                     condition: str = "gist") -> GistCache:
    """Compress a batch of long contexts, one segment at a time, into a cache of their gists.

    Args:
        model: a decoder-only HF model with ``<GIST>`` (T5-style models are refused: their encoder
            sees the whole source at once).
        tokenizer: its tokenizer.
        texts: the contexts, one cache row each (of any lengths).
        settings: the segmenting (:class:`SegmentSettings`), as the model was trained.
        condition: ``gist`` keeps the gists; ``pos_control`` keeps every position (full attention
            over the context, the upper bound); ``neg_control`` keeps nothing.

    Returns:
        A :class:`GistCache` whose ``meta`` holds the settings, the context tokens of each row and
        ``peak_positions``: the most positions held in any forward (kept ones plus one segment).
    """
    gist_id = find_gist_token_id(tokenizer)
    rows = [encode_context(tokenizer, text, settings, gist_id) for text in texts]
    return compress_context_ids(model, rows, gist_id, tokenizer.pad_token_id, settings, condition)


@torch.no_grad()
def compress_context_ids(model, rows: list[list[int]], gist_token_id: int, pad_token_id: int,
                         settings: SegmentSettings, condition: str = "gist") -> GistCache:
    """:func:`compress_context` of rows already encoded (:func:`encode_context`), e.g. a validation
    batch's prompts up to their last gist."""
    compression = ContextCompression(model, rows, gist_token_id, pad_token_id, settings, condition)
    while not compression.done:
        compression.step()
    return compression.result()


class ContextCompression:
    """:func:`compress_context_ids` one segment per :meth:`step`: what the serving engine runs between
    decoding steps, so that a long document delays the running requests by one segment per step
    (and the one path :func:`compress_context` takes, run to its end). ``tokens_left`` says how
    much remains; :meth:`result` is the cache once ``done``."""

    def __init__(self, model, rows: list[list[int]], gist_token_id: int, pad_token_id: int,
                 settings: SegmentSettings, condition: str = "gist"):
        backend = backend_of(model)
        if backend.encoder_decoder:
            raise ValueError("compress_context is for decoder-only models: a T5-style encoder reads its "
                             "whole source in one pass, so its segments cannot be compressed one at a time")
        masks.check_condition(condition)
        t = settings.gists_per_segment
        context = backend.context_length(model.config)
        self.chunks = [_segments_of(r, gist_token_id, t) for r in rows]
        # positions the context takes: all of its tokens, or (compacted) the earlier gists + the last segment
        longest = max(((len(c) - 1) * t + len(c[-1])) if settings.compact_positions else len(r)
                      for r, c in zip(rows, self.chunks))
        if context is not None and longest >= context:
            raise ContextLengthError(f"a context of {longest} positions (gists included) leaves no room in "
                                     f"the model's {context} positions for what follows it; shorten the "
                                     "context"
                                     + ("" if settings.compact_positions else
                                        " (or train a model with segments.compact_positions)"))
        self.model, self.backend, self.rows = model, backend, rows
        self.gist_id, self.pad_token_id = gist_token_id, pad_token_id
        self.settings, self.condition = settings, condition
        self.n_segments = max(len(c) for c in self.chunks)
        # the most raw tokens a segment has (each holds t gists; the first may hold a template's tokens)
        self.widest_raw = max(len(seg) for c in self.chunks for seg in c) - t
        self.segment = 0  # the next one to run
        device, bsz = model.device, len(rows)
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, H, P, D)
        # per kept column (B, P): a real one, its position, its segment, a gist, a sink
        empty = lambda dtype: torch.zeros(bsz, 0, dtype=dtype, device=device)  # noqa: E731
        self.kept_valid, self.kept_pos = empty(torch.bool), empty(torch.long)
        self.kept_seg = empty(torch.long)
        self.kept_gist, self.kept_sink = empty(torch.bool), empty(torch.bool)
        self.offset = torch.zeros(bsz, dtype=torch.long, device=device)  # positions before this segment
        self.peak = 0

    @property
    def done(self) -> bool:
        return self.segment >= self.n_segments

    @property
    def tokens_left(self) -> int:
        """Tokens of the segments not run yet, over every row."""
        return sum(len(seg) for c in self.chunks for seg in c[self.segment:])

    @torch.no_grad()
    def step(self) -> None:
        """Run the next segment of every row that has one."""
        s, settings, condition, gist_id, model = (self.segment, self.settings, self.condition, self.gist_id,
                                                  self.model)
        device = model.device
        ids, pad = pad_batch([c[s] if s < len(c) else [] for c in self.chunks], self.pad_token_id, "left")
        ids, pad = ids.to(device), pad.to(device)
        real, is_gist = pad.bool(), ids == gist_id
        positions = masks.padding_position_ids(pad, self.offset)
        is_sink = real & ~is_gist & (positions < settings.sink_tokens) & (s == 0)
        n_past, width = self.kept_valid.shape[1], ids.shape[1]
        self.peak = max(self.peak, n_past + width)
        # the rule of masks._context_rule, with the keys' segments: past keys are what it let through
        k_seg = torch.cat([self.kept_seg, torch.full_like(ids, s)], -1)
        k_gist, k_sink = torch.cat([self.kept_gist, is_gist], -1), torch.cat([self.kept_sink, is_sink], -1)
        q = torch.arange(width, device=device)[None, :, None]
        k = torch.arange(n_past + width, device=device)[None, None, :]
        key_real = torch.cat([self.kept_valid, real], -1)[:, None, :]
        causal = k < n_past + q + 1
        allowed = (key_real & causal & masks._context_rule(
            torch.full_like(ids, s)[:, :, None], k_seg[:, None, :], k_gist[:, None, :], self.n_segments,
            condition, settings.window, k_sink[:, None, :], settings.recent_segments))[:, None]
        past = DynamicCache(ddp_cache_data=self.kept) if self.kept else DynamicCache()
        key_positions = torch.cat([self.kept_pos, positions], -1)
        with dense_attention(model):  # a segment after its past: a small mask, as a continuation's
            out = model(input_ids=ids, position_ids=positions, cache=past, use_cache=True,
                        attention_mask=self_attention_masks(model, allowed, positions, key_positions))
        # what later tokens may still see, of the past and of this segment: every gist and sink, the
        # tokens of the last recent_segments segments (gist); all of it (pos_control); nothing (neg)
        if condition == "gist":
            active = real.any(-1, keepdim=True)  # a row past its last segment keeps its recent ones
            keep = torch.cat([self.kept_valid & (self.kept_gist | self.kept_sink
                                                 | (self.kept_seg > s - settings.recent_segments) | ~active),
                              real & (is_gist | is_sink | (settings.recent_segments > 0))], -1)
        elif condition == "pos_control":
            keep = torch.cat([self.kept_valid, real], -1)
        else:
            keep = torch.zeros_like(key_real[:, 0])
        width_kept = int(keep.sum(-1).max()) if keep.numel() else 0
        if condition == "gist":  # the memory bound: sinks + the gists so far + the last raw segments
            bound = (settings.sink_tokens + (s + 1) * settings.gists_per_segment
                     + settings.recent_segments * self.widest_raw)
            if width_kept > bound:
                raise RuntimeError(f"segment {s}: the cache keeps {width_kept} positions, over the layout's "
                                   f"bound of {bound} (sinks + gists + recent segments)")
        # the kept columns of each row, left-padded to width_kept: (B, width_kept)
        order = torch.sort(keep.long(), dim=-1, stable=True).indices[:, keep.shape[1] - width_kept:]
        self.kept = [(_take(layer.keys, order), _take(layer.values, order)) for layer in out.cache.layers]
        self.kept_valid = keep.gather(1, order)
        self.kept_pos, self.kept_seg = key_positions.gather(1, order), k_seg.gather(1, order)
        self.kept_gist, self.kept_sink = k_gist.gather(1, order), k_sink.gather(1, order)
        if settings.compact_positions:  # the next segment starts after this one's gists
            self.offset = self.offset + settings.gists_per_segment * real.any(-1).long()
        else:
            self.offset = self.offset + pad.long().sum(-1)
        self.segment += 1

    def result(self) -> GistCache:
        """The cache of the rows' contexts (every segment run)."""
        if not self.done:
            raise RuntimeError(f"{self.n_segments - self.segment} segments are not compressed yet")
        return GistCache(states=self.kept, valid=self.kept_valid, positions=self.kept_pos,
                         next_position=self.offset, num_gist_tokens=self.settings.gists_per_segment,
                         condition=self.condition, backend=self.backend.name,
                         meta={"segments": asdict(self.settings),
                               "context_tokens": [len(r) for r in self.rows], "peak_positions": self.peak})


def _take(states: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Columns ``order`` (B, W) of every row of (B, H, T, D) ``states``."""
    index = order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
    return states.gather(2, index)
