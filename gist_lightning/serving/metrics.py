"""The server's Prometheus metrics (``GET /metrics``, the text exposition format).

LitServe runs the HTTP process and every inference worker as separate processes, so the metrics
use prometheus_client's multiprocess mode: each process writes its values to files in one folder
(``PROMETHEUS_MULTIPROC_DIR``: ``metrics/`` in the server's own folder, ``shared.py``, set by
``gist-lightning serve`` before any process starts), and ``/metrics`` adds them up over the
processes. Counters and histograms are sums over every process; the gauges are sums over the live
workers (their queues, the bytes their memory caches hold).

What is counted where: the inference workers count what the engine did (requests by outcome,
tokens, cache hits, compressions, queue depth, step time, cache bytes); the HTTP process counts the
requests it refused before they reached a worker, the latencies its clients see, and the tokens
made for clients that had left.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
# an engine step is one forward of the running batch (milliseconds on a GPU, up to seconds for a big
# admission on CPU); a request lasts up to minutes
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# one token per engine step: a cancelled request should stop within a few (the running step, the
# one that reads the cancellation); a cancellation that misses its worker runs on to max_tokens
AFTER_CANCEL_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def prepare_dir(folder: str | os.PathLike) -> None:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at ``folder`` (the server's ``metrics/``, removed with it)
    unless the user set one (then its values are theirs to keep). Call it before prometheus_client is
    imported in this process and before any worker starts: its value class is chosen at import."""
    if os.environ.get(ENV):
        os.makedirs(os.environ[ENV], exist_ok=True)
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(folder)


class ServerMetrics:
    """The metrics of one process (every process makes its own, writing to the shared folder)."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("gist_requests", "Generation requests ended, by outcome: stop (EOS or a stop "
                                "string), length (max_tokens), cancelled (the client left), refused (4xx), "
                                "error (5xx)", ["outcome"])
        self.generated_tokens = Counter("gist_generated_tokens", "Tokens generated (completion tokens)")
        self.cache_hits = Counter("gist_cache_hits", "Requests by where their instruction's cache came from: "
                                  "memory, disk (the shared store), compressed (made for it), none "
                                  "(--mode full)", ["source"])
        self.compressions = Counter("gist_compressions", "Instructions compressed (one per distinct missing "
                                    "instruction; one per request in --mode full)")
        self.queue = Gauge("gist_queue_depth", "Requests in the engines: waiting for a batch row, or running",
                           ["state"], multiprocess_mode="livesum")
        self.cache_bytes = Gauge("gist_cache_bytes",
                                 "Bytes held by the workers' in-memory instruction caches",
                                 multiprocess_mode="livesum")
        self.workers = Gauge("gist_workers", "Inference workers up (their model loaded)",
                             multiprocess_mode="livesum")
        self.step_seconds = Histogram("gist_step_seconds", "Duration of one engine step (a forward of the "
                                      "running batch, plus admissions)", buckets=STEP_BUCKETS)
        self.first_token_seconds = Histogram("gist_time_to_first_token_seconds", "From a request's arrival "
                                             "at the HTTP process to its first event",
                                             buckets=REQUEST_BUCKETS)
        self.request_seconds = Histogram("gist_request_seconds", "From a request's arrival at the HTTP "
                                         "process to its last event", buckets=REQUEST_BUCKETS)
        self.tokens_after_cancel = Histogram("gist_tokens_after_cancel", "Per request whose client left: "
                                             "the tokens that came back for it after its cancellation "
                                             "(for nobody; those already on their way included)",
                                             buckets=AFTER_CANCEL_BUCKETS)


@functools.cache
def metrics() -> ServerMetrics:
    """This process's metrics, made on first use (after :func:`prepare_dir`)."""
    return ServerMetrics()


def render(folder: str | None = None) -> tuple[bytes, str]:
    """(body, content type) of ``/metrics``: the values of every process writing to ``folder``
    (default: ``PROMETHEUS_MULTIPROC_DIR``), or of this process alone without one."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = folder or os.environ.get(ENV)
    if not folder:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    return generate_latest(registry), CONTENT_TYPE_LATEST
