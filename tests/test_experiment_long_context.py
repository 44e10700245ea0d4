"""experiments/long_context.py without training: the sweep cells of the ablation (bases, then
variants fine-tuned from their exports; ``--check_args``), the truncation baseline's rows (within
the position budget, the end of the context kept), the chance floor, the plateau step, kept
evaluations and the outputs written from synthetic results."""

from __future__ import annotations

import argparse
import csv
import functools
import json
import shlex

import pytest

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


def _roots(tmp_path) -> list[str]:
    """--run_root and --out in the test's folder (the default --out holds the committed experiment's)."""
    return ["--run_root", str(tmp_path), "--out", str(tmp_path / "out")]


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_check_args_lists_the_ablation_bases_first_and_variants_fine_tuned_from_them(lc, tmp_path, capsys):
    """The ablation's cells: a full-attention base per seed, the from-scratch row, coarse and fine
    from the base, then each addition on the (here default) placement; every fit's arguments are
    checked, nothing runs or is written."""
    assert lc.main(["--check_args", *_roots(tmp_path), "--train_on", "task"]) == 0
    names = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    want = [f"base-recall3-seed{s}" for s in (0, 1)]
    want += [f"{m}-recall3-seed{s}" for s in (0, 1) for m in ("scratch-coarse", "base-coarse", "base-fine")]
    want += [f"base-recall3-seed{s}" for s in (0, 1)]  # again: what the additions need (finished: kept)
    want += [f"base-coarse{a}-recall3-seed{s}" for s in (0, 1)
             for a in ("+layout", "+ae", "+importance", "+kd", "+short", "+learn", "+budget")]
    assert names == want
    assert not any(tmp_path.glob("*/cell.json"))  # a check writes no cell


    args = argparse.Namespace(run_root=tmp_path, context_words=[70, 120], base_steps=1500, tune_steps=500,
                              scratch_steps=2000, model_config=lc.MODEL, task_model_configs=None,
                              segment_tokens=32, task_base_args=None,
                              train_batch_size=16, base_learning_rate=3e-3, train_context_words=None,
                              train_on="task", vocabulary="codes", restate=1.0, context_weight=20.0,
                              base_short_steps=0, base_short_words=[6, 12], base_short_facts=None,
                              tune_short_steps=None,
                              tune_learning_rate=2e-4, tune_restate=0.0, tune_context_weight=0.5)
    base = lc.base_cell("recall3", 1, args)
    assert _value(list(base.args), "--model.condition") == "pos_control"
    assert _value(list(base.args), "--model.learning_rate") == "0.003"
    assert _value(list(base.args), "--model.scheduler") == "constant_with_warmup"
    assert _value(list(base.args), "--data.init_args.restate") == "1.0"
    assert _value(list(base.args), "--model.objectives.context_weight") == "20.0"
    seeds = _value(list(base.args), "--seed_everything"), _value(list(base.args), "--data.init_args.seed")
    assert seeds == ("1", "1")
    assert _value(list(base.args), "--data.init_args.batch_size") == "16"
    # 32 raw tokens a segment: 8 gists at 4x (validation and export), ratios 4-16 drawn in training
    assert _value(list(base.args), "--model.segments.segment_tokens") == "32"
    assert _value(list(base.args), "--model.segments.gists_per_segment") == "8"
    assert _value(list(base.args), "--model.num_gist_tokens") == "8"
    assert base.needs == ()
    assert json.loads(_value(list(base.args), "--model.model_config"))["hidden_size"] == 128
    assert _value(list(base.args), "--data.init_args.facts") == "3"
    assert _value(list(base.args), "--data.init_args.vocabulary") == "codes"
    assert [s.max_steps for s in base.stages] == [1500]
    export = str(lc.export_of(tmp_path, "base", "recall3", 1))
    kd = list(lc.gist_cell("base+kd", "fine", "recall3", 1, args).args)
    assert _value(kd, "--model.model_name_or_path") == export == _value(kd, "--model.objectives.teacher")
    assert _value(kd, "--model.model_config") == "null" and _value(kd, "--model.segments.placement") == "fine"
    assert _value(kd, "--model.learning_rate") == "0.0002"  # --tune_learning_rate
    # a gist model's recipe is its own: here the answer's loss and a little of the context's
    assert _value(kd, "--data.init_args.restate") == "0.0"
    assert _value(kd, "--model.objectives.context_weight") == "0.5"
    assert _value(kd, "--model.segments.train_ratios") == "[4, 8, 16]"
    assert lc.gist_cell("base+kd", "fine", "recall3", 1, args).needs == ("base-recall3-seed1",)  # waits
    best = lc.gist_cell("best+layout+ae", "coarse", "two_hop", 0, args)
    assert best.name == "best-coarse+layout+ae-two_hop-seed0"
    assert _value(list(best.args), "--model.segments.sink_tokens") == "4"
    assert _value(list(best.args), "--model.objectives.autoencode_weight") == "0.5"
    scratch = lc.gist_cell("scratch", "coarse", "recall1", 0, args)
    assert "--model.model_name_or_path" not in scratch.args and scratch.stages[0].max_steps == 2000
    # from random weights, but evaluated against its base (full attention, truncation): it waits for it
    assert scratch.needs == ("base-recall1-seed0",)


