"""experiments/long_context.py without training: the sweep cells it trains (two stages for the gist
models, the second extending the first from its last checkpoint; ``--check_args``), the truncation
baseline's rows (within the position budget, the end of the context kept), the fact's distance in
segments from the question, and the outputs written from synthetic results."""

from __future__ import annotations

import csv
import random

import pytest

from gist_lightning.data.long_recall import make_long_record
from gist_lightning.long_context import SegmentSettings
from gist_lightning.masks import interleave_gists
from gist_lightning.tokens import add_gist_token, encode_text, load_tokenizer, special_frame

SETTINGS = SegmentSettings(32, 8, "fine")
FILLER = " ".join(f"the {w} sat near the old mill while the river ran past." for w in
                  ("cat", "dog", "fox", "owl", "elk", "ant", "bee", "cow", "yak", "emu"))


@pytest.fixture
def lc(load_experiment):
    return load_experiment("long_context")


@pytest.fixture(scope="module")
def tok():
    tokenizer = load_tokenizer("suite")
    add_gist_token(tokenizer)
    return tokenizer


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_check_args_lists_two_stages_per_gist_model_and_one_per_control(lc, tmp_path, capsys):
    """The trainings are cells of one sweep over --run_root: the gist models in two stages (the
    second extends the run from its last checkpoint, validated at each stage's end), full attention
    and neg_control in one; every fit's arguments are checked, nothing runs."""
    assert lc.main(["--check_args", "--seeds", "0", "1", "--run_root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = {f"{m}-seed{s}" for m in ("gist_coarse", "gist_fine", "full", "neg_control") for s in (0, 1)}
    assert {line.split(":")[0] for line in lines} == runs and len(lines) == len(runs)
    assert all(": new; " in line for line in lines)
    assert not any(tmp_path.glob("*/cell.json"))  # a check writes no cell

    import argparse

    args = argparse.Namespace(steps=1000, more_gist_steps=500, neg_steps=200)
    for seed in (0, 1):
        for placement in ("coarse", "fine"):
            cell = lc.cell_of(f"gist_{placement}", seed, args, tmp_path)
            assert cell.name == f"gist_{placement}-seed{seed}"
            assert _value(list(cell.args), "--model.segments.placement") == placement
            assert _value(list(cell.args), "--seed_everything") == str(seed)
            assert [(s.max_steps, s.args) for s in cell.stages] == [
                (1000, ("--trainer.val_check_interval", "1000")),
                (1500, ("--trainer.val_check_interval", "500"))]
        full, neg = lc.cell_of("full", seed, args, tmp_path), lc.cell_of("neg_control", seed, args, tmp_path)
        assert _value(list(full.args), "--model.condition") == "pos_control"
        assert [s.max_steps for s in full.stages] == [1000]
        assert _value(list(neg.args), "--model.condition") == "neg_control"
        assert [s.max_steps for s in neg.stages] == [200]
    assert lc.export_of(tmp_path, "full", 0) == tmp_path / "full-seed0" / "run" / "export"


def test_truncated_rows_keep_the_context_end_within_the_position_budget(lc, tok):
    gist_id = add_gist_token(tok)
    before, _ = special_frame(tok)
    texts = [FILLER, "the code of amber is 4417.", FILLER[:150]]
    # from the least a row can hold (the start tokens, one raw token and its segment's gists; a
    # smaller budget still keeps that one token) to more than the whole context
    budgets = list(range(len(before) + 1 + SETTINGS.gists_per_segment, 200, 7))
    for text in texts:
        raw = encode_text(tok, text)
        rows = lc.truncated_rows(tok, [text] * len(budgets), SETTINGS, gist_id, budgets)
        for row, budget in zip(rows, budgets):
            assert row[:len(before)] == before
            context = row[len(before):]
            assert len(row) <= budget, (text[:20], budget)  # the start tokens count: a cache keeps them
            kept = [t for t in context if t != gist_id]
            assert kept and kept == raw[-len(kept):]  # a suffix: the end of the context
            # as many tokens as fit: one more would not (or the whole context is kept)
            assert len(kept) == len(raw) or len(before) + len(interleave_gists(
                raw[-len(kept) - 1:], SETTINGS.segment_tokens, SETTINGS.gists_per_segment,
                SETTINGS.placement, gist_id)) > budget


def test_fact_distance_counts_segments_between_the_fact_and_the_question(lc, tok):
    def record(instruction: str) -> dict:
        return {"instruction": instruction, "input": "What is the code of amber?", "output": "4417"}

    fact = "the code of amber is 4417."
    last = record(f"{FILLER} {fact}")
    first = record(f"{fact} {FILLER}")
    segments = (len(encode_text(tok, first["instruction"])) - 1) // SETTINGS.segment_tokens
    assert segments >= 2  # the filler spans several segments
    assert lc.fact_distance(tok, last, SETTINGS.segment_tokens) == 0
    assert lc.fact_distance(tok, first, SETTINGS.segment_tokens) == segments
    # generated records (the fact among distractors, anywhere): between 0 and the last segment
    rng = random.Random(0)
    for _ in range(20):
        rec = make_long_record("recall", 120, rng, 3)
        n = len(encode_text(tok, rec["instruction"]))
        assert 0 <= lc.fact_distance(tok, rec, SETTINGS.segment_tokens) <= (n - 1) // SETTINGS.segment_tokens


def test_write_outputs_writes_every_table_and_the_plot(lc, tmp_path):
    seeds, n = (0, 1), 10

    def right(method: str, ratio: int, seed: int) -> int:  # correct answers of n
        if method == "gist_fine":
            return n
        if method in ("gist_coarse", "truncation"):  # alike: coarse never beats truncation
            return {2: 5, 4: 4, 8: 3, 16: 2}[ratio] - seed
        return {"full": 8 - 2 * seed, "neg_control": 1}[method]

    # (correct per record, cached positions, cached bytes, prefill FLOPs), as evaluate() returns them
    results = {(m, r, s): ([1.0] * right(m, r, s) + [0.0] * (n - right(m, r, s)), 40.0 / r, 256.0 * 40 / r,
                           1e6) for m in lc.METHODS for r in lc.RATIOS for s in seeds}
    by_distance = [{"method": m, "ratio": 4, "seed": s, "distance": d, "n": 5, "exact_match": 20.0 * d}
                   for m in lc.METHODS for s in seeds for d in (0, 1, 2)]
    memory = [{"segments": 16, "ratio": r, "context_positions": 640, "kept_gists": 512 // r,
               "peak_positions": 512 // r + 41, "bound_gists_plus_one_segment": 512 // r + 41}
              for r in lc.RATIOS]
    lc.write_outputs(tmp_path, results, by_distance, memory, n)

    with open(tmp_path / "results.csv") as f:
        assert f.readline().startswith("method,ratio,seed,exact_match")
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert sorted((r["method"], int(r["ratio"]), int(r["seed"])) for r in rows) == sorted(results)
    for r in rows:
        assert float(r["exact_match"]) == 100 * right(r["method"], int(r["ratio"]), int(r["seed"])) / n
        assert int(r["records"]) == n
    assert len(list(csv.DictReader(open(tmp_path / "by_distance.csv")))) == len(by_distance)
    assert [int(r["ratio"]) for r in csv.DictReader(open(tmp_path / "memory.csv"))] == list(lc.RATIOS)

    table = (tmp_path / "table.md").read_text()
    assert table.startswith(f"# Long-context recall: 2 seeds x {n} test contexts")
    assert "| 4x | gist_fine | 100.0 | [100.0, 100.0] |" in table  # mean and interval over seeds
    assert "## Per seed" in table and "| ratio | method | seed 0 | seed 1 |" in table
    assert "| 4x | full | 80.0 | 60.0 |" in table and "| 16x | truncation | 20.0 | 10.0 |" in table
    assert "## Goals" in table
    assert ("- gist_fine at 4x: 100.0 = 143% of full attention's 70.0 (goal at 4x: >= 90%); "
            "per seed: seed 0 125%, seed 1 167%") in table
    assert "- gist_fine beats truncation (interval above 0) at: 2x, 4x, 8x, 16x (goal: every ratio)" in table
    assert "- gist_coarse beats truncation (interval above 0) at: no ratio (goal: every ratio)" in table
    assert "- memory: compressing 16 segments at 4x held at most 169 positions" in table
    assert "| method | 0 | 1 | 2 |" in table and "| full | 0 (10) | 20 (10) | 40 (10) |" in table
    assert (tmp_path / "long_context.png").stat().st_size > 1000
