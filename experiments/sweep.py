"""Sweep conditions and the number of gist tokens k over one base config, then aggregate.

The runs are the cells of a :class:`gist_lightning.sweeps.Sweep` (the engine of ``gist-lightning
sweep``): one ``gist-lightning fit`` process per run in its own folder
``<runs>/<condition>-k<k>-seed<seed>/``, N at once here (``--cells_at_once``, ``--devices_per_cell``)
or as SLURM job arrays (``--launcher slurm``). A finished run (``run/done.json``) is not run again,
an interrupted one resumes from its last.ckpt, a failed one is set aside with its log and run again,
and the others go on.

    python experiments/sweep.py --config configs/tiny.yaml --out experiments/results/tiny
    python experiments/sweep.py --config configs/llama-7b.yaml \\
        --config configs/strategies/deepspeed-zero3.yaml --out sweeps/llama --k 1 2 5 10 --seeds 0 1 \\
        -- --data.folder /path/to/alpaca_plus --trainer.devices 4

Everything after ``--`` is passed to every run. Results cover every finished run in the runs
folder (so a second call with more seeds adds to the table): ``<out>/results.csv`` (one row per run),
``<out>/table.md`` (rows: condition and k; columns: seen / unseen / human; mean ± sd over seeds;
then the per-record paired differences against pos_control with bootstrap 95% intervals over
seeds and records), ``<out>/paired.json``, ``<out>/rouge_vs_k.png`` (the differences against k,
with their intervals as error bars).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from gist_lightning.evaluation.metrics import read_predictions_csv, rouge_l
from gist_lightning.evaluation.stats import format_interval, format_mean_sd, mean_and_sd, paired_bootstrap
from gist_lightning.splits import BEST_METRIC, QUALITY_METRICS, SHORT, VALIDATION_SPLITS, metric_key
from gist_lightning.sweeps import Cell, Sweep, SweepStopped, expand
from gist_lightning.sweeps.engine import add_launcher_arguments, launcher_from, split_extra
from gist_lightning.sweeps.grid import CONDITION, K
from gist_lightning.sweeps.tracking import add_tracking_arguments, tracking_from
from gist_lightning.templates import without_gists

BASELINE = "pos_control"


def cells(conditions: list[str], ks: list[int], seeds: list[int]) -> list[Cell]:
    """Controls run once (k=1: the gist token is present, only the mask differs); gist for every k."""
    return expand({CONDITION: conditions, K: ks}, seeds)


def run_metrics(run_dir: Path) -> dict:
    """Per-split metrics of the validation with the best validation_unseen ROUGE-L (the checkpoint
    that is kept, as in the paper) and, prefixed ``final_``, of the last validation; plus the
    compression statistics of the best one."""
    rows = [r for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get(BEST_METRIC)]
    if not rows:
        raise RuntimeError(f"{run_dir}/metrics.csv has no {BEST_METRIC}")
    best = max(rows, key=lambda r: float(r[BEST_METRIC]))
    step = int(best["step"]) + 1
    out = {"step": step, "final_step": int(rows[-1]["step"]) + 1}
    for prefix, row in (("", best), ("final_", rows[-1])):
        for split in VALIDATION_SPLITS:
            for metric in QUALITY_METRICS:
                out[f"{prefix}{SHORT[split]}_{metric}"] = float(row[metric_key(split, metric)])
    comp = run_dir / "predictions" / f"step{step:06d}-compression.json"
    if comp.is_file():
        stats = json.loads(comp.read_text())
        for split in VALIDATION_SPLITS:
            if split in stats:
                out[f"{SHORT[split]}_instruction_tokens"] = stats[split]["instruction_tokens_mean"]
                out[f"{SHORT[split]}_compression_ratio"] = stats[split]["compression_ratio"]
    return out


def _predictions(run_dir: Path, step: int, split: str) -> list[dict[str, str]]:
    return read_predictions_csv(run_dir / "predictions" / f"step{step:06d}-{split}.csv",
                                {"x", "y_pred", "y_true"})


def _keyed(rows: list[dict[str, str]]) -> list[tuple[tuple[str, str, int], dict[str, str]]]:
    """Each row with its key: (prompt without gist tokens, reference, how many times it came before)."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for r in rows:
        key = (without_gists(r["x"]), r["y_true"])
        seen[key] = seen.get(key, -1) + 1
        out.append(((*key, seen[key]), r))
    return out


