"""Exact gist caching: compress an instruction once, then continue from the cache, batched.

``compress`` runs ``Instruction: t`` + gist tokens through the model under the condition's mask
and keeps, for every layer, only the positions a later token may see (the k gist positions for
``gist``; the whole prompt for ``pos_control``, which is instruction caching; nothing for
``neg_control``). Which positions that is comes from :func:`masks.continuation_visibility`; what
is kept of them, and how later tokens use it, is the model's backend (``gist_lightning.backends``:
keys/values for decoders, encoder states for T5). Rows may have instructions of different
lengths: a cache is left-padded to its longest row with a validity mask, and every row carries
its own position offset. Greedy generation from a cache is :mod:`gist_lightning.generation`.
"""

from __future__ import annotations

import torch

from . import masks
from .backends import backend_named, backend_of
from .cache import GistCache
from .errors import ContextLengthError
from .padding import pad_batch
from .templates import encode_prefix
from .tokens import gist_token_id as find_gist_token_id


def _kept_columns(visible: torch.Tensor) -> int:
    """Number of trailing columns to keep; the visible set of a left-padded prompt is a suffix."""
    length = int(visible.sum(-1).max().item()) if visible.numel() else 0
    if visible[:, : visible.shape[1] - length].any():
        raise RuntimeError("the positions visible after the gist span are not a suffix of the prompt")
    return length


@torch.no_grad()
def compress_ids(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gist_token_id: int,
    condition: str = "gist",
    num_gist_tokens: int | None = None,
) -> GistCache:
    """Compress left-padded ``[specials] Instruction: t\\n G..G`` rows (B, P) into a :class:`GistCache`."""
    backend = backend_of(model)
    why_not = backend.cannot_cache(condition)
    if why_not:
        raise ValueError(why_not)
    first, last = masks.gist_span(prompt_ids, gist_token_id, num_gist_tokens)
    if (last != prompt_ids.shape[1] - 1).any():
        raise ValueError("every prompt row must end with its gist span (left padding, nothing after the "
                         "gists)")
    k = int((last - first + 1)[0].item())
    context = backend.context_length(model.config)
    longest = int(attention_mask.sum(-1).max())
    if context is not None and longest >= context:
        raise ContextLengthError(f"an instruction of {longest - k} tokens + {k} gist tokens leaves no room "
                                 f"in the model's {context} positions for an input; shorten the instruction")
    visible = masks.continuation_visibility(prompt_ids, attention_mask, gist_token_id, condition)
    keep = _kept_columns(visible)
    cols = slice(prompt_ids.shape[1] - keep, prompt_ids.shape[1])
    return GistCache(
        states=backend.compress(model, prompt_ids, attention_mask, gist_token_id, condition, cols),
        valid=visible[:, cols],
        positions=masks.padding_position_ids(attention_mask)[:, cols],
        next_position=attention_mask.long().sum(-1),
        num_gist_tokens=k,
        condition=condition,
        backend=backend.name,
    )


def empty_cache(model, batch_size: int, condition: str = "pos_control") -> GistCache:
    """A cache that holds nothing: feeding a whole prompt after it is the uncached forward.

    Exact for ``pos_control`` (nothing to mask beyond causality and padding), which is how an
    encoder-decoder generates under ``pos_control``, whose instruction cannot be cached.
    """
    backend = backend_of(model)
    rows = torch.zeros((batch_size, 0), dtype=torch.long, device=model.device)
    return GistCache(states=backend.empty_states(model, batch_size), valid=rows.bool(), positions=rows,
                     next_position=rows.sum(-1), num_gist_tokens=0, condition=condition, backend=backend.name)


def compress(model, tokenizer, instructions: list[str], num_gist_tokens: int,
             condition: str = "gist") -> GistCache:
    """Compress a batch of instructions, one cache row each, to continue from with :func:`generate`.

    Each instruction is run once as ``Instruction: t`` + ``num_gist_tokens`` gist tokens under the
    condition's mask; the cache keeps, for every layer, the positions a later token may see.

    Args:
        model: a gist model (e.g. from :func:`~gist_lightning.export.load_pretrained`), in eval mode.
        tokenizer: its tokenizer, which holds ``<GIST>``.
        instructions: the instructions to compress, one cache row each.
        num_gist_tokens: k, as the model was trained (the ``num_gist_tokens`` of its export settings).
        condition: ``"gist"`` keeps the k gist positions; ``"pos_control"`` keeps the whole prompt
            (instruction caching); ``"neg_control"`` keeps nothing.

    Returns:
        GistCache: B = ``len(instructions)`` rows, left-padded to the longest.

    Raises:
        ContextLengthError: an instruction leaves no room for an input in the model's positions.
        ValueError: the model's family cannot cache under ``condition`` (e.g. T5 under pos_control).

    Example:
        >>> from gist_lightning import compress, generate
        >>> from gist_lightning.export import load_pretrained
        >>> model, tok, settings = load_pretrained("runs/tiny/version_0/export")  # make demo's export
        >>> k = settings["num_gist_tokens"]
        >>> cache = compress(model, tok, ["Reverse the list.", "Give the first word."], k)
        >>> cache.batch_size, cache.length  # one row per instruction, k positions under gist
        (2, 1)
        >>> generate(model, tok, cache, ["cat dog owl", "pear fig apple"], max_new_tokens=24)
        ['owl dog cat', 'pear']
    """
    gist_id = find_gist_token_id(tokenizer)
    rows = [encode_prefix(tokenizer, t, num_gist_tokens, gist_id) for t in instructions]
    ids, mask = pad_batch(rows, tokenizer.pad_token_id, "left")
    device = model.device
    return compress_ids(model, ids.to(device), mask.to(device), gist_id, condition, num_gist_tokens)


@torch.no_grad()
def continuation_logits(model, cache: GistCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        **kwargs):
    """One forward of what follows the gist span, from the cache.

    Decoder-only: ``input_ids`` (B, T), left-padded, returns the model output (logits (B, T, V)).
    Encoder-decoder: ``input_ids`` is the rest of the source (right-padded); pass ``decoder_input_ids``.
    """
    return backend_named(cache.backend).continuation(model, cache, input_ids, attention_mask, **kwargs)


def cache_bytes_per_position(model) -> int:
    """Bytes a cache holds per kept prompt position, from the model's shape and dtype."""
    return backend_of(model).bytes_per_position(model)
