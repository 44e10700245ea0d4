"""The decoding core, written once for the library (``generate``), validation and the serving
engine: how the next token is chosen (greedy, or sampled with temperature, top-p and a seed), when
a sequence ends (EOS, a stop string, its token budget), how its text is streamed (incrementally
detokenized, with what may still change held back), the padding side of what follows a cache, and
whether a prompt fits the model's positions.

A :class:`DecodingBatch` is rows decoding together from gist caches: ``start`` runs the first
forward, each ``step`` one more token for every row; rows may leave (``keep``) and batches may be
joined (``merge``), which the engine's continuous batching uses. :func:`decode_steps` is the
static batch (the library and validation): a generator of steps until every row is done."""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .backends import backend_named
from .cache import GistCache
from .errors import ContextLengthError
from .padding import pad_batch

MIN_TEMPERATURE = 1e-5  # below it a row is decoded greedily (and 1/t would overflow)
SEED_LIMIT = 2**63


# -- what follows a cache, and whether it fits ------------------------------------------------------
def continuation_batch(rows: list[list[int]], pad_token_id: int,
                       encoder_decoder: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of what follows each cache row: left-padded for decoder-only models (every
    row's next token comes from the last column), right-padded for encoder-decoders (the rest of the
    source follows the cached positions directly)."""
    return pad_batch(rows, pad_token_id, "right" if encoder_decoder else "left")


def positions_needed(prompt_tokens, max_new_tokens: int):
    """Positions a prompt and its continuation occupy: the last new token is never fed back."""
    return prompt_tokens + max_new_tokens - 1


def prompt_room(context: int, max_new_tokens):
    """The most prompt tokens that fit ``context`` positions with ``max_new_tokens`` new ones."""
    return context + 1 - max_new_tokens


def prompt_lengths(cache: GistCache, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) positions each row's prompt spans: the cached prompt (instruction + gists, including
    what the gist mask hides) and what follows it."""
    return cache.next_position.to(attention_mask.device) + attention_mask.long().sum(-1)


def check_fits(model, cache: GistCache, attention_mask: torch.Tensor,
               max_new_tokens: int | list[int]) -> None:
    """Refuse, with the numbers, prompts that leave no room for ``max_new_tokens`` (one for every
    row, or one per row) in the model's positions.

    Raises:
        ContextLengthError: naming how many rows do not fit and the longest one's parts.
    """
    context = backend_named(cache.backend).context_length(model.config)
    if context is None:
        return
    lengths = prompt_lengths(cache, attention_mask)
    budgets = torch.as_tensor(max_new_tokens, device=lengths.device).expand_as(lengths)
    over = (lengths > prompt_room(context, budgets)).nonzero().flatten().tolist()
    if over:
        i = max(over, key=lambda r: int(lengths[r]))
        prefix, budget = int(cache.next_position[i]), int(budgets[i])
        rest = int(lengths[i]) - prefix
        raise ContextLengthError(
            f"{len(over)} of {len(lengths)} prompts do not fit the model's {context} positions; the longest: "
            f"instruction + gists {prefix} + input {rest} + {budget} new tokens need "
            f"{positions_needed(prefix + rest, budget)} positions (the last new token is not fed back). "
            "Shorten the input, ask for fewer new tokens, or truncate inputs (on_overflow='truncate_input')")


# -- choosing the next token ------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How one row chooses its tokens: greedy at ``temperature`` below ``MIN_TEMPERATURE`` (0 by
    default), else sampled from the smallest set of tokens whose probability reaches ``top_p``,
    drawn from a generator seeded with ``seed`` (a random seed when None)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0; got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be between 0 and 2**63 - 1; got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def generator(self, device) -> torch.Generator | None:
        """The row's own random stream (None when greedy): its draws do not depend on the other rows."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return generator


def choose_tokens(logits: torch.Tensor, rows: list[Row], pad_token_id: int) -> torch.Tensor:
    """The next token (B,) of every row from its logits (B, V): greedy, or sampled with the row's
    generator; a finished row gets ``pad_token_id`` (what a static batch feeds until all are done)."""
    tokens = logits.argmax(-1)
    finished = [i for i, row in enumerate(rows) if row.finish_reason]
    if finished:
        tokens[finished] = pad_token_id
    for i, row in enumerate(rows):
        if row.generator is None or row.finish_reason:
            continue
        probs = torch.softmax(logits[i].float() / row.sampling.temperature, -1)
        if row.sampling.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest set reaching top_p
            drop = sorted_p.cumsum(-1) - sorted_p >= row.sampling.top_p
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0))
        tokens[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
    return tokens


# -- text: incremental detokenization, stop strings, what is held back ------------------------------
def final_text(tokenizer, ids: list[int], stop=(), skip_special_tokens: bool = True) -> str:
    """The one-shot answer of ``ids`` (no EOS among them): decoded, leading space dropped, cut before
    the first stop string, trailing space dropped. :class:`TextStream` streams the same text."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).lstrip()
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(cuts)] if cuts else text).rstrip()


