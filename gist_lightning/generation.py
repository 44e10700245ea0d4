"""Generation from gist caches, batched, for the library and validation: the decoding core
(:mod:`gist_lightning.decoding`: token choice, EOS, stop strings, the context check) run as a
static batch, and what users ask of it (inputs as text, over-long inputs cut or refused)."""

from __future__ import annotations

import warnings

import torch

from .backends import backend_named
from .cache import GistCache
from .decoding import (
    Row,
    Sampling,
    TextStream,
    check_fits,
    continuation_batch,
    decode_steps,
    final_text,
    positions_needed,
    prompt_lengths,
    prompt_room,
)
from .templates import encode_continuation

__all__ = ["OVERFLOW_POLICIES", "check_fits", "decode_new_tokens", "fit_inputs", "generate", "generate_ids",
           "positions_needed", "prompt_lengths"]


def _run(model, cache, input_ids, attention_mask, rows, pad_token_id, sync_ranks=False,
         compile: bool | str = False) -> torch.Tensor:
    """Every step's tokens of a static batch, (B, N): rows that ended early carry padding."""
    with torch.no_grad():
        steps = decode_steps(model, cache, input_ids, attention_mask, rows, pad_token_id, sync_ranks,
                             compile)
        tokens = [t for t, _ in steps]
    return torch.stack(tokens, 1) if tokens else input_ids.new_zeros((input_ids.shape[0], 0))


def generate_ids(
    model,
    cache: GistCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    sync_ranks: bool = False,
    compile: bool | str = False,
) -> torch.Tensor:
    """Greedy new tokens for what follows each cache row.

    A row that has produced EOS goes on with padding until every row (on every rank) is done.

    Args:
        model: the model the cache was made with.
        cache: one row per row of ``input_ids``.
        input_ids / attention_mask: (B, T) what follows each cache row: decoder-only left-padded,
            encoder-decoder (the rest of the source) right-padded (``decoding.continuation_batch``).
        max_new_tokens: the most new tokens per row.
        eos_token_id / pad_token_id: the token that ends a row, and what a finished row takes.
        sync_ranks: step until every process's rows are done (ZeRO-3 gathers parameters inside each
            forward, so no rank may stop before the others).
        compile: decode in static buffers through ``torch.compile`` (see :func:`generate`).

    Returns:
        (B, N <= max_new_tokens) the new tokens.
    """
    rows = [Row(max_new_tokens, eos_token_id) for _ in range(input_ids.shape[0])]
    return _run(model, cache, input_ids, attention_mask, rows, pad_token_id, sync_ranks, compile)


OVERFLOW_POLICIES = ("error", "truncate_input")


def _words_that_fit(tokenizer, words: list[str], budget: int, encoder_decoder: bool) -> int:
    """The most leading ``words`` whose continuation takes at most ``budget`` tokens, by bisection
    (more words never take fewer tokens); 0 when even an empty input does not fit, which
    ``generate`` then refuses with the numbers."""
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode_continuation(tokenizer, " ".join(words[:mid]), encoder_decoder)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_inputs(model, tokenizer, cache: GistCache, inputs: list[str], max_new_tokens: int) -> list[str]:
    """``inputs`` with words dropped from the end of each one that does not fit (instruction and gist
    tokens are never cut); a warning says which rows lost how many words."""
    context = backend_named(cache.backend).context_length(model.config)
    if context is None:
        return list(inputs)
    out, cut = [], []
    for i, x in enumerate(inputs):
        words = x.split(" ")
        budget = prompt_room(context, max_new_tokens) - int(cache.next_position[i])
        n = _words_that_fit(tokenizer, words, budget, cache.encoder_decoder)
        if n < len(words):
            cut.append(f"row {i}: {len(words) - n} of {len(words)} words")
        out.append(" ".join(words[:n]))
    if cut:
        warnings.warn(f"inputs truncated to fit the model's {context} positions with {max_new_tokens} new "
                      "tokens: "
                      + "; ".join(cut), stacklevel=3)
    return out


