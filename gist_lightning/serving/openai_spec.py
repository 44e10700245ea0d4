"""The OpenAI-compatible HTTP face of the server, as a LitServe spec: request schemas, their
checks (every bad request gets a 4xx JSON error in OpenAI's shape, naming what is wrong), the
endpoints, and the response and stream chunk formats.

Endpoints: ``POST /v1/chat/completions`` (the system message is the instruction, the user message
the input; without a system message the user message is the instruction), ``POST /v1/completions``
(``prompt`` is the instruction, the extra field ``input`` the input; a list of prompts gives one
choice each), ``GET /v1/models``, ``GET /v1/cache/stats`` (the cache counters of every worker's
engine, summed, and each worker's under ``workers``), ``GET /metrics`` (Prometheus, every
worker's); LitServe adds ``GET /health``. The engines run in LitServe's inference workers; this runs
in its HTTP process and sends them requests through LitServe's queue. A request whose client goes
away is listed in the server's folder (``shared.py``), where every worker looks, and its remaining
events are counted (``gist_tokens_after_cancel``) and dropped. :func:`install_error_handlers` gives
FastAPI's own refusals (unknown path, wrong method) the same error shape; a client that leaves is one
log line, not a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import time
import uuid
from collections import deque
from typing import Annotated, Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .engine import sum_stats
from .metrics import metrics, render
from .shared import ServerFolder

log = logging.getLogger(__name__)
# a real request nests 4 levels (body, messages, a message, its content parts); clients may add a few
# more in fields read by nobody here (tools' JSON schemas), so this leaves room without letting a body
# reach the parser's or pydantic's recursion limits
MAX_DEPTH = 64
DEFAULT_MAX_TOKENS = 128
# how long the events of a cancelled request are waited for at most: its worker drops it at its next
# step, so this only bounds what a request whose worker died would hold (its uid, its listing)
AFTER_CANCEL_LIMIT = 600.0

# what a client may send beside the fields read here (OpenAI clients send some by default)
_LAX = ConfigDict(strict=True, extra="ignore")
Text = Annotated[str, Field(max_length=1_000_000)]


class TextPart(BaseModel):
    model_config = _LAX
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = _LAX
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(BaseModel):
    model_config = _LAX
    model: str | None = None
    max_tokens: int | None = None
    # NaN passes no comparison, so without allow_inf_nan it would be refused as "not <= 2"
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: Text | list[Text]
    input: Text = ""  # not in OpenAI's API: the input that follows the instruction


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 from_engine: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.from_engine = from_engine  # the engine answered so (and counted it); else refused here

    def refused_here(self) -> JSONResponse:
        """The response, counted as a refused request when no worker saw (and counted) it."""
        if not self.from_engine:
            metrics().requests.labels("refused" if self.status < 500 else "error").inc()
        return self.response()

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}},
                            status_code=self.status)


def _parse(schema: type[BaseModel], body) -> BaseModel:
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        # one line per field; a field that fits no member of a union lists what each member wanted
        problems: dict[str, list[str]] = {}
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]
                             if isinstance(p, int) or str(p).isidentifier()) or "body"
            problems.setdefault(where, []).append(err["msg"])
        text = "; ".join(f"{where}: {' or '.join(dict.fromkeys(msgs))}"
                         for where, msgs in list(problems.items())[:5])
        raise ApiError(400, f"invalid request: {text}", param=next(iter(problems))) from None


def chat_prompt(messages: list[ChatMessage]) -> tuple[str, str]:
    """(instruction, input) of a chat: the system (or developer) message and the user message."""
    system = [m.text for m in messages if m.role in ("system", "developer")]
    user = [m.text for m in messages if m.role == "user"]
    other = sorted({m.role for m in messages} - {"system", "developer", "user"})
    if other or len(user) != 1 or len(system) > 1:
        raise ApiError(400,
                       "a gist model answers one instruction and one input: send at most one system message "
                       "(the instruction) and exactly one user message (the input, or the instruction when "
                       f"there is no system message); got roles {[m.role for m in messages]}",
                       param="messages")
    return (system[0], user[0]) if system else (user[0], "")


def resolve_max_tokens(default_max_tokens: int | None, max_tokens_limit: int) -> int:
    """The max_tokens of a request that sets none: ``default_max_tokens``, or without it 128 capped
    at the limit (a default above the limit would refuse every such request with a number the client
    never sent, so it is refused here, before the server starts)."""
    if max_tokens_limit < 1:
        raise ValueError(f"--max_tokens_limit must be at least 1; got {max_tokens_limit}")
    if default_max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    if not 1 <= default_max_tokens <= max_tokens_limit:
        raise ValueError(f"--default_max_tokens {default_max_tokens} must be between 1 and "
                         f"--max_tokens_limit {max_tokens_limit}")
    return default_max_tokens


class GistOpenAISpec(LitSpec):
    def __init__(self, model_name: str, folder: ServerFolder, default_max_tokens: int | None = None,
                 max_tokens_limit: int = 1024, max_prompts: int = 64, max_body_bytes: int = 16 * 2**20):
        super().__init__()
        self.model_name, self.folder = model_name, folder
        self._ended: set[str] = set()  # requests whose last event has come (read or not)
        self._draining: set[asyncio.Task] = set()  # what the event loop holds only weakly
        self.default_max_tokens = resolve_max_tokens(default_max_tokens, max_tokens_limit)
        self.max_tokens_limit, self.max_prompts = max_tokens_limit, max_prompts
        self.max_body_bytes = max_body_bytes
        # LitServe's request queue is keyed by it; every endpoint uses it
        self.api_path = "/v1/chat/completions"
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/v1/cache/stats", self.cache_stats, ["GET"])
        self.add_endpoint("/metrics", self.prometheus_metrics, ["GET"])

    @property
    def stream(self):
        return True

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    # -- endpoints -----------------------------------------------------------------------------
    async def chat_completions(self, request: Request):
        try:
            req = _parse(ChatRequest, await _json_body(request, self.max_body_bytes))
            instruction, input = chat_prompt(req.messages)
            max_tokens = (req.max_completion_tokens if req.max_completion_tokens is not None
                          else req.max_tokens)
            gens = [self._generation(req, instruction, input, max_tokens)]
            return await self._respond(request, gens, req.stream, _ChatFormat(self.model_name))
        except ApiError as e:
            return e.refused_here()
        except _ClientGone as e:
            return e.response(request)

    async def completions(self, request: Request):
        try:
            req = _parse(CompletionRequest, await _json_body(request, self.max_body_bytes))
            prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if not 1 <= len(prompts) <= self.max_prompts:
                raise ApiError(400, f"prompt: give 1 to {self.max_prompts} prompts; got {len(prompts)}",
                               "prompt")
            gens = [self._generation(req, p, req.input, req.max_tokens) for p in prompts]
            return await self._respond(request, gens, req.stream, _CompletionFormat(self.model_name))
        except ApiError as e:
            return e.refused_here()
        except _ClientGone as e:
            return e.response(request)

    async def models(self, request: Request):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "gist-lightning"}]}

    async def cache_stats(self, request: Request):
        workers = self.folder.worker_stats()
        return {**sum_stats(list(workers.values())), "workers": workers}

    async def prometheus_metrics(self, request: Request):
        body, content_type = render()
        return Response(body, media_type=content_type)

    # -- plumbing ------------------------------------------------------------------------------
    def _generation(self, req: _Sampling, instruction: str, input: str, max_tokens: int | None) -> dict:
        if req.model not in (None, "", self.model_name):
            raise ApiError(404,
                           f"model {req.model!r} is not served here; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        if req.n != 1:
            raise ApiError(400, f"n: only n=1 is supported; got {req.n}", "n")
        if not instruction.strip():
            raise ApiError(400, "the instruction (system message, or prompt) is empty", "messages")
        max_tokens = self.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be between 1 and {self.max_tokens_limit}; got {max_tokens}",
                           "max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
        return {"instruction": instruction, "input": input, "max_tokens": max_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "stop": tuple(stop)}

    def _send(self, payload: dict) -> str:
        uid = uuid.uuid4().hex
        self.response_buffer[uid] = ResponseBufferItem(response_queue=deque(), event=asyncio.Event())
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), payload))
        return uid

    def _cancel(self, uids: list[str]) -> None:
        """Cancel the requests of a client that left: listed for every worker to see (LitServe would
        hand a message to any one of them); their remaining events are counted and dropped."""
        for uid in uids:
            if uid in self._ended:  # nothing left to stop
                self._release(uid)
                continue
            self.folder.cancel(uid)
            task = asyncio.ensure_future(self._after_cancel(uid))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _after_cancel(self, uid: str) -> None:
        """Read a cancelled request's events to its last one (``cancelled`` from its worker, or its own
        end when the worker finished it first), counting the tokens made for nobody; then forget it."""
        tokens = 0

        async def drain():
            nonlocal tokens
            async for event in self._events(uid):
                tokens += "error" not in event and event.get("finish_reason") != "cancelled"

        try:
            await asyncio.wait_for(drain(), AFTER_CANCEL_LIMIT)
        except asyncio.TimeoutError:
            log.warning("a cancelled request gave no last event within %.0f s", AFTER_CANCEL_LIMIT)
        finally:
            metrics().tokens_after_cancel.observe(tokens)
            self.folder.forget(uid)
            self._release(uid)

    def _release(self, uid: str) -> None:
        self.response_buffer.pop(uid, None)
        self._ended.discard(uid)

    async def _events(self, uid: str):
        """The engine's events for ``uid`` as dicts, until its last one."""
        async for data, status in self.data_streamer(self.response_buffer[uid].response_queue,
                                                     self.response_buffer[uid].event, send_status=True):
            if status == LitAPIStatus.ERROR:
                data = pickle.loads(data) if isinstance(data, bytes) else data
                event = json.loads(data) if isinstance(data, str) else {"error": str(data), "status": 500}
            else:
                event = json.loads(data)
            if _last(event):
                self._ended.add(uid)
            yield event
            if "error" in event:
                return

    async def _respond(self, request: Request, gens: list[dict], stream: bool, fmt):
        start = time.monotonic()
        uids = [self._send(g) for g in gens]
        streams = [self._events(uid) for uid in uids]
        done = False
        try:
            # every choice's first event first: a refused request gets its 4xx before any stream starts
            firsts = await self._watch(request, uids, asyncio.gather(*(anext(s) for s in streams)))
            errors = [e for e in firsts if "error" in e]
            if errors:
                e = errors[0]
                raise ApiError(e.get("status", 500), e["error"], code=e.get("code"), from_engine=True)
            metrics().first_token_seconds.observe(time.monotonic() - start)
            if not stream:
                events = await self._watch(request, uids, asyncio.gather(
                    *(_rest(first, s) for first, s in zip(firsts, streams))))
                done = True
                failed = [e for evs in events for e in evs if "error" in e]
                if failed:
                    raise ApiError(failed[0].get("status", 500), failed[0]["error"], from_engine=True)
                metrics().request_seconds.observe(time.monotonic() - start)
                return fmt.response(events)
            done = True  # the stream's generator owns the requests from here
            return StreamingResponse(self._sse(fmt, uids, firsts, streams, start),
                                     media_type="text/event-stream")
        finally:
            if not done:
                self._cancel(uids)
            elif not stream:
                for uid in uids:
                    self._release(uid)

    async def _watch(self, request: Request, uids: list[str], work):
        """``work``'s result, or cancel the requests if the client goes away first."""
        task = asyncio.ensure_future(work)
        while True:
            finished, _ = await asyncio.wait({task}, timeout=0.25)
            if finished:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise _ClientGone("before its answer was ready; its request was cancelled")

    async def _sse(self, fmt, uids, firsts, streams, start: float):
        finished, tasks = set(), []
        try:
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i, first, stream):
                try:
                    await queue.put((i, first))
                    if not _last(first):
                        async for event in stream:
                            await queue.put((i, event))
                            if _last(event):
                                break
                except Exception as e:  # noqa: BLE001 - the stream must end, with the reason
                    await queue.put((i, {"error": f"{type(e).__name__}: {e}", "status": 500}))

            tasks = [asyncio.ensure_future(pump(i, f, s)) for i, (f, s) in enumerate(zip(firsts, streams))]
            usage = []
            while len(finished) < len(uids):
                i, event = await queue.get()
                if "error" in event:
                    yield "data: " + json.dumps({"error": {"message": event["error"], "type": "server_error",
                                                           "index": i}}) + "\n\n"
                    finished.add(i)
                    continue
                yield "data: " + json.dumps(fmt.chunk(i, event)) + "\n\n"
                if _last(event):
                    finished.add(i)
                    usage.append(event.get("usage") or {})
            await asyncio.gather(*tasks)
            metrics().request_seconds.observe(time.monotonic() - start)
            yield "data: " + json.dumps(fmt.usage_chunk(usage)) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            gone = [uid for i, uid in enumerate(uids) if i not in finished]
            if gone:  # the client went away mid-stream: free its rows in the running batch
                self._cancel(gone)
                log.warning("a client left mid-stream; its request was cancelled")
            for uid in uids:
                if uid not in gone:
                    self._release(uid)


