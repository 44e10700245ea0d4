"""Per-architecture backends: how a masked forward, a gist cache and a step of greedy decoding work
for one kind of model. The family registry (``families.py``) names the backend of each family; a
new architecture type is a new file here and one line in ``BACKENDS``."""

from __future__ import annotations

from ..families import family_of
from .base import Backend
from .decoder_kv import DecoderKV
from .t5_encoder import T5Encoder

BACKENDS: dict[str, Backend] = {b.name: b for b in (DecoderKV(), T5Encoder())}


def backend_named(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown cache backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backend_of(model) -> Backend:
    """The backend of a model's family (a clear error for unsupported families)."""
    return BACKENDS[family_of(model).backend]


def gist_forward(model, input_ids, attention_mask, gist_token_id: int, condition: str, num_gist_tokens=None,
                 gist_masks=None, **kwargs):
    """The masked full-prompt forward pass: training, and the reference every cache must equal.

    Decoder-only: ``input_ids`` is prompt + completion, any padding side; position ids skip
    padding. Encoder-decoder: ``input_ids`` is the source; pass ``labels`` or ``decoder_input_ids``.
    ``gist_masks`` are the boolean masks of :func:`masks.gist_masks` when the collator made them.
    """
    return backend_of(model).forward(model, input_ids, attention_mask, gist_token_id, condition,
                                     gist_masks=gist_masks, num_gist_tokens=num_gist_tokens, **kwargs)


__all__ = ["BACKENDS", "Backend", "backend_named", "backend_of", "gist_forward"]
