"""Load test of ``gist-lightning serve``: the same workload against the three modes (gist caching,
instruction caching, no caching) with the same cache-memory budget, at several concurrencies.

Workload: M distinct instructions (synthetic ones of about ``--instruction_tokens`` tokens, or the
instructions of an Alpaca+-style JSON file as they are), N requests whose instructions are drawn
Zipf(s) over them (a few popular prompts, a long tail), each with a short input, greedy answers
of ``--max_tokens`` tokens. Every (mode, concurrency) cell gets a fresh server (cold cache but for one
warm-up request with an instruction outside the workload, before the timing) on a
free loopback port, runs until its N requests are answered or ``--time_limit`` seconds have passed
(in-flight requests are then awaited), and is stopped. Requests are streamed, so the
time to the first token is measured. Reported per cell: requests/s, generated tokens/s, latency
p50/p99, time to first token p50/p99, cache hit rate (requests whose instruction was in memory
or on disk), failures, and how many instructions the budget holds (capacity / bytes per cached
instruction, from the server's /v1/cache/stats).

The model: an exported one (``--model``) or a random-weight shape (``--shape``: the text is
meaningless, the work is real), exported to a temporary folder with the suite tokenizer.

    python experiments/bench_serve.py --shape 100m --out experiments/results/serve-100m-cpu
    python experiments/bench_serve.py --shape tiny --out experiments/results/serve-tiny-cpu
    python experiments/bench_serve.py --shape 100m --device cuda --requests 1024 --out ...

``--long_documents``: a segment model (random weights, 64 raw tokens + 8 gists per segment) serving
``--streams`` short requests that stream, then ``--documents`` requests whose system prompt is a
document of 2,000-4,000 tokens, compressed by the engine a piece per step between the streams'
tokens (``--prefill_tokens_per_step``, several values: one server each). Reported: the running
streams' inter-token gaps p50/p99 before the documents arrive and while they are compressed, and
the documents' time to first token against each compressed alone on the idle server.

    python experiments/bench_serve.py --long_documents --shape tiny --out experiments/results/serve-long-docs
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gist_lightning.machine import describe_machine
from gist_lightning.serving.launch import ServerProcess

SHAPES = {
    # the embedded default's model shape (configs/tiny.yaml)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # ~90M parameters: where the prompt's compute counts on a CPU
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12),
}
WORDS = ("the a user assistant answer question always never must should reply format list table summary "
         "polite concise detailed customer order refund policy product shipping account password security "
         "step explain example code python error message language english french tone friendly formal "
         "include avoid mention number date time price support ticket escalate manager review rules").split()


def export_random(shape: str, folder: Path, positions: int, segments: dict | None = None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from gist_lightning.export import export_pretrained
    from gist_lightning.tokens import add_gist_token, load_tokenizer

    tok = load_tokenizer("suite")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 2, max_position_embeddings=positions,
                                         **SHAPES[shape]))
    add_gist_token(tok, model)
    k = segments["gists_per_segment"] if segments else 1
    return export_pretrained(model, tok, folder / f"random-{shape}{'-segments' if segments else ''}",
                             num_gist_tokens=k, condition="gist", segments=segments)


def synthetic_instructions(n: int, tokens: int, tokenizer, rng: random.Random) -> list[str]:
    out = []
    for i in range(n):
        words = [f"Rule set {i}:"]
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words += [rng.choice(WORDS) for _ in range(rng.randint(6, 14))] + ["."]
        out.append(" ".join(words))
    return out


def file_instructions(path: str, n: int, rng: random.Random) -> list[str]:
    records = json.loads(Path(path).read_text())
    distinct = list(dict.fromkeys(r["instruction"] for r in records))
    rng.shuffle(distinct)
    return distinct[:n]


def workload(instructions: list[str], n: int, s: float, rng: random.Random) -> list[tuple[str, str]]:
    weights = [1 / (i + 1) ** s for i in range(len(instructions))]
    picks = rng.choices(range(len(instructions)), weights, k=n)
    return [(instructions[i], " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))) for i in picks]


def one_request(port: int, instruction: str, input: str, max_tokens: int) -> dict:
    """Stream one chat completion; the times of its first content and its end, tokens, cache source."""
    body = {"messages": [{"role": "system", "content": instruction}, {"role": "user", "content": input}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    out = {"start": start, "ok": False, "first": None, "tokens": 0, "cache": None}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            out["error"] = f"HTTP {r.status}: {r.read()[:200]!r}"
            return out
        done = False
        for line in r:
            line = line.strip()
            if line == b"data: [DONE]":
                done = True
            if not line.startswith(b"data: ") or done:
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
                return out
            if chunk.get("gist_cache"):
                out["cache"] = chunk["gist_cache"]
            if chunk["choices"] and out["first"] is None:
                out["first"] = time.perf_counter()
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
        conn.close()
        # a stream cut off before its usage chunk and [DONE] is a failure, not a short answer
        out["ok"] = done and out["tokens"] > 0
        if not out["ok"]:
            out["error"] = "the stream ended without its usage chunk and [DONE]"
    except OSError as e:
        out["error"] = repr(e)
    finally:
        out["end"] = time.perf_counter()
    return out


def stream_times(port: int, instruction: str, input: str, max_tokens: int, out: dict) -> None:
    """Stream one chat completion into ``out``: its start, the arrival time of every chunk with
    content, and its end."""
    body = {"messages": [{"role": "system", "content": instruction}, {"role": "user", "content": input}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    out.update(start=time.perf_counter(), times=[], error=None)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1200)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        out["error"] = f"HTTP {r.status}: {r.read()[:200]!r}"
        return
    for line in r:
        line = line.strip()
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
                return
            if chunk["choices"] and chunk["choices"][0].get("delta", {}).get("content"):
                out["times"].append(time.perf_counter())
    out["end"] = time.perf_counter()
    conn.close()


def long_documents(cfg, tmp: Path) -> tuple[dict, list[dict]]:
    """The --long_documents scenario: one server per --prefill_tokens_per_step value."""
    from dataclasses import asdict

    from gist_lightning.long_context import SegmentSettings
    from gist_lightning.tokens import load_tokenizer

    rng = random.Random(cfg.seed)
    settings = SegmentSettings(64, 8, "coarse")
    model = str(export_random(cfg.shape, tmp, 8192, asdict(settings)))
    tokenizer = load_tokenizer(model)

    def text_of(tokens: int, tag: str) -> str:
        return synthetic_instructions(1, tokens, tokenizer, random.Random(f"{tag}{rng.random()}"))[0]

    info = {"command": "python " + " ".join(sys.argv), "machine": describe_machine(),
            "model": f"random {cfg.shape} LLaMA shape, segments of 64 + 8 gists", "streams": cfg.streams,
            "documents": cfg.documents, "document_tokens": [2000, 4000], "stream_tokens": cfg.stream_tokens}
    cells = []
    for budget in cfg.prefill_tokens_per_step:
        args = ["--max_batch_size", str(cfg.streams + cfg.documents), "--accelerator", cfg.device,
                "--max_tokens_limit", str(cfg.stream_tokens), "--prefill_tokens_per_step", str(budget)]
        if cfg.dtype:
            args += ["--dtype", cfg.dtype]
        stream_texts = [text_of(40, f"s{i}") for i in range(cfg.streams)]
        doc_texts = [text_of(rng.randint(2000, 4000), f"d{i}") for i in range(cfg.documents)]
        with ServerProcess(model, *args, log=str(tmp / f"server-docs-{budget}.log")) as server:
            stream_times(server.port, text_of(40, "warm"), "a", 2, {})
            streams = [{} for _ in range(cfg.streams)]
            threads = [threading.Thread(target=stream_times,
                                        args=(server.port, text, "go on", cfg.stream_tokens, out))
                       for text, out in zip(stream_texts, streams)]
            for t in threads:
                t.start()
            time.sleep(cfg.lead_seconds)  # the streams run alone for a while
            docs = [{} for _ in range(cfg.documents)]
            arrive = time.perf_counter()
            question = "What is rule 3?"
            doc_threads = [threading.Thread(target=stream_times, args=(server.port, text, question, 8, doc))
                           for doc, text in zip(docs, doc_texts)]
            for t in doc_threads:
                t.start()
            for t in doc_threads + threads:
                t.join()
            # each document alone on the idle server (new texts of the same lengths: nothing cached)
            alone = []
            for text in doc_texts:
                again = {}
                stream_times(server.port, text.replace("Rule set", "Rule book", 1), question, 8, again)
                alone.append(again["times"][0] - again["start"])
        errors = [x["error"] for x in streams + docs if x.get("error")]
        last_first = max(d["times"][0] for d in docs if d.get("times"))
        before, during = [], []
        for st in streams:
            for a, b in zip(st["times"], st["times"][1:]):
                (before if b <= arrive else during if a >= arrive and b <= last_first else []).append(b - a)
        ttft = [d["times"][0] - d["start"] for d in docs if d.get("times")]
        cell = {"prefill_tokens_per_step": budget, "gaps_before": len(before), "gaps_during": len(during),
                "gap_p50_before_ms": 1000 * percentile(before, 50),
                "gap_p99_before_ms": 1000 * percentile(before, 99),
                "gap_p50_during_ms": 1000 * percentile(during, 50),
                "gap_p99_during_ms": 1000 * percentile(during, 99),
                "doc_ttft_s": ttft, "doc_ttft_alone_s": alone, "errors": errors[:3]}
        cell["p99_ratio"] = cell["gap_p99_during_ms"] / cell["gap_p99_before_ms"]
        cell["ttft_ratio_max"] = max(t / a for t, a in zip(ttft, alone)) if len(ttft) == len(alone) else None
        cells.append(cell)
        print(json.dumps(cell), flush=True)
    return info, cells


def render_documents(info: dict, cells: list[dict]) -> str:
    lines = [f"# bench_serve --long_documents: {info['model']}", "", info["machine"], "",
             f"    {info['command']}", "",
             f"{info['streams']} streams of {info['stream_tokens']} tokens each (greedy), then "
             f"{info['documents']} requests bringing documents of 2,000-4,000 tokens (8 new tokens each). "
             "Gaps: between a running stream's content chunks, before the documents arrive and while they "
             "are compressed (until the last one's first token). Goals (issue 33): p99 while <= 1.5x p99 "
             "before; each document's time to first token <= 2x its compression alone.", "",
             "| prefill tokens / step | gaps before / during | p50 before ms | p99 before ms | p50 during ms "
             "| p99 during ms | p99 ratio | doc TTFT s | alone s | worst TTFT ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        budget = c["prefill_tokens_per_step"] or "1 segment"
        ratio = f"{c['ttft_ratio_max']:.2f}" if c["ttft_ratio_max"] is not None else "-"
        lines.append(f"| {budget} | {c['gaps_before']} / {c['gaps_during']} | {c['gap_p50_before_ms']:.1f} | "
                     f"{c['gap_p99_before_ms']:.1f} | {c['gap_p50_during_ms']:.1f} | "
                     f"{c['gap_p99_during_ms']:.1f} | "
                     f"{c['p99_ratio']:.2f} | {', '.join(f'{t:.2f}' for t in c['doc_ttft_s'])} | "
                     f"{', '.join(f'{t:.2f}' for t in c['doc_ttft_alone_s'])} | {ratio} |")
    return "\n".join(lines) + "\n"


def run_cell(port: int, requests: list[tuple[str, str]], concurrency: int, max_tokens: int,
             time_limit: float):
    results, lock, next_index = [], threading.Lock(), [0]
    t0 = time.perf_counter()

    def worker():
        while True:
            with lock:
                i = next_index[0]
                if i >= len(requests) or time.perf_counter() - t0 > time_limit:
                    return
                next_index[0] += 1
            r = one_request(port, *requests[i], max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    latency = [r["end"] - r["start"] for r in ok]
    ttft = [r["first"] - r["start"] for r in ok if r["first"] is not None]
    hits = sum(r["cache"] in ("memory", "disk") for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok), "seconds": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_p50": percentile(latency, 50), "latency_p99": percentile(latency, 99),
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "hit_rate": hits / len(ok) if ok else 0.0,
            "errors": sorted({str(r.get("error")) for r in results if not r["ok"]})[:3]}


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None,
                   help="an exported model folder (default: a random-weight --shape)")
    p.add_argument("--shape", default="100m", choices=list(SHAPES))
    p.add_argument("--instructions_file", default=None,
                   help="Alpaca+-style JSON: use its instructions as they are")
    p.add_argument("--instruction_tokens", type=int, default=300, help="length of the synthetic instructions")
    p.add_argument("--num_instructions", type=int, default=64)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", default=["gist", "instruction", "full"])
    p.add_argument("--cache_memory", default="64MB", help="the same budget for every mode")
    p.add_argument("--max_batch_size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--time_limit", type=float, default=120.0, help="seconds a cell may issue requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    p.add_argument("--check_args", action="store_true",
                   help="validate the arguments, print what would run and exit (no server, no work)")
    p.add_argument("--long_documents", action="store_true",
                   help="the long-document scenario (chunked prefill; see the module docstring)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--stream_tokens", type=int, default=600)
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--lead_seconds", type=float, default=3.0, help="the streams alone before the documents")
    p.add_argument("--prefill_tokens_per_step", type=int, nargs="+", default=[0, 256])
    cfg = p.parse_args(argv)
    if cfg.check_args:
        print(f"bench_serve would run: {vars(cfg)}")
        return
    if cfg.long_documents:
        with tempfile.TemporaryDirectory() as tmp:
            info, cells = long_documents(cfg, Path(tmp))
        write_results(cfg.out, info, cells, render_documents(info, cells))
        return

    from gist_lightning.templates import encode_prefix
    from gist_lightning.tokens import add_gist_token, gist_token_id, load_tokenizer

    rng = random.Random(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = cfg.model or str(export_random(cfg.shape, Path(tmp), 1024))
        tokenizer = load_tokenizer(model)
        if cfg.instructions_file:
            instructions = file_instructions(cfg.instructions_file, cfg.num_instructions, rng)
        else:
            instructions = synthetic_instructions(cfg.num_instructions, cfg.instruction_tokens, tokenizer,
                                                  rng)
        requests = workload(instructions, cfg.requests, cfg.zipf, rng)
        used = list(dict.fromkeys(t for t, _ in requests))
        # warm-up: an instruction of the same kind outside the workload (its cache entry is typical)
        warm = next((t for t in instructions if t not in used), "Warm up.")
        k = json.loads((Path(model) / "gist_config.json").read_text())["num_gist_tokens"]
        # instruction tokens as the server sees them: specials + "Instruction: {t}\n" (the prompt before
        # the gists)
        add_gist_token(tokenizer)
        lengths = [len(encode_prefix(tokenizer, t, k, gist_token_id(tokenizer))) - k for t in used]
        weights = Path(model) / "model.safetensors"
        params = None
        if weights.is_file():
            from safetensors.torch import load_file

            params = sum(t.numel() for t in load_file(str(weights)).values())
        info = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                "machine": describe_machine(),
                "model": cfg.model or f"random {cfg.shape} LLaMA shape", "parameters": params, "k": k,
                "instructions": len(instructions), "mean_instruction_tokens": statistics.mean(lengths),
                "distinct_in_workload": len({t for t, _ in requests}), "requests": len(requests),
                "zipf": cfg.zipf, "max_tokens": cfg.max_tokens, "cache_memory": cfg.cache_memory,
                "max_batch_size": cfg.max_batch_size, "device": cfg.device}
        print(json.dumps(info, indent=1), flush=True)
        cells = []
        for mode in cfg.modes:
            for concurrency in cfg.concurrency:
                args = ["--mode", mode, "--cache_memory", cfg.cache_memory,
                        "--max_batch_size", str(cfg.max_batch_size), "--accelerator", cfg.device,
                        "--max_tokens_limit", str(max(cfg.max_tokens, 1024))]
                if cfg.dtype:
                    args += ["--dtype", cfg.dtype]
                log = str(Path(tmp) / f"server-{mode}-{concurrency}.log")
                with ServerProcess(model, *args, log=log) as server:
                    one_request(server.port, warm, "a", 2)  # first-call overheads out of the timing
                    results, wall = run_cell(server.port, requests, concurrency, cfg.max_tokens,
                                             cfg.time_limit)
                    stats = get_json(server.port, "/v1/cache/stats")
                cell = {"mode": mode, "concurrency": concurrency, **summarize(results, wall),
                        "cached_instructions": stats["cached_instructions"],
                        "bytes_per_instruction": stats["bytes_per_instruction"],
                        "instructions_in_budget": (
                            int(stats["cache_capacity"] // stats["bytes_per_instruction"])
                            if stats["bytes_per_instruction"] else None),
                        "compressions": stats["compressed"]}
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    write_results(cfg.out, info, cells, render(info, cells))


def write_results(out: str | None, info: dict, cells: list[dict], table: str) -> None:
    """Print the table; with ``out``, write results.json and results.md there."""
    print(table)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"info": info, "cells": cells}, indent=1))
        (out / "results.md").write_text(table)


def render(info: dict, cells: list[dict]) -> str:
    lines = [f"# bench_serve: {info['model']}, k={info['k']}, {info['device']}", "",
             info["machine"], "", f"    {info['command']}", "",
             f"{info['instructions']} instructions, {info['distinct_in_workload']} of them in the workload "
             f"({info['mean_instruction_tokens']:.0f} tokens on average), {info['requests']} requests "
             f"Zipf({info['zipf']}), {info['max_tokens']} new tokens each (greedy), cache memory "
             f"{info['cache_memory']} in every mode, max batch {info['max_batch_size']}.", "",
             "| mode | concurrency | requests | failed | req/s | gen tok/s | latency p50 s | p99 s | TTFT "
             "p50 s | p99 s | hit rate | compressions | bytes / instruction | instructions in budget |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        per = f"{c['bytes_per_instruction']:.0f}" if c["bytes_per_instruction"] else "-"
        fit = c["instructions_in_budget"] if c["instructions_in_budget"] is not None else "-"
        lines.append(f"| {c['mode']} | {c['concurrency']} | {c['requests']} | {c['failed']} | "
                     f"{c['requests_per_s']:.2f} | {c['tokens_per_s']:.1f} | {c['latency_p50']:.2f} | "
                     f"{c['latency_p99']:.2f} | {c['ttft_p50']:.2f} | {c['ttft_p99']:.2f} | "
                     f"{c['hit_rate']:.2f} | {c['compressions']} | {per} | {fit} |")
    by = {(c["mode"], c["concurrency"]): c for c in cells}
    notes = []
    for conc in sorted({c["concurrency"] for c in cells}):
        if ("gist", conc) in by and ("full", conc) in by:
            notes.append(f"concurrency {conc}: gist / full requests/s = "
                         f"{by['gist', conc]['requests_per_s'] / by['full', conc]['requests_per_s']:.2f}x")
    gist = next((c for c in cells if c["mode"] == "gist" and c["bytes_per_instruction"]), None)
    instr = next((c for c in cells if c["mode"] == "instruction" and c["bytes_per_instruction"]), None)
    if gist and instr:
        notes.append(f"instructions held in the same memory, gist / instruction = "
                     f"{instr['bytes_per_instruction'] / gist['bytes_per_instruction']:.1f}x (mean "
                     f"instruction tokens / k = {info['mean_instruction_tokens'] / info['k']:.1f})")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


if __name__ == "__main__":
    main()