def record_scores(run_dir: Path, step: int, split: str) -> dict[tuple[str, str, int], float]:
    """ROUGE-L of each record of one run's validation at ``step``, by :func:`record_keys`' key."""
    return {key: rouge_l(r["y_pred"], r["y_true"]) for key, r in _keyed(_predictions(run_dir, step, split))}


def record_keys(run_dir: Path, step: int, split: str) -> tuple[tuple[str, str, int], ...]:
    """(prompt without gist tokens, reference, repeat) of each record of one run's validation at ``step``."""
    return tuple(key for key, _ in _keyed(_predictions(run_dir, step, split)))


def check_same_records(runs: list[dict], run_root: Path) -> None:
    """The runs must have validated records of the same data: of any two runs, one's records of a
    split hold the other's (a larger k may drop a few more examples that no longer fit, never others).
    Runs made from different data (a changed generator or data folder, runs kept from an earlier
    sweep) cannot share a table. Raises naming the groups of runs that validated the same records."""
    for split in VALIDATION_SPLITS:
        groups: dict[tuple, list[str]] = {}
        for r in runs:
            validated = record_keys(run_root / r["name"] / "run", r["step"], split)
            groups.setdefault(validated, []).append(r["name"])
        sets = [set(keys) for keys in groups]
        if any(not (a <= b or b <= a) for i, a in enumerate(sets) for b in sets[i + 1:]):
            listed = "; ".join(f"({len(g)}) {', '.join(g)}"
                               for g in sorted(groups.values(), key=len, reverse=True))
            raise RuntimeError(
                f"the runs validated {len(groups)} different sets of {split} records: {listed}. Runs made "
                "from other data (an earlier version of the suite, another data folder) cannot share a "
                "table: move the stale ones out of the runs folder and run the sweep again.")


def paired_differences(results: list[dict], run_root: Path, prefix: str = "") -> dict:
    """For every (condition, k) but the baseline and every split: the per-record ROUGE-L difference
    to pos_control of the same seed, over the seeds both have and the records every one of those runs
    validated, with a bootstrap 95% interval over seeds and records. ``prefix`` "" uses each run's
    kept (best) validation, "final_" its last one."""
    scores: dict[tuple, dict[int, dict[str, dict]]] = {}
    for r in results:
        run_dir = run_root / r["name"] / "run"
        step = r["step" if not prefix else "final_step"]
        for split in VALIDATION_SPLITS:
            scores.setdefault((r["condition"], r["k"]), {}).setdefault(r["seed"], {})[split] = \
                record_scores(run_dir, step, split)
    base = next((v for (c, _), v in scores.items() if c == BASELINE), None)
    out = {}
    if base is None:
        return out
    for (condition, k), by_seed in scores.items():
        if condition == BASELINE:
            continue
        seeds = sorted(set(by_seed) & set(base))
        if not seeds:
            continue
        for split in VALIDATION_SPLITS:
            runs = [by_seed[seed][split] for seed in seeds] + [base[seed][split] for seed in seeds]
            common = [key for key in base[seeds[0]][split] if all(key in run for run in runs)]
            diffs = [[by_seed[seed][split][key] - base[seed][split][key] for key in common] for seed in seeds]
            out[f"{condition}|{k}|{SHORT[split]}"] = paired_bootstrap(np.array(diffs))
    return out


