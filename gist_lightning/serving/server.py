"""``gist-lightning serve``: the engine behind LitServe. LitServe runs the HTTP process (the spec in
``openai_spec.py``) and inference workers (``--workers_per_device`` on each of ``--devices``), each
owning a copy of the model and an engine with its own memory cache; they take requests from one
shared queue, and share compressed instructions through the store at ``--cache_dir`` (a folder or an
fsspec URL), so an instruction compressed by one worker, or by a replica on another machine, is read
from there by the others. A worker's continuous batching loop calls :meth:`GistServeAPI.step` for
as long as its engine has work, and hands it every queued request through ``add_request``. What the
processes share beside LitServe's queues lives in the server's own folder (``shared.py``): at each
step a worker drops its requests whose client left (listed there by the HTTP process), and writes
its engine's stats there when they changed (``/v1/cache/stats`` adds them up); ``GET /metrics`` adds
up every process's Prometheus metrics (``metrics.py``), written there too.

Stopping: SIGTERM or SIGINT (Ctrl-C) to the main process at any moment (loading, idle, answering)
stops the HTTP process, the inference worker and LitServe's manager, and the server exits with status
0, without a traceback. Only a signal that arrives while Python is still importing, before ``serve``
has started anything, ends it the default way (status 143, -15 to ``subprocess``)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from argparse import ArgumentParser
from pathlib import Path

import litserve as ls
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.utils import LitAPIStatus

from ..prompt_cache import check_location
from .engine import MODES, ServingEngine, parse_bytes
from .metrics import metrics, prepare_dir
from .openai_spec import GistOpenAISpec, install_error_handlers, resolve_max_tokens
from .shared import ServerFolder

log = logging.getLogger(__name__)


class _Loop(ContinuousBatchingLoop):
    """LitServe's continuous batching loop, resting while the engine is idle (LitServe's own
    loop polls without pause, which takes a core from the HTTP process)."""

    async def run(self, lit_api, *args, **kwargs):
        if not lit_api.has_active_requests():
            await asyncio.sleep(0.002)
            return
        await super().run(lit_api, *args, **kwargs)


class GistServeAPI(ls.LitAPI):
    def __init__(self, model: str, mode: str = "gist", cache_dir: str | None = None,
                 cache_memory: str = "256MB", max_batch_size: int = 16, dtype: str | None = None,
                 model_name: str | None = None, default_max_tokens: int | None = None,
                 max_tokens_limit: int = 1024, max_body_size: str | int = "16MiB", *,
                 folder: ServerFolder, compile: bool = False, prefill_tokens_per_step: int = 0):
        if mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}; got {mode!r}")
        parse_bytes(cache_memory)  # a bad size fails here, before any process starts
        self.model_path, self.mode, self.cache_dir, self.cache_memory = model, mode, cache_dir, cache_memory
        self.dtype, self.folder, self.compile = dtype, folder, compile
        self.prefill_tokens_per_step = prefill_tokens_per_step
        spec = GistOpenAISpec(model_name or Path(model).name, folder, default_max_tokens, max_tokens_limit,
                              max_body_bytes=parse_bytes(max_body_size))
        super().__init__(max_batch_size=max_batch_size, stream=True, spec=spec, loop=_Loop())

    def setup(self, device):
        import torch
        from tqdm import tqdm

        # the main process stops this worker (SIGTERM); a Ctrl-C reaches the whole process group and
        # would end it mid-step with a KeyboardInterrupt traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # tqdm's default lock is a multiprocessing semaphore; SIGTERM ends this process before it is
        # freed, and the resource tracker then warned of a leaked semaphore at every shutdown
        tqdm.set_lock(threading.RLock())
        self.folder.join()  # held while this worker lives: a server that starts later leaves it
        self.worker = os.environ.get("LITSERVE_WORKER_ID", str(os.getpid()))  # set by LitServe
        self.device_name = str(device)

        from ..export import load_pretrained
        from ..long_context import SegmentSettings

        model, tokenizer, settings = load_pretrained(self.model_path,
                                                     dtype=getattr(torch, self.dtype) if self.dtype else None)
        segments = SegmentSettings(**settings["segments"]) if settings.get("segments") else None
        self.engine = ServingEngine(model.to(device), tokenizer, settings["num_gist_tokens"],
                                    settings["condition"], mode=self.mode, cache_memory=self.cache_memory,
                                    cache_dir=self.cache_dir, max_batch_size=self.max_batch_size,
                                    segments=segments, compile=self.compile,
                                    prefill_tokens_per_step=self.prefill_tokens_per_step)
        self.metrics = metrics()
        # the requests given to this worker and not ended (add_request adds from the loop's thread)
        self._uids: set[str] = set()
        self._published: dict | None = None
        self._compressed = self.engine.stats()["compressed"]
        self._observe_engine()
        self.metrics.workers.set(1)
        if self.mode == "instruction" and settings["condition"] != "pos_control":
            log.warning("--mode instruction caches whole instructions (pos_control); this model was trained "
                        "with %s, so its answers here are not what it learned: use this mode for cost "
                        "comparisons or with a pos_control model", settings["condition"])

    # -- what the continuous batching loop calls --------------------------------------------------
    def add_request(self, uid, request):
        self._uids.add(uid)
        self.engine.submit(uid, request)

    def has_capacity(self):
        return True  # the engine queues what does not fit its batch

    def has_active_requests(self):
        return self.engine.busy()

    def step(self, prev_outputs):
        start = time.perf_counter()
        # whichever process heard that a client left, every worker reads it here and drops its own
        # (set & set runs in C: add_request's thread cannot change the set half-way)
        for uid in self.folder.cancelled() & self._uids:
            self.engine.cancel(uid)
        events = self.engine.step()  # a failure inside ends the requests in flight with 500 events
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self._count(events)
        outputs = []
        for event in events:
            if event.error is not None:
                outputs.append(Output(event.uid, event.as_dict(), LitAPIStatus.ERROR))
                continue
            outputs.append(Output(event.uid, event.as_dict(), LitAPIStatus.OK))
            if event.done:
                outputs.append(Output(event.uid, {}, LitAPIStatus.FINISH_STREAMING))
        return outputs

    def _count(self, events) -> None:
        """The metrics of one step's events (the engine's own counters are read, not changed)."""
        m = self.metrics
        for event in events:
            if event.done:
                self._uids.discard(event.uid)
            if event.cache is not None:
                m.cache_hits.labels(event.cache).inc()
            if event.error is not None:
                m.requests.labels("refused" if event.status < 500 else "error").inc()
            elif event.finish_reason is not None:
                m.requests.labels(event.finish_reason).inc()
                m.generated_tokens.inc((event.usage or {}).get("completion_tokens", 0))
        self._observe_engine()

    def _observe_engine(self) -> None:
        """The engine's state to the gauges, and its stats to the server's folder when they changed
        (before this step's events go out: a client that got its answer reads stats that count it)."""
        stats = self.engine.stats()
        if stats != self._published:
            self.folder.publish_stats(self.worker, {"worker": self.worker, "pid": os.getpid(),
                                                    "device": self.device_name, **stats})
            self._published = stats
        self.metrics.queue.labels("waiting").set(stats["waiting"])
        self.metrics.queue.labels("running").set(stats["running"])
        self.metrics.cache_bytes.set(stats["cache_bytes"])
        if stats["compressed"] > self._compressed:
            self.metrics.compressions.inc(stats["compressed"] - self._compressed)
            self._compressed = stats["compressed"]

    def encode_response(self, output):
        return output

    def predict(self, *args, **kwargs):  # the loop calls step; LitServe checks that predict exists
        raise NotImplementedError


class _Server(ls.LitServer):
    """LitServe's server, marking when its own shutdown begins (a stop signal is not raised again then)."""

    def _perform_graceful_shutdown(self, *args, **kwargs):
        _STOP_BEGAN.set()
        return super()._perform_graceful_shutdown(*args, **kwargs)


def build_server(cfg, folder: ServerFolder) -> ls.LitServer:
    api = GistServeAPI(cfg.model, cfg.mode, cfg.cache_dir, cfg.cache_memory, cfg.max_batch_size, cfg.dtype,
                       cfg.served_model_name, cfg.default_max_tokens, cfg.max_tokens_limit, cfg.max_body_size,
                       folder=folder, compile=cfg.compile,
                       prefill_tokens_per_step=cfg.prefill_tokens_per_step)
    server = _Server(api, accelerator=cfg.accelerator, devices=cfg.devices,
                          workers_per_device=cfg.workers_per_device, timeout=False)
    if server.devices == ["cpu"] and cfg.devices > 1:
        raise ValueError(f"--devices {cfg.devices}: the server runs on CPU, where --devices counts nothing; "
                         "use --workers_per_device for more workers")
    install_error_handlers(server.app)  # before run(): the HTTP process gets a copy of this app
    return server


_STOPPING = threading.Event()  # set once a stop signal reached the main process
_STOP_BEGAN = threading.Event()  # set once the main process acts on it (its KeyboardInterrupt was caught)


class _QuietClientErrors(logging.Filter):
    """LitServe logs every error event as a server error; a refused request (4xx) is not one. Once a
    stop began, LitServe's worker-monitoring thread may still ask its manager's shutdown event while
    LitServe's own shutdown has stopped that manager, and logs the broken connection as a crash with
    a traceback: that is the stop, not an error."""

    def filter(self, record):
        message = record.getMessage()
        if _STOPPING.is_set() and message.startswith("Monitoring worker crashed"):
            return False
        return "Error occurred while streaming outputs from the inference worker" not in message


def _stop_on_signals() -> None:
    """SIGTERM (and SIGINT, which a shell ignores in background jobs) interrupt the main process the
    way Ctrl-C does: LitServe stops its processes itself once it serves, :func:`_stop_children`
    before that. A KeyboardInterrupt raised from a signal handler can land where Python only prints
    it ("Exception ignored in ...": a fork's logging lock, a finalizer) and the server would go on:
    it is not raised inside a fork's hooks, and until the stop has begun the signal is sent again
    every 2 seconds. A signal once the stop has
    begun is ignored (it would break off the stop half-way)."""
    main_pid = os.getpid()
    forking = [0]  # inside os.fork's hooks: an exception raised there is printed and dropped
    os.register_at_fork(before=lambda: forking.__setitem__(0, forking[0] + 1),
                        after_in_parent=lambda: forking.__setitem__(0, forking[0] - 1))

    def insist(signum):
        while not _STOP_BEGAN.wait(2):
            os.kill(main_pid, signum)

    def interrupt(signum, frame):
        if os.getpid() != main_pid:  # the forked HTTP process re-raises what uvicorn caught: just exit
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _STOP_BEGAN.is_set():
            return
        if not _STOPPING.is_set():
            _STOPPING.set()
            threading.Thread(target=insist, args=(signum,), daemon=True, name="stop-signal").start()
        if forking[0] == 0:  # else the next insisting signal raises it
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def _stop_children(server: ls.LitServer) -> None:
    """Stop what LitServe started and did not stop: a signal during start-up interrupts it before its
    own shutdown is armed. LitServe's manager goes last: the others talk to it, and a manager gone
    first made the inference worker die with tracebacks."""
    manager_process = getattr(getattr(server.transport_config, "manager", None), "_process", None)
    for child in sorted(multiprocessing.active_children(), key=lambda c: c is manager_process):
        child.terminate()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join(5)
    _stop_descendants()


def _stop_descendants() -> None:
    """Stop every process still below this one: a signal that lands while ``multiprocessing`` starts a
    process leaves one it does not know of yet (started, not yet registered), and such a process
    outlived the server. Python's resource tracker is left alone: it ignores SIGTERM, and frees what
    the stopped processes left once this one exits."""
    from multiprocessing import resource_tracker

    import psutil

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid != tracker]
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _serve_parser() -> ArgumentParser:
    """The options of ``gist-lightning serve``."""
    parser = ArgumentParser(prog="gist-lightning serve", description="Serve an exported gist model with an "
                            "OpenAI-compatible API (POST /v1/chat/completions and /v1/completions, GET "
                            "/v1/models, /v1/cache/stats, /health): each instruction is compressed once and "
                            "its cache reused.")
    parser.add_argument("--model", required=True, help="exported model folder (gist-lightning export)")
    parser.add_argument("--mode", default="gist", choices=MODES, help="gist: cache as trained (default); "
                        "instruction: keep whole instructions (pos_control caching, decoder-only); full: no "
                        "caching")
    parser.add_argument("--cache_dir", default=None, help="also keep caches here, across restarts, shared by "
                        "all workers and replicas: a folder or an fsspec URL (s3://bucket/prefix, gs://...)")
    parser.add_argument("--cache_memory", default="256MB",
                        help="memory for cached instructions (LRU), e.g. 256MB, 2GiB")
    parser.add_argument("--max_batch_size", type=int, default=16, help="requests decoded together at most")
    parser.add_argument("--prefill_tokens_per_step", type=int, default=0,
                        help="a long context (segment models) is compressed between decoding steps: one "
                        "segment per step (0), or segments until this many tokens per step")
    parser.add_argument("--compile", action="store_true",
                        help="decode in static buffers through torch.compile (CUDA graphs on a GPU); each "
                        "new bucket of rows and columns compiles once (seconds to minutes) on first use")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--devices", type=int, default=1, help="GPUs to use (cuda:0 .. N-1), each with "
                        "--workers_per_device workers")
    parser.add_argument("--workers_per_device", type=int, default=1, help="inference workers per device (on "
                        "CPU: the number of workers), each with its own copy of the model and memory cache")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the export's)")
    parser.add_argument("--served_model_name", default=None,
                        help="the model id clients name (default: the folder name)")
    parser.add_argument("--default_max_tokens", type=int, default=None,
                        help="max_tokens of a request that sets none (default: 128, or --max_tokens_limit if "
                             "lower)")
    parser.add_argument("--max_tokens_limit", type=int, default=1024,
                        help="the largest max_tokens a request may ask")
    parser.add_argument("--max_body_size", default="16MiB",
                        help="the largest request body accepted (else 413)")
    parser.add_argument("--log_level", default="warning")
    return parser


