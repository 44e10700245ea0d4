"""Two CPU processes (DDP, gloo) give the same ROUGE-L as one process on the same data, with a
split size that does not divide by the number of processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_module import tiny_config

from gist_lightning.cli import cli_main

BIN = Path(sys.executable).parent / "gist-lightning"


def last_metrics(log_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    out = {}
    for row in rows:
        out.update({k: float(v) for k, v in row.items() if v and k.endswith(("rougeL", "exact_match"))})
    return out


def validate(config: Path, export: Path, devices: int, name: str, tmp_path: Path) -> dict[str, float]:
    args = [str(BIN), "validate", "--config", str(config), "--model.model_config", "null",
            "--model.model_name_or_path", str(export), "--data.tokenizer", str(export),
            "--data.eval_batch_size", "1", "--data.max_validation_records", "15", "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.logger.init_args.name", name]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return last_metrics(tmp_path / "runs" / name / "version_0")


@pytest.mark.slow
def test_two_process_ddp_validation_matches_one_process(tmp_path):
    config = tiny_config(tmp_path, max_steps=120, val_check_interval=120)
    cli = cli_main(["fit", "--config", str(config)])
    export = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ExportBest").path
    one = validate(config, export, 1, "one", tmp_path)
    two = validate(config, export, 2, "two", tmp_path)
    assert set(one) == {f"{s}/{m}" for s in ("validation_seen", "validation_unseen", "validation_human")
                        for m in ("rougeL", "exact_match")}
    assert any(v > 0 for v in one.values())  # a model that says something, so equality means something
    assert one == pytest.approx(two, abs=1e-6)
    # 15 records per split on 2 ranks: one rank gets a repeat, which must not be counted or written
    for name in ("one", "two"):
        for split in ("validation_seen", "validation_unseen", "validation_human"):
            [path] = (tmp_path / "runs" / name / "version_0" / "predictions").glob(f"*-{split}.csv")
            assert len(list(csv.DictReader(open(path)))) == 15
