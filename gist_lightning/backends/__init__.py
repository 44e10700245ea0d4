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
                 segment_ids=None, **kwargs):
    """The masked full-prompt forward pass: training, and the reference every cache must equal.

    Decoder-only: ``input_ids`` is prompt + completion, any padding side; position ids skip
    padding; ``segment_ids`` (B, S) for packed rows (1, 2, ... per example, 0 for padding), whose
    examples see only themselves and whose positions restart per example. Under
    ``flex_attention`` the rule reaches the layers as BlockMasks, otherwise as dense masks.
    Encoder-decoder: ``input_ids`` is the source; pass ``labels`` or ``decoder_input_ids``.
    """
    return backend_of(model).forward(model, input_ids, attention_mask, gist_token_id, condition,
                                     num_gist_tokens=num_gist_tokens, segment_ids=segment_ids, **kwargs)


__all__ = ["BACKENDS", "Backend", "backend_named", "backend_of", "gist_forward"]
