"""Add pilots' curves to loss.csv and validation.csv (from their run folders' metrics.csv) and redraw
pilots.png from the two files.

    python experiments/results/long-context-pilots/collect.py NAME=RUN_FOLDER ...   # then redraw
    python experiments/results/long-context-pilots/collect.py NAME=FOLDER+FOLDER    # a run continued
    python experiments/results/long-context-pilots/collect.py                       # redraw only

A pilot already in the files is replaced by its folders' rows. ``pilots.png`` draws the first
pilots; ``lookup.png`` the framework's lookup pilots (names starting with ``a``: words, 3 facts);
``tune.png`` gist models fine-tuned from a base (names starting with ``t``); ``twohop.png`` the
two-hop bases (``hop``)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
SPLITS = ("validation_seen", "validation_unseen", "validation_human")


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def add(name: str, runs: list[Path]) -> None:
    metrics = [r for run in runs for r in read(run / "metrics.csv")]
    loss = [r for r in read(HERE / "loss.csv") if r["pilot"] != name]
    for r in metrics:
        answer = r.get("train/lm_loss") or r.get("train/loss")
        if answer:
            loss.append({"pilot": name, "step": r["step"], "answer_loss": round(float(answer), 4),
                         "context_loss": r.get("train/context_loss", "")})
    write(HERE / "loss.csv", loss, ["pilot", "step", "answer_loss", "context_loss"])
    val = [r for r in read(HERE / "validation.csv") if r["pilot"] != name]
    for r in metrics:
        for split in SPLITS:
            if r.get(f"{split}/exact_match"):
                val.append({"pilot": name, "step": r["step"], "split": split,
                            "exact_match": r[f"{split}/exact_match"]})
    write(HERE / "validation.csv", val, ["pilot", "step", "split", "exact_match"])


def draw() -> None:
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in read(HERE / "loss.csv"):
        curves.setdefault(r["pilot"], []).append((int(r["step"]), float(r["answer_loss"])))
    draw_curves({k: v for k, v in curves.items() if not k.startswith(("a", "t", "hop"))}, "pilots.png",
                "long-context pilots: the answer's loss\n(plateau: codes 0.5 dashed, words 0.25 dotted; "
                "w*: words)")
    draw_curves({k: v for k, v in curves.items() if k.startswith("a")}, "lookup.png",
                "the 3-fact lookup in the framework (words, restated facts, 3e-4 constant)\n"
                "a5s1 went on at 70-120 words from step 2000; plateau 0.25 dotted")
    draw_curves({k: v for k, v in curves.items() if k.startswith("t")}, "tune.png",
                "gist models fine-tuned from a5s1's base (3 facts, words, coarse)\n"
                "the answer's loss; plateau 0.25 dotted")
    draw_curves({k: v for k, v in curves.items() if k.startswith("hop")}, "twohop.png",
                "two-hop bases (words, 2 keys, restated facts, context loss 20, 6-12 words)\n"
                "the answer's loss; hop-r0 starts from the 3-fact base; hop-L8 has 8 layers;\n"
                "hop-3m is 3.1M (hidden 256), 70-120 words from step 4000")


def draw_curves(curves: dict[str, list[tuple[int, float]]], filename: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (name, points) in enumerate(curves.items()):
        points.sort()
        ax.plot([s for s, _ in points], [v for _, v in points], label=name, lw=1,
                color=plt.cm.tab20(i % 20), ls="-" if i < 10 else "--")
    # the plateau thresholds of experiments/long_context.py (PLATEAU_LOSS: codes, words)
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.axhline(0.25, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("answer loss (train)")
    ax.set_ylim(0, 3)
    ax.set_title(title, fontsize=11)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / filename, dpi=110)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        name, _, folders = arg.partition("=")
        add(name, [Path(f) for f in folders.split("+")])
    draw()