class _ClientGone(Exception):
    """The client closed the connection before its answer was complete."""

    def response(self, request: Request) -> Response:
        # one line: a client that hangs up is routine, not a failure of the server
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.warning("client %s left %s", client, self)
        return Response(status_code=499)  # nobody reads it


def _last(event: dict) -> bool:
    return "finish_reason" in event or "error" in event


async def _rest(first: dict, stream) -> list[dict]:
    events = [first]
    if not _last(first):
        async for event in stream:
            events.append(event)
            if _last(event):
                break
    return events


async def _json_body(request: Request, max_bytes: int):
    too_large = ApiError(413,
                         f"the request body is larger than {max_bytes} bytes (the server's --max_body_size)",
                         code="request_too_large")
    # a body too large is still read to its end, discarded: closing on unread data resets the connection,
    # and the client would see the reset instead of this answer; but not without bound
    drain = 4 * max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > drain:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # in pieces: a body without a length is stopped at the bound too
            size += len(chunk)
            if size <= max_bytes:
                chunks.append(chunk)
            elif size > drain:
                break
    except ClientDisconnect:
        raise _ClientGone("before its request was read") from None
    if size > max_bytes:
        raise too_large
    nested = ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels of arrays and objects")
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError:  # far deeper than MAX_DEPTH: the parser gave up first
        raise nested from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if _deeper_than(body, MAX_DEPTH):  # pydantic would recurse into it, and its errors would say less
        raise nested
    return body