def run_cells(cells: list[Cell], configs: list[str], run_root: Path, extra: list[str], launcher,
              log=print, tracking=None) -> list[str]:
    """Run the cells on the engine; the names of those that failed. Each finished run (earlier ones
    too) must have validated the records every other finished run did: a run that did not stops the
    sweep at once, not after the grid."""
    def same_records(_summary: dict) -> None:
        try:
            check_same_records(finished_runs(run_root), run_root)
        except RuntimeError as e:
            raise SweepStopped(str(e)) from None

    sweep = Sweep(cells, configs, run_root, launcher, extra, retries=0, log=log, on_finished=same_records,
                  tracking=tracking)
    sweep.check()
    sweep.run()
    return list(sweep.failed)


def finished_runs(run_root: Path) -> list[dict]:
    order = {"pos_control": 0, "gist": 1, "neg_control": 2}
    runs = [{**_row(json.loads(done.read_text())), **run_metrics(done.parent)}
            for done in run_root.glob("*/run/done.json")]
    return sorted(runs, key=lambda r: (order.get(r["condition"], 9), r["k"], r["seed"]))


def _row(done: dict) -> dict:
    """A finished cell's ``done.json`` as a results row (condition, k, seed, name, minutes, attempts)."""
    keys = ("condition", "k", "seed", "name", "minutes", "attempts")
    return {key: done[key] for key in keys if key in done}


