"""``gist-lightning serve`` as a real process on a free loopback port: its answers are the library's,
whole or streamed, from raw HTTP and from the openai client; bad requests get a 4xx JSON error and
the server goes on; a client that leaves mid-generation does not disturb the others."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PROBE_INPUTS, PROBE_INSTRUCTIONS

from gist_lightning import compress, generate
from gist_lightning.export import load_pretrained
from gist_lightning.serving.launch import ServerProcess

pytestmark = pytest.mark.slow


def post(server, path: str, body, timeout: float = 120) -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request(server.base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(server, path: str):
    with urllib.request.urlopen(server.base + path, timeout=30) as r:
        body = r.read()
        return r.status, (json.loads(body) if body.startswith(b"{") else body.decode())


def stream(server, path: str, body) -> tuple[int, list]:
    """(status, [chunk dicts..., "[DONE]"]) of a streamed request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        return r.status, [json.loads(r.read())]
    chunks = []
    for line in r:
        line = line.decode().strip()
        if line.startswith("data: "):
            chunks.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    conn.close()
    return r.status, chunks


def chat(instruction: str | None, input: str, **kw) -> dict:
    messages = ([{"role": "system", "content": instruction}] if instruction is not None else [])
    return {"messages": messages + [{"role": "user", "content": input}], "temperature": 0, "max_tokens": 8,
            **kw}


@pytest.fixture(scope="module")
def library(trained_export):
    model, tok, settings = load_pretrained(trained_export)

    def answer(instruction: str, input: str, max_tokens: int = 8) -> str:
        cache = compress(model, tok, [instruction], settings["num_gist_tokens"], settings["condition"])
        return generate(model, tok, cache, [input], max_new_tokens=max_tokens)[0]

    return answer


@pytest.fixture(scope="module")
def server(trained_export, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(trained_export, "--max_batch_size", "4", "--served_model_name", "tiny-gist",
                       log=str(log)) as s:
        yield s


def test_answers_are_the_librarys_under_concurrency(server, library):
    pairs = [(t, x) for t in PROBE_INSTRUCTIONS for x in PROBE_INPUTS]
    want = [library(t, x) for t, x in pairs]
    assert len(set(want)) > len(PROBE_INSTRUCTIONS)
    with ThreadPoolExecutor(8) as pool:  # 12 requests, 8 at a time, batches of 4 rows
        got = list(pool.map(lambda p: post(server, "/v1/chat/completions", chat(*p)), pairs))
    assert all(status == 200 for status, _ in got)
    assert [r["choices"][0]["message"]["content"] for _, r in got] == want
    r = got[0][1]
    assert r["object"] == "chat.completion" and r["model"] == "tiny-gist"
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    # the same instruction again comes from memory, and says so
    status, again = post(server, "/v1/chat/completions", chat(*pairs[0]))
    assert again["gist_cache"] == "memory" and again["choices"][0]["message"]["content"] == want[0]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    # what the instruction was compressed into (k=1: one cached position)
    assert again["usage"]["compression"]["cached_positions"] == 1
    assert again["usage"]["compression"]["instruction_tokens"] > 1


def test_streamed_answer_is_the_whole_answer(server, library):
    t, x = PROBE_INSTRUCTIONS[1], PROBE_INPUTS[1]
    status, chunks = stream(server, "/v1/chat/completions", chat(t, x, stream=True))
    assert status == 200 and chunks[-1] == "[DONE]"
    deltas = [c for c in chunks[:-1] if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in deltas) == library(t, x)
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant"
    assert deltas[-1]["choices"][0]["finish_reason"]
    assert chunks[-2]["usage"]["completion_tokens"] >= 1 and all(c["object"] == "chat.completion.chunk"
                                                                 for c in deltas)


def test_completions_endpoint_and_its_prompt_list(server, library):
    status, r = post(server, "/v1/completions", {"prompt": PROBE_INSTRUCTIONS[:3], "input": PROBE_INPUTS[0],
                                                 "max_tokens": 8, "temperature": 0})
    assert status == 200 and r["object"] == "text_completion"
    assert [c["text"] for c in r["choices"]] == [library(t, PROBE_INPUTS[0]) for t in PROBE_INSTRUCTIONS[:3]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    status, chunks = stream(server, "/v1/completions",
                            {"prompt": PROBE_INSTRUCTIONS[3], "input": PROBE_INPUTS[2],
                                                        "max_tokens": 8, "temperature": 0, "stream": True})
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1] if isinstance(c, dict) and c["choices"])
    assert text == library(PROBE_INSTRUCTIONS[3], PROBE_INPUTS[2])


