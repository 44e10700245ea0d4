"""The serving engine: many requests decoding together, each continuing the cached prompt of its
instruction. No HTTP here (``serving/server.py`` puts it behind LitServe); any thread may submit
or cancel, one thread calls :meth:`ServingEngine.step`.

One step: (1) requests that arrived are checked (a request that cannot be served gets its error
now) and queued; cancelled ones leave; (2) every running request gets one more token, in one
forward; (3) waiting requests join, up to ``max_batch_size`` running: their instructions' caches
come from memory (an LRU bounded in bytes), else from the on-disk :class:`CacheStore`, else they
are compressed, in one batch, each distinct instruction once however many requests carry it; one
forward of their inputs from those caches gives each its first token. Decoder-only models then
decode the newcomers in the same batch as the running requests (continuous batching); T5 keeps
batches that started at different steps apart (its decoder cannot align them).

Modes, i.e. what a prompt costs:
- ``gist``: caches as the model was trained (its condition; k positions for gist), kept;
- ``instruction``: the whole instruction's keys/values kept (pos_control caching, i.e. the
  prefix caching of ordinary servers), decoder-only;
- ``full``: nothing kept; every request runs its whole prompt again (its instruction through the
  compress forward, then its input), so its answers equal ``gist``'s, at the cost of no caching.
"""

from __future__ import annotations

import logging
import queue
import re
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from ..backends import backend_of
from ..cache import GistCache
from ..caching import compress
from ..errors import GistError
from ..generation import positions_needed
from ..padding import pad_batch
from ..prompt_cache import CacheStore
from ..templates import encode_continuation, encode_prefix
from ..tokens import gist_token_id

