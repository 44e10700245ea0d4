"""Decoding speed from a cached prompt, against what a user gets without this project and against
what this machine can do.

One instruction of ``--instruction_tokens`` tokens shared by every row (a system prompt), B inputs
of the same length, greedy, ``--new_tokens`` new tokens, caches made before the clock starts:

- ``hf_generate``: HF ``model.generate`` on the whole prompt (what a user does without this project);
- ``hf_prefix_cache``: HF ``model.generate`` continuing a precomputed cache of the instruction
  (HF's own prefix caching; the copy of the cache that generate may extend is made before the clock);
- ``library``: ``gist_lightning.generate`` from a gist cache (k positions); ``library_compiled``:
  the same with ``compile=True`` (static buffers, each step through ``torch.compile``);
- ``engine``: the serving engine in-process (no HTTP), the instruction's cache warm in memory;
  ``engine_compiled``: the same with ``compile=True``;
- ``ceiling``: a bare loop of model forwards over HF's concatenating ``DynamicCache``, no masks;
- ``ceiling_static``: a bare loop over a preallocated cache (HF ``StaticLayer`` buffers), no
  masks; ``ceiling_static_compiled``: its step through ``torch.compile`` (``fullgraph``: no graph
  break, or it fails);
- ``floor``: only the weight matmuls of each step (every linear layer and the LM head, at the same
  batch, one token): what no decoding loop of this model can beat on this machine.

Every method runs once per round, the rounds interleaved (``--repeats``, at least 5 for the
committed tables), after a warm-up run whose time is reported for the compiled ones (their compile
cost). Answers are checked where they must agree: hf_generate = hf_prefix_cache = the library from a
pos_control cache (full attention over the instruction), and library = library_compiled = engine
= engine_compiled = the ceilings (from the gist cache). tokens_per_s = B x new tokens / time
(median over rounds, with the lowest and highest); each method is also given as a ratio to
``ceiling_static``, ``ceiling_static_compiled`` and ``floor``. Random weights are fine for speed.

    python experiments/bench_generate.py --shape tiny
    python experiments/bench_generate.py --shape 100m --batch 1 32 --repeats 5 --out experiments/results
    python experiments/bench_generate.py --shape 100m --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path

import torch

METHODS = ("hf_generate", "hf_prefix_cache", "library", "library_compiled", "engine", "engine_compiled",
           "ceiling", "ceiling_static", "ceiling_static_compiled", "floor")
COMPILED = ("library_compiled", "engine_compiled", "ceiling_static_compiled")
CEILINGS = ("ceiling_static", "ceiling_static_compiled", "floor")
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
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of every method")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
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


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def until_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def methods_for(model, tok, instruction: str, inputs: list[str], cfg) -> tuple[dict, dict]:
    """{method: a function running it once and returning its answers}, and the answers of the
    pos_control library run (what HF's own generation must equal)."""
    from transformers import DynamicCache

    from gist_lightning import compress, generate
    from gist_lightning.backends.decoder_kv import bucket, static_cache
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
    fns = {}
    hf_kwargs = dict(max_new_tokens=T, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    fns["hf_generate"] = lambda: until_eos(model.generate(whole, attention_mask=torch.ones_like(whole),
                                                          **hf_kwargs)[:, whole.shape[1]:].tolist(), eos)
    prompt_cache = DynamicCache()
    with torch.no_grad():
        model(torch.tensor([prefix] * B, device=dev), cache=prompt_cache)
    fns["hf_prefix_cache"] = lambda: until_eos(model.generate(
        whole, attention_mask=torch.ones_like(whole), cache=copy.deepcopy(prompt_cache),
        **hf_kwargs)[:, whole.shape[1]:].tolist(), eos)  # the copy costs little against the decoding
    full_cache = compress(model, tok, [instruction] * B, cfg.k, "pos_control")
    pos_control = generate(model, tok, full_cache, inputs, T)
    gist_cache = compress(model, tok, [instruction] * B, cfg.k, "gist")
    fns["library"] = lambda: generate(model, tok, gist_cache, inputs, T)
    fns["library_compiled"] = lambda: generate(model, tok, gist_cache, inputs, T, compile=True)
    engines = {name: ServingEngine(model, tok, cfg.k, "gist", mode="gist", cache_memory="4GB",
                                   max_batch_size=B, compile=name == "engine_compiled")
               for name in ("engine", "engine_compiled")}

    def serve(engine):
        texts = {}
        for i, x in enumerate(inputs):
            engine.submit(str(i), GenerationRequest(instruction, x, max_tokens=T))
        while engine.busy():
            for e in engine.step():
                assert e.error is None, e.error
                texts[e.uid] = texts.get(e.uid, "") + e.text
        return [texts[str(i)] for i in range(B)]

    for name, engine in engines.items():
        fns[name] = lambda engine=engine: serve(engine)
    start_pos, cont = int(gist_cache.next_position[0]), torch.tensor(conts, device=dev)
    capacity = bucket(gist_cache.length + cont.shape[1] + T, 64)

    def static_step(past, tokens, position):
        return model(input_ids=tokens[:, None], position_ids=position[:, None], cache=past,
                     use_cache=True).logits[:, -1]

    compiled_step = torch.compile(static_step, dynamic=False, fullgraph=True,
                                  mode="reduce-overhead" if dev.type == "cuda" else None)

    @torch.no_grad()
    def bare(kind: str):
        if kind == "ceiling":
            past = DynamicCache(ddp_cache_data=[(k_, v_) for k_, v_ in gist_cache.states])
        else:
            past = static_cache(gist_cache.states, B, capacity)
        pos = torch.arange(start_pos, start_pos + cont.shape[1], device=dev)[None].expand(B, -1)
        logits = model(input_ids=cont, position_ids=pos, cache=past, use_cache=True).logits[:, -1]
        step = compiled_step if kind == "ceiling_static_compiled" else static_step
        tokens, nxt, position = [], logits.argmax(-1), torch.full((B,), start_pos + cont.shape[1], device=dev)
        for i in range(T):
            tokens.append(nxt)
            if i == T - 1:
                break
            nxt = step(past, nxt, position).argmax(-1)
            position = position + 1
        return decode_new_tokens(tok, torch.stack(tokens, 1))

    for kind in ("ceiling", "ceiling_static", "ceiling_static_compiled"):
        fns[kind] = lambda kind=kind: bare(kind)
    # the floor: every linear layer's matmul at this batch, one token per row, T steps
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(B, w.shape[1], device=dev, dtype=w.dtype) for w in weights]

    @torch.no_grad()
    def floor():
        for _ in range(T):
            for x, w in zip(xs, weights):
                torch.matmul(x, w.t())
        return None

    fns["floor"] = floor
    return {m: f for m, f in fns.items() if m in cfg.methods}, {"library_pos_control": pos_control}


def run_batch(model, tok, instruction: str, inputs: list[str], cfg) -> list[dict]:
    """Every method warmed once (the compiled ones' warm-up timed), then ``cfg.repeats`` rounds of
    every method in turn; one row per method: median tokens/s and the rounds' lowest and highest."""
    B, T = len(inputs), cfg.new_tokens
    fns, answers = methods_for(model, tok, instruction, inputs, cfg)
    warmup = {}
    for method, fn in fns.items():
        sync()
        start = time.perf_counter()
        answers[method] = fn()
        sync()
        warmup[method] = time.perf_counter() - start
    times = {m: [] for m in fns}
    for _ in range(cfg.repeats):
        for method, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[method].append(time.perf_counter() - start)
    check(answers, tok)
    rows = []
    for method, ts in times.items():
        med = statistics.median(ts)
        rows.append({"batch": B, "method": method, "tokens_per_s": B * T / med,
                     "ms_per_token": 1000 * med / T, "tokens_per_s_low": B * T / max(ts),
                     "tokens_per_s_high": B * T / min(ts),
                     "warmup_s": warmup[method] if method in COMPILED else None})
        print(f"  batch {B:>3} {method:<24} {B * T / med:10.1f} tok/s [{B * T / max(ts):.1f}, "
              f"{B * T / min(ts):.1f}] {1000 * med / T:9.2f} ms/step"
              + (f"  (warm-up {warmup[method]:.1f} s)" if method in COMPILED else ""), flush=True)
    return rows


def check(answers: dict, tok) -> None:
    """The methods that must agree do, or the run fails."""
    def text(rows):
        return [r if isinstance(r, str) else tok.decode([t for t in r if t != tok.eos_token_id],
                                                        skip_special_tokens=True).strip() for r in rows]

    groups = [("hf_generate", "hf_prefix_cache", "library_pos_control"),
              ("library", "library_compiled", "engine", "engine_compiled", "ceiling", "ceiling_static",
               "ceiling_static_compiled")]
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
             f"tokens, {info['new_tokens']} new tokens, greedy; median [lowest, highest] of "
             f"{info['repeats']} interleaved rounds after a warm-up; the compiled methods' warm-up (their "
             "compile) apart.", "",
             "| batch | method | tokens/s [range] | ms/step | x ceiling_static | x ceiling_static_compiled "
             "| x floor | warm-up s |", "|---|---|---|---|---|---|---|---|"]
    for b in sorted({r["batch"] for r in rows}):
        ref = {c: next((r["tokens_per_s"] for r in rows if r["batch"] == b and r["method"] == c), None)
               for c in CEILINGS}
        for r in (r for r in rows if r["batch"] == b):
            ratios = " | ".join(f"{r['tokens_per_s'] / ref[c]:.2f}" if ref[c] else "-" for c in CEILINGS)
            warm = f"{r['warmup_s']:.1f}" if r.get("warmup_s") is not None else ""
            lines.append(f"| {b} | {r['method']} | {r['tokens_per_s']:.1f} [{r['tokens_per_s_low']:.1f}, "
                         f"{r['tokens_per_s_high']:.1f}] | {r['ms_per_token']:.2f} | {ratios} | {warm} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.check_args:
        print(f"bench_generate would run: {vars(cfg)}")
        return
    import sys

    from gist_lightning.machine import describe_machine

    model, tok, instruction, single = build(cfg)
    info = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "machine": describe_machine(),
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
            fields = ["shape", "batch", "method", "tokens_per_s", "tokens_per_s_low", "tokens_per_s_high",
                      "ms_per_token", "warmup_s"] + [f"x_{c}" for c in CEILINGS]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                ref = {c: next((x["tokens_per_s"] for x in rows
                                if x["batch"] == r["batch"] and x["method"] == c), None) for c in CEILINGS}
                writer.writerow({**{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()},
                                 **{f"x_{c}": f"{r['tokens_per_s'] / ref[c]:.3f}" if ref[c] else ""
                                    for c in CEILINGS}})
        (out / f"{stem}.md").write_text(table)
        print(f"wrote {out / stem}.csv and .md")


if __name__ == "__main__":
    main()