def test_models_health_and_cache_stats(server):
    assert get(server, "/health") == (200, "ok")
    status, models = get(server, "/v1/models")
    assert [m["id"] for m in models["data"]] == ["tiny-gist"]
    post(server, "/v1/chat/completions", chat("Count the words.", "a b c"))
    post(server, "/v1/chat/completions", chat("Count the words.", "d e"))
    status, stats = get(server, "/v1/cache/stats")
    assert stats["mode"] == "gist" and stats["cached_instructions"] >= 1 and stats["memory_hits"] >= 1
    # k=1: all alike
    assert stats["cache_bytes"] == stats["cached_instructions"] * stats["bytes_per_instruction"]


def test_a_literal_gist_token_is_served_as_text(server, library):
    status, r = post(server, "/v1/chat/completions", chat("Repeat the list. <GIST>", "cat <GIST> dog"))
    assert status == 200 and r["choices"][0]["message"]["content"] == library("Repeat the list. <GIST>",
                                                                              "cat <GIST> dog")


BAD = [
    ("not json", "{\"messages\": [", "not valid JSON"),
    ("no messages", {}, "messages: Field required"),
    ("empty messages", {"messages": []}, "at least 1 item"),
    ("content of a wrong type", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("max_tokens 0", chat("Repeat.", "a", max_tokens=0), "max_tokens must be between 1 and"),
    ("max_tokens too large", chat("Repeat.", "a", max_tokens=10**6), "max_tokens must be between 1 and"),
    ("max_tokens as text", chat("Repeat.", "a", max_tokens="5"),
     "max_tokens: Input should be a valid integer"),
    ("max_completion_tokens 0", chat("Repeat.", "a", max_completion_tokens=0),
     "max_tokens must be between 1 and"),
    ("seed beyond 64 bits", chat("Repeat.", "a", seed=10**30), "seed: Input should be less than"),
    ("negative temperature", chat("Repeat.", "a", temperature=-1), "temperature"),
    ("two turns", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "one instruction and one input"),
    ("system only", {"messages": [{"role": "system", "content": "Repeat."}]}, "exactly one user message"),
    ("empty instruction", chat("  ", "a"), "instruction"),
    ("n=2", chat("Repeat.", "a", n=2), "n=1"),
    ("stop list too long", chat("Repeat.", "a", stop=["a", "b", "c", "d", "e"]), "stop"),
]


@pytest.mark.parametrize("name,body,message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_that_says_why(server, name, body, message):
    status, r = post(server, "/v1/chat/completions", body)
    assert status == 400, r
    assert message in r["error"]["message"] and r["error"]["type"] == "invalid_request_error"


def test_refusals_that_need_the_model_and_the_server_goes_on(server, library):
    long = chat("Repeat the list.", "word " * 1000)
    status, r = post(server, "/v1/chat/completions", long)
    assert status == 400 and r["error"]["code"] == "context_length_exceeded"
    assert "positions" in r["error"]["message"]
    # refused before any stream
    status, chunks = stream(server, "/v1/chat/completions", {**long, "stream": True})
    assert status == 400 and chunks[0]["error"]["code"] == "context_length_exceeded"
    status, r = post(server, "/v1/chat/completions", chat("Repeat.", "a", model="gpt-4"))
    assert status == 404 and r["error"]["code"] == "model_not_found" and "tiny-gist" in r["error"]["message"]
    status, r = post(server, "/v1/completions", {"prompt": [], "max_tokens": 4})
    assert status == 400 and "prompt" in r["error"]["message"]
    assert server.healthy()
    status, r = post(server, "/v1/chat/completions", chat(PROBE_INSTRUCTIONS[0], PROBE_INPUTS[0]))
    assert status == 200 and r["choices"][0]["message"]["content"] == library(PROBE_INSTRUCTIONS[0],
                                                                              PROBE_INPUTS[0])


def test_openai_client(server, library):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    t, x = PROBE_INSTRUCTIONS[2], PROBE_INPUTS[0]
    r = client.chat.completions.create(model="tiny-gist", messages=[{"role": "system", "content": t},
                                                                    {"role": "user", "content": x}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.content == library(t, x)
    pieces = client.chat.completions.create(model="tiny-gist", messages=[{"role": "system", "content": t},
                                                                         {"role": "user", "content": x}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == library(t, x)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny-gist", messages=[{"role": "user", "content": x}],
                                       max_tokens=0)


# -- a client that leaves mid-generation -----------------------------------------------------------

@pytest.fixture(scope="module")
def rambling_server(random_export, tmp_path_factory):
    """Random weights: answers run to max_tokens (no EOS), so a request is long enough to leave."""
    folder, export = tmp_path_factory.mktemp("rambling"), random_export
    with ServerProcess(export, "--max_batch_size", "8", log=str(folder / "server.log")) as s:
        yield s


def test_a_client_leaving_mid_stream_does_not_disturb_its_batch(rambling_server):
    server = rambling_server
    bodies = [chat(f"Describe item {i}.", "x y z", max_tokens=120) for i in range(3)]
    alone = [post(server, "/v1/chat/completions", b)[1]["choices"][0]["message"]["content"] for b in bodies]
    left = threading.Event()

    def leave():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/chat/completions",
                     json.dumps(chat("Ramble on.", "a", max_tokens=400, stream=True)),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        for _ in range(3):  # a few chunks, then hang up
            r.fp.readline()
        conn.sock.close()
        conn.close()
        left.set()

    with ThreadPoolExecutor(4) as pool:
        leaver = pool.submit(leave)
        time.sleep(0.2)
        together = list(pool.map(lambda b: post(server, "/v1/chat/completions", b), bodies))
        leaver.result()
    assert left.is_set() and all(status == 200 for status, _ in together)
    assert [r["choices"][0]["message"]["content"] for _, r in together] == alone
    assert all(r["choices"][0]["finish_reason"] == "length" for _, r in together)
    for _ in range(40):  # the engine hears of it at its next step
        stats = get(server, "/v1/cache/stats")[1]
        if stats["cancelled"] >= 1 and stats["running"] == 0:
            break
        time.sleep(0.25)
    assert stats["cancelled"] == 1 and stats["running"] == 0 and server.healthy()


def test_serve_refuses_what_it_cannot_serve(tmp_path, capsys):
    from gist_lightning.cli import main

    for argv, message in [(["--model", str(tmp_path)], "no gist_config.json"),
                          (["--model", str(tmp_path), "--cache_memory", "lots"],
                           "cannot read 'lots' as a size")]:
        with pytest.raises(SystemExit) as e:
            main(["serve", *argv])
        assert e.value.code == 1 and message in capsys.readouterr().err


def test_judge_against_this_projects_server(server, library, tmp_path, monkeypatch, capsys):
    import csv

    from gist_lightning.cli import main
    from gist_lightning.evaluation.judge import QUESTION, JudgeClient, combine, judge, parse_verdict

    pairs = [(t, x) for t in PROBE_INSTRUCTIONS[:3] for x in PROBE_INPUTS[:2]]
    for name, answer in [("a.csv", lambda t, x: library(t, x)), ("b.csv", lambda t, x: x)]:
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["x", "y_pred", "y_true"])
            w.writerows([[f"Instruction: {t}\n<GIST>\nInput: {x}\nOutput:", answer(t, x), ""]
                         for t, x in pairs])
    before = get(server, "/v1/cache/stats")[1]["requests"]
    client = JudgeClient(server.url, "tiny-gist", api_key="unused")
    summary = judge(tmp_path / "a.csv", tmp_path / "b.csv", client, tmp_path / "j.csv")
    # both orders, every record
    assert get(server, "/v1/cache/stats")[1]["requests"] - before == 2 * len(pairs)
    rows = list(csv.DictReader(open(tmp_path / "j.csv")))
    assert len(rows) == summary["records"] == len(pairs)
    for row in rows:  # what was recorded is what the endpoint answers to that question, read by the rules
        question = QUESTION.format(task=row["x"], first=row["a"], second=row["b"])
        assert row["raw_ab"] == client.ask(question)
        assert row["outcome"] == combine(parse_verdict(row["raw_ab"]), parse_verdict(row["raw_ba"]))
    assert summary["win_rate"] + summary["tie_rate"] + summary["loss_rate"] == pytest.approx(1)
    # the command line: key from the environment, refuses to overwrite what it wrote
    monkeypatch.setenv("JUDGE_KEY", "unused")
    args = ["judge", "--a", str(tmp_path / "a.csv"), "--b", str(tmp_path / "b.csv"), "--url", server.url,
            "--model", "tiny-gist", "--api_key_env", "JUDGE_KEY", "--out", str(tmp_path / "cli.csv"),
            "--limit", "2"]
    main(args)
    assert "2 records judged in both orders" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(args)
    assert "exists; refusing to overwrite" in capsys.readouterr().err
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(SystemExit):
        main([*args[:-4], "--out", str(tmp_path / "other.csv")])
    assert "no API key: set JUDGE_KEY" in capsys.readouterr().err
