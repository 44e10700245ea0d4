"""``gist-lightning serve`` against hostile clients and signals: every bad body (nested too deep,
too large, of the wrong types, not JSON), unknown path or wrong method gets a 4xx JSON error in
OpenAI's shape and the server goes on; a client that hangs up is one log line; a low
``--max_tokens_limit`` lowers the default; SIGTERM at start-up or idle stops every process quietly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gist_lightning import compress, generate
from gist_lightning.export import load_pretrained
from gist_lightning.serving.launch import ServerProcess, free_port
from gist_lightning.serving.openai_spec import MAX_DEPTH, resolve_max_tokens

pytestmark = pytest.mark.slow

LIMIT = 64  # --max_tokens_limit, below the default max_tokens of 128
BODY_LIMIT = 1 << 20  # --max_body_size: room for 100,000 levels of nesting
OK = {"messages": [{"role": "system", "content": "Repeat the list."}, {"role": "user", "content": "dog cat"}],
      "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def export(random_export) -> Path:
    return random_export  # random weights are enough: nothing below depends on what the model answers


@pytest.fixture(scope="module")
def server(export):
    log = export.parent / "server.log"
    with ServerProcess(export, "--max_tokens_limit", str(LIMIT), "--max_body_size", str(BODY_LIMIT),
                       log=str(log)) as s:
        s.log = log
        yield s
    assert "Traceback" not in log.read_text()


def send(server, method: str, path: str, body: bytes = b"", timeout: float = 30) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one raw HTTP request: bodies here need not be JSON, nor small."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def openai_error(status: int, payload: bytes) -> dict:
    """The error of a 4xx answer, checked to be in OpenAI's shape."""
    assert 400 <= status < 500, (status, payload[:300])
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]
    return error


def assert_healthy(server, export):
    """/health answers, and an ordinary request is answered as the library answers it."""
    assert server.healthy()
    status, _, payload = send(server, "POST", "/v1/chat/completions", json.dumps(OK).encode())
    assert status == 200, payload
    model, tok, cfg = load_pretrained(export)
    cache = compress(model, tok, [OK["messages"][0]["content"]], cfg["num_gist_tokens"], cfg["condition"])
    want = generate(model, tok, cache, [OK["messages"][1]["content"]], max_new_tokens=8)[0]
    assert json.loads(payload)["choices"][0]["message"]["content"] == want


# -- hostile bodies -----------------------------------------------------------------------------------

def nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "[" else '{"a": ' * depth + "1" + "}" * depth


def deep_body(depth: int, kind: str, where: str) -> bytes:
    inner = nested(depth, kind)
    if where == "messages":
        return f'{{"messages": {inner}}}'.encode()
    if where == "content":
        return f'{{"messages": [{{"role": "user", "content": {inner}}}]}}'.encode()
    return json.dumps(OK)[:-1].encode() + f', "unknown_field": {inner}}}'.encode()


NESTING = f"nests deeper than {MAX_DEPTH} levels"


@pytest.mark.parametrize("body", [deep_body(100_000, "[", "messages"), deep_body(100_000, "[", "unknown"),
                                  deep_body(5_000, "{", "content"), deep_body(MAX_DEPTH, "[", "unknown")],
                         ids=["100k arrays in messages", "100k arrays in an unknown field",
                              "5000 objects in content", "just past the limit"])