def test_the_base_forms_the_lookup_on_short_contexts_first_then_trains_on_the_task(lc, tmp_path, capsys):
    """The base's curriculum: --base_short_steps on short contexts (their words and facts override
    the task's: the stage's arguments come last), unvalidated, so the export is the model after the
    task's contexts; then --base_steps more on the task's contexts, validated at the end."""
    assert lc.main(["--check_args", *_roots(tmp_path), "--ablation_seeds", "0", "--ablation_rows",
                    "+layout", "--base_short_steps", "700", "--base_steps", "300", "--base_short_words", "4",
                    "9", "--base_short_facts", "8"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("base-recall3-seed0:") and "; 1000 steps;" in line

    args = argparse.Namespace(base_short_steps=700, base_steps=300, base_short_words=[4, 9],
                              base_short_facts=8)
    short, task = lc.base_stages(args)
    assert short.max_steps == 700 and task.max_steps == 1000
    cell_args = shlex.split(line.split("; ", 2)[2])
    composed = cell_args + list(short.args)  # how the sweep runs a stage: the cell's, then the stage's
    last = max(i for i, a in enumerate(composed) if a == "--data.init_args.context_words")  # the one read
    assert json.loads(composed[last + 1]) == [4, 9]
    assert json.loads(_value(cell_args, "--data.init_args.context_words")) == [70, 120]  # the task's
    assert _value(list(short.args), "--data.init_args.facts") == "8"
    assert _value(list(short.args), "--trainer.limit_val_batches") == "0"
    assert "--data.init_args.context_words" not in task.args
    assert "--trainer.limit_val_batches" not in task.args
    assert _value(list(task.args), "--trainer.val_check_interval") == "1000"
    args.base_short_steps = 0
    (only,) = lc.base_stages(args)  # no short steps: one stage, the task's contexts
    assert only.max_steps == 300 and "--data.init_args.context_words" not in only.args
    # --tune_short_steps: a fine-tuned gist model's curriculum alike (the task's facts); scratch keeps
    # the plain recipe; without it, one stage as recorded before the option
    lc.main(["--check_args", *_roots(tmp_path), "--ablation_seeds", "0", "--ablation_rows", "scratch",
             "--tune_short_steps", "200", "--tune_steps", "500", "--base_short_words", "4", "9"])
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "; 700 steps;" in lines["base-coarse-recall3-seed0"] and "; 2000 steps;" in lines[
        "scratch-coarse-recall3-seed0"]
    tune = argparse.Namespace(base_short_words=[4, 9])
    short, task = lc.curriculum(200, 500, tune)
    assert (short.max_steps, task.max_steps) == (200, 700)
    assert json.loads(_value(list(short.args), "--data.init_args.context_words")) == [4, 9]
    assert "--data.init_args.facts" not in short.args
    assert [s.max_steps for s in lc.curriculum(None, 500, tune)] == [500]


def test_ablation_rows_cut_the_optional_rows_and_segments_must_divide(lc, tmp_path, capsys):
    assert lc.main(["--check_args", *_roots(tmp_path), "--ablation_seeds", "0", "--train_on",
                    "task", "--ablation_rows", "+layout", "+kd"]) == 0
    names = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["base-recall3-seed0", "base-coarse-recall3-seed0", "base-fine-recall3-seed0",
                     "base-recall3-seed0", "base-coarse+layout-recall3-seed0", "base-coarse+kd-recall3-seed0"]
    with pytest.raises(SystemExit):
        lc.main(["--check_args", *_roots(tmp_path), "--segment_tokens", "24"])
    assert "--segment_tokens must be a multiple of 16" in capsys.readouterr().err


def test_a_mixture_trains_one_model_per_seed_for_every_task(lc, tmp_path, capsys):
    """--train_on mixture: one base and one variant per seed, trained on recall and two-hop among
    1-3 facts, shared by every task's evaluation."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "choice.json").write_text(json.dumps({"placement": "fine", "variant": "base"}))
    assert lc.main(["--check_args", "--stage", "final", "--run_root", str(tmp_path), "--out",
                    str(tmp_path / "out"), "--final_seeds", "0", "1", "--train_on", "mixture"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # each base beside its gist model (the sweep still starts both bases first: the gist waits)
    assert [line.split(":")[0] for line in lines] == ["base-mixture-seed0", "base-fine-mixture-seed0",
                                                      "base-mixture-seed1", "base-fine-mixture-seed1"]
    fit = shlex.split(lines[0].split("; ", 2)[2])  # the printed command, as a shell reads it
    assert _value(fit, "--data.init_args.tasks") == '["recall", "two_hop"]'
    assert _value(fit, "--data.init_args.facts") == "[1, 2, 3]"


def test_the_bases_stage_trains_only_the_bases_of_the_tasks_asked(lc, tmp_path, capsys):
    """--stage bases: whether the full-attention bases of some tasks train, before any gist cell."""
    assert lc.main(["--check_args", "--stage", "bases", "--run_root", str(tmp_path), "--out",
                    str(tmp_path / "out"), "--tasks", "two_hop", "recall1", "--final_seeds", "0", "2"]) == 0
    names = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["base-two_hop-seed0", "base-two_hop-seed2", "base-recall1-seed0", "base-recall1-seed2"]
    assert lc.main(["--check_args", "--stage", "bases", *_roots(tmp_path), "--final_seeds", "0"]) == 0
    names = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]  # two-hop: its chain
    assert names == ["base-recall1-seed0", "base-recall3-seed0", "base-two_hop_chain-seed0"], names
    with pytest.raises(SystemExit):
        lc.main(["--check_args", *_roots(tmp_path), "--train_on", "mixture", "--tasks", "two_hop_chain"])
    assert "--train_on mixture trains no model that answers two_hop_chain" in capsys.readouterr().err
    # a check against an --out measured under other settings still lists the cells, and says so
    (tmp_path / "out").mkdir()
    other = {"settings": {"vocabulary": "codes"}, "evaluations": {}, "models": {}, "speed": []}
    (tmp_path / "out" / "evaluations.json").write_text(json.dumps(other))
    assert lc.main(["--check_args", "--stage", "bases", *_roots(tmp_path), "--tasks", "recall1",
                    "--final_seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "measured under other settings" in out and "listed as if nothing were recorded" in out
    assert "base-recall1-seed0: new;" in out


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


def test_the_chance_floor_answers_any_code_of_the_context(lc):
    records = [{"instruction": "the code of amber is 4417. the code of jade is 12. the code of ruby is 999."},
               {"instruction": "the code of amber is 4417. the cat sat."}]
    assert lc.chance_floor(records) == pytest.approx(100 * (1 / 3 + 1) / 2)
    recall3 = lc.records_of("recall3", 50, 0, (150, 250))
    assert 30 <= lc.chance_floor(recall3) <= 40  # three codes per context
    assert lc.records_of("recall3", 5, 0, (150, 250)) == recall3[:5]  # fixed
    assert lc.records_of("recall3", 5, 1, (150, 250)) != recall3[:5]  # validation records differ
    words = lc.records_of("recall3", 50, 0, (150, 250), "words")  # one-token values: the same floor
    assert 30 <= lc.chance_floor(words, "words") <= 40 and not any(r["output"].isdigit() for r in words)
    two = "apple fox. the book sat near the tree. pear owl. a lamp and a door went to the river."
    assert lc.chance_floor([{"instruction": two}], "words") == 50
    chains = lc.records_of("two_hop_chain", 20, 0, (70, 120), "words")  # two_hop's, answered "place code"
    hops = lc.records_of("two_hop", 20, 0, (70, 120), "words")
    assert [(r["instruction"], r["input"]) for r in chains] == [(r["instruction"], r["input"]) for r in hops]
    assert [r["output"].split()[1] for r in chains] == [r["output"] for r in hops]
    assert lc.chance_floor(chains, "words") == 50


def test_the_plateau_step_and_kept_evaluations(lc, tmp_path):
    rows = "".join(f"0,{s},{v}\n" for s, v in ((49, 2.1), (99, 0.9), (149, 0.4), (199, 0.6), (249, 0.3),
                                                (299, 0.2), (349, 0.1)))
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss\n" + rows)
    losses = lc.answer_losses(tmp_path)
    assert lc.plateau_step(losses, 0.5) == 149 and lc.plateau_step(losses, 0.1) is None
    assert lc.end_loss(lc.answer_losses(tmp_path)) == pytest.approx(0.3)  # the last 4 logged
    assert lc.plateau_step(lc.answer_losses(tmp_path), 0.5, start=200) == 249  # from a stage's first step on
    cell = tmp_path / "cell"  # a curriculum's cell: its last stage (the task's contexts) from step 200
    (cell / "run").mkdir(parents=True)
    (cell / "run" / "metrics.csv").write_text("epoch,step,train/loss\n" + rows)
    (cell / "cell.json").write_text(json.dumps({"stages": [{"max_steps": 200}, {"max_steps": 400}]}))
    assert lc.training_record(cell, 0.5) == {"plateau_loss": 0.5, "plateau_step": 149,
                                             "task_plateau_step": 249, "end_loss": pytest.approx(0.3)}
    assert lc.last_stage_start(cell) == (200, False)  # (no export of stage 0: its max_steps, a guess)
    # a first stage stopped once learned (+learn) at step 120, before its max_steps: the last stage
    # starts there, as the stage's export (the sweep's export-stage0) records
    (cell / "run" / "export-stage0").mkdir()
    (cell / "run" / "export-stage0" / "gist_config.json").write_text(
        json.dumps({"source": {"checkpoint": None, "global_step": 120}}))
    assert lc.last_stage_start(cell) == (120, True)
    assert lc.training_record(cell, 0.5)["task_plateau_step"] == 149
    # a last stage of steps (Stage(steps=...)) records where it started; it ends that many later
    steps = [{"max_steps": 200}, {"max_steps": None, "steps": 150}]
    assert lc.stage_end(cell, steps, 1) == 0  # (nothing recorded yet)
    (cell / "stage1.start").write_text("130")
    assert lc.last_stage_start(cell) == (130, True) and lc.stage_end(cell, steps, 1) == 280
    (cell / "stage1.start").unlink()
    (cell / "run" / "metrics.csv").unlink()
    assert lc.training_record(cell, 0.5) == {}  # nothing logged: nothing to record
    # under the threshold on a curriculum's short contexts, back above it on the task's: never left it
    rows += "".join(f"0,{s},1.2\n" for s in (399, 449, 499, 549))
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss\n" + rows)
    assert lc.plateau_step(lc.answer_losses(tmp_path), 0.5) is None
    assert lc.end_loss(lc.answer_losses(tmp_path)) == pytest.approx(1.2)
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss,train/lm_loss\n0,49,0.4,2.1\n0,99,0.3,0.2\n"
                                          + "".join(f"0,{s},0.3,0.1\n" for s in (149, 199, 249)))
    assert lc.plateau_step(lc.answer_losses(tmp_path), 0.5) == 99  # with objectives: the answer's own loss
    args = argparse.Namespace(plateau_loss=0.25, vocabulary="words")  # chain: a guessed place: ln(2)/3
    assert lc.plateau_loss("recall3", args) == 0.25 and lc.plateau_loss("two_hop_chain", args) == 0.125
    args = argparse.Namespace(plateau_loss=0.5, vocabulary="codes")  # ln(2)/7 with codes' 3-5 tokens
    assert lc.plateau_loss("two_hop_chain", args) == pytest.approx(0.05)
    calls, path, settings = [], tmp_path / "out" / "evaluations.json", {"context_words": [70, 120]}
    ev = lc.Evaluations(path, settings)
    compute = lambda: calls.append(1) or {4: ([1.0, 0.0], [10, 12])}  # noqa: E731
    assert ev.get("test/recall3/base-coarse/seed1", compute) == {4: ([1.0, 0.0], [10, 12])}
    ev.get("validation/recall3/base-fine/seed0", lambda: {8: ([0.0], [3])})
    again = lc.Evaluations(path, settings)  # a later sitting: kept, not computed again
    assert again.get("test/recall3/base-coarse/seed1", compute) == {4: ([1.0, 0.0], [10, 12])}
    assert calls == [1]
    assert again.results("test") == {("recall3", "base-coarse", 4, 1): ([1.0, 0.0], [10, 12])}
    before = path.read_text()
    with pytest.raises(SystemExit, match="context_words differ"):  # other settings: refused, file kept
        lc.Evaluations(path, {"context_words": [150, 250]})
    assert path.read_text() == before


def test_a_run_folder_keeps_the_training_settings_of_its_models(lc, tmp_path):
    """``<run_root>/settings.json``: written once; the same training settings pass (evaluation ones
    such as --records may change); other ones (here the vocabulary) are refused naming the field,
    the folder unchanged: its finished cells would otherwise be kept as if trained under them."""
    settings = {k: None for k in lc.TRAINING_SETTINGS} | {"vocabulary": "codes", "records": 200}
    lc.check_run_root(tmp_path / "runs", settings)
    written = (tmp_path / "runs" / "settings.json").read_text()
    lc.check_run_root(tmp_path / "runs", settings | {"records": 50})
    with pytest.raises(SystemExit, match=r"runs/settings.json: .*\(vocabulary differ"):
        lc.check_run_root(tmp_path / "runs", settings | {"vocabulary": "words"})
    assert (tmp_path / "runs" / "settings.json").read_text() == written
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["settings.json"]


def test_write_outputs_writes_every_table_and_the_plot(lc, tmp_path):

    seeds, n = (0, 1), 10

    def right(method: str, ratio: int, seed: int) -> int:  # correct answers of n
        if method == "base-coarse":
            return n
        if method in ("scratch-coarse", "truncation"):  # alike: scratch never beats truncation
            return {4: 4, 8: 3, 16: 2}[ratio] - seed
        return {"full": 9, "no_context": 1}[method]

    methods = ("base-coarse", "scratch-coarse", "truncation", "full", "no_context")
    results = {("recall3", m, r, s): ([1.0] * right(m, r, s) + [0.0] * (n - right(m, r, s)), [64 // r] * n)
               for m in methods for r in lc.RATIOS for s in seeds}
    plateau = [{"model": "base-coarse", "task": "recall3", "seed": 0, "plateau_loss": 0.5,
                "plateau_step": 149, "steps": 500},
               {"model": "scratch-coarse", "task": "recall3", "seed": 0, "plateau_loss": 0.5,
                "plateau_step": None, "steps": 2000}]
    speed = [{"objective": "plain", "steps_per_second": 2.0, "steps_timed": 20, "relative_to_plain": 1.0},
             {"objective": "+kd", "steps_per_second": 1.5, "lowest": 1.4, "highest": 1.6, "repeats": 3,
              "steps_timed": 20, "relative_to_plain": 0.75}]
    args = argparse.Namespace(records=n, plateau_loss=0.5)
    lc.write_outputs(tmp_path, results, {"recall3": 33.3}, plateau, speed, {"recall3": 256.0}, args)
    with open(tmp_path / "results.csv") as f:
        assert f.readline().startswith("task,method,ratio,seed,exact_match")
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == len(results)
    for r in rows:
        assert float(r["exact_match"]) == 100 * right(r["method"], int(r["ratio"]), int(r["seed"])) / n
        assert float(r["effective_ratio"]) == pytest.approx(256 / (64 // int(r["ratio"])), abs=0.01)
    table = (tmp_path / "table.md").read_text()
    assert "## recall3 (chance floor 33.3%)" in table
    assert "| base-coarse | 2 | 500 | 100.0 [100, 100] (16.0x) |" in table
    assert "| scratch-coarse | 2 | 2000 | " in table and "| full | 2 | - | 90.0 [" in table  # (no base here)
    assert "seed 0: 40.0, seed 1: 30.0" in table  # scratch at 4x, per seed
    assert "| scratch-coarse | recall3 | 0 | 0.5 | never | - | - | 2000 |" in table
    assert "| +kd | 1.50 | 1.40, 1.60 | 0.75 |" in table
    assert "| plain | 2.00 | 2.00, 2.00 | 1.00 |" in table  # (recorded before rounds: one round)
    assert (tmp_path / "long_context.png").stat().st_size > 1000
    base_line = next(line for line in table.splitlines() if line.startswith("| base-coarse | 2 | 500"))
    assert base_line.count("[") >= 6  # three ratios, and a paired interval against truncation at each
    # a row on seed 1 alone (as the ablation runs seed 1 first) is paired with its truncation's seed 1
    one = {("recall3", m, r, 1): ([1.0] * k + [0.0] * (n - k), [20] * n)
           for m, k in (("base-coarse+layout", 6), ("truncation+layout", 2)) for r in lc.RATIOS}
    lc.write_outputs(tmp_path, results | one, {"recall3": 33.3}, plateau, speed, {"recall3": 256.0}, args)
    layout = next(line for line in (tmp_path / "table.md").read_text().splitlines()
                  if line.startswith("| base-coarse+layout | 1"))
    assert layout.count("+40.0 [") == 3, layout
    lc.write_outputs(tmp_path, results, {"recall3": 100.0}, plateau, speed, {"recall3": 256.0}, args)
    assert "(chance floor 100.0%: the context holds one value" in (tmp_path / "table.md").read_text()
    bases = [{"model": "base", "task": "recall3", "seed": s, "steps": 5000 + s} for s in seeds]
    lc.write_outputs(tmp_path, results, {"recall3": 33.3}, plateau + bases, speed, {"recall3": 256.0}, args)
    table = (tmp_path / "table.md").read_text()
    assert "| full | 2 | 5000-5001 | 90.0 [" in table and "| truncation | 2 | 5000-5001 | " in table


def test_the_table_checks_each_seed_against_the_goals(lc, tmp_path):
    """Per gist model and seed: its share of that seed's full model at each ratio against the
    task's goal, its paired interval (that seed's records) against truncation at the same cache, the
    step it left the plateau on the task's contexts; each miss named (a full model under 90%, what
    could not be checked), ``none`` where nothing is missed."""
    n = 100

    def rows(values, ratios=lc.RATIOS):  # exact match % per ratio -> (correct, positions) of n records
        return {r: ([1.0] * v + [0.0] * (n - v), [10] * n) for r, v in zip(ratios, values)}

    got = {("recall3", "full", 0): rows([100] * 3), ("recall3", "full", 1): rows([80] * 3),
           ("recall3", "truncation+layout", 0): rows([20] * 3),
           ("recall3", "truncation+layout", 1): rows([20, 20, 15]),
           ("recall3", "truncation+layout", 2): rows([20] * 3),
           ("recall3", "best-coarse+layout", 0): rows([96, 89, 50]),
           ("recall3", "best-coarse+layout", 1): rows([78, 76, 20]),
           ("recall3", "best-coarse+layout", 2): rows([90] * 3),  # (no full model of seed 2)
           ("recall3", "best-coarse+ae+layout", 0): rows([97, 92, 20]),  # 16x: one seed's 20 vs 20
           ("recall3", "base-coarse", 0): rows([99, 98], (4, 8)),  # (16x not evaluated)
           ("recall3", "truncation", 0): rows([20] * 3),
           ("recall1", "full", 0): rows([100] * 3), ("recall1", "truncation", 0): rows([10] * 3),
           ("recall1", "base-coarse", 0): rows([100, 96, 80])}
    results = {(t, m, r, s): v for (t, m, s), by in got.items() for r, v in by.items()}
    # at 16x, a mean above 0 whose interval is not: 3 records right that truncation gets wrong, 1 the reverse
    results[("recall3", "best-coarse+ae+layout", 16, 0)] = ([1.0] * 23 + [0.0] * 77, [10] * n)
    results[("recall3", "truncation+layout", 16, 0)] = ([1.0] * 20 + [0.0] * 79 + [1.0], [10] * n)
    plateau = [{"model": "best-coarse+layout", "task": "recall3", "seed": 0, "plateau_loss": 0.5,
                "plateau_step": 100, "task_plateau_step": 300, "steps": 2000},
               {"model": "best-coarse+layout", "task": "recall3", "seed": 1, "plateau_loss": 0.5,
                "plateau_step": 100, "task_plateau_step": None, "steps": 2000},
               {"model": "best-coarse+layout", "task": "recall3", "seed": 2, "plateau_loss": 0.5,
                "plateau_step": 100, "task_plateau_step": 120, "steps": 2000},
               {"model": "best-coarse+ae+layout", "task": "recall3", "seed": 0, "plateau_loss": 0.5,
                "plateau_step": 250, "task_plateau_step": "", "steps": 2000},  # (recorded before it)
               {"model": "base-coarse", "task": "mixture", "seed": 0, "plateau_loss": 0.5,
                "plateau_step": 0, "task_plateau_step": 0, "steps": 2000}]  # (one model for every task)
    args = argparse.Namespace(records=n, plateau_loss=0.5)
    lc.write_outputs(tmp_path, results, {"recall3": 33.3, "recall1": 1.0}, plateau, [],
                     {"recall3": 256.0, "recall1": 256.0}, args)
    table = (tmp_path / "table.md").read_text()
    assert "full attention: seed 0 100.0, seed 1 80.0 (under 90)" in table
    assert "of full at least 4x 95%, 8x 90%;" in table
    assert "of full at least 4x 95%, 8x 95%, 16x 85%;" in table
    goal_rows = [row.strip("| ").split(" | ") for row in table.splitlines() if row.startswith("| b")]
    line = {(cells[0], cells[1]): cells[2:] for cells in goal_rows if len(cells) == 6}  # (the goals')
    assert line[("best-coarse+layout", "0")] == [  # 8x: 89.00% of full under the goal's 90
        "96.0% / 89.0% / 50.0%", "+76.0 [+68.0, +84.0]; +69.0 [+60.0, +78.0]; +29.0 [+20.0, +38.0]", "300",
        "8x 89.00% < 90%"]
    # seed 1 against its own full model (80) and its own truncation (15 at 16x); its plateau: never
    assert line[("best-coarse+layout", "1")] == [
        "97.5% / 95.0% / 25.0%", "+58.0 [+49.0, +68.0]; +56.0 [+47.0, +66.0]; +5.0 [+1.0, +10.0]", "never",
        "full 80.0 < 90; never left the plateau"]
    assert line[("best-coarse+layout", "2")] == [
        "- / - / -", "; ".join(["+70.0 [+61.0, +79.0]"] * 3), "120", "no full model for this seed"]
    # a mean above 0 with an interval that is not; a plateau recorded before task_plateau_step
    assert line[("best-coarse+ae+layout", "0")] == [
        "97.0% / 92.0% / 23.0%", "+77.0 [+69.0, +85.0]; +72.0 [+63.0, +80.0]; +2.0 [-2.0, +6.0]", "250",
        "16x vs truncation +2.0 [-2.0, +6.0]"]
    assert line[("base-coarse", "0")] == [  # (recall3's: the last; its plateau recorded under the mixture)
        "99.0% / 98.0% / -", "+79.0 [+71.0, +87.0]; +78.0 [+70.0, +86.0]; -", "0", "16x not evaluated"]
    recall1 = table[table.index("## recall1"):table.index("## recall3")]
    assert ("| base-coarse | 0 | 100.0% / 96.0% / 80.0% | +90.0 [+84.0, +95.0]; +86.0 [+79.0, +92.0]; "
            "+70.0 [+61.0, +78.0] | 0 | 16x 80.00% < 85% |") in recall1
    # nothing missed: none; a task without gist models has no section
    results.update({("recall1", "base-coarse", 16, 0): rows([90] * 3)[16]})
    lc.write_outputs(tmp_path, results, {"recall3": 33.3, "recall1": 1.0}, plateau, [],
                     {"recall3": 256.0, "recall1": 256.0}, args)
    table = (tmp_path / "table.md").read_text()
    assert " | 0 | none |" in table[table.index("## recall1"):table.index("## recall3")]
    only_baselines = {k: v for k, v in results.items() if k[0] == "recall1" and k[1] != "base-coarse"}
    lc.write_outputs(tmp_path, only_baselines, {"recall1": 1.0}, plateau, [], {"recall1": 256.0}, args)
    assert "Against the goals" not in (tmp_path / "table.md").read_text()


def test_a_report_evaluates_recorded_models_on_the_validation_records_they_lack(lc, tmp_path, monkeypatch,
                                                                              capsys):
    """A gist model recorded before every model was evaluated on validation records gets them from
    the report, where its folder and its base's still hold the weights the record names (the
    baselines come from that base); another model's weights under its name, or another base, are
    never evaluated in its place: the report says which and records nothing for it."""
    import torch

    calls = []

    def fake_evaluate_all(ev, task, seed, methods, records, split, args):
        calls.append((task, seed, tuple(methods), split, len(records)))
        for m in [*methods, "full"]:
            ev.get(f"{split}/{task}/{m}/seed{seed}", lambda: {r: ([1.0] * len(records), [9] * len(records))
                                                                for r in lc.RATIOS})

    monkeypatch.setattr(lc, "evaluate_all", fake_evaluate_all)
    runs, out = tmp_path / "runs", tmp_path / "out"
    ev = lc.Evaluations(out / "evaluations.json", {"context_words": [70, 120]})
    digests = {}
    for seed in (0, 1, 2):
        base = _finished_run(lc, runs, f"base-recall3-seed{seed}", {"w": torch.full((2,), float(seed))})
        tuned = _finished_run(lc, runs, f"base-coarse-recall3-seed{seed}",
                              {"w": torch.full((3,), seed + 5.0)})
        digests[seed] = lc.weights_digest(base / "export"), lc.weights_digest(tuned / "export")
        ev.models[f"base-recall3-seed{seed}"] = {"model": "base", "task": "recall3", "seed": seed,
                                                  "weights_sha256": digests[seed][0], "evaluated": True}
        for m in ("base-coarse", "full", "truncation", "no_context"):
            ev.get(f"test/recall3/{m}/seed{seed}", lambda: {r: ([1.0] * 4, [9] * 4) for r in lc.RATIOS})
        ev.models[f"base-coarse-recall3-seed{seed}"] = {
            "model": "base-coarse", "task": "recall3", "seed": seed, "weights_sha256": digests[seed][1],
            "base_sha256": digests[seed][0], "evaluated": True}
    ev.models["base-coarse-recall3-seed1"]["weights_sha256"] = "1" * 64  # another run's weights here
    ev.models["base-coarse-recall3-seed2"]["base_sha256"] = "2" * 64  # fine-tuned from another base
    ev.save()
    args = argparse.Namespace(run_root=runs, out=out, records=4, validation_records=2, train_on="task",
                              context_words=[70, 120], vocabulary="words", plateau_loss=0.25, speed=False,
                              final_seeds=[0, 1, 2])
    lc.report(ev, args)
    printed = capsys.readouterr().out
    assert "base-coarse-recall3-seed0: evaluated on validation records" in printed
    assert ("base-coarse-recall3-seed1: not evaluated on validation records: its folder does not hold the "
            "weights the record names") in printed
    assert ("base-coarse-recall3-seed2: not evaluated on validation records: its base's folder does not hold "
            "the weights the record names") in printed
    assert ("recall3", 0, ("base-coarse",), "validation", 2) in calls
    assert not [c for c in calls if c[1] != 0], calls
    done = json.loads((out / "evaluations.json").read_text())["evaluations"]
    assert sorted(k for k in done if k.startswith("validation/")) == [
        "validation/recall3/base-coarse/seed0", "validation/recall3/full/seed0"]
    assert (out / "validation.csv").read_text().count("recall3,base-coarse,") == 3  # (seed 0's ratios)
    calls.clear()
    lc.report(ev, args)  # nothing left to evaluate on seed 0
    assert not [c for c in calls if c[1] == 0], calls


def test_each_tasks_variant_is_chosen_on_its_validation_records_never_its_test_records(lc, tmp_path):
    """The table names, per task, the gist model with the best validation exact match over the final
    stage's seeds (mean over ratios and records; a model's other seeds left out), with its paired
    interval against the next best; a model missing one of them (an ablation's row) is named, not a
    candidate; validation.csv holds those rows; a task with no validation rows has no choice."""
    n = 100

    def rows(values):  # exact match % per ratio -> (correct, positions) of n records
        return {r: ([1.0] * v + [0.0] * (n - v), [10] * n) for r, v in zip(lc.RATIOS, values)}

    test = {("recall3", "full", s): rows([100] * 3) for s in (0, 1, 3)}
    test |= {("recall3", "best+stage", s): rows([99] * 3) for s in (0, 1, 3)}  # best on the test records
    test |= {("recall3", "best+until", s): rows([90] * 3) for s in (0, 1)}
    test |= {("recall1", "full", 0): rows([100] * 3), ("recall1", "base-coarse", 0): rows([100] * 3)}
    val = {("recall3", "best+stage", 0): rows([90, 90, 84]), ("recall3", "best+stage", 1): rows([80] * 3),
           ("recall3", "best+stage", 3): rows([100] * 3),  # (a seed the final stage did not train: left out)
           ("recall3", "best+until", 0): rows([95, 95, 92]),
           ("recall3", "best+until", 1): rows([85] * 3),
           ("recall3", "best+learn", 0): rows([70] * 3), ("recall3", "best+learn", 1): rows([70] * 3),
           ("recall3", "base-coarse", 0): rows([100] * 3),  # (one seed: the ablation's)
           ("recall3", "full", 0): rows([99] * 3), ("recall3", "full", 1): rows([98] * 3)}
    flat = {(t, m, r, s): v for (t, m, s), by in test.items() for r, v in by.items()}
    flat_val = {(t, m, r, s): v for (t, m, s), by in val.items() for r, v in by.items()}
    args = argparse.Namespace(records=n, plateau_loss=0.5, final_seeds=[0, 1])
    with pytest.raises(ValueError, match="validation results need validation_tokens"):
        lc.write_outputs(tmp_path, flat, {"recall3": 33.3, "recall1": 100.0}, [], [],
                         {"recall3": 256.0, "recall1": 256.0}, args, flat_val)
    lc.write_outputs(tmp_path, flat, {"recall3": 33.3, "recall1": 100.0}, [], [],
                     {"recall3": 256.0, "recall1": 256.0}, args, flat_val, {"recall3": 128.0})
    table = (tmp_path / "table.md").read_text()
    recall3 = table[table.index("## recall3"):]
    assert ("Chosen on validation records (100 per seed, never the test records; exact match %, mean over "
            "seeds 0, 1 and records; the choice: the best mean over ratios):") in recall3
    assert "| best+until | 90.0 | 90.0 | 88.5 | 89.5 | seed 0: 94.0, seed 1: 85.0 |" in recall3
    assert "| best+stage | 85.0 | 85.0 | 82.0 | 84.0 | seed 0: 88.0, seed 1: 80.0 |" in recall3
    assert "| best+learn | 70.0 | 70.0 | 70.0 | 70.0 | seed 0: 70.0, seed 1: 70.0 |" in recall3
    assert recall3.index("| best+until | 90.0") < recall3.index("| best+stage | 85.0") < recall3.index(
        "| best+learn | 70.0")
    assert ("Not candidates (not evaluated at every ratio on every one of these seeds): base-coarse "
            "(seeds 0).") in recall3
    assert "full attention on these records: seed 0 99.0, seed 1 98.0" in recall3
    choice = next(line for line in recall3.splitlines() if line.startswith("The choice: "))
    assert choice.startswith("The choice: best+until (89.5); against the next, best+stage: +5.5 [")
    low = float(choice.split("[")[1].split(",")[0])
    assert 0 < low < 5.5
    recall1 = table[table.index("## recall1"):table.index("## recall3")]
    assert "Chosen on validation" not in recall1  # (no validation rows)
    with open(tmp_path / "validation.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(flat_val) and {r["task"] for r in got} == {"recall3"}
    # (its effective ratio: the validation records' context tokens over its cached positions)
    assert {"method": "best+stage", "ratio": "16", "seed": "0", "exact_match": "84.0",
            "effective_ratio": "12.8"}.items() <= next(
        r for r in got if (r["method"], r["ratio"], r["seed"]) == ("best+stage", "16", "0")).items()


def test_fresh_test_records_are_another_draw_recorded_apart_never_the_validation_records(
        lc, tmp_path, capsys, monkeypatch):
    """--test_records_seed draws other test records (a recipe chosen after its test scores were seen
    is measured again on records nobody looked at): the evaluations use them, the table says so, an
    --out measured on the recorded ones (seed 0, recorded before the setting was) refuses them, and
    the validation records' seed is refused in one line."""
    draws = {s: lc.records_of("recall3", 30, s, (70, 120), "words") for s in (0, 1, 2)}
    texts = {s: [r["instruction"] for r in draws[s]] for s in draws}
    assert not set(texts[2]) & set(texts[0]) and not set(texts[2]) & set(texts[1])
    seen = []
    monkeypatch.setattr(lc, "evaluate_all", lambda ev, task, seed, methods, records, split, args:
                        seen.append((split, [r["instruction"] for r in records])))
    args = argparse.Namespace(train_on="task", records=30, validation_records=30, context_words=[70, 120],
                              vocabulary="words", test_records_seed=2)
    lc.evaluate_splits(None, args, "base-coarse", "recall3", 0)
    assert seen == [("test", texts[2]), ("validation", texts[1])]
    seen.clear()
    lc.evaluate_splits(None, argparse.Namespace(**{**vars(args), "test_records_seed": None}), "base",
                       "recall3", 0)
    assert seen == [("test", texts[0]), ("validation", texts[1])]
    lc.write_outputs(tmp_path / "t", {}, {}, [], [], {}, args)  # (a report before anything is evaluated)
    assert not (tmp_path / "t" / "long_context.png").exists()
    lc.write_outputs(tmp_path / "t", {("recall3", "full", r, 0): ([1.0], [9]) for r in lc.RATIOS},
                     {"recall3": 33.3}, [], [], {"recall3": 256.0}, args)
    assert (tmp_path / "t" / "table.md").read_text().startswith("# Long contexts: recipes by compression "
                                                               "ratio (30 test records per task, drawn from "
                                                               "generator seed 2)")
    # an --out recorded before the setting was (seed 0): the same settings by default, refused with seed 2
    made = []
    real = lc.experiment_settings
    monkeypatch.setattr(lc, "experiment_settings", lambda *a: made.append(real(*a)) or made[-1])
    roots = _final_roots(tmp_path)
    assert lc.main(["--check_args", "--stage", "final", *roots, "--final_seeds", "0"]) == 0
    assert "test_records_seed" not in made[0]
    (tmp_path / "out" / "evaluations.json").write_text(json.dumps(
        {"settings": made[0], "evaluations": {}, "models": {}, "speed": []}))
    capsys.readouterr()
    assert lc.main(["--check_args", "--stage", "final", *roots, "--final_seeds", "0"]) == 0
    assert "measured under other settings" not in capsys.readouterr().out
    assert lc.main(["--check_args", "--stage", "final", *roots, "--final_seeds", "0",
                    "--test_records_seed", "2"]) == 0
    assert "measured under other settings (test_records_seed differ)" in capsys.readouterr().out
    assert made[-1]["test_records_seed"] == 2
    assert lc.main(["--check_args", "--stage", "final", *roots, "--final_seeds", "0",
                    "--test_records_seed", "0"]) == 0  # (0 given: the recorded records, as not given)
    assert "measured under other settings" not in capsys.readouterr().out
    for seed in ("1", "-3"):  # (-3 draws the validation records' generator: random takes |seed|)
        with pytest.raises(SystemExit):
            lc.main(["--stage", "report", *roots, "--test_records_seed", seed])
        assert (f"--test_records_seed must be 0 (the recorded test records) or above 1 (fresh ones); got "
                f"{seed}") in capsys.readouterr().err
    # the report's chance floor and effective ratios come from the fresh records
    ev = lc.Evaluations(tmp_path / "fresh" / "evaluations.json", {"test_records_seed": 2})
    ev.get("test/recall3/full/seed0", lambda: {r: ([1.0] * 30, [9] * 30) for r in lc.RATIOS})
    lc.report(ev, argparse.Namespace(**{**vars(args), "run_root": tmp_path / "none", "speed": False,
                                        "out": tmp_path / "fresh", "plateau_loss": 0.25, "final_seeds": [0]}))
    tok = load_tokenizer("suite")
    tokens = {s: sum(len(encode_text(tok, t)) for t in texts[s]) / 30 for s in (0, 2)}
    assert round(tokens[2] / 9, 2) != round(tokens[0] / 9, 2)
    with open(tmp_path / "fresh" / "results.csv") as f:
        assert float(next(csv.DictReader(f))["effective_ratio"]) == round(tokens[2] / 9, 2)


def test_test_and_validation_records_ask_the_keys_training_asks(lc):
    """The experiment's record sets ask only keys that training asks (keys never asked are the
    fits' validation_unseen): without the filter about a sixth of them would not."""
    from gist_lightning.data.long_recall import asks_unseen_key, unseen_keys

    for task in lc.TASKS:
        for seed in (0, 1):
            records = lc.records_of(task, 120, seed, (20, 40), "words")
            assert len(records) == 120 and not any(asks_unseen_key(r, "words") for r in records)
    first, second = unseen_keys("words")
    assert asks_unseen_key({"input": f"What is the code of {first}?"}, "words")
    assert asks_unseen_key({"input": f"What is the code of what {second} points to?"}, "words")
    assert not asks_unseen_key({"input": "What is the code of apple?"}, "words")


def test_a_task_can_have_its_own_model_and_older_run_folders_still_pass(lc, tmp_path, capsys):
    """--task_model_config two_hop=JSON: two-hop's base and scratch cells build that model, the
    others keep --model_config; a settings.json written before the option existed still passes
    without it and is refused with it; a malformed value is refused naming the option."""
    bigger = {**lc.MODEL, "num_hidden_layers": 8}
    assert lc.main(["--check_args", "--stage", "ablation", *_roots(tmp_path), "--ablation_task",
                    "two_hop", "--ablation_seeds", "0", "--ablation_rows", "scratch",
                    "--task_model_config", f"two_hop={json.dumps(bigger)}"]) == 0
    cells = [line for line in capsys.readouterr().out.splitlines() if ": new;" in line]
    built = {line.split(":")[0]: line for line in cells if "--model.model_config {" in line or
             "--model.model_config '{" in line}
    assert sorted(built) == ["base-two_hop-seed0", "scratch-coarse-two_hop-seed0"], cells
    assert all('"num_hidden_layers": 8' in line for line in built.values())
    args = argparse.Namespace(model_config=lc.MODEL, task_model_configs={"two_hop": bigger})
    assert lc.model_config_of("two_hop", args) == bigger and lc.model_config_of("recall3", args) == lc.MODEL
    older = {k: None for k in lc.TRAINING_SETTINGS if k != "task_model_configs"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "settings.json").write_text(json.dumps(older))
    none = {k: None for k in lc.TRAINING_SETTINGS}
    lc.check_run_root(tmp_path / "old", none)
    # a model for a task nothing was trained on yet (here the folder holds a 3-fact base): accepted and
    # recorded, so two-hop's model can be chosen after the 3-fact ablation ran; another model for a
    # task that was trained is refused, in the run folder and in the evaluations alike
    (tmp_path / "old" / "base-recall3-seed0").mkdir()
    lc.check_run_root(tmp_path / "old", none | {"task_model_configs": {"two_hop": bigger}})
    assert json.loads((tmp_path / "old" / "settings.json").read_text())["task_model_configs"] == {
        "two_hop": bigger}
    both = {"two_hop": bigger, "recall3": bigger}
    with pytest.raises(SystemExit, match="task_model_configs differ"):
        lc.check_run_root(tmp_path / "old", none | {"task_model_configs": both})
    (tmp_path / "old" / "base-two_hop-seed0").mkdir()
    with pytest.raises(SystemExit, match="task_model_configs differ"):
        lc.check_run_root(tmp_path / "old", none)
    ev = lc.Evaluations(tmp_path / "ev.json", {"task_model_configs": None})
    ev.models["base-recall3-seed0"] = {"task": "recall3"}
    ev.save()
    added = lc.Evaluations(tmp_path / "ev.json", {"task_model_configs": {"two_hop": bigger}})
    added.save()
    recorded = json.loads((tmp_path / "ev.json").read_text())["settings"]
    assert recorded["task_model_configs"] == {"two_hop": bigger}
    with pytest.raises(SystemExit, match="task_model_configs differ"):
        lc.Evaluations(tmp_path / "ev.json", {"task_model_configs": both})
    with pytest.raises(SystemExit):
        lc.main(["--check_args", *_roots(tmp_path), "--task_model_config", "two_hop={nope"])
    assert "--task_model_config: two_hop: its config is not JSON" in capsys.readouterr().err


def test_a_per_training_value_that_is_malformed_is_refused_naming_what(lc):
    """--task_model_config / --task_base_args: TRAINING=JSON, the training one the experiment trains,
    the JSON of the option's kind; each malformed value refused in one line saying what is wrong."""
    assert lc.per_training('two_hop={"num_hidden_layers": 8}') == ("two_hop", {"num_hidden_layers": 8})
    assert lc.per_training('two_hop=["--a", "1"]', list) == ("two_hop", ["--a", "1"])
    for text, kind, message in [
        ('{"num_hidden_layers": 8}', dict, "expected TRAINING=JSON, TRAINING one of recall1, recall3,"),
        ('nine={"num_hidden_layers": 8}', dict, "expected TRAINING=JSON"),
        ("two_hop=[1]", dict, "two_hop: its config must be a JSON object"),
        ('two_hop={"a": 1}', list, "two_hop: its argument list must be a JSON list of strings"),
        ('two_hop=["--a", 1]', list, "two_hop: its arguments must be strings"),
        ("two_hop=[", list, r"two_hop: its argument list is not JSON \("),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            lc.per_training(text, kind)


def _finished_run(lc, root, name, weights, steps=(49, 99), cpu=None):
    """A cell folder as a finished fit leaves it: done.json, metrics.csv and an export's weights (and
    attempts.json naming the CPU it trained on, if given)."""
    from safetensors.torch import save_file

    run = root / name / "run"
    (run / "export").mkdir(parents=True)
    save_file(weights, str(run / "export" / "model.safetensors"))
    (run / "done.json").write_text(json.dumps({"name": name, "minutes": 3.5, "attempts": 1}))
    stages = [{"max_steps": 60}, {"max_steps": 10 * len(steps)}]
    (root / name / "cell.json").write_text(json.dumps({"name": name, "stages": stages}))
    rows = "".join(f"0,{s},{1.0 / (i + 1) ** 2}\n" for i, s in enumerate(steps))
    (run / "metrics.csv").write_text("epoch,step,train/loss\n" + rows)
    if cpu:
        (root / name / "attempts.json").write_text(json.dumps([{"minutes": 3.5, "host": "h", "cpu": cpu}]))
    return run


def test_each_finished_model_is_evaluated_at_once_and_a_fresh_machine_trains_only_the_rest(
        lc, tmp_path, monkeypatch, capsys):
    """A sitting's run folders may not outlive its machine, so a finished model is evaluated when it
    finishes (on test and validation records, on every task it answers), its training and weights'
    digest recorded in evaluations.json (committed). A later sitting with no run folders trains only
    what that file does not hold, and a base it needs again must come out bit for bit the base the
    recorded models were fine-tuned from, or the sweep stops naming both digests, nothing changed."""
    import torch

    calls = []

    def fake_evaluate_all(ev, task, seed, methods, records, split, args):
        calls.append((task, seed, tuple(methods), split, len(records)))
        for m in [*methods, "full"]:
            ev.get(f"{split}/{task}/{m}/seed{seed}", lambda: {4: ([1.0] * len(records), [9] * len(records))})

    monkeypatch.setattr(lc, "evaluate_all", fake_evaluate_all)
    runs, out = tmp_path / "runs", tmp_path / "out"
    args = argparse.Namespace(run_root=runs, train_on="task", ablation_task="recall3", records=6,
                              validation_records=4, context_words=[70, 120], vocabulary="words",
                              plateau_loss=0.6)
    ev = lc.Evaluations(out / "evaluations.json", {"context_words": [70, 120]})
    base_weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    _finished_run(lc, runs, "base-recall3-seed0", base_weights, cpu="AMD EPYC 7B13")
    _finished_run(lc, runs, "base-coarse-recall3-seed0", {"w": torch.zeros(2, 3)}, steps=(49, 99, 149))
    lc.record_model(ev, args, "base-recall3-seed0")
    lc.record_model(ev, args, "base-coarse-recall3-seed0")
    # test and validation records; the base alone evaluates its baselines
    coarse = ("base-coarse",)
    assert calls == [("recall3", 0, (), "test", 6), ("recall3", 0, (), "validation", 4),
                     ("recall3", 0, coarse, "test", 6), ("recall3", 0, coarse, "validation", 4)]
    tuned = ev.models["base-coarse-recall3-seed0"]
    assert tuned["evaluated"] and tuned["steps"] == 30 and tuned["plateau_step"] == 99
    assert tuned["plateau_loss"] == 0.6 and tuned["end_loss"] == pytest.approx(0.4537, abs=1e-4)
    assert tuned["task_plateau_step"] == 99  # (its last stage starts at step 60)
    base_digest = ev.models["base-recall3-seed0"]["weights_sha256"]
    assert tuned["base_sha256"] == base_digest != tuned["weights_sha256"]
    assert ev.models["base-recall3-seed0"]["cpus"] == ["AMD EPYC 7B13"] and "cpus" not in tuned  # (not named)
    assert lc.weights_digest(runs / "base-recall3-seed0" / "run" / "export") == tuned["base_sha256"]
    # the chain's models: its test and validation records (a final variant is chosen on them too) and
    # its own plateau threshold (words: half of 0.6)
    calls.clear()
    _finished_run(lc, runs, "base-two_hop_chain-seed0", base_weights, steps=(49, 99, 149))  # 1, .25, .11
    lc.record_model(ev, args, "base-two_hop_chain-seed0")
    assert calls == [("two_hop_chain", 0, (), "test", 6), ("two_hop_chain", 0, (), "validation", 4)]
    assert ev.models["base-two_hop_chain-seed0"]["plateau_step"] is None  # (ended at 0.45: over 0.3)
    assert ev.models["base-two_hop_chain-seed0"]["plateau_loss"] == 0.3
    # a mixture's models are asked every task they were trained for, not the chain's
    calls.clear()
    _finished_run(lc, runs, "base-mixture-seed0", base_weights)
    mixed = lc.Evaluations(tmp_path / "mixed" / "evaluations.json", {"context_words": [70, 120]})
    lc.record_model(mixed, argparse.Namespace(**{**vars(args), "train_on": "mixture"}), "base-mixture-seed0")
    assert [c[0] for c in calls if c[3] == "test"] == ["recall1", "recall3", "two_hop"], calls
    assert [c[0] for c in calls if c[3] == "validation"] == ["recall1", "recall3", "two_hop"], calls

    # a fresh machine: the run folders are gone; what evaluations.json holds is not trained again
    later = lc.Evaluations(out / "evaluations.json", {"context_words": [70, 120]})
    bases = [lc.Cell(f"base-recall3-seed{s}", ()) for s in (0, 1)]
    tuned_cells = [lc.Cell(f"base-{p}-recall3-seed{s}", (), needs=(f"base-recall3-seed{s}",))
                   for s in (0, 1) for p in ("coarse", "fine")]
    todo = [c.name for c in lc.still_to_train(bases + tuned_cells, later)]
    # seed 0's base trains again, for its fine model; seed 1: everything
    assert todo == ["base-recall3-seed0", "base-recall3-seed1", "base-fine-recall3-seed0",
                    "base-coarse-recall3-seed1", "base-fine-recall3-seed1"]
    only_coarse = [c.name for c in lc.still_to_train(bases[:1] + tuned_cells[:1], later)]
    assert only_coarse == []  # nothing left that needs seed 0's base: not trained again
    real_sweep = lc.sweep
    monkeypatch.setattr(lc, "sweep", lambda *a, **k: pytest.fail("nothing was left to train"))
    lc.run_or_list(bases[:1] + tuned_cells[:1], argparse.Namespace(check_args=False), [], later)
    assert "base-coarse-recall3-seed0: evaluated in" in capsys.readouterr().out

    # seed 0's base trained again, bit for bit: passes; a different one stops, the file unchanged
    import shutil

    shutil.rmtree(runs)
    _finished_run(lc, runs, "base-recall3-seed0", dict(base_weights), cpu="AMD EPYC 7B13")
    lc.record_model(later, args, "base-recall3-seed0")
    before = (out / "evaluations.json").read_text()
    shutil.rmtree(runs)
    _finished_run(lc, runs, "base-recall3-seed0", {**base_weights, "b": torch.ones(2) + 1e-6},
                  cpu="Intel(R) Xeon(R) Processor")
    with pytest.raises(SystemExit, match=r"base-recall3-seed0: its weights now \(sha256 \w{16}\) differ from "
                                         r"those .*evaluations.json records \(\w{16}\).*the same CPU type: .*"
                                         r"it trained on Intel\(R\) Xeon\(R\) Processor, the record's on "
                                         r"AMD EPYC 7B13\)"):
        lc.record_model(later, args, "base-recall3-seed0")
    assert (out / "evaluations.json").read_text() == before
    del later.models["base-recall3-seed0"]["cpus"]  # recorded before models named their CPU
    (runs / "base-recall3-seed0" / "attempts.json").unlink()  # and trained before attempts did
    with pytest.raises(SystemExit, match=r"it trained on a CPU its attempts do not name \(this machine: "
                                         r"\S.*\), the record's on a CPU the record does not name\)"):
        lc.record_model(later, args, "base-recall3-seed0")
    # in a sweep, that stop is the engine's SweepStopped (it stops starting cells, the log says why)
    launch = argparse.Namespace(**vars(args), retries=0, launcher="local", cells_at_once=1,
                                devices_per_cell=0, threads_per_cell=1)
    sw = real_sweep([bases[0]], launch, [], later)
    with pytest.raises(lc.SweepStopped, match="differ from"):
        sw.on_finished({"name": "base-recall3-seed0"})
    # any other failure of an evaluation stops the sweep too (its running cells go on), never the driver
    monkeypatch.setattr(lc, "weights_digest", lambda export: 1 / 0)
    with pytest.raises(lc.SweepStopped, match="base-recall3-seed0: its evaluation failed: ZeroDivisionError"):
        sw.on_finished({"name": "base-recall3-seed0"})
    monkeypatch.undo()
    (runs / "base-recall3-seed0" / "run" / "export" / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match="no \\*.safetensors weights"):  # never the digest of nothing
        lc.weights_digest(runs / "base-recall3-seed0" / "run" / "export")


def test_the_report_leaves_out_tasks_it_does_not_know_and_gives_each_models_threshold(lc, tmp_path, capsys):
    """evaluations.json may hold a task that a newer version of the script recorded (a second driver
    started later): the report writes everything else and names what it left out. Each model's plateau
    threshold is the one recorded with it (an older record without one: the current one)."""
    settings = {"context_words": [70, 120]}
    ev = lc.Evaluations(tmp_path / "out" / "evaluations.json", settings)
    for task in ("recall3", "four_hop"):
        for m in ("base-coarse", "truncation", "full", "no_context"):
            ev.get(f"test/{task}/{m}/seed0", lambda: {r: ([1.0, 0.0], [9, 9]) for r in lc.RATIOS})
    ev.models["base-coarse-recall3-seed0"] = {"model": "base-coarse", "task": "recall3", "seed": 0,
                                              "plateau_step": 99, "steps": 500}
    ev.models["base-coarse+short-recall3-seed0"] = {"model": "base-coarse+short", "task": "recall3",
                                                    "seed": 0, "plateau_step": 99, "steps": 500,
                                                    "evaluated": True}
    ev.models["base-coarse-two_hop_chain-seed0"] = {"model": "base-coarse", "task": "two_hop_chain",
                                                    "seed": 0, "plateau_loss": 0.07, "plateau_step": None,
                                                    "steps": 500}
    ev.models["base-coarse-four_hop-seed0"] = {"model": "base-coarse", "task": "four_hop", "seed": 0}
    ev.save()
    args = argparse.Namespace(run_root=tmp_path / "runs", out=tmp_path / "out", records=4,
                              validation_records=2, train_on="task", context_words=[70, 120],
                              vocabulary="words", plateau_loss=0.25, speed=False)
    (tmp_path / "runs").mkdir()
    # recorded before end losses were, its folder still here: under 0.25 on the short contexts, back on
    # the plateau on the task's, so it never left it
    run = _finished_run(lc, tmp_path / "runs", "base-coarse+short-recall3-seed0", {}, steps=(49, 99))
    (run.parent / "cell.json").write_text(json.dumps({"stages": [{"max_steps": 100}, {"max_steps": 300}]}))
    # one whose metrics.csv is gone: its record stays as it was
    ev.models["base-fine-recall3-seed0"] = {"model": "base-fine", "task": "recall3", "seed": 0,
                                            "plateau_step": 299, "steps": 500, "evaluated": True}
    ev.save()
    (_finished_run(lc, tmp_path / "runs", "base-fine-recall3-seed0", {}) / "metrics.csv").unlink()
    (run / "metrics.csv").write_text("epoch,step,train/loss\n" + "".join(
        f"0,{s},{v}\n" for s, v in ((49, 0.9), (99, 0.1), (149, 1.1), (199, 1.2), (249, 1.2), (299, 1.3))))
    lc.report(ev, args)
    assert "tasks this version does not know: ['four_hop']" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "out" / "evaluations.json").read_text())["models"]
    short = recorded["base-coarse+short-recall3-seed0"]
    assert short["plateau_step"] is None and short["end_loss"] == pytest.approx(1.2)
    assert short["task_plateau_step"] is None  # (from step 100 on: never under 0.25)
    assert recorded["base-fine-recall3-seed0"] == ev.models["base-fine-recall3-seed0"]
    assert "end_loss" not in recorded["base-fine-recall3-seed0"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "## recall3" in table and "four_hop" not in table
    assert "| base-coarse | recall3 | 0 | 0.25 | 99 | - | - | 500 |" in table  # (recorded without one)
    assert "| base-coarse | two_hop_chain | 0 | 0.07 | never | - | - | 500 |" in table  # (its own, not 0.125)
    assert "| base-coarse+short | recall3 | 0 | 0.25 | never | never | 1.200 | 500 |" in table
    assert "| base-fine | recall3 | 0 | 0.25 | 299 | - | - | 500 |" in table
    assert "four_hop" in (tmp_path / "out" / "evaluations.json").read_text()  # kept for the newer version


def test_a_report_refreshes_a_records_training_fields_only_from_its_own_run(lc, tmp_path, capsys):
    """A recorded model whose folder is here gets its plateau fields recomputed, but never from a run
    with other weights under its name, and never a task plateau step guessed from max_steps (its
    short stage's export gone) over the recorded one."""
    import torch

    ev = lc.Evaluations(tmp_path / "out" / "evaluations.json", {"context_words": [70, 120]})
    for m in ("base-coarse+learn", "truncation", "full", "no_context"):
        ev.get(f"test/recall3/{m}/seed0", lambda: {r: ([1.0, 0.0], [9, 9]) for r in lc.RATIOS})
    runs = tmp_path / "runs"
    run = _finished_run(lc, runs, "base-coarse+learn-recall3-seed0", {"w": torch.ones(2)},
                        steps=(49, 99, 149, 199, 249, 299))  # losses 1, 1/4, 1/9...: under 0.25 from 149
    digest = lc.weights_digest(run / "export")
    record = {"model": "base-coarse+learn", "task": "recall3", "seed": 0, "plateau_loss": 0.25,
              "plateau_step": 99, "task_plateau_step": 99, "end_loss": 0.9, "steps": 300, "evaluated": True}
    ev.models["base-coarse+learn-recall3-seed0"] = dict(record, weights_sha256="0" * 64)  # another run's
    ev.save()
    args = argparse.Namespace(run_root=runs, out=tmp_path / "out", records=4, validation_records=2,
                              train_on="task", context_words=[70, 120], vocabulary="words", plateau_loss=0.25,
                              speed=False)
    lc.report(ev, args)
    assert "holds other weights than the record's" in capsys.readouterr().out
    assert ev.models["base-coarse+learn-recall3-seed0"]["end_loss"] == 0.9  # kept
    # its own run: the end loss refreshed; its stage-0 export gone, the task step stays the recorded one
    ev.models["base-coarse+learn-recall3-seed0"] = dict(record, weights_sha256=digest)
    lc.report(ev, args)
    refreshed = ev.models["base-coarse+learn-recall3-seed0"]
    assert refreshed["end_loss"] == pytest.approx((1 / 9 + 1 / 16 + 1 / 25 + 1 / 36) / 4, abs=1e-4)
    assert refreshed["task_plateau_step"] == 99  # (max_steps 60 would have given 149)
    # with the export of stage 0 (stopped at step 200): the step is read, and recomputed from there
    (run / "export-stage0").mkdir()
    (run / "export-stage0" / "gist_config.json").write_text(json.dumps({"source": {"global_step": 200}}))
    lc.report(ev, args)
    assert ev.models["base-coarse+learn-recall3-seed0"]["task_plateau_step"] == 249


def test_two_processes_recording_evaluations_lose_nothing(lc, tmp_path):
    """The driver and a report (or two drivers on other run folders with one --out) each write
    evaluations.json as they go: each save merges what the other wrote meanwhile."""
    path, settings = tmp_path / "evaluations.json", {"context_words": [70, 120]}
    driver, report = lc.Evaluations(path, settings), lc.Evaluations(path, settings)
    driver.get("test/recall3/base-coarse/seed0", lambda: {4: ([1.0], [9])})
    report.get("test/recall3/base-fine/seed0", lambda: {4: ([0.0], [9])})
    report.models["base-fine-recall3-seed0"] = {"evaluated": True}
    report.save()
    driver.models["base-coarse-recall3-seed0"] = {"evaluated": True}
    driver.save()
    later = lc.Evaluations(path, settings)
    assert sorted(later.done) == ["test/recall3/base-coarse/seed0", "test/recall3/base-fine/seed0"]
    assert sorted(later.models) == ["base-coarse-recall3-seed0", "base-fine-recall3-seed0"]
    # two processes that both found no file, under other settings (fresh test records): never merged
    fresh, recorded = tmp_path / "fresh.json", {"context_words": [70, 120], "records": 200}
    first = lc.Evaluations(fresh, recorded)
    second = lc.Evaluations(fresh, {**recorded, "test_records_seed": 2})
    first.get("test/recall3/base-coarse/seed0", lambda: {4: ([1.0], [9])})
    before = fresh.read_text()
    with pytest.raises(SystemExit, match=r"fresh.json: written meanwhile under other settings \("
                                         r"test_records_seed differ\); nothing of this process's was added"):
        second.get("test/recall3/base-coarse/seed0", lambda: {4: ([0.0], [9])})
    assert fresh.read_text() == before


def test_two_drivers_with_their_own_models_keep_each_others_settings(lc, tmp_path):
    """The 3-fact driver (no task model) and the two-hop bases' driver (its own model) record into one
    evaluations.json: whichever saves last, the two-hop model stays recorded, so a later sitting with
    the two-hop model is accepted and one without it is refused (its two-hop base is recorded)."""
    path, bigger = tmp_path / "evaluations.json", {"hidden_size": 256}
    threefact = lc.Evaluations(path, {"context_words": [70, 120], "task_model_configs": None})
    twohop = lc.Evaluations(path, {"context_words": [70, 120], "task_model_configs": {"two_hop": bigger}})
    twohop.models["base-two_hop-seed0"] = {"task": "two_hop"}
    twohop.save()
    threefact.models["base-recall3-seed0"] = {"task": "recall3"}
    threefact.save()  # the last writer
    assert json.loads(path.read_text())["settings"]["task_model_configs"] == {"two_hop": bigger}
    lc.Evaluations(path, {"context_words": [70, 120], "task_model_configs": {"two_hop": bigger}})
    with pytest.raises(SystemExit, match="task_model_configs differ"):
        lc.Evaluations(path, {"context_words": [70, 120], "task_model_configs": None})
    # a writer opened before another recorded a two-hop base under the default model (no entry) may
    # not relabel that base as trained with its own model when it saves
    second = tmp_path / "second.json"
    late = lc.Evaluations(second, {"context_words": [70, 120], "task_model_configs": {"two_hop": bigger}})
    default = lc.Evaluations(second, {"context_words": [70, 120], "task_model_configs": None})
    default.models["base-two_hop-seed0"] = {"task": "two_hop"}
    default.save()
    with pytest.raises(SystemExit, match="two_hop was trained with another task_model_configs entry"):
        late.save()
    assert json.loads(second.read_text())["settings"]["task_model_configs"] is None
    other = lc.Evaluations(path, {"context_words": [70, 120], "task_model_configs": {"two_hop": bigger}})
    other.settings["task_model_configs"] = {"two_hop": {"hidden_size": 512}}  # (as a clash met while running)
    with pytest.raises(SystemExit, match="two_hop was trained with another task_model_configs entry"):
        other.save()


def test_a_tasks_bases_take_their_own_fit_arguments(lc, tmp_path, capsys):
    """--task_base_args two_hop='[...]' reaches two-hop's bases alone (not its gist models, not
    another task's base); it is a per-task setting, accepted for a task nothing was trained on yet,
    refused for one that was; a value that is not a JSON list of strings is refused naming it."""
    hops = ["--data.init_args.hop_questions", "0.5"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "choice.json").write_text(json.dumps({"placement": "coarse", "variant": "base"}))
    assert lc.main(["--check_args", "--stage", "final", *_roots(tmp_path), "--tasks", "two_hop", "recall3",
                    "--final_seeds", "0", "--task_base_args", f"two_hop={json.dumps(hops)}"]) == 0
    cells = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines() if ": new;" in line}
    assert sorted(cells) == ["base-coarse-recall3-seed0", "base-coarse-two_hop-seed0", "base-recall3-seed0",
                             "base-two_hop-seed0"], cells
    assert "--data.init_args.hop_questions 0.5" in cells["base-two_hop-seed0"]
    assert not any("hop_questions" in cells[c] for c in cells if c != "base-two_hop-seed0")
    args = argparse.Namespace(task_base_args={"two_hop": hops})
    (tmp_path / "r").mkdir()
    none = {k: None for k in lc.TRAINING_SETTINGS}
    lc.check_run_root(tmp_path / "r", none)
    (tmp_path / "r" / "base-recall3-seed0").mkdir()
    lc.check_run_root(tmp_path / "r", none | {"task_base_args": args.task_base_args})  # two-hop: untrained
    (tmp_path / "r" / "base-two_hop-seed0").mkdir()
    with pytest.raises(SystemExit, match="task_base_args differ"):
        lc.check_run_root(tmp_path / "r", none)
    bad_values = (('two_hop={"a": 1}', "argument list must be a JSON list of strings"),
                  ("two_hop=[1]", "must be strings"), ("two_hop=[nope", "argument list is not JSON"))
    for bad, why in bad_values:
        with pytest.raises(SystemExit):
            lc.main(["--check_args", *_roots(tmp_path), "--task_base_args", bad])
        err = capsys.readouterr().err
        assert "--task_base_args: two_hop: its" in err and why in err, err
    for flag, value in (("--task_base_args", f"two_hop={json.dumps(hops)}"),
                        ("--task_model_config", "two_hop={}")):
        with pytest.raises(SystemExit):  # given twice: refused, not the last kept
            lc.main(["--check_args", *_roots(tmp_path), flag, value, flag, value])
        assert f"{flag} names two_hop more than once" in capsys.readouterr().err