MODES = ("gist", "instruction", "full")
MIN_TEMPERATURE = 1e-5  # a request below it is answered greedily
log = logging.getLogger(__name__)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str | int) -> int:
    """``"256MB"`` (10^6), ``"1GiB"`` (2^30), ``"0"`` or an int: a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 256MB, 1GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class RequestError(GistError, ValueError):
    """A request that cannot be served as asked (the client's to fix: HTTP 400); ``code`` in
    OpenAI's terms where there is one."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class GenerationRequest:
    """What one request asks for. ``temperature`` 0 is greedy; ``stop``: strings that end the answer."""

    instruction: str
    input: str = ""
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What one step produced for one request: new text, and on its last event why it ended."""

    uid: str
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
    error: str | None = None  # the request was refused or failed: its only event
    status: int = 200  # the HTTP status an error maps to
    code: str | None = None  # the error's code in OpenAI's terms (e.g. context_length_exceeded)
    usage: dict | None = None  # on the last event
    cache: str | None = None  # first event: "memory", "disk", "compressed" (full mode: "none")
    stats: dict | None = None  # the answer to a stats request

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None or self.stats is not None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "uid"}


class PromptCacheLRU:
    """Caches of instructions in memory, least recently used dropped first, bounded in bytes held
    (padding included). An entry larger than the whole budget is not kept."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, GistCache] = OrderedDict()
        self.used = 0
        self.evicted = 0
        self.added, self.added_bytes = 0, 0  # every entry ever kept: its mean size is what one instruction costs

    def get(self, key: str) -> GistCache | None:
        cache = self.entries.get(key)
        if cache is not None:
            self.entries.move_to_end(key)
        return cache

    def put(self, key: str, cache: GistCache) -> bool:
        size = cache.held_bytes()
        if size > self.capacity:
            return False
        if key in self.entries:
            self.used -= self.entries.pop(key).held_bytes()
        while self.used + size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.used -= old.held_bytes()
            self.evicted += 1
        self.entries[key] = cache
        self.used += size
        self.added += 1
        self.added_bytes += size
        return True

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class _Job:
    uid: str
    request: GenerationRequest
    prefix_len: int  # specials + instruction + gists
    continuation: list[int]
    generator: torch.Generator | None = None
    cache_source: str = ""
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already sent

    def usage(self) -> dict:
        prompt = self.prefix_len + len(self.continuation)
        cached = self.prefix_len if self.cache_source in ("memory", "disk") else 0
        return {"prompt_tokens": prompt, "completion_tokens": len(self.generated),
                "total_tokens": prompt + len(self.generated), "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class _Batch:
    state: object  # the backend's decoding state, one row per job
    jobs: list[_Job]
    tokens: torch.Tensor  # (B,) the last token of each row, fed at the next step


class ServingEngine:
    def __init__(self, model, tokenizer, num_gist_tokens: int, condition: str, mode: str = "gist",
                 cache_memory: int | str = "256MB", cache_dir: str | None = None, max_batch_size: int = 16):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.mode, self.num_gist_tokens = mode, num_gist_tokens
        self.condition = "pos_control" if mode == "instruction" else condition
        self.backend = backend_of(model)
        why_not = self.backend.cannot_cache(self.condition)
        if why_not:
            raise GistError(f"--mode {mode} needs {self.condition} caching: {why_not}")
        self.max_batch_size = max_batch_size
        self.gist_id = gist_token_id(tokenizer)
        self.context = self.backend.context_length(model.config)
        self.memory = PromptCacheLRU(0 if mode == "full" else parse_bytes(cache_memory))
        self.store = (CacheStore(cache_dir, model, tokenizer, num_gist_tokens, self.condition, frozen=True)
                      if cache_dir and mode != "full" else None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[_Job] = deque()
        self.admitting: list[_Job] = []  # taken from waiting, not yet running (a failure must still answer them)
        self.running: list[_Batch] = []
        # per request: served from memory, from disk, or waiting for a compression ("compressed_waits");
        # "compressed": compressions run (one per distinct missing instruction; per request in full mode)
        self.counts = {"requests": 0, "memory_hits": 0, "disk_hits": 0, "compressed_waits": 0, "compressed": 0,
                       "refused": 0, "cancelled": 0}

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, uid: str, request: GenerationRequest | dict) -> None:
        self._inbox.put(("request", uid, request))

    def cancel(self, uid: str, ack: str | None = None) -> None:
        """Drop request ``uid`` (waiting or running); ``ack``: a uid that gets an event when done."""
        self._inbox.put(("cancel", uid, ack))

    def request_stats(self, uid: str) -> None:
        """``uid`` gets an event with :meth:`stats` at the next step."""
        self._inbox.put(("stats", uid, None))

    def busy(self) -> bool:
        return not self._inbox.empty() or bool(self.waiting) or bool(self.running)

    # -- the stepping thread ------------------------------------------------------------------
    def stats(self) -> dict:
        entries = len(self.memory)
        return {**self.counts, "mode": self.mode, "condition": self.condition, "cached_instructions": entries,
                "cache_bytes": self.memory.used, "cache_capacity": self.memory.capacity,
                "evicted": self.memory.evicted, "running": sum(len(b.jobs) for b in self.running),
                "waiting": len(self.waiting),
                # the mean size of every entry kept so far (not only of those still held)
                "bytes_per_instruction": self.memory.added_bytes / self.memory.added if self.memory.added else None}

    def step(self) -> list[Event]:
        """One step (see the module docstring). A failure inside it (a bug, out of memory) ends every
        request in flight with a 500 event, keeps the events made before it, and leaves the engine
        ready for new requests."""
        events: list[Event] = []
        try:
            self._step(events)
        except Exception as e:  # noqa: BLE001 - one failed step must not lose requests or stop the engine
            log.exception("engine step failed")
            events += self.fail_all(f"the server failed while generating: {type(e).__name__}: {e}")
        return events

    @torch.no_grad()
    def _step(self, events: list[Event]) -> None:
        self._drain(events)
        for batch in list(self.running):
            logits, batch.state = self.backend.step(self.model, batch.state, batch.tokens)
            self._advance(batch, self._choose(logits, batch.jobs), events)
        self._admit(events)
        if len(self.running) > 1:
            merged = self.backend.merge([b.state for b in self.running])
            if merged is not None:
                self.running = [_Batch(merged, [j for b in self.running for j in b.jobs],
                                       torch.cat([b.tokens for b in self.running]))]

    def fail_all(self, message: str) -> list[Event]:
        """Error events for every request in flight (after a failure inside a step), and a clean slate."""
        jobs = [j for b in self.running for j in b.jobs] + self.admitting + list(self.waiting)
        self.running, self.admitting, self.waiting = [], [], deque()
        return [Event(j.uid, error=message, status=500) for j in dict((j.uid, j) for j in jobs).values()]

    def _drain(self, events: list[Event]) -> None:
        while not self._inbox.empty():
            kind, uid, payload = self._inbox.get()
            if kind == "stats":
                events.append(Event(uid, stats=self.stats()))
            elif kind == "cancel":
                self._cancel(uid, events)
                if payload is not None:
                    events.append(Event(payload, finish_reason="cancelled"))
            else:
                self.counts["requests"] += 1
                try:
                    self.waiting.append(self._job(uid, payload))
                except (RequestError, TypeError, ValueError, OverflowError) as e:  # this request's alone
                    self.counts["refused"] += 1
                    events.append(Event(uid, error=str(e), status=400, code=getattr(e, "code", None)))

    def _cancel(self, uid: str, events: list[Event]) -> None:
        for job in list(self.waiting):
            if job.uid == uid:
                self.waiting.remove(job)
                self.counts["cancelled"] += 1
                events.append(Event(uid, finish_reason="cancelled"))
        for batch in self.running:
            keep = [i for i, j in enumerate(batch.jobs) if j.uid != uid]
            if len(keep) < len(batch.jobs):
                self.counts["cancelled"] += 1
                events.append(Event(uid, finish_reason="cancelled"))
                self._keep(batch, keep)
        self.running = [b for b in self.running if b.jobs]

    def _job(self, uid: str, request: GenerationRequest | dict) -> _Job:
        if isinstance(request, dict):
            request = GenerationRequest(**request)
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1; got {request.max_tokens}")
        if not request.instruction.strip():
            raise RequestError("the instruction is empty")
        prefix = len(encode_prefix(self.tokenizer, request.instruction, self.num_gist_tokens, self.gist_id))
        cont = encode_continuation(self.tokenizer, request.input, self.backend.encoder_decoder)
        if self.context is not None:
            if prefix >= self.context:
                raise RequestError(f"the instruction takes {prefix - self.num_gist_tokens} tokens (+ "
                                   f"{self.num_gist_tokens} gist tokens); the model has {self.context} positions",
                                   "context_length_exceeded")
            need = positions_needed(prefix + len(cont), request.max_tokens)
            if need > self.context:
                raise RequestError(
                    f"the prompt does not fit the model's {self.context} positions: instruction + gists {prefix} + "
                    f"input {len(cont)} tokens + max_tokens {request.max_tokens} need {need} (the last new token is "
                    "not fed back); shorten the input or ask for fewer tokens", "context_length_exceeded")
        if request.seed is not None and not 0 <= request.seed < 2**63:
            raise RequestError(f"seed must be between 0 and 2**63 - 1; got {request.seed}")
        generator = None
        if request.temperature >= MIN_TEMPERATURE:  # below it, sampling is greedy (and 1/t overflows)
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        return _Job(uid, request, prefix, cont, generator)

    def _admit(self, events: list[Event]) -> None:
        free = self.max_batch_size - sum(len(b.jobs) for b in self.running)
        if free <= 0 or not self.waiting:
            return
        jobs = self.admitting = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        cache = GistCache.concat(self._prompt_caches(jobs))
        side = "right" if self.backend.encoder_decoder else "left"
        ids, mask = pad_batch([j.continuation for j in jobs], self.tokenizer.pad_token_id, side)
        device = self.model.device
        logits, state = self.backend.start(self.model, cache.to(device), ids.to(device), mask.to(device))
        batch = _Batch(state, jobs, torch.zeros(len(jobs), dtype=torch.long, device=device))
        self._advance(batch, self._choose(logits, jobs), events, first=True)
        self.admitting = []
        if batch.jobs:
            self.running.append(batch)

    def _prompt_caches(self, jobs: list[_Job]) -> list[GistCache]:
        """One cache row per job: from memory, disk, or compressed now (each instruction once)."""
        found: dict[str, GistCache] = {}
        source: dict[str, str] = {}
        missing: list[str] = []
        for job in jobs:
            text = job.request.instruction
            if self.mode == "full":
                job.cache_source = "none"
                missing.append(text)  # every request pays for its own prompt
                continue
            if text not in source:
                if (hit := self.memory.get(text)) is not None:
                    found[text], source[text] = hit, "memory"
                elif self.store is not None and (stored := self._from_disk(text)) is not None:
                    found[text], source[text] = stored, "disk"
                    self.memory.put(text, found[text])
                else:
                    missing.append(text)
                    source[text] = "compressed"
            job.cache_source = source[text]
            self.counts[f"{source[text]}_hits" if source[text] != "compressed" else "compressed_waits"] += 1
        rows = []
        for start in range(0, len(missing), self.max_batch_size):
            chunk = missing[start:start + self.max_batch_size]
            cache = compress(self.model, self.tokenizer, chunk, self.num_gist_tokens, self.condition)
            rows += [cache.select([i]).trimmed() for i in range(len(chunk))]
        self.counts["compressed"] += len(missing)
        if self.mode == "full":
            return rows
        for text, row in zip(missing, rows):
            found[text] = row
            self.memory.put(text, row)
            if self.store is not None:
                self.store.add(text, row)
        return [found[j.request.instruction] for j in jobs]

    def _from_disk(self, text: str) -> GistCache | None:
        """The store's entry for ``text``; None when it has none or one that does not belong to this
        model (a store folder reused after retraining) or cannot be read: it is made again."""
        if text not in self.store:
            return None
        try:
            return self.store.get(text)
        except GistError as e:
            log.warning("cache store entry for %r not used (it is made again): %s", text[:60], e)
            return None

    def _choose(self, logits: torch.Tensor, jobs: list[_Job]) -> torch.Tensor:
        """The next token of every row: greedy at temperature 0, else sampled (top-p) with the job's seed."""
        tokens = logits.argmax(-1)
        for i, job in enumerate(jobs):
            if job.generator is None:
                continue
            probs = torch.softmax(logits[i].float() / job.request.temperature, -1)
            if job.request.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p >= job.request.top_p  # keep the smallest set reaching top_p
                probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0))
            tokens[i] = torch.multinomial(probs, 1, generator=job.generator)[0]
        return tokens

    def _advance(self, batch: _Batch, tokens: torch.Tensor, events: list[Event], first: bool = False) -> None:
        keep = []
        for i, (job, token) in enumerate(zip(batch.jobs, tokens.tolist())):
            event = self._take(job, token)
            if first:
                event.cache = job.cache_source
            events.append(event)
            if not event.done:
                keep.append(i)
        batch.tokens = tokens
        self._keep(batch, keep)
        self.running = [b for b in self.running if b.jobs]

    def _keep(self, batch: _Batch, keep: list[int]) -> None:
        if len(keep) == len(batch.jobs):
            return
        batch.jobs = [batch.jobs[i] for i in keep]
        if keep:
            rows = torch.tensor(keep, device=batch.tokens.device)
            batch.state = self.backend.select_rows(batch.state, rows)
            batch.tokens = batch.tokens[rows]

    def _take(self, job: _Job, token: int) -> Event:
        """The job's event for its new ``token``: the text it adds (held back while it may still
        change: a partial character, trailing space, the start of a stop string) and whether it ends."""
        reason = None
        if token == self.tokenizer.eos_token_id:
            reason = "stop"
        job.generated.append(token)
        ids = job.generated[:-1] if reason else job.generated
        text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        stops = [i for i in (text.find(s) for s in job.request.stop) if i >= 0]
        if stops:
            text, reason = text[:min(stops)], "stop"
        elif reason is None and len(job.generated) >= job.request.max_tokens:
            reason = "length"
        if reason:
            end = len(text.rstrip())
        else:
            end = len(text.rstrip().rstrip("\ufffd"))
            for s in job.request.stop:  # a suffix that may grow into a stop string
                end = min(end, next((len(text) - n for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), end))
        delta = text[job.sent:max(end, job.sent)]
        job.sent += len(delta)
        return Event(job.uid, text=delta, finish_reason=reason, usage=job.usage() if reason else None)
