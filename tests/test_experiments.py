"""The experiments' scripts: the sweep driver on a two-cell grid (runs, skips finished runs,
reports failures, aggregates, plots; a killed driver), the PEFT experiment, the unseen breakdown.
The benchmarks: tests/test_benchmarks.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_runs_skips_and_aggregates_with_paired_intervals(run_config, load_experiment, tmp_path, capsys):
    sweep = load_experiment("sweep")
    config = run_config(max_steps=6, val_check_interval=6)
    out = tmp_path / "sweep"
    args = ["--config", str(config), "--out", str(out), "--conditions", "pos_control", "gist", "--k", "1",
            "--seeds", "0", "1"]
    assert sweep.main(args + ["--", "--model.max_new_tokens", "4"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["condition"], r["k"], r["seed"]) for r in rows] == [
        ("pos_control", "1", "0"), ("pos_control", "1", "1"), ("gist", "1", "0"), ("gist", "1", "1")]
    assert all(0 <= float(r["unseen_rougeL"]) <= 100 and float(r["seen_instruction_tokens"]) > 0
               for r in rows)
    table = (out / "table.md").read_text()
    assert "| gist | 1 | 2 |" in table and "| pos_control | - | 2 |" in table
    assert "ROUGE-L minus pos_control of the same seed" in table
    paired = json.loads((out / "paired.json").read_text())
    for protocol, prefix in (("best", ""), ("final_", "final_")):
        d = paired[protocol]["gist|1|unseen"]
        assert (d["seeds"], d["records"]) == (2, 16) and d["low"] <= d["mean"] <= d["high"]
        # a second path to the same number: the per-record mean difference is the difference of the
        # logged split means, averaged over seeds
        logged = [float(g[f"{prefix}unseen_rougeL"]) - float(p[f"{prefix}unseen_rougeL"])
                  for g, p in zip(rows[2:], rows[:2])]
        assert d["mean"] == pytest.approx(sum(logged) / 2, abs=1e-3)
    assert (out / "rouge_vs_k.png").stat().st_size > 1000
    capsys.readouterr()
    # a second call finds every run finished and runs nothing
    args += ["--", "--model.max_new_tokens", "4"]
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    # a call with other fit arguments is refused in one line: its runs would not be these
    assert sweep.main(args[:-1] + ["5"]) == 2
    err = capsys.readouterr().err
    assert "other arguments (recorded --model.max_new_tokens 4; now --model.max_new_tokens 5)" in err
    # a run that fails (an attention implementation this machine lacks) is reported, and the runs
    # before it are still aggregated
    bad = sweep.main(args[:5] + ["gist", "--k", "3", "--", "--model.attn_implementation",
                                 "flash_attention_2"])
    printed = capsys.readouterr()
    assert bad == 1 and "gist-k3-seed0: FAILED" in printed.out and "1 run(s) failed" in printed.err
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 4
    # a run made from other data (here: one validation record's prompt changed) cannot share the table
    kept = sweep.run_metrics(out / "runs" / "gist-k1-seed1" / "run")["step"]
    path = out / "runs" / "gist-k1-seed1" / "run" / "predictions" / f"step{kept:06d}-validation_unseen.csv"
    rows = list(csv.DictReader(open(path)))
    rows[0]["x"] = rows[0]["x"].replace("Instruction: ", "Instruction: Now ", 1)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written = {name: (out / name).read_bytes() for name in ("results.csv", "table.md", "paired.json")}
    assert sweep.main(args) == 1
    err = capsys.readouterr().err
    assert "2 different sets of validation_unseen records" in err and "(1) gist-k1-seed1." in err
    assert {name: (out / name).read_bytes() for name in written} == written  # nothing rewritten
    # finished runs that validated other records refuse a call that would add to them, before it runs
    # anything
    assert sweep.main(args[:-5] + ["0", "2"] + args[-3:]) == 1  # seeds 0, 2: pos_control-k1-seed2 is new
    captured = capsys.readouterr()
    assert "stopping the sweep" in captured.out and "running" not in captured.out
    assert not (out / "runs" / "pos_control-k1-seed2" / "run").exists()
    assert not (out / "runs" / "gist-k1-seed2").exists()


@pytest.mark.slow
def test_a_killed_sweep_rerun_loses_and_duplicates_nothing(run_config, tmp_path):
    import os
    import signal
    import time

    config = run_config(max_steps=6, val_check_interval=6)
    out, runs = tmp_path / "sweep", tmp_path / "runs"
    argv = [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--config", str(config),
            "--out", str(out), "--runs", str(runs), "--conditions", "gist", "--k", "1", "2",
            "--", "--model.max_new_tokens", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # kill the driver alone while the second run is under way: its run must die with it
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    start = time.time()
    while not ((runs / "gist-k1-seed0" / "run" / "done.json").is_file()
               and (runs / "gist-k2-seed0" / "run").is_dir()):
        assert proc.poll() is None and time.time() - start < 300
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def orphans() -> list[str]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(runs) in text and ("gist-lightning" in text or "gist_lightning.sweeps" in text):
                found.append(text)
        return found

    deadline = time.time() + 10
    while orphans() and time.time() < deadline:
        time.sleep(0.1)
    assert not orphans(), "a run outlived its killed sweep driver"
    rerun = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "gist-k1-seed0: finished before, skipped" in rerun.stdout
    # killed before its first checkpoint: that attempt is set aside and the run starts again
    assert "gist-k2-seed0: interrupted before its first checkpoint; set aside in" in rerun.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["condition"], r["k"]) for r in rows) == [("gist", "1"), ("gist", "2")]


@pytest.mark.slow
def test_the_peft_experiment_reports_every_arm(tmp_path):
    script = ROOT / "experiments" / "peft_cpu.py"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--work", str(tmp_path / "work"),
                           "--seeds", "0", "--pretrain_steps", "6", "--steps", "12",
                           "--max_validation_records", "8"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    arms = {r["arm"]: r for r in rows}
    assert len(arms) == 6
    lora, row_only, full = (arms["gist (LoRA r16 + gist row)"], arms["gist (gist row only)"],
                            arms["gist (full)"])
    assert (row_only["trainable_params"] < lora["trainable_params"] < full["trainable_params"]
            == full["total_params"])
    assert row_only["checkpoint_bytes"] < lora["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert "| gist (gist row only) |" in (out / "table.md").read_text()


def test_unseen_breakdown_groups_records_by_held_out_wording(load_experiment, tmp_path, capsys):
    breakdown = load_experiment("unseen_breakdown")
    path = tmp_path / "unseen.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y_pred", "y_true"])
        # copy, 1st
        w.writerow(["Instruction: Say the words again.\n<GIST>\nInput: a b\nOutput:", "a b", "a b"])
        # first, 2nd
        w.writerow(["Instruction: Grab the opening word.\n<GIST><GIST>\nInput: a b\nOutput:", "b", "a"])
        # held-out word
        w.writerow(["Instruction: Remove every plum.\n<GIST>\nInput: plum a\nOutput:", "a", "a"])
    assert breakdown.breakdown(str(path)) == {"held-out sentence 1": [100.0], "held-out sentence 2": [0.0],
                                              "held-out parameter word": [100.0]}
    assert breakdown.main([str(path)]) == 0
    assert "| 66.7 (3) |" in capsys.readouterr().out