def test_the_final_variant_is_the_best_on_validation_the_combination_only_a_candidate(lc, monkeypatch):
    """Additions need not add up: the final stage takes whichever of the plain placement, each
    addition and their combination answers best on validation (over seeds and ratios), not the
    combination because it was built; on a tie, the first listed."""
    table = {"base-coarse": (0.4, 0.9), "base-coarse+layout": (0.6, 0.95),  # exact match of seeds 0 and 1
             "base-coarse+importance": (0.9, 0.9), "best-coarse+layout+importance": (0.5, 0.97)}

    def fake_evaluate_all(ev, task, seed, methods, records, split, args):
        assert split == "validation" and task == "recall3"
        return {(m, r): ([table[m][seed]], [9]) for m in methods for r in lc.RATIOS}

    monkeypatch.setattr(lc, "evaluate_all", fake_evaluate_all)
    candidates = ["base", "base+layout", "base+importance", "best+layout+importance"]
    choose = functools.partial(lc.choose_variant, None, "recall3", [0, 1], "coarse", candidates, [], None)
    variant, means = choose()
    assert variant == "base+importance" and means["base-coarse+importance"] == 90.0, means
    assert means["best-coarse+layout+importance"] == 73.5
    table["best-coarse+layout+importance"] = (0.9, 0.95)
    assert choose()[0] == "best+layout+importance"
    table["base-coarse"] = (0.925, 0.925)  # a tie with the combination: the first listed
    assert choose()[0] == "base"