def _check_settings(cfg) -> None:
    """Refuse settings that cannot work now, before any process starts, each with one line that names it."""
    parse_bytes(cfg.cache_memory)
    parse_bytes(cfg.max_body_size)
    # one line naming both, before anything starts
    resolve_max_tokens(cfg.default_max_tokens, cfg.max_tokens_limit)
    settings = Path(cfg.model) / "gist_config.json"
    if not settings.is_file():
        raise FileNotFoundError(f"{cfg.model}: no gist_config.json; is this a folder made by gist-lightning "
                                "export?")
    if cfg.max_batch_size < 1:
        raise ValueError(f"--max_batch_size must be at least 1; got {cfg.max_batch_size}")
    for flag in ("devices", "workers_per_device"):
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1; got {getattr(cfg, flag)}")
    if cfg.cache_dir and cfg.mode != "full":
        check_location(cfg.cache_dir)  # unreachable or read-only: refused now, not at the first request


def serve_main(argv: list[str]) -> None:
    """``gist-lightning serve``: check the settings, start the server's processes, serve until stopped
    (SIGTERM or Ctrl-C), and stop every process it started."""
    cfg = _serve_parser().parse_args(argv)
    _check_settings(cfg)
    folder = ServerFolder.create()  # after removing those of servers that died without removing theirs
    prepare_dir(folder.metrics)  # before any process starts (and before prometheus_client is imported here)
    _stop_on_signals()  # from here on a signal stops what was started, without a traceback
    logging.getLogger("litserve.server").addFilter(_QuietClientErrors())
    server = None
    try:
        server = build_server(cfg, folder)
        workers = len(server.devices) * cfg.workers_per_device
        print(f"serving {cfg.model} ({cfg.mode} mode, {workers} worker{'s' * (workers > 1)}) on "
              f"http://{cfg.host}:{cfg.port}/v1", flush=True)
        server.run(host=cfg.host, port=cfg.port, generate_client_file=False, log_level=cfg.log_level,
                   num_api_servers=1)
    except KeyboardInterrupt:  # a stop asked for before LitServe's own handling of it began
        pass
    finally:
        _STOP_BEGAN.set()
        if server is not None:
            _stop_children(server)
        folder.remove()
    print("stopped", flush=True)


__all__ = ["GistServeAPI", "build_server", "serve_main"]