def _deeper_than(value, limit: int) -> bool:
    """Whether arrays and objects nest in ``value`` more than ``limit`` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def install_error_handlers(app: FastAPI) -> None:
    """Give the refusals FastAPI makes itself (unknown path, wrong method, a malformed request to a
    route, an unexpected failure) OpenAI's error shape instead of ``{"detail": ...}``, so that a
    client's error handling reads every answer of this server the same way."""

    async def http_error(request: Request, exc: HTTPException) -> Response:
        what = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"no such endpoint: {what}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
            message = f"method not allowed: {what}" + (f" (allowed: {allowed})" if allowed else "")
        else:
            message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        code = "not_found" if exc.status_code == 404 else None
        response = ApiError(exc.status_code, message, code=code).response()
        response.headers.update(exc.headers or {})
        return response

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}"
                             for e in exc.errors()[:5])
        return ApiError(400, f"invalid request: {problems}").response()

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette still logs the traceback: this is a bug of the server, not of the request
        return ApiError(500, f"internal server error ({type(exc).__name__})").response()

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


def _usage(usages: list[dict]) -> dict:
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
             "prompt_tokens_details": {"cached_tokens": 0}}
    for u in usages:
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            total[key] += u.get(key, 0)
        cached = u.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        total["prompt_tokens_details"]["cached_tokens"] += cached
        if "compression" in u:  # the choices of one request share its instruction and its cache
            total["compression"] = u["compression"]
    return total


