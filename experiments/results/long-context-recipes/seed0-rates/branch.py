"""Branch seed 0's +until cell at the end of its short stage: copies with the task stage's learning
rate scaled (diagnosis of #32's chain seed 0; not part of the project)."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

CELL = "best-coarse+layout+ae+importance+short+until-two_hop_chain-seed0"
BASE = "base-two_hop_chain-seed0"
SRC = Path("/tmp/lc_chain")
TARGETS = {"r050": 0.5, "r100": 1.0}  # the task stage's rate at its start, of the peak


def cosine(step, total=2400, warmup_ratio=0.05):
    w = int(warmup_ratio * total)
    p = (step - w) / (total - w)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * p)))


src = SRC / CELL
while not (src / "stage0.done").exists():
    time.sleep(5)
snap = Path("/tmp/lcv/snapshot")
shutil.copytree(src, snap, symlinks=True)
ck = torch.load(snap / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
step = ck["global_step"]
print("snapshot at step", step, "lambda", cosine(step), flush=True)
# (the driver goes on: its cell is the control, the recorded +until)
for name, target in TARGETS.items():
    m = target / cosine(step)
    root = Path("/tmp/lcv") / name
    root.mkdir(parents=True, exist_ok=True)
    if not (root / BASE).exists():
        os.symlink(SRC / BASE, root / BASE)
    dst = root / CELL
    shutil.copytree(snap, dst, symlinks=True)
    for f in ("running.json", "failed.json"):
        (dst / f).unlink(missing_ok=True)
    spec = json.loads((dst / "cell.json").read_text())
    spec["args"] = [a.replace('"save_dir": "/tmp/lc_chain"', f'"save_dir": "{root}"') for a in spec["args"]]
    (dst / "cell.json").write_text(json.dumps(spec, indent=1))
    c = torch.load(snap / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    for opt in c["optimizer_states"]:
        for g in opt["param_groups"]:
            for k in ("lr", "initial_lr"):
                if k in g:
                    g[k] *= m
    for s in c["lr_schedulers"]:
        s["base_lrs"] = [x * m for x in s["base_lrs"]]
        if "_last_lr" in s:
            s["_last_lr"] = [x * m for x in s["_last_lr"]]
    torch.save(c, dst / "run/checkpoints/last.ckpt")
    print(name, "multiplier", round(m, 4), "base_lrs", c["lr_schedulers"][0]["base_lrs"], flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.Popen(
        [sys.executable, "-m", "gist_lightning.sweeps.cell", str(dst)],
        env=env,
        stdout=open(root / "cell.out", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
print("started", flush=True)