def aggregate(results: list[dict], out: Path, run_root: Path | None = None) -> None:
    if not results:
        return
    if run_root is not None:
        check_same_records(results, run_root)  # before anything is written
    keys = list(results[0])
    for r in results[1:]:
        keys += [k for k in r if k not in keys]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(results)
    groups: dict[tuple, list[dict]] = {}
    order = {"pos_control": 0, "gist": 1, "neg_control": 2}
    for r in results:
        groups.setdefault((r["condition"], r["k"]), []).append(r)
    lines = []
    for prefix, title in (("", "best checkpoint by validation_unseen ROUGE-L (the paper's protocol)"),
                          ("final_", "last validation")):
        lines += [f"{title}:", "",
                  "| condition | k | seeds | seen ROUGE-L | unseen ROUGE-L | human ROUGE-L | seen EM | "
                  "unseen EM | human EM |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (condition, k), rs in sorted(groups.items(), key=lambda g: (order.get(g[0][0], 9), g[0][1])):
            cells = [format_mean_sd([r[f"{prefix}{SHORT[s]}_{m}"] for r in rs]) for m in QUALITY_METRICS
                     for s in VALIDATION_SPLITS]
            lines.append(f"| {condition} | {k if condition == 'gist' else '-'} | {len(rs)} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    paired = {}
    if run_root is not None:
        for prefix, title in (("", "best checkpoint"), ("final_", "last validation")):
            paired[prefix or "best"] = diffs = paired_differences(results, run_root, prefix)
            if not diffs:
                continue
            lines += [f"ROUGE-L minus {BASELINE} of the same seed, per record ({title}): mean [bootstrap 95% "
                      "interval over seeds and records]; an interval that excludes 0 is a difference the "
                      "data support:", "",
                      "| condition | k | seeds | records (seen / unseen / human) | seen | unseen | human |",
                      "|---|---|---|---|---|---|---|"]
            for (condition, k), _ in sorted(groups.items(), key=lambda g: (order.get(g[0][0], 9), g[0][1])):
                cells = [diffs.get(f"{condition}|{k}|{SHORT[s]}") for s in VALIDATION_SPLITS]
                if condition == BASELINE or None in cells:
                    continue
                lines.append(f"| {condition} | {k if condition == 'gist' else '-'} | {cells[0]['seeds']} | "
                             + " / ".join(str(c["records"]) for c in cells) + " | "
                             + " | ".join(format_interval(c) for c in cells) + " |")
            lines.append("")
        (out / "paired.json").write_text(json.dumps(paired, indent=1) + "\n")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(groups, paired.get("best", {}), out / "rouge_vs_k.png")


def plot(groups: dict, paired: dict, path: Path) -> None:
    """Per split: mean ROUGE-L against k (top), and the paired difference to pos_control with its
    95% interval (bottom; the controls as bands)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if paired else 1
    fig, axes = plt.subplots(rows, 3, figsize=(12, 3.6 * rows), sharey="row", squeeze=False)
    ks = sorted(k for c, k in groups if c == "gist")
    for col, full_name in enumerate(VALIDATION_SPLITS):
        split = SHORT[full_name]
        ax = axes[0][col]
        gist = [(k, [r[f"{split}_rougeL"] for r in groups["gist", k]]) for k in ks]
        if gist:
            means, sds = zip(*(mean_and_sd(v) for _, v in gist))
            ax.errorbar(ks, means, yerr=sds, fmt="o-", color="C0", capsize=3, label="gist (± sd over seeds)")
        for cond, style, color in ((BASELINE, "-", "C2"), ("neg_control", "--", "C3")):
            values = [r[f"{split}_rougeL"] for (c, _), rs in groups.items() if c == cond for r in rs]
            if values:
                ax.axhline(statistics.mean(values), linestyle=style, color=color, label=cond)
        ax.set_title(full_name)
        ax.set_ylabel("ROUGE-L" if col == 0 else "")
        if paired:
            ax = axes[1][col]
            pts = [(k, paired[f"gist|{k}|{split}"]) for k in ks if f"gist|{k}|{split}" in paired]
            if pts:
                ax.errorbar([k for k, _ in pts], [d["mean"] for _, d in pts],
                            yerr=[[d["mean"] - d["low"] for _, d in pts],
                                  [d["high"] - d["mean"] for _, d in pts]],
                            fmt="o-", color="C0", capsize=3, label=f"gist - {BASELINE} (95% CI)")
            neg = paired.get(f"neg_control|1|{split}")
            if neg:
                ax.axhspan(neg["low"], neg["high"], color="C3", alpha=0.2, label=f"neg_control - {BASELINE}")
            ax.axhline(0, color="C2", linewidth=1)
            ax.set_ylabel(f"ROUGE-L minus {BASELINE}" if col == 0 else "")
        for ax in axes[:, col]:
            ax.set_xlabel("gist tokens k")
            if ks:
                ax.set_xscale("log")
                ax.set_xticks(ks, [str(k) for k in ks])
            ax.grid(alpha=0.3)
    for row in axes:
        row[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_extra(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="base config(s), in order")
    parser.add_argument("--out", required=True, help="results folder (results.csv, table.md, plot)")
    parser.add_argument("--runs", default=None,
                        help="where the runs go (checkpoints, exports); default <out>/runs")
    parser.add_argument("--conditions", nargs="+", default=["pos_control", "gist", "neg_control"])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2, 5, 10])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    add_launcher_arguments(parser)
    add_tracking_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_root = Path(args.runs) if args.runs else out / "runs"
    grid = cells(args.conditions, args.k, args.seeds)
    launcher = launcher_from(args, run_root)
    print(f"sweep of {len(grid)} runs into {out} ({args.launcher})"
          + (f", passing {' '.join(extra)}" if extra else ""), flush=True)
    try:
        failed = run_cells(grid, args.config, run_root, extra, launcher, log=lambda m: print(m, flush=True),
                           tracking=tracking_from(args, run_root))
    except ValueError as e:  # e.g. runs made with other arguments: nothing ran, nothing was written
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    results = finished_runs(run_root)  # this grid and every earlier finished run in the folder
    try:
        aggregate(results, out, run_root)
    except RuntimeError as e:  # runs that cannot share a table: say which, leave runs and results as they are
        print(f"sweep: cannot aggregate {run_root}: {e}", file=sys.stderr)
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'results.csv'}, {out / 'table.md'}, {out / 'paired.json'}, {out / 'rouge_vs_k.png'}")
    if results:
        print((out / "table.md").read_text())
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
