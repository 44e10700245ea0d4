"""Serving past one process: two inference workers answer as one; two servers on one store share
what either compressed (the second answers from "disk"), and servers of two models on one store each
read their own entries; clients that leave mid-stream stop their requests on whichever worker runs
them; ``/v1/cache/stats`` adds up every worker; a killed server's folder is removed by the next
start; a store in S3 (a local S3-compatible server on loopback); a store location that cannot be
written is refused at start; ``GET /metrics`` moves as requests are answered and parses as
Prometheus text."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import PROBE_INPUTS, PROBE_INSTRUCTIONS

from gist_lightning import compress
from gist_lightning.export import load_pretrained
from gist_lightning.prompt_cache import CacheStore
from gist_lightning.serving.launch import ServerProcess, free_port
from gist_lightning.serving.shared import remove_dead

pytestmark = pytest.mark.slow
PAIRS = [(t, x) for t in PROBE_INSTRUCTIONS for x in PROBE_INPUTS]


def post(server, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ask(server, instruction: str, input: str, **kw) -> tuple[str, str]:
    """(answer, where its instruction's cache came from) of one greedy chat request."""
    status, r = post(server, "/v1/chat/completions", {
        "messages": [{"role": "system", "content": instruction}, {"role": "user", "content": input}],
        "max_tokens": 8, "temperature": 0, **kw})
    assert status == 200, r
    return r["choices"][0]["message"]["content"], r["gist_cache"]


def scrape(server) -> dict[tuple[str, tuple], float]:
    """``/metrics`` read with prometheus_client's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.base + "/metrics", timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def cache_stats(server) -> dict:
    with urllib.request.urlopen(server.base + "/v1/cache/stats", timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def servers(trained_export, tmp_path_factory):
    """One server of one worker and one of two workers, started together on one store (so neither
    has seen the other's entries at start)."""
    folder = tmp_path_factory.mktemp("scaleout")
    store = folder / "store"
    with ServerProcess(trained_export, "--max_batch_size", "4", "--cache_dir", str(store),
                       log=str(folder / "one.log")) as one, \
         ServerProcess(trained_export, "--max_batch_size", "4", "--cache_dir", str(store),
                       "--accelerator", "cpu", "--workers_per_device", "2",
                       log=str(folder / "two.log")) as two:
        yield one, two, store


def test_two_workers_answer_as_one_from_the_first_servers_store(servers):
    one, two, _ = servers
    first = [ask(one, t, x) for t, x in PAIRS]
    # each instruction compressed once, by the server that saw it first, then held in its memory
    assert [src for _, src in first] == [("compressed" if i % len(PROBE_INPUTS) == 0 else "memory")
                                         for i in range(len(PAIRS))]
    with ThreadPoolExecutor(8) as pool:  # 12 requests, 8 at a time, spread over the two workers
        second = list(pool.map(lambda p: ask(two, *p), PAIRS))
    assert [text for text, _ in second] == [text for text, _ in first]
    # nothing compressed again: every worker read each instruction from the store (once) or its memory
    assert {src for _, src in second} <= {"disk", "memory"} and "disk" in {src for _, src in second}
    metrics = scrape(two)
    assert value(metrics, "gist_workers") == 2
    assert value(metrics, "gist_compressions_total") == 0
    disk = value(metrics, "gist_cache_hits_total", source="disk")
    # every instruction read from the store at least once; hits count requests, and requests of one
    # instruction admitted together share one read, so with 8 at a time the count depends on timing
    assert len(PROBE_INSTRUCTIONS) <= disk <= len(PAIRS)


def test_an_entry_written_after_start_is_read_from_disk_by_the_other_server(servers, trained_export):
    one, two, store_dir = servers
    text, src = ask(two, "Sort the list.", "pear fig")
    assert src == "compressed"
    again, src = ask(one, "Sort the list.", "pear fig")  # `one` opened the store long before this entry
    assert src == "disk" and again == text
    # what the store holds is what compressing the instruction here gives
    model, tok, settings = load_pretrained(trained_export)
    stored = CacheStore(store_dir, model, tok, settings["num_gist_tokens"]).get("Sort the list.")
    fresh = compress(model, tok, ["Sort the list."], settings["num_gist_tokens"])
    assert torch.allclose(stored.states[0][0], fresh.states[0][0], atol=1e-6)


def test_metrics_move_as_requests_are_answered(servers):
    one, _, _ = servers
    before = scrape(one)
    answers = [ask(one, "Count the words.", x, max_tokens=5) for x in ("a b c", "d e", "f")]
    answers += [ask(one, "Name the first word.", "g h", max_tokens=3)]
    # by the HTTP process
    refused_here = post(one, "/v1/chat/completions", {"messages": [], "max_tokens": 4})[0]
    refused_there = post(one, "/v1/chat/completions", {  # by the engine: longer than the model's positions
        "messages": [{"role": "system", "content": "Repeat."}, {"role": "user", "content": "word " * 1000}],
        "max_tokens": 4})[0]
    assert refused_here == refused_there == 400
    after = scrape(one)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    outcomes = {o: moved("gist_requests_total", outcome=o)
                for o in ("stop", "length", "refused", "cancelled", "error")}
    assert outcomes["stop"] + outcomes["length"] == len(answers) and outcomes["refused"] == 2
    assert outcomes["cancelled"] == outcomes["error"] == 0
    hits = {s: moved("gist_cache_hits_total", source=s) for s in ("memory", "disk", "compressed")}
    assert hits == {"memory": 2, "disk": 0, "compressed": 2}  # two new instructions, each asked again once
    assert moved("gist_compressions_total") == 2
    assert 0 < moved("gist_generated_tokens_total") <= 3 * 5 + 3
    steps = moved("gist_step_seconds_count")
    assert steps >= len(answers) and moved("gist_step_seconds_sum") > 0
    assert value(after, "gist_step_seconds_bucket", le="+Inf") == value(after, "gist_step_seconds_count")
    assert (moved("gist_request_seconds_count") == moved("gist_time_to_first_token_seconds_count")
            == len(answers))
    assert (value(after, "gist_queue_depth", state="waiting")
            == value(after, "gist_queue_depth", state="running") == 0)
    with urllib.request.urlopen(one.base + "/v1/cache/stats", timeout=30) as r:
        stats = json.loads(r.read())
    assert value(after, "gist_cache_bytes") == stats["cache_bytes"] > 0 and value(after, "gist_workers") == 1


def test_two_models_on_one_store_each_read_their_own_entries(random_export, other_random_export, tmp_path):
    """Without a memory cache every request reads the store: each server compresses the instruction
    once, then reads its own entry, whatever the other model wrote under the same instruction."""
    args = ("--cache_dir", str(tmp_path / "store"), "--cache_memory", "0")
    with ServerProcess(random_export, *args, log=str(tmp_path / "a.log")) as a, \
         ServerProcess(other_random_export, *args, log=str(tmp_path / "b.log")) as b:
        sources = [[], []]
        for _ in range(3):  # the two servers take turns
            for server, seen in zip((a, b), sources):
                seen.append(ask(server, PROBE_INSTRUCTIONS[0], PROBE_INPUTS[0])[1])
        hits = [{s: value(scrape(server), "gist_cache_hits_total", source=s) for s in ("compressed", "disk")}
                for server in (a, b)]
    assert sources == [["compressed", "disk", "disk"]] * 2
    assert hits == [{"compressed": 1, "disk": 2}] * 2
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 2


# -- two workers: what reaches every worker ----------------------------------------------------------

@pytest.fixture(scope="module")
def two_workers(random_export, tmp_path_factory):
    """Two inference workers of a model with random weights (its answers run to max_tokens)."""
    log = tmp_path_factory.mktemp("two-workers") / "server.log"
    with ServerProcess(random_export, "--accelerator", "cpu", "--workers_per_device", "2",
                       "--max_batch_size", "8", log=str(log)) as server:
        yield server


def leave_mid_stream(server, i: int) -> None:
    """Ask for a long streamed answer, read its first chunks, hang up."""
    body = {"messages": [{"role": "system", "content": f"Ramble on about {i}."},
                         {"role": "user", "content": "a"}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    for _ in range(4):  # two chunks, each a data line and a blank line
        r.fp.readline()
    conn.sock.close()
    conn.close()


def test_clients_that_leave_mid_stream_stop_their_requests_on_either_worker(two_workers):
    """A cancellation reaches the worker that runs the request, whichever it is: every request stops
    within a few tokens (engine steps) of its client leaving, instead of running on to max_tokens."""
    n = 8
    before = scrape(two_workers)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: leave_mid_stream(two_workers, i), range(n)))
    deadline = time.monotonic() + 120

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    while True:  # each cancelled request is observed once its last event has come back
        after = scrape(two_workers)
        counted = moved("gist_tokens_after_cancel_count")
        if counted >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    stats = cache_stats(two_workers)
    per_worker = {w: s["cancelled"] for w, s in stats["workers"].items()}  # requests each one dropped
    assert counted == n
    # every request stopped within 32 tokens of its cancellation; one whose worker missed the
    # cancellation runs on to its 400. The count includes the events already on their way to the HTTP
    # process when the client left: 0 or 1 on an idle machine, but one request of 8 counted ~10 in a CI
    # run with the suite's other processes beside it (sum 17), so the bound is not 4
    stopped = moved("gist_tokens_after_cancel_bucket", le="32.0")
    assert stopped == n, (stopped, moved("gist_tokens_after_cancel_sum"), per_worker)
    assert moved("gist_requests_total", outcome="cancelled") == n
    assert stats["cancelled"] == n and stats["running"] == stats["waiting"] == 0


def test_cache_stats_add_up_every_worker(two_workers):
    before = cache_stats(two_workers)
    bodies = [{"messages": [{"role": "system", "content": f"Describe item {i}."},
                            {"role": "user", "content": "x y"}], "max_tokens": 20, "temperature": 0}
              for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda body: post(two_workers, "/v1/chat/completions", body), bodies))
    assert all(status == 200 for status, _ in answers)
    after = cache_stats(two_workers)
    workers = after["workers"]
    assert sorted(workers) == ["0", "1"] and len({w["pid"] for w in workers.values()}) == 2
    assert after["requests"] - before["requests"] == after["compressed"] - before["compressed"] == 12
    served = {w: s["requests"] - before["workers"][w]["requests"] for w, s in workers.items()}
    assert all(served.values()), served  # both took some (each request goes to whichever is free)
    for key in ("requests", "compressed", "cancelled", "cached_instructions", "cache_bytes",
                "cache_capacity"):
        assert after[key] == sum(s[key] for s in workers.values()), key
    assert after["cache_bytes"] == after["cached_instructions"] * after["bytes_per_instruction"]  # k=1


def test_a_killed_servers_folder_is_removed_by_the_next_start(random_export, tmp_path):
    """Its Prometheus files live in its own folder; a SIGKILL leaves that folder, and the next server
    to start removes it, but never the folder of a server still running."""
    def folder_of(server) -> Path:
        (folder,) = Path(tempfile.gettempdir()).glob(f"gist-serve-{server.process.pid}-*")
        return folder

    with ServerProcess(random_export, log=str(tmp_path / "killed.log")) as killed:
        ask(killed, PROBE_INSTRUCTIONS[0], PROBE_INPUTS[0])
        left = folder_of(killed)
        assert list((left / "metrics").glob("*.db"))  # every process's metrics, in the server's folder
        os.killpg(killed.process.pid, signal.SIGKILL)
        killed.process.wait()
    assert left.is_dir()
    with ServerProcess(random_export, log=str(tmp_path / "next.log")) as server:
        assert not left.exists()
        mine = folder_of(server)
        remove_dead()  # as another server's start would
        assert mine.is_dir()
        ask(server, PROBE_INSTRUCTIONS[0], PROBE_INPUTS[0])
    assert not mine.exists()  # a server that stops removes its own


# -- a store in S3 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3-compatible server (moto) on a free loopback port, with a bucket; the environment that
    points boto (so s3fs, so fsspec) at it."""
    pytest.importorskip("s3fs", reason="s3fs (fsspec's S3 filesystem) is not installed")
    server_mod = pytest.importorskip("moto.server",
                                     reason="moto's server mode is not installed (moto[server])")
    port = free_port()
    try:
        moto = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        moto.start()
    except Exception as e:  # noqa: BLE001 - whatever keeps it from starting, the tests say so
        pytest.skip(f"the local S3 server (moto) cannot start: {type(e).__name__}: {e}")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("gist-caches")
    yield env
    moto.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


def test_an_s3_store_sees_other_writers_entries_after_a_listing(s3, make_pair):
    """s3fs keeps listings it has read; a store that trusted them would never see another replica's
    new entries."""
    import s3fs

    model, tok, _ = make_pair("llama")
    b = CacheStore("s3://gist-caches/unit", model, tok, 1, frozen=True)
    s3fs.S3FileSystem.clear_instance_cache()  # a writer of its own, as in another process
    a = CacheStore("s3://gist-caches/unit", model, tok, 1)
    assert a.fs is not b.fs
    a.add("reverse the list")
    assert b.list() == ["reverse the list"]  # b has read (and s3fs cached) the listing
    a.add("sort the list")
    assert "sort the list" in b and sorted(b.list()) == ["reverse the list", "sort the list"]
    assert torch.equal(b.get("sort the list").states[0][0],
                       compress(model, tok, ["sort the list"], 1).states[0][0])
    # two writers of one instruction write one key with the same bytes
    fs = s3fs.S3FileSystem()
    key = b.path("sort the list")
    first = fs.cat_file(key)
    b.add("sort the list")
    assert fs.cat_file(key) == first and len(fs.ls("gist-caches/unit")) == 2
    assert b.delete("sort the list") and "sort the list" not in a
    with pytest.raises(KeyError, match="no cache for instruction"):
        a.get("sort the list")


def test_a_server_on_an_s3_store(s3, trained_export, tmp_path, monkeypatch):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    url = "s3://gist-caches/served"
    model, tok, settings = load_pretrained(trained_export)
    k = settings["num_gist_tokens"]
    CacheStore(url, model, tok, k).add(PROBE_INSTRUCTIONS[0])  # another replica's entry, written before start
    with ServerProcess(trained_export, "--cache_dir", url, log=str(tmp_path / "s3.log")) as server:
        text, src = ask(server, PROBE_INSTRUCTIONS[0], PROBE_INPUTS[0])
        assert src == "disk"
        new, src = ask(server, PROBE_INSTRUCTIONS[1], PROBE_INPUTS[0])
        assert src == "compressed"
    store = CacheStore(url, model, tok, k)
    assert sorted(store.list()) == sorted(PROBE_INSTRUCTIONS[:2])  # the server wrote its compression there
    fresh = compress(model, tok, [PROBE_INSTRUCTIONS[1]], k)
    assert torch.allclose(store.get(PROBE_INSTRUCTIONS[1]).states[0][0], fresh.states[0][0], atol=1e-6)


def _serve(export, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gist_lightning.cli", "serve", "--model", str(export),
                           *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                             **(env or {})})


def _refused(proc: subprocess.CompletedProcess, message: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in lines[-1], proc.stderr[-2000:]
    assert "serving" not in proc.stdout


def test_a_local_store_that_cannot_be_written_and_devices_on_cpu_are_refused_at_start(trained_export,
                                                                                      tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _refused(_serve(trained_export, "--cache_dir", str(blocker / "store")),
             f"cache store {blocker / 'store'}: cannot write there")
    _refused(_serve(trained_export, "--devices", "2", "--accelerator", "cpu"), "use --workers_per_device")


def test_an_s3_store_that_cannot_be_reached_or_written_is_refused_at_start(trained_export, s3):
    # nothing listens there; one attempt (botocore's default retries with back-off took ~20 s)
    closed = {**s3, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1",
              "AWS_RETRY_MODE": "standard"}
    _refused(_serve(trained_export, "--cache_dir", "s3://no-such-bucket/store", env=s3),
             "cache store s3://no-such-bucket/store: cannot write there")
    _refused(_serve(trained_export, "--cache_dir", "s3://gist-caches/store", env=closed),
             "cache store s3://gist-caches/store: cannot write there")
