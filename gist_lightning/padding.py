"""Padding rows of token ids into a batch: shared by the data collator and the caching API, so
that neither imports the other."""

from __future__ import annotations

import torch


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of a list of id lists, both (B, longest row), padded on ``side``
    ("left" for decoder prompts, so that every row ends in the last column; "right" otherwise)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right'; got {side!r}")
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask
