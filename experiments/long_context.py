"""Long contexts: recall by compression ratio, gist tokens against full attention and truncation.

Trains, per seed, four models on the generated key-value recall task (configs/tiny-long-recall.yaml,
through the ``gist-lightning fit`` command line) and answers one fixed test set with each. The gist
models train ``--steps`` and are then resumed for ``--more_gist_steps`` (the cosine schedule
restarts over the new total); full attention trains ``--steps``; neg_control ``--neg_steps``:

- ``gist_coarse`` / ``gist_fine``: one model per placement, trained with a ratio drawn per batch
  from {2, 4, 8, 16}; tested at each ratio from caches made segment by segment
  (:func:`gist_lightning.long_context.compress_context`), which hold the gists alone;
- ``full``: full attention over the context (``pos_control``; the upper bound);
- ``truncation``: the same full-attention model given only the context's last tokens, as many
  positions as the gist cache holds at that ratio (start token included), laid out with the
  sparsest gist layout that model trained with (2 gists per 32 tokens), so most positions hold
  raw tokens;
- ``neg_control``: trained and tested without the context (the answer prior).

``full`` and ``neg_control`` do not depend on the ratio; their rows repeat one evaluation at every
ratio so that each ratio's comparison reads from one place. Outputs (``--out``): ``results.csv``
(one row per method, ratio and seed: exact match in percent, cached positions and bytes per
context, prefill FLOPs per question), ``by_distance.csv`` (exact match by how many segments lie
between the needed fact and the question), ``memory.csv`` (peak positions held while compressing a
16-segment context), ``table.md`` (means over seeds, 95% bootstrap intervals over seeds and
records, the paired gist - truncation differences, the goals) and ``long_context.png``.

    python experiments/long_context.py --seeds 0 1 2 --cells_at_once 2  # trains 12 models, then tests
    python experiments/long_context.py --seeds 0 1 2 --steps 3000 --check_args

The trainings are cells of one sweep (:mod:`gist_lightning.sweeps`) over ``--run_root``: 2 at once
with one thread each by default, or on SLURM (``--launcher slurm``); finished cells are kept,
interrupted ones resume from their ``last.ckpt``, so the command can be stopped and run again.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from pathlib import Path

import numpy as np
import torch

from gist_lightning import generate
from gist_lightning.caching import cache_bytes_per_position
from gist_lightning.data.long_recall import make_long_record
from gist_lightning.evaluation.stats import format_interval, paired_bootstrap
from gist_lightning.export import load_pretrained
from gist_lightning.long_context import (
    SegmentSettings,
    compress_context,
    compress_context_ids,
    encode_context,
)
from gist_lightning.masks import interleave_gists
from gist_lightning.sweeps import Cell, Stage, Sweep
from gist_lightning.sweeps.engine import add_launcher_arguments, launcher_from
from gist_lightning.tokens import encode_text, gist_token_id, special_frame

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "tiny-long.yaml",
           ROOT / "configs" / "tiny-long-recall.yaml"]
RATIOS = (2, 4, 8, 16)
METHODS = ("gist_coarse", "gist_fine", "full", "truncation", "neg_control")
# what each trained model is: its overrides of configs/tiny-long-recall.yaml
TRAINED = {
    "gist_coarse": ["--model.segments.placement", "coarse"],
    "gist_fine": ["--model.segments.placement", "fine"],
    "full": ["--model.condition", "pos_control"],
    "neg_control": ["--model.condition", "neg_control"],
}
TRAINED_BY = {"gist_coarse": "gist_coarse", "gist_fine": "gist_fine", "full": "full", "truncation": "full",
              "neg_control": "neg_control"}


def cell_of(method: str, seed: int, args, run_root: Path) -> Cell:
    """The sweep cell that trains ``method`` on ``seed``: its stages end at :func:`stages` (a stage
    after the first continues the run from its ``last.ckpt``; the cosine schedule restarts over the
    new total: a warm restart), each validated once at its end."""
    ends = stages(method, args)
    # the seed is the model's (seed_everything); every seed trains on the same generated data, as before
    return Cell(name=f"{method}-seed{seed}",
                args=(*TRAINED[method], "--seed_everything", str(seed),
                      "--trainer.enable_progress_bar", "false",
                      "--data.init_args.cache_dir", str(run_root / "cache")),
                stages=tuple(Stage(max_steps=end, args=("--trainer.val_check_interval", str(end - before)))
                             for before, end in zip([0, *ends], ends)))


def export_of(run_root: Path, method: str, seed: int) -> Path:
    return run_root / f"{method}-seed{seed}" / "run" / "export"


def stages(method: str, args) -> list[int]:
    """The step each training stage of ``method`` ends at: gist models train ``--steps``, then are
    resumed to ``--steps + --more_gist_steps``; neg_control (which cannot see the context, so it
    only learns the answers' prior) trains ``--neg_steps``."""
    if method.startswith("gist") and args.more_gist_steps:
        return [args.steps, args.steps + args.more_gist_steps]
    return [args.neg_steps if method == "neg_control" else args.steps]


def sweep_of(args, extra: list[str]) -> Sweep:
    """Every (method, seed) model as a cell of one sweep over ``--run_root``, on the launcher the
    arguments ask for (default: 2 cells at once, one thread each)."""
    cells = [cell_of(m, s, args, args.run_root) for s in args.seeds for m in TRAINED]
    return Sweep(cells, [str(c) for c in CONFIGS], args.run_root, launcher_from(args, args.run_root), extra,
                 retries=args.retries, log=lambda m: print(m, flush=True))


def test_records(n: int, seed: int, context_words: tuple[int, int], facts: int) -> list[dict]:
    """The fixed test set (a generator seed no training split uses): recall among distractors."""
    rng = random.Random(10_000 + seed)
    return [make_long_record("recall", rng.randint(*context_words), rng, facts) for _ in range(n)]


def fact_distance(tok, rec: dict, segment_tokens: int) -> int:
    """Segments between the asked fact and the question (0: the fact is in the last segment)."""
    key = re.search(r"code of (\w+)\?", rec["input"]).group(1)
    start = rec["instruction"].index(f"the code of {key} is")
    n_tokens = len(encode_text(tok, rec["instruction"]))
    before = len(encode_text(tok, rec["instruction"][:start].rstrip())) if start else 0
    return (n_tokens - 1) // segment_tokens - before // segment_tokens


def prefill_flops(model, question_tokens: float, cached: float) -> float:
    """FLOPs of one question's prefill over a cache of ``cached`` positions: 2 x the non-embedding
    weights per token, plus attention scores and weighted sums (4 x hidden per key per layer)."""
    c = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    q = question_tokens
    return 2 * weights * q + 4 * c.num_hidden_layers * c.hidden_size * q * (cached + (q + 1) / 2)


def truncated_rows(tok, texts: list[str], settings: SegmentSettings, gist_id: int,
                   positions: list[int]) -> list[list[int]]:
    """Each context cut to its last raw tokens such that the row (the start tokens, the raw tokens
    and the full model's gists under ``settings``) holds at most ``positions[i]`` positions (the
    gist cache's size at the ratio tested); at least one raw token is kept."""
    before, _ = special_frame(tok)

    def row(raw):
        return before + interleave_gists(raw, settings.segment_tokens, settings.gists_per_segment,
                                         settings.placement, gist_id)

    rows = []
    for text, budget in zip(texts, positions):
        raw = encode_text(tok, text)
        keep = len(raw)
        while keep > 1 and len(row(raw[-keep:])) > budget:
            keep -= 1
        rows.append(row(raw[-keep:]))
    return rows


@torch.no_grad()
def evaluate(export: Path, method: str, records: list[dict], ratios, batch_size: int,
             max_new_tokens: int) -> dict:
    """{ratio: (correct per record, mean cached positions, bytes per context, prefill FLOPs per question)}."""
    model, tok, settings = load_pretrained(export)
    model.float()
    base = SegmentSettings(**settings["segments"])
    sparse = base.at_ratio(max(base.train_ratios or [round(base.ratio)]))
    gist_id, per_pos = gist_token_id(tok), cache_bytes_per_position(model)
    condition = {"full": "pos_control", "truncation": "pos_control",
                 "neg_control": "neg_control"}.get(method, "gist")
    q_tokens = float(np.mean([len(encode_text(tok, r["input"])) for r in records]))
    out = {}
    for ratio in ratios:
        if method == "truncation":  # as many positions as the gist cache holds at this ratio: its gists
            budget = [encode_context(tok, r["instruction"], base.at_ratio(ratio), gist_id).count(gist_id)
                      for r in records]
        correct, positions = [], []
        for i in range(0, len(records), batch_size):
            batch = records[i:i + batch_size]
            texts = [r["instruction"] for r in batch]
            if method.startswith("gist"):
                cache = compress_context(model, tok, texts, base.at_ratio(ratio))
            elif method == "truncation":  # the sparsest layout the full model trained with: most raw tokens
                rows = truncated_rows(tok, texts, sparse, gist_id, budget[i:i + batch_size])
                cache = compress_context_ids(model, rows, gist_id, tok.pad_token_id, sparse, "pos_control")
            else:
                cache = compress_context(model, tok, texts, base, condition)
            answers = generate(model, tok, cache, [r["input"] for r in batch], max_new_tokens=max_new_tokens)
            correct += [float(a.strip() == r["output"]) for a, r in zip(answers, batch)]
            positions += cache.valid.sum(-1).tolist()
        cached = float(np.mean(positions))
        out[ratio] = (correct, cached, cached * per_pos, prefill_flops(model, q_tokens, cached))
    return out


@torch.no_grad()
def peak_memory(export: Path, ratio: int, segments: int = 16) -> dict:
    """Peak positions held while compressing a context of ``segments`` segments, against the gists
    plus one segment (the issue's bound) and the whole context."""
    model, tok, settings = load_pretrained(export)
    settings = SegmentSettings(**settings["segments"]).at_ratio(ratio)
    rng = random.Random(0)
    context = make_long_record("recall", 400, rng)["instruction"]
    raw = encode_text(tok, context)[: segments * settings.segment_tokens]
    assert len(raw) == segments * settings.segment_tokens, "the generated context is too short"
    row = special_frame(tok)[0] + interleave_gists(raw, settings.segment_tokens, settings.gists_per_segment,
                                                   settings.placement, gist_token_id(tok))
    cache = compress_context_ids(model, [row], gist_token_id(tok), tok.pad_token_id, settings)
    gists = int(cache.valid.sum())
    one_segment = settings.segment_tokens + settings.gists_per_segment + len(special_frame(tok)[0])
    return {"segments": segments, "ratio": ratio, "context_positions": len(row), "kept_gists": gists,
            "peak_positions": cache.meta["peak_positions"],
            "bound_gists_plus_one_segment": gists + one_segment}


def bootstrap(matrix: np.ndarray) -> dict:
    """Mean and 95% interval (percent) of a (seeds, records) 0/1 matrix, seeds and records resampled."""
    return paired_bootstrap(100 * matrix)


def write_outputs(out: Path, results: dict, by_distance: list[dict], memory: list[dict],
                  records: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({s for (_, _, s) in results})
    rows = []
    for (method, ratio, seed), (correct, cached, nbytes, flops) in sorted(results.items()):
        rows.append({"method": method, "ratio": ratio, "seed": seed,
                     "exact_match": round(100 * np.mean(correct), 2), "records": len(correct),
                     "cached_positions": round(cached, 1), "cached_bytes": int(nbytes),
                     "prefill_flops": int(flops)})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "by_distance.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(by_distance[0]))
        w.writeheader()
        w.writerows(by_distance)
    with open(out / "memory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(memory[0]))
        w.writeheader()
        w.writerows(memory)

    def matrix(method, ratio):
        return np.array([results[(method, ratio, s)][0] for s in seeds])

    lines = [f"# Long-context recall: {len(seeds)} seeds x {records} test contexts", "",
             "Exact match (%) on key-value recall among distractors; mean over seeds and records, 95% "
             "bootstrap interval (seeds and records resampled). `full` and `neg_control` do not depend on "
             "the ratio (one evaluation, repeated). Cached bytes per context (fp32) and prefill FLOPs per "
             "question are means.", "",
             "| ratio | method | exact match | 95% interval | cached positions | cached bytes "
             "| prefill MFLOPs |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for ratio in RATIOS:
        for method in METHODS:
            if (method, ratio, seeds[0]) not in results:
                continue
            b = bootstrap(matrix(method, ratio))
            summary[(method, ratio)] = b
            _, cached, nbytes, flops = results[(method, ratio, seeds[0])]
            lines.append(f"| {ratio}x | {method} | {b['mean']:.1f} | [{b['low']:.1f}, {b['high']:.1f}] | "
                         f"{cached:.0f} | {nbytes / 1024:.1f} KiB | {flops / 1e6:.2f} |")
    lines += ["", "## Per seed", "",
              "Exact match (%) of each seed's model: training either escapes the loss plateau within the "
              "budget or not, so seeds differ far more than records do.", "",
              "| ratio | method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|---|" + "---|" * len(seeds)]
    for ratio in RATIOS:
        for method in METHODS:
            if (method, ratio, seeds[0]) in results:
                lines.append(f"| {ratio}x | {method} | " + " | ".join(
                    f"{100 * np.mean(results[(method, ratio, s)][0]):.1f}" for s in seeds) + " |")
    lines += ["", "## Gist against truncation at the same cached positions (paired, percentage points)", "",
              "| ratio | gist_coarse - truncation | gist_fine - truncation |", "|---|---|---|"]
    for ratio in RATIOS:
        cells = []
        for g in ("gist_coarse", "gist_fine"):
            if (g, ratio, seeds[0]) in results and ("truncation", ratio, seeds[0]) in results:
                cells.append(format_interval(paired_bootstrap(
                    100 * (matrix(g, ratio) - matrix("truncation", ratio)))))
            else:
                cells.append("-")
        lines.append(f"| {ratio}x | {cells[0]} | {cells[1]} |")
    lines += ["", "## Goals", ""]
    full = summary.get(("full", 4), {}).get("mean")
    for g in ("gist_coarse", "gist_fine"):
        for ratio in (4, 8):
            if (g, ratio) in summary and full:
                share = 100 * summary[(g, ratio)]["mean"] / full
                shares = [100 * np.mean(results[(g, ratio, s)][0])
                          / max(1e-9, np.mean(results[("full", ratio, s)][0])) for s in seeds]
                per_seed = ", ".join(f"seed {s} {x:.0f}%" for s, x in zip(seeds, shares))
                lines.append(f"- {g} at {ratio}x: {summary[(g, ratio)]['mean']:.1f} = {share:.0f}% of full "
                             f"attention's {full:.1f}" + (" (goal at 4x: >= 90%)" if ratio == 4 else "")
                             + f"; per seed: {per_seed}")
    for g in ("gist_coarse", "gist_fine"):
        wins = [r for r in RATIOS if (g, r, seeds[0]) in results and ("truncation", r, seeds[0]) in results
                and paired_bootstrap(100 * (matrix(g, r) - matrix("truncation", r)))["low"] > 0]
        lines.append(f"- {g} beats truncation (interval above 0) at: "
                     f"{', '.join(f'{r}x' for r in wins) or 'no ratio'} (goal: every ratio)")
    for m in memory:
        lines.append(f"- memory: compressing {m['segments']} segments at {m['ratio']}x held at most "
                     f"{m['peak_positions']} positions (gists + one segment: "
                     f"{m['bound_gists_plus_one_segment']}; the whole context: {m['context_positions']})")
    lines += ["", "## By distance of the needed fact from the question (segments; at 4x)", "",
              "| method | " + " | ".join(f"{d}" for d in sorted({r['distance'] for r in by_distance})) + " |"]
    distances = sorted({r["distance"] for r in by_distance})
    lines.append("|---|" + "---|" * len(distances))
    for method in METHODS:
        cells = []
        for d in distances:
            sel = [r for r in by_distance if r["method"] == method and r["ratio"] == 4 and r["distance"] == d]
            n = sum(r["n"] for r in sel)
            cells.append(f"{sum(r['exact_match'] * r['n'] for r in sel) / n:.0f} ({n})" if n else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(out / "long_context.png", summary, by_distance, distances)


def plot(path: Path, summary: dict, by_distance: list[dict], distances: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        pts = [(r, summary[(method, r)]) for r in RATIOS if (method, r) in summary]
        if not pts:
            continue
        x = [r for r, _ in pts]
        y = [s["mean"] for _, s in pts]
        err = [[s["mean"] - s["low"] for _, s in pts], [s["high"] - s["mean"] for _, s in pts]]
        a.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    a.set(xscale="log", xticks=list(RATIOS), xticklabels=[f"{r}x" for r in RATIOS],
          xlabel="compression ratio", ylabel="exact match (%)", title="Recall by compression ratio (95% CI)",
          ylim=(0, 100))
    a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the tested ratios on the log axis
    a.legend()
    for method in METHODS:
        ys = []
        for d in distances:
            sel = [r for r in by_distance if r["method"] == method and r["ratio"] == 4 and r["distance"] == d]
            n = sum(r["n"] for r in sel)
            ys.append(sum(r["exact_match"] * r["n"] for r in sel) / n if n else np.nan)
        b.plot(distances, ys, marker="o", label=method)
    b.set_xticks(distances)
    b.set(xlabel="segments between the needed fact and the question", ylabel="exact match (%)",
          title="Recall by distance, 4x", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000,
                   help="training steps of the full-attention model, and of the gist models' first stage")
    p.add_argument("--more_gist_steps", type=int, default=500,
                   help="the gist models' second stage: resumed for this many more steps (0: none)")
    p.add_argument("--neg_steps", type=int, default=200,
                   help="training steps of neg_control (it learns only the answers' prior: it never sees the "
                   "context)")
    p.add_argument("--records", type=int, default=300, help="test contexts")
    p.add_argument("--context_words", type=int, nargs=2, default=[40, 80],
                   help="test contexts' words (low high)")
    p.add_argument("--facts", type=int, default=1,
                   help="key facts per test context (the asked one + distractors)")
    p.add_argument("--run_root", type=Path, default=ROOT / "runs" / "long-context")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "long-context")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--check_args", action="store_true",
                   help="check every fit's arguments, list the cells, their stages and state; run nothing")
    add_launcher_arguments(p)  # the trainings run as a sweep: --cells_at_once, --launcher slurm, ...
    p.set_defaults(cells_at_once=2, threads_per_cell=1)
    args, extra = p.parse_known_args(argv)  # unknown arguments go to every fit
    sweep = sweep_of(args, extra)
    sweep.check()
    if args.check_args:
        for cell in sweep.cells:
            ends = ", ".join(str(stage.max_steps) for stage in cell.stages)
            print(f"{cell.name}: {sweep.state(cell)}; stages end at step {ends}; "
                  f"gist-lightning fit {' '.join(sweep.args(cell, create=False))}")
        return 0
    if sweep.run() != 0:
        raise SystemExit(f"training did not finish; see {args.run_root}/<cell>/stdout.log and run this again "
                         "(finished cells are kept, interrupted ones resume)")
    torch.set_num_threads(1)
    records = test_records(args.records, 0, tuple(args.context_words), args.facts)
    results, by_distance = {}, []
    _, tok, settings = load_pretrained(export_of(args.run_root, "full", args.seeds[0]))
    seg = settings["segments"]["segment_tokens"]
    distances = [min(fact_distance(tok, r, seg), 5) for r in records]  # 5: five or more
    for seed in args.seeds:
        for method in METHODS:
            export = export_of(args.run_root, TRAINED_BY[method], seed)
            ratios = RATIOS if method not in ("full", "neg_control") else (4,)
            scores = evaluate(export, method, records, ratios, args.batch_size, 8)
            if len(ratios) == 1:
                scores = {r: scores[4] for r in RATIOS}
            for ratio, value in scores.items():
                results[(method, ratio, seed)] = value
                for d in sorted(set(distances)):
                    picked = [c for c, dd in zip(value[0], distances) if dd == d]
                    by_distance.append({"method": method, "ratio": ratio, "seed": seed, "distance": d,
                                        "n": len(picked),
                                        "exact_match": round(100 * float(np.mean(picked)), 2)})
            print(f"seed {seed} {method}: "
                  + ", ".join(f"{r}x {100 * np.mean(v[0]):.1f}" for r, v in scores.items()), flush=True)
    memory = [peak_memory(export_of(args.run_root, "gist_fine", args.seeds[0]), r) for r in RATIOS]
    write_outputs(args.out, results, by_distance, memory, len(records))
    print(f"wrote {args.out}/results.csv, table.md, long_context.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
