"""Decoding speed from a cached prompt, against what a user gets without this project and against
the hardware's ceiling.

One instruction of ``--instruction_tokens`` tokens shared by every row (a system prompt), B inputs
of the same length, greedy, ``--new_tokens`` new tokens, caches made before the clock starts:

- ``hf_generate``: HF ``model.generate`` on the whole prompt (what a user does without this project);
- ``hf_prefix_cache``: HF ``model.generate`` continuing a precomputed cache of the instruction
  (HF's own prefix caching; the copy of the cache that generate may extend is made before the clock);
- ``library``: ``gist_lightning.generate`` from a gist cache (k positions);
- ``engine``: the serving engine in-process (no HTTP), the instruction's cache warm in memory;
- ``ceiling``: a bare loop of model forwards with a key/value cache and no masks, from the same
  gist cache (``ceiling_compiled``: the same loop through ``torch.compile``, with ``--compile``).

Answers are checked where they must agree: hf_generate = hf_prefix_cache = the library from a
pos_control cache (full attention over the instruction), and library = engine = ceiling (from the
gist cache). A disagreement fails the run. tokens_per_s = B x new tokens / time; ms_per_token =
time / new tokens (one step of the whole batch); the median of ``--repeats`` timed runs after a
warm-up. Random weights are fine for speed.

    python experiments/bench_generate.py --shape tiny
    python experiments/bench_generate.py --shape 100m --out experiments/results
    python experiments/bench_generate.py --shape 100m --device cuda --dtype bfloat16 --compile
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

METHODS = ("hf_generate", "hf_prefix_cache", "library", "engine", "ceiling", "ceiling_compiled")
SHAPES = {  # as experiments/bench_serve.py
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12),
}
WORDS = ("the a user answer question always never must reply format list table summary polite concise "
         "customer order refund policy product shipping account step explain example error tone "
         "rules").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--shape", default="100m", choices=list(SHAPES))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--instruction_tokens", type=int, default=400)
    p.add_argument("--input_tokens", type=int, default=8)
    p.add_argument("--k", type=int, default=1, help="gist tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "ceiling_compiled"],
                   choices=METHODS)
    p.add_argument("--compile", action="store_true",
                   help="add ceiling_compiled (torch.compile of the bare loop)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="folder for bench_generate-<shape>-<device>.csv and .md")
    p.add_argument("--check_args", action="store_true",
                   help="validate the arguments, print what would run, exit")
    cfg = p.parse_args(argv)
    try:
        torch.device(cfg.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if min(cfg.batch) < 1 or cfg.new_tokens < 2 or cfg.repeats < 1:
        p.error("--batch values >= 1, --new_tokens >= 2 and --repeats >= 1")
    if cfg.compile and "ceiling_compiled" not in cfg.methods:
        cfg.methods.append("ceiling_compiled")
    return cfg


def build(cfg):
    """A random LLaMA of the shape with the suite tokenizer and ``<GIST>``; the instruction and inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gist_lightning.tokens import add_gist_token, load_tokenizer

    tok = load_tokenizer("suite")
    positions = cfg.instruction_tokens + cfg.input_tokens + cfg.new_tokens + 64
    torch.manual_seed(0)
    with torch.device(cfg.device):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 2, max_position_embeddings=positions,
                                             **SHAPES[cfg.shape]))
    add_gist_token(tok, model)
    model = model.to(getattr(torch, cfg.dtype)).eval()
    words, i = [], 0
    while len(tok(" ".join(words))["input_ids"]) < cfg.instruction_tokens:
        words.append(WORDS[i % len(WORDS)] + ("." if i % 9 == 8 else ""))
        i += 1
    # inputs of one token length: words that are one token each, so no row needs padding
    single = [w for w in WORDS if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    return model, tok, " ".join(words), single


def inputs_for(batch: int, cfg, single: list[str]) -> list[str]:
    return [" ".join(single[(r * 7 + j * 3) % len(single)] for j in range(cfg.input_tokens))
            for r in range(batch)]


def timed(fn, repeats: int):
    fn()  # warm-up (first-call allocations, lazy inits)
    times, out = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def until_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def run_batch(model, tok, instruction: str, inputs: list[str], cfg) -> list[dict]:
    from transformers import DynamicCache

    from gist_lightning import compress, generate
    from gist_lightning.generation import decode_new_tokens
    from gist_lightning.serving.engine import GenerationRequest, ServingEngine
    from gist_lightning.templates import encode_continuation, encode_prefix
    from gist_lightning.tokens import gist_token_id

    B, T, eos = len(inputs), cfg.new_tokens, tok.eos_token_id
    dev = model.device
    prefix = encode_prefix(tok, instruction, cfg.k, gist_token_id(tok))
    conts = [encode_continuation(tok, x, False) for x in inputs]
    assert len({len(c) for c in conts}) == 1, "inputs of different token lengths"
    whole = torch.tensor([prefix + c for c in conts], device=dev)
    results, answers = [], {}

    def record(method, seconds, rows):
        results.append({"batch": B, "method": method, "tokens_per_s": B * T / seconds,
                        "ms_per_token": 1000 * seconds / T})
        answers[method] = rows
        print(f"  batch {B:>3} {method:<17} {B * T / seconds:10.1f} tok/s {1000 * seconds / T:9.2f} ms/step",
              flush=True)

    hf_kwargs = dict(max_new_tokens=T, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    if "hf_generate" in cfg.methods:
        s, out = timed(lambda: model.generate(whole, attention_mask=torch.ones_like(whole), **hf_kwargs),
                       cfg.repeats)
        record("hf_generate", s, until_eos(out[:, whole.shape[1]:].tolist(), eos))
    if "hf_prefix_cache" in cfg.methods:
        prompt_cache = DynamicCache()
        with torch.no_grad():
            model(torch.tensor([prefix] * B, device=dev), past_key_values=prompt_cache)
        copies = []

        def prefix_cached():
            past = copies.pop() if copies else copy.deepcopy(prompt_cache)
            return model.generate(whole, attention_mask=torch.ones_like(whole), past_key_values=past,
                                  **hf_kwargs)

        def timed_copies():  # the copy generate extends is made outside the clock
            copies.append(copy.deepcopy(prompt_cache))
            sync()
            start = time.perf_counter()
            out = prefix_cached()
            sync()
            return time.perf_counter() - start, out

        prefix_cached()
        runs = [timed_copies() for _ in range(cfg.repeats)]
        record("hf_prefix_cache", statistics.median(r[0] for r in runs),
               until_eos(runs[-1][1][:, whole.shape[1]:].tolist(), eos))
    # the library from a pos_control cache: full attention over the instruction, as HF computes it
    full_cache = compress(model, tok, [instruction] * B, cfg.k, "pos_control")
    answers["library_pos_control"] = generate(model, tok, full_cache, inputs, T)
    gist_cache = compress(model, tok, [instruction] * B, cfg.k, "gist")
    if "library" in cfg.methods:
        s, texts = timed(lambda: generate(model, tok, gist_cache, inputs, T), cfg.repeats)
        record("library", s, texts)
    if "engine" in cfg.methods:
        engine = ServingEngine(model, tok, cfg.k, "gist", mode="gist", cache_memory="4GB", max_batch_size=B)

        def serve():
            texts = {}
            for i, x in enumerate(inputs):
                engine.submit(str(i), GenerationRequest(instruction, x, max_tokens=T))
            while engine.busy():
                for e in engine.step():
                    assert e.error is None, e.error
                    texts[e.uid] = texts.get(e.uid, "") + e.text
            return [texts[str(i)] for i in range(B)]

        s, texts = timed(serve, cfg.repeats)
        record("engine", s, texts)
    start_pos, cont = int(gist_cache.next_position[0]), torch.tensor(conts, device=dev)
    for method in ("ceiling", "ceiling_compiled"):
        if method not in cfg.methods:
            continue
        forward = model.forward
        if method == "ceiling_compiled":
            try:
                forward = torch.compile(model.forward, dynamic=False)
            except Exception as e:  # noqa: BLE001 - reported, the others go on
                print(f"  {method}: torch.compile failed: {e}")
                continue
        @torch.no_grad()
        def bare(forward=forward):
            past = DynamicCache(ddp_cache_data=[(k_, v_) for k_, v_ in gist_cache.states])
            pos = torch.arange(start_pos, start_pos + cont.shape[1], device=dev)[None].expand(B, -1)
            logits = forward(input_ids=cont, position_ids=pos, cache=past, use_cache=True).logits[:, -1]
            tokens, nxt, p = [], logits.argmax(-1), start_pos + cont.shape[1]
            for step in range(T):
                tokens.append(nxt)
                if step == T - 1:
                    break
                pos = torch.full((B, 1), p + step, device=dev)
                logits = forward(input_ids=nxt[:, None], position_ids=pos, cache=past,
                                 use_cache=True).logits[:, -1]
                nxt = logits.argmax(-1)
            return torch.stack(tokens, 1)

        try:
            s, ids = timed(bare, cfg.repeats)
        except Exception as e:  # noqa: BLE001 - a compile failure is reported, the others go on
            print(f"  {method}: failed: {type(e).__name__}: {e}")
            continue
        record(method, s, decode_new_tokens(tok, ids))
    check(answers, tok)
    return results


def check(answers: dict, tok) -> None:
    """The methods that must agree do, or the run fails."""
    def text(rows):
        return [r if isinstance(r, str) else tok.decode([t for t in r if t != tok.eos_token_id],
                                                        skip_special_tokens=True).strip() for r in rows]

    groups = [("hf_generate", "hf_prefix_cache", "library_pos_control"),
              ("library", "engine", "ceiling", "ceiling_compiled")]
    for group in groups:
        present = [m for m in group if m in answers]
        for m in present[1:]:
            if text(answers[m]) != text(answers[present[0]]):
                raise SystemExit(f"answers differ: {m} vs {present[0]}:\n{text(answers[m])[:2]}\n"
                                 f"{text(answers[present[0]])[:2]}")


def render(info: dict, rows: list[dict]) -> str:
    lines = [f"# bench_generate, {info['shape']} shape, {info['device']}", "",
             f"`{info['command']}`", "", f"Machine: {info['machine']}", "",
             f"{info['parameters'] / 1e6:.1f}M parameters, {info['dtype']}; instruction "
             f"{info['instruction_tokens']} tokens (+{info['k']} gist), inputs {info['input_tokens']} "
             f"tokens, {info['new_tokens']} new tokens, greedy; median of {info['repeats']} warm runs.", "",
             "| batch | method | tokens/s | ms/step | x ceiling |", "|---|---|---|---|---|"]
    for b in sorted({r["batch"] for r in rows}):
        ceiling = next((r["tokens_per_s"] for r in rows if r["batch"] == b and r["method"] == "ceiling"),
                       None)
        for r in (r for r in rows if r["batch"] == b):
            ratio = f"{r['tokens_per_s'] / ceiling:.2f}" if ceiling else "-"
            lines.append(f"| {b} | {r['method']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | "
                         f"{ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.check_args:
        print(f"bench_generate would run: {vars(cfg)}")
        return
    import sys

    model, tok, instruction, single = build(cfg)
    info = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.platform()}; {platform.processor() or platform.machine()}; "
                       f"{torch.get_num_threads()} torch threads; torch {torch.__version__}",
            "shape": cfg.shape, "device": cfg.device, "dtype": cfg.dtype,
            "parameters": sum(p.numel() for p in model.parameters()), "k": cfg.k,
            "instruction_tokens": len(tok(instruction)["input_ids"]), "input_tokens": cfg.input_tokens,
            "new_tokens": cfg.new_tokens, "repeats": cfg.repeats}
    print(info, flush=True)
    rows = []
    for batch in cfg.batch:
        rows += [{"shape": cfg.shape, **r} for r in run_batch(model, tok, instruction,
                                                               inputs_for(batch, cfg, single),
                                                              cfg)]
    table = render(info, rows)
    print(table)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"bench_generate-{cfg.shape}-{'cpu' if cfg.device == 'cpu' else 'cuda'}"
        with open(out / f"{stem}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f,
                                    fieldnames=["shape", "batch", "method", "tokens_per_s", "ms_per_token"])
            writer.writeheader()
            writer.writerows({**r, "tokens_per_s": f"{r['tokens_per_s']:.2f}",
                              "ms_per_token": f"{r['ms_per_token']:.3f}"}
                             for r in rows)
        (out / f"{stem}.md").write_text(table)
        print(f"wrote {out / stem}.csv and .md")


if __name__ == "__main__":
    main()