def test_deep_nesting_is_a_400_that_says_so(server, body):
    status, _, payload = send(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and NESTING in openai_error(status, payload)["message"]


def test_nesting_up_to_the_limit_is_read(server):
    """An unknown field nested to the limit is ignored, as any unknown field is: the request is answered."""
    body = json.dumps(OK)[:-1] + f', "unknown_field": {nested(MAX_DEPTH - 1, "[")}}}'
    status, _, payload = send(server, "POST", "/v1/chat/completions", body.encode())
    assert status == 200, payload


def test_a_body_past_the_size_limit_is_a_413(server):
    body = json.dumps({**OK, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}).encode()
    status, _, payload = send(server, "POST", "/v1/chat/completions", body)
    assert status == 413 and f"larger than {BODY_LIMIT} bytes" in openai_error(status, payload)["message"]


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_sampling_values_are_named_so(server, field, value):
    body = json.dumps(OK)[:-1] + f', "{field}": {value}}}'
    status, _, payload = send(server, "POST", "/v1/chat/completions", body.encode())
    error = openai_error(status, payload)
    assert "finite number" in error["message"] and error["param"] == field


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda inner: (st.lists(inner, max_size=4)
                                          | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=20)


# content is a string or a list of text parts, never a number or an object
def _wrong_content(value) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": value}]}).encode()


hostile = st.one_of(
    st.builds(lambda d, k, w: (deep_body(d, k, w), NESTING), st.integers(MAX_DEPTH, 100_000),
              st.sampled_from("[{"), st.sampled_from(["messages", "content", "unknown"])),
    st.builds(lambda n: (json.dumps({"messages": [{"role": "user", "content": "x" * n}]}).encode(),
                         "larger than"),
              st.integers(BODY_LIMIT, 2 * BODY_LIMIT)),
    st.builds(lambda v: (json.dumps(v).encode(), "invalid request"),
              json_values.filter(lambda v: not isinstance(v, dict))),
    st.builds(lambda v: (_wrong_content(v), "messages.0.content"),
              json_values.filter(lambda v: not isinstance(v, str | list))
              | st.lists(st.integers(), min_size=1)),
    st.builds(lambda f, v: (json.dumps({**OK, f: v}).encode(), f),
              st.sampled_from(["temperature", "top_p"]),
              st.floats(allow_nan=False).filter(lambda v: not 0 <= v <= 2) | st.text(max_size=5)
              | st.lists(st.none())),
    st.builds(lambda b: (b, ""), st.binary(max_size=300)),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=hostile)
def test_hostile_bodies_get_a_4xx_in_openai_shape(server, case):
    body, message = case
    status, _, payload = send(server, "POST", "/v1/chat/completions", body)
    assert message in openai_error(status, payload)["message"]


def test_the_server_is_healthy_after_hostile_clients(server, export):
    assert_healthy(server, export)


# -- FastAPI's own refusals ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,status", [("GET", "/nope", 404), ("POST", "/v1/nope", 404),
                                                ("GET", "/v1/chat/completions", 405),
                                                ("POST", "/v1/models", 405), ("DELETE", "/health", 405)])
def test_unknown_paths_and_wrong_methods_answer_in_openai_shape(server, method, path, status):
    got, headers, payload = send(server, method, path)
    assert got == status and path in openai_error(got, payload)["message"]
    if status == 405:
        assert headers.get("allow")


# -- clients that leave -------------------------------------------------------------------------------

def test_a_client_that_leaves_at_once_is_one_log_line(server):
    ports = []
    for body in [b"", b'{"messages": [', json.dumps(OK).encode()[:20]]:
        with socket.create_connection(("127.0.0.1", server.port)) as c:
            c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + body)  # promised 1000 bytes, sent fewer, hung up
            ports.append(c.getsockname()[1])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = server.log.read_text().splitlines()
        if all(any(f":{p} left" in line for line in lines) for p in ports):
            break
        time.sleep(0.2)
    for port in ports:
        assert sum(f":{port} left" in line for line in lines) == 1, lines
    assert "Traceback" not in server.log.read_text() and server.healthy()


# -- max_tokens ---------------------------------------------------------------------------------------

def test_a_request_without_max_tokens_follows_a_low_limit(server):
    body = {k: v for k, v in OK.items() if k != "max_tokens"}
    status, _, payload = send(server, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, payload
    assert 1 <= json.loads(payload)["usage"]["completion_tokens"] <= LIMIT


def test_the_default_max_tokens_follows_the_limit():
    assert resolve_max_tokens(None, 64) == 64 and resolve_max_tokens(None, 4096) == 128
    assert resolve_max_tokens(32, 64) == 32
    with pytest.raises(ValueError, match="--default_max_tokens 100 .* --max_tokens_limit 64"):
        resolve_max_tokens(100, 64)


def test_serve_refuses_a_default_above_the_limit_in_one_line(export, capsys):
    from gist_lightning.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(export), "--default_max_tokens", "100", "--max_tokens_limit", "64"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "100" in err and "64" in err


# -- SIGTERM ------------------------------------------------------------------------------------------

def session_processes(sid: int) -> list[str]:
    """The live processes of session ``sid`` (zombies are dead: only their reaping is left)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(text[:text.rindex(")") + 1])
    return found


@pytest.mark.parametrize("when", ["loading", "later in start-up", "idle"])
def test_sigterm_stops_every_process_quietly(export, tmp_path, when):
    log = tmp_path / "server.log"
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "gist_lightning.cli", "serve",
                                    "--model", str(export), "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        deadline = time.monotonic() + 120
        while "serving " not in log.read_text() and time.monotonic() < deadline:  # serve has begun
            time.sleep(0.05)
        if when == "later in start-up":
            time.sleep(1.5)
        elif when == "idle":
            while not healthy() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert healthy()
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        rc = process.wait(30)
        assert time.monotonic() - start < 15 and rc == 0  # serve_main's stop is an ordinary exit
        deadline = time.monotonic() + 10
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(process.pid) == []
        text = log.read_text()
        assert "Traceback" not in text and "leaked" not in text and not re.search(r"Error\b", text), text
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