class TextStream:
    """One answer's text as its tokens arrive, pieces whose concatenation is :func:`final_text` of
    the tokens taken (property-tested).

    Detokenization is incremental (as vLLM's and TGI's): only a window ``tokens[prefix_offset:]``
    is decoded per token, and the text it adds beyond ``tokens[prefix_offset:read_offset]`` is
    taken once it does not end in U+FFFD (a character whose bytes have not all arrived); decoding
    from a token boundary where the text was whole gives the same text as decoding from the start,
    and starting the window one group of tokens back keeps decoders that treat a sequence's first
    token apart (SentencePiece's leading space) right. Work per token is the window plus the text
    held back (trailing white space, the start of a possible stop string), not the whole answer;
    only a run of tokens that never completes a character (invalid UTF-8) grows the window.
    """

    def __init__(self, tokenizer, stop=(), skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.stop = tuple(s for s in stop if s)
        self.longest_stop = max(map(len, self.stop), default=0)
        self.tokens: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.prefix_text = ""  # decode(tokens[prefix_offset:read_offset])
        self.pending = ""  # whole text not sent yet: it may still be trailing space or start a stop string
        self.solid = 0  # length of pending up to its last non-space character
        self.started = False  # a non-space character has been seen (the answer's leading space is dropped)
        self.stopped = False  # a stop string was found: the text is complete

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _window(self, final: bool) -> tuple[str, str]:
        """(text the new tokens add for good, text they add that a later token may still change)."""
        text = self._decode(self.tokens[self.prefix_offset:])[len(self.prefix_text):]
        if text.endswith("\ufffd") and not final:
            return "", text
        self.prefix_offset, self.read_offset, self.prefix_text = self.read_offset, len(self.tokens), text
        return text, ""

    def push(self, token: int) -> str:
        """Take one token (not EOS); return the text that can be sent now (possibly empty)."""
        self.tokens.append(token)
        return self._take(*self._window(final=False), final=False)

    def finish(self) -> str:
        """The rest of the text once the answer ends (EOS or its token budget)."""
        return self._take(*self._window(final=True), final=True)

    def _take(self, text: str, unsure: str, final: bool) -> str:
        if self.stopped:
            return ""
        if not self.started:
            text = text.lstrip()
            unsure = unsure if text else unsure.lstrip()
            self.started = bool(text)
        base = len(self.pending)
        self.pending += text
        if kept := text.rstrip():
            self.solid = base + len(kept)
        # a stop string starts in what is not sent yet (its start was held back): search from where
        # one could start that takes the new text, including the part that may still change
        start = max(0, base - self.longest_stop + 1)
        look = self.pending[start:] + unsure
        cuts = [i for i in (look.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            out, self.pending = (self.pending[:start] + look[:min(cuts)]).rstrip(), ""
            return out
        if final:
            out, self.pending = self.pending.rstrip(), ""
            return out
        end = self.solid
        for s in self.stop:  # a suffix that may grow into a stop string
            longest = min(len(s) - 1, len(self.pending))
            n = next((n for n in range(longest, 0, -1) if self.pending.endswith(s[:n])), 0)
            end = min(end, len(self.pending) - n)
        if end < self.solid:  # held back before a stop string's start: not the space before it either
            end = len(self.pending[:end].rstrip())
        out, self.pending, self.solid = self.pending[:end], self.pending[end:], self.solid - end
        return out


# -- one sequence -----------------------------------------------------------------------------------
class Row:
    """One sequence being decoded: its budget, how it chooses tokens, the tokens it took and, when it
    has a :class:`TextStream`, its text. ``finish_reason``: "stop" (EOS or a stop string) or
    "length" once it ends, else None.

    Args:
        max_new_tokens: the most tokens it takes (EOS included).
        eos_token_id: the token that ends it (not part of its text).
        sampling: how it chooses its tokens (greedy by default).
        stream: its text as tokens arrive (needed for stop strings); None: ids only.
        device: where its random generator lives (sampled rows).
    """

    def __init__(self, max_new_tokens: int, eos_token_id: int, sampling: Sampling = Sampling(),
                 stream: TextStream | None = None, device="cpu"):
        self.max_new_tokens, self.eos_token_id = max_new_tokens, eos_token_id
        self.sampling, self.generator, self.stream = sampling, sampling.generator(device), stream
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        """Take ``token``; return the text it lets the row send (empty without a stream)."""
        self.tokens.append(token)
        eos = token == self.eos_token_id
        text = self.stream.push(token) if self.stream is not None and not eos else ""
        if eos or (self.stream is not None and self.stream.stopped):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason and self.stream is not None:
            text += self.stream.finish()
        self.pieces.append(text)
        return text

    @property
    def answer_ids(self) -> list[int]:
        """The tokens taken, without the EOS that ended them."""
        return self.tokens[:-1] if self.tokens and self.tokens[-1] == self.eos_token_id else list(self.tokens)

    @property
    def text(self) -> str:
        """The text streamed so far (the whole answer once finished)."""
        return "".join(self.pieces)


# -- rows decoding together -------------------------------------------------------------------------
class DecodingBatch:
    """Rows decoding together from gist caches: the backend's decoding state (one row per
    :class:`Row`) and the tokens chosen last (fed at the next step). Use :meth:`start`."""

    def __init__(self, model, backend, state, rows: list[Row], tokens: torch.Tensor, pad_token_id: int,
                 compiled: bool | None = None):
        self.model, self.backend, self.state = model, backend, state
        self.rows, self.tokens, self.pad_token_id = rows, tokens, pad_token_id
        self.compiled = compiled  # None: growing buffers, eager; else static buffers, compiled or not

    @classmethod
    def start(cls, model, cache: GistCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: list[Row], pad_token_id: int,
              compile: bool | str = False) -> tuple[DecodingBatch, list[str]]:
        """The first forward of what follows each cache row (``input_ids`` padded as
        :func:`continuation_batch` pads) and every row's first token.

        Args:
            model: the model the cache was made with.
            cache: one row per row of ``input_ids``.
            input_ids / attention_mask: (B, T) what follows each cache row.
            rows: one :class:`Row` per row.
            pad_token_id: fed for rows that finished while others go on.
            compile: decode in static key/value buffers (the batch and the capacity rounded up to
                powers of two) with each step through ``torch.compile`` (CUDA graphs on a GPU);
                ``"static"``: the same buffers, eager. A backend that cannot (T5-style models) says so
                in a warning and decodes eagerly.

        Returns:
            (the batch, the text each row's first token adds).

        Raises:
            ContextLengthError: a row's prompt leaves no room for its ``max_new_tokens``.
        """
        check_fits(model, cache, attention_mask, [r.max_new_tokens for r in rows])
        backend = backend_named(cache.backend)
        if compile and not backend.can_compile:
            warnings.warn(f"compile: the {backend.name} backend cannot decode in static buffers; decoding "
                          "eagerly", stacklevel=2)
            compile = False
        if compile:
            logits, state = backend.start_static(model, cache, input_ids, attention_mask,
                                                 max(r.max_new_tokens for r in rows))
            compiled = compile != "static"
        else:
            logits, state = backend.start(model, cache, input_ids, attention_mask)
            compiled = None
        batch = cls(model, backend, state, rows, input_ids.new_zeros(len(rows)), pad_token_id, compiled)
        return batch, batch._advance(logits)

    def step(self) -> list[str]:
        """One more token for every row (finished rows take padding, which nothing reads); returns
        the text each row adds."""
        if self.compiled is None:
            logits, self.state = self.backend.step(self.model, self.state, self.tokens)
        else:
            logits, self.state = self.backend.step_static(self.model, self.state, self.tokens, self.compiled)
        return self._advance(logits)

    def _advance(self, logits: torch.Tensor) -> list[str]:
        was_done = [r.finish_reason is not None for r in self.rows]
        self.tokens = choose_tokens(logits, self.rows, self.pad_token_id)
        return ["" if done else row.push(t) for row, done, t in zip(self.rows, was_done,
                                                                    self.tokens.tolist())]

    @property
    def done(self) -> bool:
        return all(r.finish_reason for r in self.rows)

    def keep(self, indices: list[int]) -> None:
        """Keep rows ``indices`` alone, in that order (finished requests leave a running batch)."""
        if len(indices) == len(self.rows):
            return
        if self.compiled is not None and indices:  # new static buffers, sized to the rows that stay
            self.rows = [self.rows[i] for i in indices]
            self.state = self.backend.restack_static([(self.state, indices)], _room(self.rows))
            self.tokens = self.tokens[torch.tensor(indices, device=self.tokens.device)]
            return
        self.rows = [self.rows[i] for i in indices]
        if indices:
            index = torch.tensor(indices, device=self.tokens.device)
            self.state = self.backend.select_rows(self.state, index)
            self.tokens = self.tokens[index]

    @staticmethod
    def merge(batches: list[DecodingBatch]) -> DecodingBatch | None:
        """One batch holding the rows of ``batches`` in order (rows started at different steps decode
        together); None where the backend keeps them apart."""
        first = batches[0]
        if len({b.compiled for b in batches}) > 1:
            return None  # static and growing buffers decode apart
        if first.compiled is not None:
            rows = [r for b in batches for r in b.rows]
            state = first.backend.restack_static([(b.state, list(range(len(b.rows)))) for b in batches],
                                                 _room(rows))
            tokens = torch.cat([b.tokens for b in batches])
            return DecodingBatch(first.model, first.backend, state, rows, tokens, first.pad_token_id,
                                 first.compiled)
        state = batches[0].backend.merge([b.state for b in batches])
        if state is None:
            return None
        first = batches[0]
        return DecodingBatch(first.model, first.backend, state, [r for b in batches for r in b.rows],
                             torch.cat([b.tokens for b in batches]), first.pad_token_id)


def _room(rows: list[Row]) -> int:
    """Columns the rows may still write: the most tokens any of them may still take."""
    return max((r.max_new_tokens - len(r.tokens) for r in rows), default=0)


def _all_ranks_done(batch: DecodingBatch, sync_ranks: bool) -> bool:
    """Whether every row is done, on every process when ``sync_ranks`` (ZeRO-3 gathers parameters
    inside each forward, so no rank may stop stepping before the others)."""
    done = batch.done
    if sync_ranks and dist.is_available() and dist.is_initialized():
        flag = torch.tensor(int(done), dtype=torch.int32, device=batch.tokens.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        done = bool(flag)
    return done


def decode_steps(model, cache: GistCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 rows: list[Row], pad_token_id: int, sync_ranks: bool = False,
                 compile: bool | str = False) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """A static batch decoded step by step: yields (the tokens chosen (B,), the text each row adds)
    until every row is done, on every process when ``sync_ranks``.

    Args:
        model / cache / input_ids / attention_mask / rows / pad_token_id: as :meth:`DecodingBatch.start`.
        sync_ranks: step until every rank's rows are done (ZeRO-3 validation).
        compile: as :meth:`DecodingBatch.start`.
    """
    if not rows or max(r.max_new_tokens for r in rows) < 1:
        return
    batch, texts = DecodingBatch.start(model, cache, input_ids, attention_mask, rows, pad_token_id, compile)
    yield batch.tokens, texts
    while not _all_ranks_done(batch, sync_ranks):
        texts = batch.step()
        yield batch.tokens, texts
