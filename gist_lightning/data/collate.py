"""Length limits and batching of tokenized examples.

Truncation never cuts a gist token: a target is shortened (keeping at least one token); an
example whose prompt alone does not fit is dropped (and counted by the DataModule).
Decoder batches are left-padded so that the last column is every row's last token (batched
generation); position ids are derived from the padding by the model wrapper. Packed decoder
batches hold several examples per row, numbered by ``segment_ids``. The masks are built from
these by the backends (:mod:`gist_lightning.masks`); nothing here decides what may attend to what.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..long_context import SegmentSettings, relayout
from ..padding import pad_batch
from ..templates import EncodedExample

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LengthLimits:
    """Decoder-only: ``max_length`` for prompt + target. Encoder-decoder: source and target limits."""

    max_length: int = 512
    max_source_length: int = 128
    max_target_length: int = 256


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into rows of at most ``capacity`` tokens, best fit decreasing (each
    example goes into the fullest row it fits in). Deterministic; every index appears once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    by_space: dict[int, list[int]] = {}  # free tokens -> rows with that much room
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"example {i} has {need} tokens, more than a packed row's {capacity}")
        space = next((s for s in range(need, capacity + 1) if by_space.get(s)), None)
        if space is None:
            rows.append([])
            row, space = len(rows) - 1, capacity
        else:
            row = by_space[space].pop()
        rows[row].append(i)
        by_space.setdefault(space - need, []).append(row)
    return rows


def fit_to_limits(ex: EncodedExample, limits: LengthLimits, encoder_decoder: bool) -> EncodedExample | None:
    """The example cut to the limits (target shortened, gist span intact), or None to drop it."""
    if encoder_decoder:
        if len(ex.prompt) > limits.max_source_length:
            return None
        budget = limits.max_target_length
    else:
        budget = limits.max_length - len(ex.prompt)
    if budget < 1 or not ex.target:
        return None
    return EncodedExample(ex.prefix, ex.gists, ex.suffix, ex.target[:budget])


@dataclass
class GistCollator:
    """Turns tokenized examples (dicts with prefix/gists/suffix/target ids) into model batches.

    Training fields: ``input_ids``, ``attention_mask``, ``labels``. With ``packed`` (decoder-only,
    training) each item is a list of examples put end to end in one row, right-padded, with
    ``segment_ids`` (1, 2, ... per example, 0 on padding). With ``for_generation`` it adds the
    cache path's inputs: ``prefix_ids`` (instruction + gists, left-padded), ``continuation_ids``
    (what follows the gists) and their masks, plus the raw ``x`` / ``y_true`` strings and
    instruction lengths. With ``segments`` whose ``train_ratios`` are set, a training batch's
    contexts get ``segments.draw_gists`` gists per segment (one ratio per batch, a function of the
    batch's first example), and the batch says how many in ``gists_per_segment``.
    """

    pad_token_id: int
    gist_token_id: int
    condition: str
    encoder_decoder: bool
    num_gist_tokens: int
    for_generation: bool = False
    packed: bool = False
    segments: SegmentSettings | None = None
    n_special: int = 0  # tokens before a long context (the tokenizer's BOS), kept by ``relayout``

    def __post_init__(self):
        if self.packed and (self.encoder_decoder or self.for_generation):
            raise ValueError("packed batches are for training decoder-only models")

    def _draw_layout(self, examples: list[dict]) -> tuple[list[dict], int | None]:
        """The examples with their contexts' gists placed at this batch's drawn ratio, and its gists
        per segment (None: the examples as they are)."""
        seg = self.segments
        if self.for_generation or seg is None or not seg.train_ratios:
            return examples, None
        first = examples[0]
        gists = seg.draw_gists((tuple(first["prefix"][-16:]), tuple(first["target"]), len(examples)))
        settings = replace(seg, gists_per_segment=gists)
        out = []
        for r in examples:
            ids = relayout(r["prefix"] + r["gists"], self.n_special, self.gist_token_id, settings)
            out.append({**r, "prefix": ids[:-gists], "gists": ids[-gists:]})
        return out, gists

    def _packed(self, rows: list[list[dict]]) -> dict:
        seqs, segments, labels = [], [], []
        flat, gists = self._draw_layout([r for row in rows for r in row])
        it = iter(flat)
        rows = [[next(it) for _ in row] for row in rows]
        for row in rows:
            ids, seg, lab = [], [], []
            for s, r in enumerate(row, start=1):
                prompt = r["prefix"] + r["gists"] + r["suffix"]
                ids += prompt + r["target"]
                seg += [s] * (len(prompt) + len(r["target"]))
                lab += [IGNORE_INDEX] * len(prompt) + r["target"]
            seqs.append(ids)
            segments.append(seg)
            labels.append(lab)
        input_ids, attention_mask = pad_batch(seqs, self.pad_token_id, "right")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": pad_batch(labels, IGNORE_INDEX, "right")[0],
                 "segment_ids": pad_batch(segments, 0, "right")[0]}
        if gists is not None:
            batch["gists_per_segment"] = gists
        return batch

    def __call__(self, rows: list[dict]) -> dict:
        if self.packed:
            return self._packed(rows)
        rows, gists = self._draw_layout(rows)
        exs = [EncodedExample(r["prefix"], r["gists"], r["suffix"], r["target"]) for r in rows]
        pad = self.pad_token_id
        if self.encoder_decoder:
            input_ids, attention_mask = pad_batch([e.prompt for e in exs], pad, "right")
            labels, _ = pad_batch([e.target for e in exs], IGNORE_INDEX, "right")
        else:
            input_ids, attention_mask = pad_batch([e.prompt + e.target for e in exs], pad, "left")
            labels, _ = pad_batch([[IGNORE_INDEX] * len(e.prompt) + e.target for e in exs],
                                  IGNORE_INDEX, "left")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if gists is not None:
            batch["gists_per_segment"] = gists
        if self.for_generation:
            batch["prefix_ids"], batch["prefix_mask"] = pad_batch(
                [e.prefix + e.gists for e in exs], pad, "left")
            side = "right" if self.encoder_decoder else "left"
            batch["continuation_ids"], batch["continuation_mask"] = pad_batch(
                [e.suffix for e in exs], pad, side)
            batch["instruction_tokens"] = torch.tensor([len(e.prefix) for e in exs])
            batch["x"] = [r["x"] for r in rows]
            batch["y_true"] = [r["output"] for r in rows]
            batch["is_padding"] = [bool(r.get("is_padding", False)) for r in rows]
        return batch
