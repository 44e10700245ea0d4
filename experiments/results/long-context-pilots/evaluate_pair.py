"""Evaluate a full-attention base export and a gist export fine-tuned from it as
experiments/long_context.py does, on a task's 200 test records (contexts of 70-120 words): the gist
model at 4x, 8x and 16x, the base with the whole context, with none, and with the context's end in
as many positions as each gist cache held.

    python experiments/results/long-context-pilots/evaluate_pair.py TASK BASE_EXPORT GIST_EXPORT OUT.json \
        [VOCABULARY]   # codes (default) or words
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

EXPERIMENT = Path(__file__).resolve().parents[2] / "long_context.py"


def main(task: str, base: str, gist: str, out: str, vocabulary: str = "codes") -> None:
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("long_context", EXPERIMENT)
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    records = lc.records_of(task, 200, 0, (70, 120), vocabulary)
    print("chance floor", round(lc.chance_floor(records, vocabulary), 1))
    start = time.time()
    res = {"gist-coarse": lc.evaluate(gist, "gist", records, lc.RATIOS, 50, 8)}
    res["full"] = lc.evaluate(base, "full", records, (4,), 50, 8)
    res["no_context"] = lc.evaluate(base, "no_context", records, (4,), 50, 8)
    budgets = {r: res["gist-coarse"][r][1] for r in lc.RATIOS}
    res["truncation"] = lc.evaluate(base, "truncation", records, lc.RATIOS, 50, 8, budgets)
    for method, by_ratio in res.items():
        for r, (correct, positions) in by_ratio.items():
            print(f"{method:12s} {r:>2}x  EM {100 * np.mean(correct):5.1f}  cached positions "
                  f"{np.mean(positions):6.1f}")
    print(f"evaluated in {time.time() - start:.0f} s")
    Path(out).write_text(json.dumps({m: {str(r): v for r, v in by.items()} for m, by in res.items()}))


if __name__ == "__main__":
    main(*sys.argv[1:6])