def _tune_args(lc, tmp_path) -> argparse.Namespace:
    """The driver's arguments a fine-tuned gist cell reads (16-token segments, words, 1000 steps)."""
    return argparse.Namespace(run_root=tmp_path, context_words=[70, 120], tune_steps=1000, scratch_steps=2000,
                              model_config=lc.MODEL, task_model_configs=None, task_base_args=None,
                              segment_tokens=16, train_batch_size=32, tune_learning_rate=3e-4,
                              train_context_words=None, train_on="task", vocabulary="words",
                              tune_restate=0.0, tune_context_weight=0.0, tune_short_steps=None,
                              base_short_words=[6, 12], plateau_loss=0.25)


def test_the_short_row_spends_part_of_the_same_steps_on_the_short_contexts(lc, tmp_path):
    """+short: SHORT_TUNE_STEPS of the fine-tuning's steps on the bases' short contexts, then the
    rest on the task's: as many steps as every other row, no other argument; combinable."""
    args = _tune_args(lc, tmp_path)
    plain, short = (lc.gist_cell(v, "coarse", "recall3", 0, args) for v in ("base", "base+short"))
    assert [s.max_steps for s in plain.stages] == [1000]
    assert [s.max_steps for s in short.stages] == [lc.SHORT_TUNE_STEPS, 1000]
    assert json.loads(_value(list(short.stages[0].args), "--data.init_args.context_words")) == [6, 12]
    assert short.args == plain.args and short.name == "base-coarse+short-recall3-seed0"
    both = lc.gist_cell("best+layout+short", "coarse", "recall3", 0, args)
    assert [s.max_steps for s in both.stages] == [lc.SHORT_TUNE_STEPS, 1000]
    assert "--model.segments.sink_tokens" in both.args
    assert not any("StopWhenLearned" in a for s in short.stages for a in s.args)


