"""experiments/long_context.py without training: the fit commands ``--check_args`` prints (two
stages for the gist models, the second resumed from the first's last checkpoint), the truncation
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


def test_check_args_prints_two_stages_per_gist_model_and_one_per_control(lc, tmp_path, capsys):
    assert lc.main(["--check_args", "--seeds", "0", "1", "--run_root", str(tmp_path)]) == 0
    cmds = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert len(cmds) == 2 * (2 + 2 + 1 + 1)
    by_run: dict[str, list[list[str]]] = {}
    for cmd in cmds:
        assert cmd[1:5] == ["-m", "gist_lightning.cli", "fit", "--config"] and cmd.count("--config") == 3
        assert _value(cmd, "--trainer.logger.init_args.save_dir") == str(tmp_path)
        name = _value(cmd, "--trainer.logger.init_args.name")
        assert name.endswith(f"-seed{_value(cmd, '--seed_everything')}")
        by_run.setdefault(name, []).append(cmd)
    runs = {f"{m}-seed{s}" for m in ("gist_coarse", "gist_fine", "full", "neg_control") for s in (0, 1)}
    assert set(by_run) == runs
    for seed in (0, 1):
        for placement in ("coarse", "fine"):
            name = f"gist_{placement}-seed{seed}"
            first, second = by_run[name]
            assert all(_value(c, "--model.segments.placement") == placement for c in (first, second))
            assert _value(first, "--trainer.max_steps") == "1000" and "--ckpt_path" not in first
            assert _value(second, "--trainer.max_steps") == "1500"
            assert _value(second, "--ckpt_path") == str(tmp_path / name / "version_0" / "checkpoints"
                                                        / "last.ckpt")
        (full,), (neg,) = by_run[f"full-seed{seed}"], by_run[f"neg_control-seed{seed}"]
        assert _value(full, "--model.condition") == "pos_control"
        assert _value(full, "--trainer.max_steps") == "1000" and "--ckpt_path" not in full
        assert _value(neg, "--model.condition") == "neg_control"
        assert _value(neg, "--trainer.max_steps") == "200" and "--ckpt_path" not in neg


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


def test_training_resumes_stage_by_stage_and_stops_when_all_are_done(lc, tmp_path, monkeypatch):
    """train_all starts only the stages without a ``stageN.done`` marker (the second stage of a gist
    model resumed from the first), and returns once every stage is done."""
    import argparse

    args = argparse.Namespace(steps=1000, more_gist_steps=500, neg_steps=200, jobs=2)
    started = []

    class Finished:  # a fit that ends at once, successfully
        returncode = 0

        def __init__(self, cmd, **kwargs):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(lc.subprocess, "Popen", Finished)
    monkeypatch.setattr(lc, "_running", lambda name: False)
    cells = [("gist_coarse", 0), ("full", 0)]
    (tmp_path / "gist_coarse-seed0").mkdir()
    (tmp_path / "gist_coarse-seed0" / "stage1.done").touch()
    lc.train_all(cells, tmp_path, args, [])
    assert len(started) == 2  # the gist model's second stage, and full's only stage
    assert "--ckpt_path" in started[0] and _value(started[0], "--trainer.max_steps") == "1500"
    assert _value(started[1], "--trainer.max_steps") == "1000"
    assert (tmp_path / "gist_coarse-seed0" / "stage2.done").is_file()
    started.clear()
    lc.train_all(cells, tmp_path, args, [])  # everything done: nothing starts, nothing fails
    assert started == []
