"""Greedy generation from gist caches, batched: one loop for every architecture (the backend
says how the first forward and each further step run)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from .backends import backend_named
from .cache import GistCache
from .errors import ContextLengthError
from .padding import pad_batch
from .templates import encode_continuation


def _all_ranks_done(done: torch.Tensor, sync_ranks: bool) -> bool:
    """Whether every row is done, on every process when ``sync_ranks`` (ZeRO-3 gathers parameters
    inside each forward, so no rank may stop stepping before the others)."""
    flag = done.all()
    if sync_ranks and dist.is_available() and dist.is_initialized():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


@torch.no_grad()
def generate_ids(
    model,
    cache: GistCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    sync_ranks: bool = False,
) -> torch.Tensor:
    """Greedy new tokens (B, N <= max_new_tokens) for what follows each cache row: decoder
    ``input_ids`` left-padded, encoder-decoder ``input_ids`` (the rest of the source) right-padded.
    A row that has produced EOS goes on with padding until every row (on every rank) is done."""
    backend = backend_named(cache.backend)
    check_fits(model, cache, attention_mask, max_new_tokens)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    # the prompt's continuation in one forward: the logits of the first new token
    logits, state = backend.start(model, cache, input_ids, attention_mask)
    for step in range(max_new_tokens):
        nxt = torch.where(done, pad_token_id, logits.argmax(-1))
        tokens.append(nxt)
        done |= nxt == eos_token_id
        if step == max_new_tokens - 1 or _all_ranks_done(done, sync_ranks):
            break
        # one token more for every row (finished rows feed padding, which nothing reads)
        logits, state = backend.step(model, state, nxt)
    return torch.stack(tokens, 1) if tokens else input_ids.new_zeros((input_ids.shape[0], 0))


def prompt_lengths(cache: GistCache, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) positions each row's prompt spans: the cached prompt (instruction + gists, including
    what the gist mask hides) and what follows it."""
    return cache.next_position.to(attention_mask.device) + attention_mask.long().sum(-1)


def positions_needed(prompt_tokens, max_new_tokens: int):
    """Positions a prompt and its greedy continuation occupy: the last new token is never fed back."""
    return prompt_tokens + max_new_tokens - 1


def check_fits(model, cache: GistCache, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
    """Refuse, with the numbers, prompts that leave no room for ``max_new_tokens`` in the model's positions."""
    context = backend_named(cache.backend).context_length(model.config)
    if context is None:
        return
    lengths = prompt_lengths(cache, attention_mask)
    over = (positions_needed(lengths, max_new_tokens) > context).nonzero().flatten().tolist()
    if over:
        i = max(over, key=lambda r: int(lengths[r]))
        prefix, rest = int(cache.next_position[i]), int(lengths[i]) - int(cache.next_position[i])
        raise ContextLengthError(
            f"{len(over)} of {len(lengths)} prompts do not fit the model's {context} positions; the longest: "
            f"instruction + gists {prefix} + input {rest} + {max_new_tokens} new tokens need "
            f"{positions_needed(prefix + rest, max_new_tokens)} positions (the last new token is not fed back). "
            "Shorten the input, ask for fewer new tokens, or truncate inputs (on_overflow='truncate_input')")


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
        budget = context + 1 - max_new_tokens - int(cache.next_position[i])  # see positions_needed

        n = _words_that_fit(tokenizer, words, budget, cache.encoder_decoder)
        if n < len(words):
            cut.append(f"row {i}: {len(words) - n} of {len(words)} words")
        out.append(" ".join(words[:n]))
    if cut:
        warnings.warn(f"inputs truncated to fit the model's {context} positions with {max_new_tokens} new tokens: "
                      + "; ".join(cut), stacklevel=3)
    return out


def generate(
    model, tokenizer, cache: GistCache, inputs: list[str], max_new_tokens: int = 64, skip_special_tokens: bool = True,
    on_overflow: str = "error",
) -> list[str]:
    """Greedy completions for ``inputs``, row i continuing cache row i (``cache.select`` to reuse one).

    A prompt that does not fit the model's positions with ``max_new_tokens`` is refused with the
    numbers (``on_overflow="error"``), or its input is cut word by word from the end until it fits
    (``"truncate_input"``, with a warning); gist tokens and the instruction are never cut.
    """
    if len(inputs) != cache.batch_size:
        raise ValueError(f"{len(inputs)} inputs for a cache of {cache.batch_size} rows; use cache.select to reuse rows")
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}; got {on_overflow!r}")
    if on_overflow == "truncate_input":
        inputs = fit_inputs(model, tokenizer, cache, inputs, max_new_tokens)
    rows = [encode_continuation(tokenizer, x, cache.encoder_decoder) for x in inputs]
    ids, mask = pad_batch(rows, tokenizer.pad_token_id, "right" if cache.encoder_decoder else "left")
    device = model.device
    out = generate_ids(
        model, cache.to(device), ids.to(device), mask.to(device), max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    return decode_new_tokens(tokenizer, out, skip_special_tokens)


def decode_new_tokens(tokenizer, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
    """Text of each row of generated ids, cut at the first EOS and stripped."""
    eos = tokenizer.eos_token_id
    return [
        tokenizer.decode(r[: r.index(eos)] if eos in r else r, skip_special_tokens=skip_special_tokens).strip()
        for r in ids.tolist()
    ]
