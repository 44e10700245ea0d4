"""Gist caching benchmark, as in the paper and beyond.

1. One forward of each prompt at batch size 1 (the compression itself excluded), three ways:
   no caching (the whole gist prompt), instruction caching (the instruction's KV reused, i.e. a
   pos_control cache) and gist caching (k positions). For each: prefill FLOPs
   (torch.utils.flop_counter), wall time (median of warm repeats), cache bytes held per prompt,
   and the ratio to no caching, beside the token ratio (k + |input|) / (|instruction| + k + |input|).
   Each cached path is checked against the uncached prompt under the same mask (gist caching
   against the whole gist prompt, instruction caching against the whole pos_control prompt):
   the largest logit difference is printed, and in float32 a difference above 1e-4 fails the run.
2. Generation from caches, batched, against the batch-1 loop of the authors' code: tokens per
   second at batch 1, 4 and 16, and for each batch size how many rows equal greedy decoding by
   the masked full forward without any cache (the reference, recomputed token by token).

    python experiments/bench_caching.py                                   # tiny default shape, CPU
    python experiments/bench_caching.py --model runs/tiny/version_0/export
    python experiments/bench_caching.py --shape llama-7b --dtype bfloat16 --device cuda

Random weights are fine for speed. Figures go to stdout and to a CSV under experiments/results/.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig

from gist_lightning import caching, generation
from gist_lightning.backends import gist_forward
from gist_lightning.data.suite import human_records
from gist_lightning.export import load_pretrained
from gist_lightning.machine import cpu_model
from gist_lightning.padding import pad_batch
from gist_lightning.templates import encode_example
from gist_lightning.tokens import add_gist_token, gist_token_id, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
}

DTYPES = ("float32", "bfloat16", "float16")


def device_arg(text: str) -> str:
    """argparse type: a device torch can name (cpu, cuda, cuda:1), kept as the string it was given."""
    try:
        torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def load_model(args):
    dtype = getattr(torch, args.dtype)
    if args.model:
        model, tok, settings = load_pretrained(args.model, dtype=dtype)
        return model.to(args.device), tok, settings["num_gist_tokens"], args.model
    tok = load_tokenizer("suite")
    if args.shape == "tiny":
        fields = yaml.safe_load(open(ROOT / "configs" / "tiny.yaml"))["model"]["model_config"]
        fields = {k: v for k, v in fields.items() if k != "model_type"}
        fields["vocab_size"] = len(tok)
    else:
        fields = SHAPES[args.shape]
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**fields), dtype=dtype,
                                                 attn_implementation="sdpa")
    add_gist_token(tok, model)
    return model.eval(), tok, args.k, f"{args.shape} (random weights)"


def timed(fn, repeats: int, device: str) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops(model, fn) -> int:
    """FLOPs of ``fn``, counted under eager attention so that the attention matmuls are counted
    too (a fused SDPA kernel may not be); the two implementations compute the same thing."""
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
    finally:
        model.config._attn_implementation = impl
    return counter.get_total_flops()


# float32 cached logits must equal the uncached ones to this; lower precisions are reported only
# (their kernels round in a different order for a cache than for a whole prompt)
FP32_TOLERANCE = 1e-4


@torch.no_grad()
def prefill_table(model, tok, examples, k, gist_id, repeats, device):
    """Per prompt and way of prefilling: FLOPs, time, cache bytes, and the largest difference of the
    suffix logits from the uncached prompt under the same mask (0 for no caching itself)."""
    rows = {"no caching": [], "instruction caching": [], "gist caching": []}
    token_ratios = []
    ones = torch.ones_like
    for ex in examples:
        prompt = torch.tensor([ex.prompt], device=device)
        prefix = torch.tensor([ex.prefix + ex.gists], device=device)
        suffix = torch.tensor([ex.suffix], device=device)
        n = len(ex.suffix)
        uncached = {c: gist_forward(model, prompt, ones(prompt), gist_id, c).logits[0, -n:].float()
                    for c in ("gist", "pos_control")}
        caches = {
            "instruction caching": caching.compress_ids(model, prefix, ones(prefix), gist_id, "pos_control"),
            "gist caching": caching.compress_ids(model, prefix, ones(prefix), gist_id, "gist"),
        }
        reference = {"no caching": uncached["gist"], "instruction caching": uncached["pos_control"],
                     "gist caching": uncached["gist"]}
        runs = {"no caching": lambda prompt=prompt: gist_forward(model, prompt, ones(prompt), gist_id,
                                                                 "gist")}
        for name, cache in caches.items():
            runs[name] = lambda cache=cache, suffix=suffix: caching.continuation_logits(model, cache, suffix,
                                                                                     ones(suffix))
        for name, fn in runs.items():
            logits = fn().logits[0, -n:].float()
            rows[name].append({"flops": flops(model, fn), "seconds": timed(fn, repeats, device),
                               "bytes": caches[name].nbytes() if name in caches else 0,
                               "max_diff": (logits - reference[name]).abs().max().item(),
                               "same_argmax": bool(torch.equal(logits.argmax(-1),
                                                               reference[name].argmax(-1)))})
        token_ratios.append((k + len(ex.suffix)) / (len(ex.prefix) + k + len(ex.suffix)))
    return rows, statistics.mean(token_ratios)


@torch.no_grad()
def full_forward_greedy(model, example, gist_id, new_tokens, device) -> list[int]:
    """The reference: greedy tokens from the masked full forward of the whole prompt, no cache."""
    out = []
    for _ in range(new_tokens):
        ids = torch.tensor([example.prompt + out], device=device)
        logits = gist_forward(model, ids, torch.ones_like(ids), gist_id, "gist").logits
        out.append(int(logits[0, -1].argmax()))
    return out


@torch.no_grad()
def generation_table(model, tok, examples, k, gist_id, new_tokens, batch_sizes, repeats, device):
    """Tokens per second from caches: the batch-1 loop against batches of each size, and how many
    rows equal the uncached full-forward reference."""
    prefixes = [ex.prefix + ex.gists for ex in examples]
    suffixes = [ex.suffix for ex in examples]

    def run(batch_size):
        out = []
        for start in range(0, len(examples), batch_size):
            p_ids, p_mask = pad_batch(prefixes[start:start + batch_size], tok.pad_token_id, "left")
            s_ids, s_mask = pad_batch(suffixes[start:start + batch_size], tok.pad_token_id, "left")
            cache = caching.compress_ids(model, p_ids.to(device), p_mask.to(device), gist_id, "gist")
            # eos=-1: every row generates exactly new_tokens, so the token counts are equal
            out += generation.generate_ids(model, cache, s_ids.to(device), s_mask.to(device), new_tokens, -1,
                                        tok.pad_token_id).tolist()
        return out

    reference = [full_forward_greedy(model, ex, gist_id, new_tokens, device) for ex in examples]
    results = []
    for bs in batch_sizes:
        outputs = run(bs)
        same = sum(o == r for o, r in zip(outputs, reference))
        seconds = timed(lambda bs=bs: run(bs), repeats, device)
        results.append({"batch_size": bs, "tokens_per_second": len(examples) * new_tokens / seconds,
                        "seconds": seconds, "rows_equal_full_forward": same})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", default=None,
                        help="exported model folder (default: random weights of --shape)")
    parser.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    parser.add_argument("--k", type=int, default=1, help="gist tokens (for random-weight shapes)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=device_arg)
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    parser.add_argument("--check_args", action="store_true",
                        help="validate the arguments, print what would run and exit (no model, no work)")
    args = parser.parse_args(argv)
    if args.check_args:
        print(f"bench_caching would run: {vars(args)}")
        return
    logging.disable(logging.WARNING)
    model, tok, k, label = load_model(args)
    gist_id = gist_token_id(tok)
    records = human_records()[: args.num_prompts]
    examples = [encode_example(tok, r["instruction"], r["input"], None, k, gist_id, False) for r in records]
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else cpu_model())
    header = (f"model: {label}, {args.dtype}, k={k}, device: {args.device} ({device_name}, "
              f"{torch.get_num_threads()} threads), {len(examples)} prompts of the suite's validation_human")
    print(header)

    rows, token_ratio = prefill_table(model, tok, examples, k, gist_id, args.repeats, args.device)
    base_flops = statistics.mean(r["flops"] for r in rows["no caching"])
    base_time = statistics.mean(r["seconds"] for r in rows["no caching"])
    out_rows = []
    print("\n| | no caching | instruction caching | gist caching |\n|---|---|---|---|")
    summary = {}
    for name, rs in rows.items():
        f = statistics.mean(r["flops"] for r in rs)
        t = statistics.mean(r["seconds"] for r in rs)
        b = statistics.mean(r["bytes"] for r in rs)
        summary[name] = (f, t, b)
        out_rows.append({"part": "prefill", "condition": name, "mflops": f / 1e6, "ms": 1e3 * t,
                         "cache_bytes": b, "flops_ratio": f / base_flops, "time_ratio": t / base_time,
                         "token_ratio": token_ratio})
    names = list(rows)
    print("| prefill MFLOPs | "
          + " | ".join(f"{summary[n][0] / 1e6:.2f} ({summary[n][0] / base_flops:.3f}x)" for n in names)
          + " |")
    print("| wall ms (median, warm) | "
          + " | ".join(f"{1e3 * summary[n][1]:.2f} ({summary[n][1] / base_time:.3f}x)" for n in names)
          + " |")
    print("| cache bytes per prompt | " + " | ".join(f"{summary[n][2] / 1024:.1f} KiB" for n in names) + " |")
    diffs = {n: max(r["max_diff"] for r in rows[n]) for n in names}
    argmax = {n: sum(r["same_argmax"] for r in rows[n]) for n in names}
    # "no caching" is the reference of the other two columns
    print("| max logit diff vs uncached prompt | (reference) | "
          + " | ".join(f"{diffs[n]:.1e}" for n in names[1:]) + " |")
    print("| prompts with the same argmax everywhere | (reference) | "
          + " | ".join(f"{argmax[n]}/{len(examples)}" for n in names[1:]) + " |")
    for n in names:
        out_rows[names.index(n)]["max_logit_diff"] = diffs[n]
    gist_ratio = summary["gist caching"][0] / base_flops
    print(f"\ngist caching FLOPs ratio {gist_ratio:.3f} vs token ratio (k+|input|)/(|instr|+k+|input|) "
          f"{token_ratio:.3f}: {100 * (gist_ratio / token_ratio - 1):+.1f}% (goal: at most +5%)")

    gen = generation_table(model, tok, examples, k, gist_id, args.new_tokens, args.batch_sizes, args.repeats,
                           args.device)
    base_tps = gen[0]["tokens_per_second"]
    print(f"\ngeneration from gist caches, {args.new_tokens} new tokens per prompt (compression included):")
    print("| batch size | tokens/s | vs batch-1 loop | rows equal to uncached full-forward greedy |\n"
          "|---|---|---|---|")
    for g in gen:
        print(f"| {g['batch_size']} | {g['tokens_per_second']:.1f} | "
              f"{g['tokens_per_second'] / base_tps:.2f}x | {g['rows_equal_full_forward']}/{len(examples)} |")
        out_rows.append({"part": "generation", "condition": f"batch {g['batch_size']}",
                         "tokens_per_second": g["tokens_per_second"],
                         "speedup": g["tokens_per_second"] / base_tps,
                         "rows_equal_full_forward": g["rows_equal_full_forward"]})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.shape if not args.model else 'model'}-{args.dtype}-{args.device.split(':')[0]}"
    path = out / f"bench_caching-{tag}.csv"
    keys = []
    for r in out_rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        f.write(f"# {header}\n")
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(out_rows)
    print(f"\nwrote {path}")
    failures = []
    if args.dtype == "float32":
        failures += [f"{n}: cached logits differ from the uncached prompt by {d:.1e} (> {FP32_TOLERANCE})"
                     for n, d in diffs.items() if d > FP32_TOLERANCE]
        failures += [f"batch {g['batch_size']}: {len(examples) - g['rows_equal_full_forward']} rows differ "
                     "from uncached full-forward greedy decoding"
                     for g in gen if g["rows_equal_full_forward"] != len(examples)]
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