def test_the_learn_row_keeps_to_the_short_contexts_until_the_lookup_is_learned(lc, tmp_path):
    """+learn: the short stage ends once the answer loss's mean over LEARN_WINDOW steps is under the
    task's plateau threshold (LEARN_CAP steps at most), watching the answer's own loss where
    objectives add terms to the loss; the task's stage then runs to LEARN_CAP + 600 steps."""
    args = _tune_args(lc, tmp_path)
    learn = lc.gist_cell("best+layout+ae+short+learn", "coarse", "two_hop_chain", 0, args)
    assert [s.max_steps for s in learn.stages] == [lc.LEARN_CAP, lc.LEARN_CAP + 600]
    first = list(learn.stages[0].args)
    assert "--trainer.callbacks+=gist_lightning.curriculum.StopWhenLearned" in first
    assert _value(first, "--trainer.callbacks.monitor") == "train/lm_loss"  # (+ae: the loss has terms)
    assert float(_value(first, "--trainer.callbacks.below")) == lc.plateau_loss("two_hop_chain", args)
    assert _value(first, "--trainer.callbacks.window") == str(lc.LEARN_WINDOW)
    assert json.loads(_value(first, "--data.init_args.context_words")) == [6, 12]
    plain = lc.gist_cell("base+learn", "coarse", "recall3", 0, args)
    assert _value(list(plain.stages[0].args), "--trainer.callbacks.monitor") == "train/loss"
    assert float(_value(list(plain.stages[0].args), "--trainer.callbacks.below")) == 0.25


