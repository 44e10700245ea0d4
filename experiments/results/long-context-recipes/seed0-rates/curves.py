"""The three arms' answer-loss curves on the task's contexts (train/lm_loss, each logged step): csv, png."""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CELL = "best-coarse+layout+ae+importance+short+until-two_hop_chain-seed0"
ARMS = {
    "0.69 (the +until recipe)": Path("/tmp/lc_chain"),
    "0.50": Path("/tmp/lcv/r050"),
    "1.00": Path("/tmp/lcv/r100"),
}
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rows = []
fig, ax = plt.subplots(figsize=(7, 4))
for arm, root in ARMS.items():
    pts = [
        (int(r["step"]), float(r["train/lm_loss"]))
        for r in csv.DictReader(open(root / CELL / "run" / "metrics.csv"))
        if r.get("train/lm_loss")
    ]
    rows += [{"rate_at_start": arm.split()[0], "step": s, "lm_loss": round(v, 4)} for s, v in pts]
    ax.plot([s for s, _ in pts], [v for _, v in pts], label=f"task stage starts at {arm} of the peak rate")
ax.axhline(0.125, color="grey", ls=":", label="plateau threshold (0.125)")
ax.axvline(976, color="grey", ls="--", lw=0.8)
ax.set_yscale("log")
ax.set_xlabel("step (short contexts until 976, then the task's)")
ax.set_ylabel("answer loss (train/lm_loss)")
ax.set_title("two_hop_chain, seed 0: the task stage at three rates (2-core CPU)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "curves.png", dpi=110)
with open(out / "curves.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["rate_at_start", "step", "lm_loss"])
    w.writeheader()
    w.writerows(rows)
print("wrote", out)
