"""The benchmarks (experiments/bench_*.py) at tiny sizes: each checks its own outputs (cached against
the uncached prompt, the generation methods against each other, every attention mode) and writes its
table."""

from __future__ import annotations

import csv
import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gist_lightning.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_caching_benchmark_checks_its_outputs_against_the_uncached_prompt(tmp_path):
    bench = ROOT / "experiments" / "bench_caching.py"
    proc = subprocess.run([sys.executable, str(bench), "--num_prompts", "6", "--repeats", "1",
                           "--new_tokens", "3", "--batch_sizes", "1", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    diffs = next(line for line in lines if line.startswith("| max logit diff vs uncached prompt"))
    assert all(float(v) <= 1e-4 for v in diffs.split("|")[3:-1])
    for bs in (1, 4):
        row = next(line for line in lines if line.startswith(f"| {bs} |"))
        assert row.rstrip().endswith("| 6/6 |"), row
    assert (tmp_path / "bench_caching-tiny-float32-cpu.csv").is_file()


def module_methods():
    bench = ROOT / "experiments" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.METHODS


@pytest.mark.slow
def test_generation_benchmark_checks_the_methods_agree_and_writes_its_table(tmp_path):
    """Every method (the compiled ones and the floor too), interleaved rounds, ratios to each
    ceiling, the compile warm-up apart; the agreement check can fail."""
    bench = ROOT / "experiments" / "bench_generate.py"
    proc = subprocess.run([sys.executable, str(bench), "--shape", "tiny", "--batch", "3",
                           "--new_tokens", "4", "--instruction_tokens", "60", "--repeats", "2",
                           "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the machine by its CPU's name (the thread count is the benchmark process's own)
    machine = f"Machine: {platform.platform()}; {cpu_model()}; "
    assert machine in (tmp_path / "bench_generate-tiny-cpu.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "bench_generate-tiny-cpu.csv")))
    assert {(r["batch"], r["method"]) for r in rows} == {("3", m) for m in module_methods()}
    assert all(float(r["tokens_per_s_low"]) <= float(r["tokens_per_s"]) <= float(r["tokens_per_s_high"])
               for r in rows)
    for r in rows:  # each method against each ceiling; the ceilings against themselves: 1
        for c in ("ceiling_static", "ceiling_static_compiled", "floor"):
            assert float(r[f"x_{c}"]) > 0 and (r["method"] != c or float(r[f"x_{c}"]) == 1.0)
        assert (r["warmup_s"] != "") == r["method"].endswith("_compiled")
    # the agreement check can fail: answers that differ stop the run
    spec = importlib.util.spec_from_file_location("bench_generate", bench)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.check({"library": ["a b"], "engine": ["a b"]}, tok=None)
    with pytest.raises(SystemExit, match="answers differ: engine vs library"):
        module.check({"library": ["a b"], "engine": ["a c"]}, tok=None)


@pytest.mark.slow
def test_attention_benchmark_runs_every_mode_and_packing_fills_rows(tmp_path):
    bench = ROOT / "experiments" / "bench_attention.py"
    out = tmp_path / "attention.md"
    proc = subprocess.run([sys.executable, str(bench), "--lengths", "256", "--steps", "1", "--warmup", "0",
                           "--tokens_per_step", "512", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert set(rows) == {"causal", "dense", "flex", "packed-dense", "packed-flex"}
    # packed rows carry more real tokens than padded ones; BlockMasks are smaller than dense masks
    assert rows["packed-dense"]["real_tokens_per_step"] > rows["dense"]["real_tokens_per_step"]
    assert rows["flex"]["mask_MB"] < rows["dense"]["mask_MB"]
    assert rows["flex"]["work"] == "forward" and rows["dense"]["work"] == "train"  # no flex backward on CPU