def generate(
    model, tokenizer, cache: GistCache, inputs: list[str], max_new_tokens: int = 64,
    skip_special_tokens: bool = True,
    on_overflow: str = "error", temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
    stop: str | list[str] | tuple[str, ...] = (),
    compile: bool | str = False,
) -> list[str]:
    """Completions for ``inputs``, row i continuing cache row i (``cache.select`` to reuse one).

    Greedy by default; the serving engine answers a request with the same instruction, input and
    settings alike (one decoding core).

    Args:
        model / tokenizer: the model the cache was made with, and its tokenizer.
        cache: one row per input.
        inputs: the text that follows each cached instruction.
        max_new_tokens: the most new tokens per answer.
        skip_special_tokens: drop special tokens from the answers' text.
        on_overflow: a prompt that does not fit the model's positions with ``max_new_tokens`` is
            refused with the numbers (``"error"``), or its input is cut word by word from the end
            until it fits (``"truncate_input"``, with a warning); gist tokens and the instruction are
            never cut.
        temperature: 0 (below 1e-5) is greedy; above, tokens are sampled.
        top_p: sample from the smallest set of tokens whose probability reaches it.
        seed: row i samples from a generator seeded with ``seed + i`` (random when None), so one
            input with ``seed`` is answered as a server request with ``seed`` is.
        stop: strings that end an answer (cut before the first one found, the row stops decoding).
        compile: decode in static key/value buffers (batch and capacity padded to powers of two),
            each step through ``torch.compile``: CUDA graphs (``reduce-overhead``) on a GPU, the
            default mode on a CPU. The first call per shape compiles (seconds to a minute); the
            answers are the eager ones. ``"static"``: the static buffers without compiling.

    Returns:
        One answer per input, without leading and trailing white space.

    Raises:
        ContextLengthError: a prompt does not fit and ``on_overflow="error"``.
        ValueError: mismatched rows, an unknown policy, or sampling settings out of range.

    Example:
        >>> from gist_lightning import compress, generate
        >>> from gist_lightning.export import load_pretrained
        >>> model, tok, settings = load_pretrained("runs/tiny/version_0/export")  # make demo's export
        >>> cache = compress(model, tok, ["Reverse the list."], settings["num_gist_tokens"])
        >>> generate(model, tok, cache.select([0, 0]), ["cat dog owl", "red green blue"], max_new_tokens=24)
        ['owl dog cat', 'blue green red']
        >>> generate(model, tok, cache, ["cat dog owl"], temperature=0.8, seed=0)  # sampled, reproducibly
        ['owl dog cat']
    """
    if len(inputs) != cache.batch_size:
        raise ValueError(f"{len(inputs)} inputs for a cache of {cache.batch_size} rows; use cache.select to "
                         "reuse rows")
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}; got {on_overflow!r}")
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    device = model.device
    samplings = [Sampling(temperature, top_p, None if seed is None else seed + i) for i in range(len(inputs))]
    rows = [Row(max_new_tokens, tokenizer.eos_token_id, s,
                TextStream(tokenizer, stop, skip_special_tokens) if stop
                else None, device) for s in samplings]
    if on_overflow == "truncate_input":
        inputs = fit_inputs(model, tokenizer, cache, inputs, max_new_tokens)
    ids, mask = continuation_batch([encode_continuation(tokenizer, x, cache.encoder_decoder) for x in inputs],
                                   tokenizer.pad_token_id, cache.encoder_decoder)
    _run(model, cache.to(device), ids.to(device), mask.to(device), rows, tokenizer.pad_token_id,
         compile=compile)
    # without stop strings no text is needed while decoding: each answer is decoded once at the end
    return [r.text if stop else final_text(tokenizer, r.answer_ids, (), skip_special_tokens) for r in rows]


def decode_new_tokens(tokenizer, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
    """Text of each row of generated ids, cut at the first EOS and stripped.

    Args:
        tokenizer: decodes the ids.
        ids: (B, N) new tokens, as :func:`generate_ids` returns them.
        skip_special_tokens: drop special tokens from the text.

    Returns:
        One text per row.
    """
    eos = tokenizer.eos_token_id
    return [final_text(tokenizer, r[: r.index(eos)] if eos in r else r, (), skip_special_tokens)
            for r in ids.tolist()]