class _Format:
    """One response shape (chat or text completion), whole or as stream chunks."""

    object = ""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"{self.prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def response(self, events: list[list[dict]]) -> dict:
        choices = [self.choice(i, "".join(e.get("text", "") for e in evs), evs[-1].get("finish_reason"))
                   for i, evs in enumerate(events)]
        caches = [evs[0].get("cache") for evs in events]
        return {**self._head(self.object), "choices": choices, "usage": _usage([evs[-1].get("usage") or {}
                                                                                 for evs in events]),
                "gist_cache": caches if len(caches) > 1 else caches[0]}

    def usage_chunk(self, usages: list[dict]) -> dict:
        return {**self._head(self.chunk_object), "choices": [], "usage": _usage(usages)}


class _ChatFormat(_Format):
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def choice(self, i, text, finish_reason):
        return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                "logprobs": None}

    def chunk(self, i, event):
        delta = {"content": event.get("text", "")}
        if "cache" in event:
            delta["role"] = "assistant"
        out = {**self._head(self.chunk_object),
               "choices": [{"index": i, "delta": delta, "finish_reason": event.get("finish_reason"),
                            "logprobs": None}]}
        if "cache" in event:
            out["gist_cache"] = event["cache"]
        return out


class _CompletionFormat(_Format):
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def choice(self, i, text, finish_reason):
        return {"index": i, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def chunk(self, i, event):
        out = {**self._head(self.chunk_object), "choices": [
            {"index": i, "text": event.get("text", ""), "finish_reason": event.get("finish_reason"),
             "logprobs": None}]}
        if "cache" in event:
            out["gist_cache"] = event["cache"]
        return out
