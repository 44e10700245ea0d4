"""Gist-masked attention, four ways, side by side at one token budget per step:

- causal:       plain causal sdpa, no gist mask, full rows (the ceiling)
- dense:        sdpa + the dense (B, 1, S, S) gist mask, examples padded to the longest (today's default)
- flex:         flex_attention + gist BlockMask, the same padded batches
- packed-dense: several examples per row (data.packing), dense per-segment mask
- packed-flex:  several examples per row, BlockMask (document masking + the gist rule)

Examples follow an Alpaca+-like length distribution: the word counts of the Alpaca+ validation
records (x 1.33 tokens per word) when ../shared/data/alpaca_plus is there, else a log-normal fit.
Each row of a padded batch is one example; a packed row is filled up to S. Reported: median step
time (forward + backward + AdamW; forward only where no backward exists: FlexAttention on CPU),
real (non-pad) tokens per second, the attention mask's bytes, and peak GPU memory on CUDA.
On CPU, padded batches of varying width recompile the flex kernel for each new width (the
backend compiles per shape there, see backends/decoder_kv.py), so padded flex on CPU times
compilation; packed rows have one width.

    python experiments/bench_attention.py                          # CPU, tiny LLaMA shape, fp32
    python experiments/bench_attention.py --device cuda --shape 1b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from gist_lightning.backends import gist_forward
from gist_lightning.data.collate import pack_rows
from gist_lightning.machine import describe_machine

SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4),
    # Llama-3.2-1B-like
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
}
GIST, PAD = 3, 0  # token ids (any id works: the weights are random)
VOCAB = 4096  # random ids are drawn below this (the smallest vocabulary of SHAPES)
ALPACA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "alpaca_plus"
DTYPES = ("float32", "bfloat16", "float16")


def device_arg(text: str) -> str:
    """argparse type: a device torch can name (cpu, cuda, cuda:1), kept as the string it was given."""
    try:
        torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def example_lengths(n: int, rng: random.Random) -> tuple[list[int], str]:
    files = sorted(ALPACA.glob("*.json")) if ALPACA.is_dir() else []
    words = []
    for f in files:
        for r in json.loads(f.read_text()):
            text = " ".join([r.get("instruction", ""), r.get("input", ""), r.get("output", "")])
            words.append(len(text.split()))
    if words:
        source = f"Alpaca+ validation word counts x 1.33 ({len(words)} records)"
        return [max(8, round(1.33 * rng.choice(words))) + 1 for _ in range(n)], source
    lengths = [max(8, round(rng.lognormvariate(math.log(110), 0.7))) for _ in range(n)]
    return lengths, "log-normal(median 110, sigma 0.7)"


def example(length: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Token ids with one gist token after the instruction (40% of the example), and labels on the last
    half."""
    ids = [rng.randrange(4, VOCAB) for _ in range(length)]
    ids[max(1, int(0.4 * length))] = GIST
    labels = [-100] * (length - length // 2) + ids[length - length // 2:]
    return ids, labels


def padded_batch(lengths, rows, S, rng):
    exs = [example(min(n, S), rng) for n in lengths[:rows]]
    width = max(len(i) for i, _ in exs)
    ids = torch.full((rows, width), PAD)
    labels = torch.full((rows, width), -100)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, (i, lab) in enumerate(exs):  # left padding, as the collator does
        start = width - len(i)
        ids[r, start:], labels[r, start:], mask[r, start:] = torch.tensor(i), torch.tensor(lab), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(lengths, rows, S, rng):
    lengths = [min(n, S) for n in lengths]
    packed = pack_rows(lengths, S)[:rows]
    ids = torch.full((rows, S), PAD)
    labels = torch.full((rows, S), -100)
    segments = torch.zeros((rows, S), dtype=torch.long)
    for r, row in enumerate(packed):
        col = 0
        for s, j in enumerate(row, start=1):
            i, lab = example(lengths[j], rng)
            ids[r, col:col + len(i)], labels[r, col:col + len(i)] = torch.tensor(i), torch.tensor(lab)
            segments[r, col:col + len(i)] = s
            col += len(i)
    return {"input_ids": ids, "attention_mask": (segments > 0).long(), "labels": labels,
            "segment_ids": segments}


def full_batch(rows, S, rng):
    ids = torch.tensor([[rng.randrange(4, VOCAB) for _ in range(S)] for _ in range(rows)])
    return {"input_ids": ids, "labels": ids.clone()}


def mask_bytes(mode: str, batch: dict, model) -> int:
    """Bytes of what the layers receive as a mask (dense: the additive float mask; flex: the BlockMask)."""
    from gist_lightning import masks
    from gist_lightning.families import self_attention_block_masks, self_attention_masks

    if mode == "causal":
        return 0
    ids, am, seg = batch["input_ids"], batch["attention_mask"], batch.get("segment_ids")
    if "flex" in mode:
        segments = masks.decoder_segments(ids, am, seg)
        first, last = masks.segment_gist_spans(ids, segments, GIST)
        pos = masks.segment_position_ids(segments)
        bm = self_attention_block_masks(
            model, lambda w: masks.decoder_mask_mod(segments, first, last, "gist", pos, w),
            ids.shape[0], ids.shape[1], ids.shape[1], ids.device)
        return sum(t.numel() * t.element_size() for t in bm.as_tuple() if isinstance(t, torch.Tensor))
    allowed = masks.decoder_attention_mask(ids, am, GIST, "gist", segment_ids=seg)
    dense = self_attention_masks(model, allowed, masks.padding_position_ids(am),
                                 masks.padding_position_ids(am))
    return dense.numel() * dense.element_size()


def step(model, mode, batch, opt, train: bool):
    if mode == "causal":
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    else:
        out = gist_forward(model, batch["input_ids"], batch["attention_mask"], GIST, "gist",
                           segment_ids=batch.get("segment_ids"), labels=batch["labels"])
    if train:
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out.loss


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = LlamaConfig(max_position_embeddings=max(args.lengths), pad_token_id=PAD,
                      **SHAPES[args.shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = random.Random(0)
    pool, source = example_lengths(20000, rng)
    print(f"example lengths: {source}; mean {statistics.mean(pool):.0f}, p90 "
          f"{sorted(pool)[int(0.9 * len(pool))]} tokens", flush=True)
    results = []
    for S in args.lengths:
        rows = max(1, args.tokens_per_step // S)
        for mode in ("causal", "dense", "flex", "packed-dense", "packed-flex"):
            model.set_attn_implementation("flex_attention" if "flex" in mode else "sdpa")
            # no FlexAttention backward on CPU
            train = args.work == "train" and not ("flex" in mode and device.type == "cpu")
            times, real = [], 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for i in range(args.warmup + args.steps):
                lengths = [rng.choice(pool) for _ in range(rows * max(1, S // 64))]
                if mode == "causal":
                    batch = full_batch(rows, S, rng)
                elif mode.startswith("packed"):
                    batch = packed_batch(lengths, rows, S, rng)
                else:
                    batch = padded_batch(lengths, rows, S, rng)
                batch = {k: v.to(device) for k, v in batch.items()}
                tokens = (int(batch["attention_mask"].sum()) if "attention_mask" in batch
                          else batch["input_ids"].numel())
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.set_grad_enabled(train):
                    step(model, mode, batch, opt, train)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
                    real += tokens
            median = statistics.median(times)
            row = {"S": S, "mode": mode, "rows": rows, "work": "train" if train else "forward",
                   "step_ms": 1000 * median, "real_tokens_per_step": real / len(times),
                   "real_tokens_per_s": real / len(times) / median,
                   "mask_MB": mask_bytes(mode, batch, model) / 1e6,
                   "peak_GB": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}
            results.append(row)
            print(f"S={S:5d} {mode:13s} {row['work']:7s} rows={rows:3d} step {row['step_ms']:9.1f} ms  "
                  f"real tokens/s {row['real_tokens_per_s']:10.0f}  mask {row['mask_MB']:9.3f} MB"
                  + (f"  peak {row['peak_GB']:.2f} GB" if row["peak_GB"] is not None else ""), flush=True)
    return results


def table(results: list[dict], device: str) -> str:
    lines = ["| S | mode | work | rows | step ms | real tokens / step | real tokens/s | mask MB | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        peak = f"{r['peak_GB']:.2f}" if r["peak_GB"] is not None else "n/a"
        lines.append(f"| {r['S']} | {r['mode']} | {r['work']} | {r['rows']} | {r['step_ms']:.1f} | "
                     f"{r['real_tokens_per_step']:.0f} | {r['real_tokens_per_s']:.0f} | {r['mask_MB']:.3f} | "
                     f"{peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", type=device_arg)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--tokens_per_step", type=int, default=8192, help="rows per step = this / S")
    parser.add_argument("--work", choices=["train", "forward"], default="train",
                        help="train: forward + backward + AdamW (flex on CPU: forward); forward: no_grad "
                             "forward only")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the table (markdown) and the rows (JSON) here")
    parser.add_argument("--check_args", action="store_true",
                        help="validate the arguments, print what would run and exit (no model, no work)")
    args = parser.parse_args(argv)
    if args.check_args:
        print(f"bench_attention would run: {vars(args)}")
        return
    results = run(args)
    text = table(results, args.device)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        machine = f"{describe_machine()}; device {args.device}"
        if args.device == "cuda":
            machine += f" ({torch.cuda.get_device_name()})"
        given = {k: v for k, v in vars(args).items() if k not in ("out", "check_args") and v is not None}
        flags = " ".join(f"--{k} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
                         for k, v in given.items())
        out.write_text(f"# bench_attention, {args.shape} LLaMA shape, {args.dtype}\n\n{machine}\n\n"
                       f"    python experiments/bench_attention.py {flags}\n\n{text}\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
