"""ROUGE-L of embedded-suite validation_unseen predictions by the kind of unseen wording: each
held-out sentence (by its place in the family's ``held_out``) and the held-out parameter words.

    python experiments/unseen_breakdown.py \\
        runs/sweep-tiny/pos_control-k1-seed*/run/predictions/step007000-validation_unseen.csv

One row per CSV (columns: records and mean ROUGE-L per group); used in
experiments/results/tiny-variance/ to see where the seed-to-seed spread sits.
"""

from __future__ import annotations

import argparse
import sys

from gist_lightning.data.suite import TASKS, all_params
from gist_lightning.evaluation.metrics import read_predictions_csv, rouge_l
from gist_lightning.evaluation.stats import format_mean_count
from gist_lightning.templates import without_gists

PARAM = "held-out parameter word"


def groups_of_wordings() -> dict[str, str]:
    """instruction string -> its group ("held-out sentence 1", ...)."""
    out = {}
    for task in TASKS:
        for i, sentence in enumerate(task.held_out, 1):
            for params in all_params(task):
                out.setdefault(sentence.format(**params), f"held-out sentence {i}")
    return out


def instruction_of(x: str) -> str:
    first = without_gists(x).split("\n", 1)[0]
    if not first.startswith("Instruction: "):
        raise ValueError(f"not an embedded-suite prompt: {x[:80]!r}")
    return first.removeprefix("Instruction: ")


def breakdown(path: str) -> dict[str, list[float]]:
    wordings = groups_of_wordings()
    out: dict[str, list[float]] = {}
    for row in read_predictions_csv(path, {"x", "y_pred", "y_true"}):
        group = wordings.get(instruction_of(row["x"]), PARAM)
        out.setdefault(group, []).append(rouge_l(row["y_pred"], row["y_true"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+",
                        help="validation_unseen prediction CSVs (columns x, y_pred, y_true)")
    args = parser.parse_args(argv)
    tables = {path: breakdown(path) for path in args.csv}
    names = sorted({g for t in tables.values() for g in t})
    print("| predictions | all | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for path, table in tables.items():
        every = [s for v in table.values() for s in v]
        cells = [format_mean_count(table[g]) if g in table else "-" for g in names]
        print(f"| {path} | {format_mean_count(every)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