def test_the_until_row_learns_at_a_constant_rate_then_decays_on_the_task(lc, tmp_path):
    """+until: +learn's curriculum, the short stage at a constant learning rate after warmup (so the
    step it learns at does not depend on its cap), UNTIL_CAP steps at most, then the task's contexts
    under the config's schedule up to UNTIL_STEPS; it takes +short's and +learn's place; no
    ablation row by default, named for a task's final models by --final_variant."""
    args = _tune_args(lc, tmp_path)
    learn, until = (lc.gist_cell(v, "coarse", "two_hop_chain", 0, args)
                    for v in ("best+layout+ae+short+learn", "best+layout+ae+short+until"))
    assert until.name == "best-coarse+layout+ae+short+until-two_hop_chain-seed0" and until.args == learn.args
    assert [s.max_steps for s in until.stages] == [lc.UNTIL_CAP, lc.UNTIL_STEPS] == [2000, 2400]
    first, last = list(until.stages[0].args), list(until.stages[1].args)
    assert _value(first, "--model.scheduler") == "constant_with_warmup"
    assert "--model.scheduler" not in last and "--model.scheduler" not in until.args  # (tiny.yaml's cosine)
    assert first[:len(learn.stages[0].args)] == list(learn.stages[0].args)  # the same stop, data
    assert "--model.scheduler" not in learn.stages[0].args
    assert _value(first, "--trainer.callbacks.monitor") == "train/lm_loss"
    with pytest.raises(ValueError, match=r"\+learn and \+until are curricula for one stage"):
        lc.gist_cell("best+layout+learn+until", "coarse", "two_hop_chain", 0, args)
    got = lc.final_variant("two_hop_chain=best+layout+short+until")
    assert got == ("two_hop_chain", "best+layout+short+until")
    assert lc.final_variant("recall1=base+until") == ("recall1", "base+until")
    for bad, said in (("two_hop_chain=best+layout+slow", r"\+slow is not one of its additions"),
                      ("chain=base", "TRAINING one of"), ("two_hop_chain=scratch", "neither with base"),
                      ("two_hop_chain=base+ae+ae", "named twice"),
                      ("two_hop_chain=base+budget", r"\+budget is not one"),  # a control, not a recipe
                      ("two_hop_chain=best+ae+learn+until", "curricula for one stage"),
                      ("two_hop_chain=best+ae+until+stage", "curricula for one stage"),
                      ("two_hop_chain=best+until", "best two or more"),
                      ("two_hop_chain=base+ae+until", "base takes one addition")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            lc.final_variant(bad)


def _final_roots(tmp_path) -> list[str]:
    """--run_root and --out of a final stage whose ablation chose base+ae on coarse (choice.json)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "choice.json").write_text(json.dumps({"placement": "coarse", "variant": "base+ae"}))
    return ["--run_root", str(tmp_path), "--out", str(tmp_path / "out")]


def _checked_cells(lc, tmp_path, capsys, variant: str) -> str:
    """What --check_args prints for the final stage of two_hop_chain, seed 0, training ``variant``."""
    assert lc.main(["--check_args", "--stage", "final", *_final_roots(tmp_path), "--final_seeds", "0",
                    "--tasks", "two_hop_chain", "--final_variant", f"two_hop_chain={variant}"]) == 0
    return capsys.readouterr().out


def test_the_stage_row_gives_the_task_stage_its_own_steps_and_schedule(lc, tmp_path, capsys):
    """+stage: +until's short stage, then STAGE_STEPS on the task's contexts from the step it stopped
    at (Stage(steps=...)), validated at their end, under a schedule of their own at STAGE_RATE of the
    fine-tuning rate; the sweep's check passes its arguments."""
    args = _tune_args(lc, tmp_path)
    until, staged = (lc.gist_cell(v, "coarse", "two_hop_chain", 0, args)
                     for v in ("best+layout+ae+short+until", "best+layout+ae+short+stage"))
    assert staged.stages[0] == until.stages[0] and staged.args == until.args
    last = staged.stages[1]
    assert last.max_steps is None and last.steps == lc.STAGE_STEPS
    assert _value(list(last.args), "--trainer.val_check_interval") == "{max_steps}"
    assert _value(list(last.args), "--model.stage_schedule") == "true"
    assert float(_value(list(last.args), "--model.learning_rate")) == lc.STAGE_RATE * args.tune_learning_rate
    got = lc.final_variant("two_hop_chain=best+layout+short+stage")
    assert got == ("two_hop_chain", "best+layout+short+stage")
    assert "+stage" in lc.LATER  # (not an ablation row by default)
    printed = _checked_cells(lc, tmp_path, capsys, "best+layout+short+stage")
    assert "best-coarse+layout+short+stage-two_hop_chain-seed0: new; 1500 more steps" in printed


def test_the_longstage_row_is_the_stage_row_with_a_longer_task_stage(lc, tmp_path, capsys):
    """+longstage: +stage's short stage, arguments and schedule, LONG_STAGE_STEPS on the task's
    contexts; a curriculum like the others (never with one of them); not an ablation row by default."""
    args = _tune_args(lc, tmp_path)
    staged, longer = (lc.gist_cell(v, "coarse", "two_hop_chain", 0, args)
                      for v in ("best+layout+ae+short+stage", "best+layout+ae+short+longstage"))
    assert longer.stages[0] == staged.stages[0] and longer.args == staged.args
    assert longer.stages[1].args == staged.stages[1].args
    assert (staged.stages[1].steps, longer.stages[1].steps) == (lc.STAGE_STEPS, lc.LONG_STAGE_STEPS)
    assert lc.LONG_STAGE_STEPS > lc.STAGE_STEPS and "+longstage" in lc.LATER
    assert longer.name == "best-coarse+layout+ae+short+longstage-two_hop_chain-seed0"
    with pytest.raises(argparse.ArgumentTypeError, match="curricula for one stage"):
        lc.final_variant("two_hop_chain=best+ae+stage+longstage")
    printed = _checked_cells(lc, tmp_path, capsys, "best+layout+short+longstage")
    assert f"best-coarse+layout+short+longstage-two_hop_chain-seed0: new; {lc.LONG_STAGE_STEPS} more steps" \
        in printed


def test_the_final_variant_of_one_task_replaces_the_chosen_one_there_alone(lc, tmp_path, capsys):
    """--final_variant TRAINING=VARIANT: that task's final gist models train VARIANT, the other tasks'
    the chosen one; naming a training the stage does not train, or another stage, is refused."""
    roots = _final_roots(tmp_path)
    assert lc.main(["--check_args", "--stage", "final", *roots, "--final_seeds", "0", "--tasks", "recall1",
                    "two_hop_chain", "--final_variant", "two_hop_chain=best+layout+short+until"]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == [
        "base-recall1-seed0", "base-coarse+ae-recall1-seed0",
        "base-two_hop_chain-seed0", "best-coarse+layout+short+until-two_hop_chain-seed0"]
    for argv, said in ((["--tasks", "recall1", "--final_variant", "two_hop_chain=base+until"],
                        "two_hop_chain, which --tasks and --train_on do not train"),
                       (["--final_variant", "recall1=base+until", "--final_variant", "recall1=base+learn"],
                        "--final_variant names recall1 more than once"),
                       (["--stage", "ablation", "--final_variant", "recall1=base+until"],
                        "names the final stage's models; --stage is ablation")):
        with pytest.raises(SystemExit):
            lc.main(["--check_args", "--stage", "final", *roots, *argv])
        assert said in capsys.readouterr().err


def test_the_budget_control_trains_the_plain_row_as_many_steps_as_learn_on_the_task(lc, tmp_path):
    """+budget: the plain row's arguments, one stage on the task's contexts, as many steps as +learn
    takes in all (so +learn's gain can be told from its extra steps); a control, so it is never in
    the combination nor a final candidate, whatever its gain, and never combined itself."""
    args = _tune_args(lc, tmp_path)
    plain, budget, learn = (lc.gist_cell(v, "coarse", "recall3", 0, args)
                            for v in ("base", "base+budget", "base+learn"))
    assert budget.name == "base-coarse+budget-recall3-seed0" and budget.args == plain.args
    assert [s.max_steps for s in budget.stages] == [learn.stages[-1].max_steps] == [1600]
    assert "--data.init_args.context_words" not in budget.stages[0].args
    args.tune_short_steps = 200  # the other rows' short stage: not the control's (+learn has its own)
    assert [s.max_steps for s in lc.gist_cell("base+budget", "coarse", "recall3", 0, args).stages] == [1600]
    assert [s.max_steps for s in lc.gist_cell("base+learn", "coarse", "recall3", 0, args).stages][-1] == 1600
    args.tune_short_steps = None
    with pytest.raises(ValueError, match=r"\+budget"):
        lc.gist_cell("best+layout+budget", "coarse", "recall3", 0, args)
    gains = {"+layout": 7.3, "+ae": -1.0, "+learn": 26.7, "+budget": 30.0}
    best, candidates = lc.combination(gains)
    assert best == "best+layout+learn"
    assert candidates == ["base", "base+layout", "base+ae", "base+learn", "best+layout+learn"]
    assert lc.combination({"+budget": 5.0, "+ae": 1.0}) == ("base+ae", ["base", "base+ae"])
    assert lc.combination({"+budget": 5.0, "+ae": -1.0}) == ("base", ["base", "base+ae"])
    # one curriculum at most in a recipe: of those that helped, the one that helped most
    best, _ = lc.combination({"+layout": 2.0, "+learn": 5.0, "+stage": 9.0, "+longstage": 7.0})
    assert best == "best+layout+stage"
    lc.final_variant(f"recall3={best}")  # (a recipe the final stage takes)


@pytest.mark.slow
def test_objective_speed_times_each_objective_and_the_layout_from_one_base(lc, tmp_path, tok, monkeypatch):
    """--speed: the plain loss, the layout and each objective, fine-tuned from the same base on the
    task's batches, each timed after its warmup, relative to the plain loss."""
    from conftest import TINY_LLAMA
    from transformers import LlamaConfig, LlamaForCausalLM

    from gist_lightning.export import export_pretrained

    config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config |= {"vocab_size": len(tok), "max_position_embeddings": 2048}
    model = LlamaForCausalLM(LlamaConfig(**config))
    base = export_pretrained(model, tok, tmp_path / "base", num_gist_tokens=4, condition="pos_control",
                             segments={"segment_tokens": 16, "gists_per_segment": 4, "placement": "coarse"})
    args = argparse.Namespace(train_on="task", vocabulary="words", train_context_words=None,
                              context_words=[20, 30], train_batch_size=2, run_root=tmp_path)
    from gist_lightning.long_context import SegmentSettings

    built, check = [], SegmentSettings.__post_init__

    def recording(self):  # every segment layout a model of the rows is built with
        built.append((self.sink_tokens, self.recent_segments))
        check(self)

    monkeypatch.setattr(SegmentSettings, "__post_init__", recording)
    fits = []
    real_fit = lc.L.Trainer.fit

    def fit(self, module, **kw):  # the order rows are timed in, by what each row's module has
        fits.append((module.segments.sink_tokens, module.objectives))
        return real_fit(self, module, **kw)

    monkeypatch.setattr(lc.L.Trainer, "fit", fit)
    rows = lc.objective_speed(base, "recall3", args, steps=7, repeats=2)
    assert [r["objective"] for r in rows] == ["plain", "+layout", "+ae", "+importance", "+kd"]
    assert built.count((4, 1)) >= 1 and (0, 0) in built  # the layout's row trained with it
    # two rounds, the second starting at the second row: plain is not always timed first
    assert len(fits) == 10 and fits[0][0] == 0 and not fits[0][1] and fits[5][0] == 4 and not fits[9][1]
    assert all(r["steps_timed"] == 2 and r["repeats"] == 2 for r in rows)  # steps 6 and 7
    assert all(0 < r["lowest"] <= r["steps_per_second"] <= r["highest"] for r in rows)
    assert rows[0]["relative_to_plain"] == 1.0
    plain = rows[0]["steps_per_second"]
    assert [r["relative_to_plain"] for r in rows] == [round(r["steps_per_second"] / plain, 3) for r in rows]
