"""The serving engine: many requests decoding together, each continuing the cached prompt of its
instruction. No HTTP here (``serving/server.py`` puts it behind LitServe); any thread may submit
or cancel, one thread calls :meth:`ServingEngine.step`.

One step: (1) requests that arrived are checked (a request that cannot be served gets its error
now) and queued; cancelled ones leave; (2) every running request gets one more token, in one
forward; (3) waiting requests join, up to ``max_batch_size`` running: their instructions' caches
come from memory (an LRU bounded in bytes), else from the on-disk :class:`CacheStore`, else they
are compressed, in one batch, each distinct instruction once however many requests carry it; one
forward of their inputs from those caches gives each its first token. A long context (a model
with ``segments``) is compressed in pieces instead: one segment per step
(:class:`~gist_lightning.long_context.ContextCompression`), between the running requests' tokens,
while its requests wait and others join; so a document delays the running requests by one segment
per token, not by its whole compression. Decoder-only models then
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
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from ..backends import backend_of
from ..cache import GistCache
from ..caching import compress
from ..decoding import (
    MIN_TEMPERATURE,  # noqa: F401 - where the engine's users found it before
    DecodingBatch,
    Row,
    Sampling,
    TextStream,
    continuation_batch,
    positions_needed,
    prompt_room,
)
from ..errors import ContextLengthError, GistError
from ..long_context import ContextCompression, SegmentSettings, compress_context, encode_context
from ..prompt_cache import CacheStore
from ..templates import encode_continuation, encode_prefix
from ..tokens import encode_text, gist_token_id, special_frame

MODES = ("gist", "instruction", "full")
# where a request's cache came from -> the counter of ServingEngine.stats it adds one to
_COUNT_OF_SOURCE = {"memory": "memory_hits", "disk": "disk_hits", "compressed": "compressed_waits"}
# what sum_stats adds up over engines
_SUMMED = ("requests", "memory_hits", "disk_hits", "compressed_waits", "compressed", "refused", "cancelled",
           "cached_instructions", "cache_bytes", "cache_capacity", "evicted", "running", "waiting",
           "instructions_kept")
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


def sum_stats(stats: list[dict]) -> dict:
    """The :meth:`ServingEngine.stats` of several engines (a server's workers) as those of one: counters,
    sizes and queues summed (``cache_capacity``: the memory of all of them), ``bytes_per_instruction``
    the mean over every entry any of them kept; mode and condition are the same in all."""
    total = {key: sum(s[key] for s in stats) for key in _SUMMED}
    kept_bytes = sum((s["bytes_per_instruction"] or 0) * s["instructions_kept"] for s in stats)
    kept = total["instructions_kept"]
    total["bytes_per_instruction"] = kept_bytes / kept if kept else None
    return {**total, **{key: stats[0][key] for key in ("mode", "condition") if stats}}


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
        # every entry ever kept: its mean size is what one instruction costs
        self.added, self.added_bytes = 0, 0

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
    row: Row  # its decoding: tokens taken, text sent, why it ended
    cache_source: str = ""
    instruction_tokens: int = 0  # the instruction's (or long context's) own tokens
    cached_positions: int = 0  # what its cache row holds in their place

    def usage(self) -> dict:
        prompt, completion = self.prefix_len + len(self.continuation), len(self.row.tokens)
        cached = self.prefix_len if self.cache_source in ("memory", "disk") else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached},
                # what the instruction (a long context: its segments) was compressed into
                "compression": {"instruction_tokens": self.instruction_tokens,
                                "cached_positions": self.cached_positions}}


@dataclass
class _Batch:
    decoding: DecodingBatch  # one row per job, in order
    jobs: list[_Job]

    def keep(self, indices: list[int]) -> None:
        self.jobs = [self.jobs[i] for i in indices]
        self.decoding.keep(indices)


class ServingEngine:
    """Continuous batching over gist caches: requests decode together, each continuing its
    instruction's cached prompt (see the module's docstring for what one step does). Any thread may
    :meth:`submit` or :meth:`cancel`; one thread calls :meth:`step` while :meth:`busy` and hands the
    events it returns to the clients.

    Args:
        model: an exported gist model (:func:`~gist_lightning.export.load_pretrained`), in eval mode.
        tokenizer: its tokenizer.
        num_gist_tokens: k, as the model was trained (the export's settings).
        condition: the condition the model was trained under (the export's settings).
        mode: ``"gist"`` (cache as trained), ``"instruction"`` (keep whole instructions, decoder-only)
            or ``"full"`` (no caching: every request runs its whole prompt).
        cache_memory: the memory for cached instructions, e.g. ``"256MB"``, ``"2GiB"`` or bytes.
        cache_dir: also keep caches here, across restarts (a folder or an fsspec URL, shared by every
            worker; see :class:`~gist_lightning.prompt_cache.CacheStore`).
        max_batch_size: requests decoded together at most.
        segments: the model gists long contexts segment by segment (its export's ``segments``); a
            request's instruction (a system prompt or a document) is then compressed with
            :func:`~gist_lightning.long_context.compress_context`, once per distinct text.
        compile: decode in static key/value buffers, each step through ``torch.compile`` (CUDA
            graphs on a GPU); batches are padded to powers of two in rows and columns, so joins and
            leaves reuse a few compiled shapes (``"static"``: the buffers without compiling). The
            answers are the eager ones.
        prefill_tokens_per_step: a long context is compressed in pieces between decoding steps: one
            segment per step (0), or segments until this many of its tokens per step (at least one
            segment): more makes a document's first token come sooner and the running requests'
            tokens later.

    Raises:
        ValueError: an unknown mode or a batch size below 1.
        GistError: the model's family cannot cache under the mode's condition, or cannot take
            ``segments``.

    Example:
        >>> model, tok, settings = load_pretrained("runs/tiny/version_0/export")
        >>> engine = ServingEngine(model, tok, settings["num_gist_tokens"], settings["condition"])
        >>> engine.submit("a", GenerationRequest("Reverse the list.", "cat dog owl", max_tokens=16))
        >>> engine.submit("b", {"instruction": "Reverse the list.", "input": "red green blue"})
        >>> text = {}
        >>> while engine.busy():
        ...     for event in engine.step():
        ...         text[event.uid] = text.get(event.uid, "") + event.text
        >>> text
        {'a': 'owl dog cat', 'b': 'blue green red'}
        >>> engine.stats()["compressed"]  # the instruction of both, compressed once
        1
    """

    def __init__(self, model, tokenizer, num_gist_tokens: int, condition: str, mode: str = "gist",
                 cache_memory: int | str = "256MB", cache_dir: str | None = None, max_batch_size: int = 16,
                 segments: SegmentSettings | None = None, compile: bool | str = False,
                 prefill_tokens_per_step: int = 0):
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
        self.compile = compile
        if prefill_tokens_per_step < 0:
            raise ValueError(f"prefill_tokens_per_step must be >= 0; got {prefill_tokens_per_step}")
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.gist_id = gist_token_id(tokenizer)
        self.n_special = len(special_frame(tokenizer)[0])  # tokens before an instruction (e.g. BOS)
        self.context = self.backend.context_length(model.config)
        self.memory = PromptCacheLRU(0 if mode == "full" else parse_bytes(cache_memory))
        if segments is not None and self.backend.encoder_decoder:
            raise GistError("segments: a T5-style encoder reads its whole source at once; long contexts are "
                            "compressed segment by segment by decoder-only models")
        self.segments = segments
        self.store = (CacheStore(cache_dir, model, tokenizer, num_gist_tokens, self.condition, frozen=True,
                                 segments=segments) if cache_dir and mode != "full" else None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[_Job] = deque()
        # taken from waiting, not yet running (a failure must still answer them)
        self.admitting: list[_Job] = []
        # long contexts being compressed, one segment per step, and the caches made for waiting jobs
        self.compressing: list[tuple[list[str], ContextCompression]] = []
        self._fresh: dict[str, GistCache] = {}
        self.running: list[_Batch] = []
        # per request: served from memory, from disk, or waiting for a compression ("compressed_waits");
        # "compressed": compressions run (one per distinct missing instruction; per request in full mode)
        self.counts = {"requests": 0, "memory_hits": 0, "disk_hits": 0, "compressed_waits": 0,
                       "compressed": 0, "refused": 0, "cancelled": 0}

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, uid: str, request: GenerationRequest | dict) -> None:
        """Queue a request; its events (its text as it comes, then why it ended; or its refusal)
        carry ``uid``.

        Args:
            uid: the request's id, unique among those in flight.
            request: what it asks (a :class:`GenerationRequest` or a mapping of its fields).
        """
        self._inbox.put(("request", uid, request))

    def cancel(self, uid: str) -> None:
        """Drop request ``uid`` (waiting or running): its last event says ``cancelled``."""
        self._inbox.put(("cancel", uid, None))

    def request_stats(self, uid: str) -> None:
        """``uid`` gets an event with :meth:`stats` at the next step."""
        self._inbox.put(("stats", uid, None))

    def busy(self) -> bool:
        """True while anything is queued, waiting or decoding: :meth:`step` has work."""
        return not self._inbox.empty() or bool(self.waiting) or bool(self.running) or bool(self.compressing)

    # -- the stepping thread ------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters since start (requests, memory and disk hits, compressions, refusals,
        cancellations) and the state now (cached instructions and their bytes, running, waiting)."""
        entries = len(self.memory)
        return {**self.counts, "mode": self.mode, "condition": self.condition, "cached_instructions": entries,
                "cache_bytes": self.memory.used, "cache_capacity": self.memory.capacity,
                "evicted": self.memory.evicted, "running": sum(len(b.jobs) for b in self.running),
                "waiting": len(self.waiting),
                # the mean size of every entry kept so far (not only of those still held)
                "bytes_per_instruction": (self.memory.added_bytes / self.memory.added if self.memory.added
                                          else None),
                "instructions_kept": self.memory.added}

    def step(self) -> list[Event]:
        """One step (see the module docstring). A failure inside it (a bug, out of memory) ends every
        request in flight with a 500 event, keeps the events made before it, and leaves the engine
        ready for new requests.

        Returns:
            list[Event]: what the step produced, in order: each request's new text, its end, or its
            refusal; and the answers to stats requests.
        """
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
            self._advance(batch, batch.decoding.step(), events)
        self._compress_pieces()
        self._admit(events)
        if len(self.running) > 1:
            merged = DecodingBatch.merge([b.decoding for b in self.running])
            if merged is not None:
                self.running = [_Batch(merged, [j for b in self.running for j in b.jobs])]

    def fail_all(self, message: str) -> list[Event]:
        """Error events for every request in flight (after a failure inside a step), and a clean slate."""
        jobs = [j for b in self.running for j in b.jobs] + self.admitting + list(self.waiting)
        self.running, self.admitting, self.waiting = [], [], deque()
        self.compressing, self._fresh = [], {}
        return [Event(j.uid, error=message, status=500) for j in dict((j.uid, j) for j in jobs).values()]

    def _drain(self, events: list[Event]) -> None:
        while not self._inbox.empty():
            kind, uid, payload = self._inbox.get()
            if kind == "stats":
                events.append(Event(uid, stats=self.stats()))
            elif kind == "cancel":
                self._cancel(uid, events)
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
                batch.keep(keep)
        self.running = [b for b in self.running if b.jobs]

    def _job(self, uid: str, request: GenerationRequest | dict) -> _Job:
        if isinstance(request, dict):
            request = GenerationRequest(**request)
        if request.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1; got {request.max_tokens}")
        if not request.instruction.strip():
            raise RequestError("the instruction is empty")
        prefix_ids, instruction_tokens = self._encode_instruction(request.instruction)
        prefix, gists = len(prefix_ids), prefix_ids.count(self.gist_id)
        cont = encode_continuation(self.tokenizer, request.input, self.backend.encoder_decoder)
        self._check_fits(prefix, gists, len(cont), request.max_tokens)
        try:
            sampling = Sampling(request.temperature, request.top_p, request.seed)
        except ValueError as e:
            raise RequestError(str(e)) from None
        stream = TextStream(self.tokenizer, request.stop)
        row = Row(request.max_tokens, self.tokenizer.eos_token_id, sampling, stream, self.model.device)
        return _Job(uid, request, prefix, cont, row, instruction_tokens=instruction_tokens)

    def _encode_instruction(self, instruction: str) -> tuple[list[int], int]:
        """The prompt up to its last gist (``[specials] instruction <GIST>*k``, or a long context with
        its segments' gists) and the instruction's own tokens, the context tokenized once."""
        if self.segments is None:
            return (encode_prefix(self.tokenizer, instruction, self.num_gist_tokens, self.gist_id),
                    len(encode_text(self.tokenizer, instruction)))
        try:
            ids = encode_context(self.tokenizer, instruction, self.segments, self.gist_id)
        except ContextLengthError as e:
            raise RequestError(str(e), "context_length_exceeded") from None
        # [specials] + the context's raw tokens with gists placed among them
        return ids, len(ids) - ids.count(self.gist_id) - self.n_special

    def _check_fits(self, prefix: int, gists: int, input_tokens: int, max_tokens: int) -> None:
        """Refuse a request whose prompt and answer would not fit the model's positions: the check of
        ``decoding.check_fits``, per request and phrased for one."""
        if self.context is None:
            return
        if prefix >= self.context:
            raise RequestError(f"the instruction takes {prefix - gists} tokens (+ {gists} gist tokens); the "
                               f"model has {self.context} positions", "context_length_exceeded")
        if prefix + input_tokens > prompt_room(self.context, max_tokens):
            need = positions_needed(prefix + input_tokens, max_tokens)
            raise RequestError(
                f"the prompt does not fit the model's {self.context} positions: instruction + gists {prefix} "
                f"+ input {input_tokens} tokens + max_tokens {max_tokens} need {need} (the last new token is "
                "not fed back); shorten the input or ask for fewer tokens", "context_length_exceeded")

    def _admit(self, events: list[Event]) -> None:
        free = self.max_batch_size - sum(len(b.jobs) for b in self.running)
        if not self.waiting:
            return
        if self._in_pieces():  # long contexts: the jobs whose caches are ready; others start compressing
            jobs = self._ready_jobs(max(free, 0))
        elif free <= 0:
            return
        else:
            jobs = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if not jobs:
            return
        self.admitting = jobs
        cache = GistCache.concat(self._prompt_caches(jobs))
        pad = self.tokenizer.pad_token_id
        ids, mask = continuation_batch([j.continuation for j in jobs], pad, self.backend.encoder_decoder)
        device = self.model.device
        decoding, texts = DecodingBatch.start(self.model, cache.to(device), ids.to(device), mask.to(device),
                                              [j.row for j in jobs], pad, self.compile)
        batch = _Batch(decoding, jobs)
        self._advance(batch, texts, events, first=True)
        self.admitting = []
        if batch.jobs:
            self.running.append(batch)

    def _in_pieces(self) -> bool:
        """Long contexts are compressed a segment per step (in full mode each request compresses its
        own at admission, as a short instruction is)."""
        return self.segments is not None and self.mode != "full"

    def _ready_jobs(self, free: int) -> list[_Job]:
        """Up to ``free`` waiting jobs whose context caches are ready (in memory, on disk, or just
        compressed), in arrival order; the contexts of the others, neither cached nor being
        compressed, start compressing (each once, ``max_batch_size`` contexts per compression)."""
        ready, starting = [], []
        busy = {text for texts, _ in self.compressing for text in texts}
        for job in list(self.waiting):
            text = job.request.instruction
            if not job.cache_source:  # looked up once, when first considered
                if text in self._fresh:
                    job.cache_source = "memory"
                elif text in busy or text in starting:
                    job.cache_source = "compressed"
                else:
                    cache, job.cache_source = self._cached(text)
                    if cache is None:
                        starting.append(text)
                    else:
                        self._fresh[text] = cache
                self.counts[_COUNT_OF_SOURCE[job.cache_source]] += 1
            if text in self._fresh and len(ready) < free:
                ready.append(job)
                self.waiting.remove(job)
        for start in range(0, len(starting), self.max_batch_size):
            texts = starting[start:start + self.max_batch_size]
            rows = [encode_context(self.tokenizer, text, self.segments, self.gist_id) for text in texts]
            self.compressing.append((texts, ContextCompression(self.model, rows, self.gist_id,
                                                               self.tokenizer.pad_token_id, self.segments,
                                                               self.condition)))
            self.counts["compressed"] += len(texts)
        return ready

    def _compress_pieces(self) -> None:
        """One piece of every context being compressed (a segment, or ``prefill_tokens_per_step``
        tokens' worth); a finished one's caches are kept (memory, store) and held for the jobs
        waiting on them."""
        still = []
        for texts, compression in self.compressing:
            start = compression.tokens_left
            compression.step()
            while not compression.done and start - compression.tokens_left < self.prefill_tokens_per_step:
                compression.step()
            if not compression.done:
                still.append((texts, compression))
                continue
            cache = compression.result()
            for i, text in enumerate(texts):
                row = cache.select([i]).trimmed()
                self._keep(text, row)
                self._fresh[text] = row
        self.compressing = still

    def _prompt_caches(self, jobs: list[_Job]) -> list[GistCache]:
        """One cache row per job, in order: from memory, disk, or compressed now (each instruction
        once). In full mode every job compresses its own instruction and nothing is kept."""
        if self._in_pieces():  # made ready by _ready_jobs; held until no waiting job needs them
            rows = [self._fresh[job.request.instruction] for job in jobs]
            needed = {job.request.instruction for job in self.waiting}
            self._fresh = {t: c for t, c in self._fresh.items() if t in needed}
        elif self.mode == "full":  # every request pays for its own prompt
            for job in jobs:
                job.cache_source = "none"
            rows = self._compress([job.request.instruction for job in jobs])
        else:
            found, missing = self._look_up(jobs)
            for text, cache in zip(missing, self._compress(missing)):
                found[text] = cache
                self._keep(text, cache)
            rows = [found[job.request.instruction] for job in jobs]
        for job, row in zip(jobs, rows):
            job.cached_positions = int(row.valid.sum())
        return rows

    def _look_up(self, jobs: list[_Job]) -> tuple[dict[str, GistCache], list[str]]:
        """The caches of the jobs' instructions found in memory or on disk, and the distinct
        instructions found in neither, in the order first asked. Sets each job's ``cache_source``
        and counts, per request, a memory hit, a disk hit or a wait for a compression."""
        found: dict[str, GistCache] = {}
        source: dict[str, str] = {}  # instruction -> "memory", "disk" or "compressed"
        missing: list[str] = []
        for job in jobs:
            text = job.request.instruction
            if text not in source:
                cache, source[text] = self._cached(text)
                if cache is None:
                    missing.append(text)
                else:
                    found[text] = cache
            job.cache_source = source[text]
            self.counts[_COUNT_OF_SOURCE[source[text]]] += 1
        return found, missing

    def _cached(self, text: str) -> tuple[GistCache | None, str]:
        """``text``'s cache and where it was: ``(cache, "memory")``, ``(cache, "disk")`` (then kept
        in memory too), or ``(None, "compressed")`` when it must be made."""
        if (hit := self.memory.get(text)) is not None:
            return hit, "memory"
        if self.store is not None and (stored := self._from_disk(text)) is not None:
            self.memory.put(text, stored)
            return stored, "disk"
        return None, "compressed"

    def _compress(self, instructions: list[str]) -> list[GistCache]:
        """One cache row per instruction (trimmed of padding), compressed ``max_batch_size`` at a time."""
        rows = []
        for start in range(0, len(instructions), self.max_batch_size):
            chunk = instructions[start:start + self.max_batch_size]
            if self.segments is not None:  # long contexts, one segment at a time
                cache = compress_context(self.model, self.tokenizer, chunk, self.segments, self.condition)
            else:
                cache = compress(self.model, self.tokenizer, chunk, self.num_gist_tokens, self.condition)
            rows += [cache.select([i]).trimmed() for i in range(len(chunk))]
        self.counts["compressed"] += len(instructions)
        return rows

    def _keep(self, text: str, cache: GistCache) -> None:
        """A new cache goes to memory and, where there is one, to the store."""
        self.memory.put(text, cache)
        if self.store is not None:
            self.store.add(text, cache)

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

    def _advance(self, batch: _Batch, texts: list[str], events: list[Event], first: bool = False) -> None:
        """Each job's event for the token it just took; finished jobs leave the batch."""
        keep = []
        for i, (job, text) in enumerate(zip(batch.jobs, texts)):
            reason = job.row.finish_reason
            event = Event(job.uid, text=text, finish_reason=reason, usage=job.usage() if reason else None)
            if first:
                event.cache = job.cache_source
            events.append(event)
            if reason is None:
                keep.append(i)
        batch.keep(keep)
        self.running = [b for b in self.running if b.jobs]
