"""Nothing silently wrong: what does not fit the model is refused with the numbers (or cut by a
stated policy), every expected failure of the command line is one line naming the file and what is
wrong, and malformed data is refused with the package's own error, never another exception."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gist_lightning import compress, generate
from gist_lightning.cli import main
from gist_lightning.data.records import load_records
from gist_lightning.errors import ContextLengthError, GistError
from gist_lightning.evaluation.metrics import score_csv
from gist_lightning.export import export_pretrained
from gist_lightning.prompt_cache import CacheStore, save_cache

BIN = str(Path(sys.executable).parent / "gist-lightning")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture
def exported(make_pair, tmp_path):
    """A tiny LLaMA of 256 positions exported with k=1, and a cache file of one instruction."""
    model, tok, _ = make_pair("llama", seed=0)
    folder = export_pretrained(model, tok, tmp_path / "model", num_gist_tokens=1, condition="gist")
    cache = save_cache(compress(model, tok, ["Reverse the list."], 1), tmp_path / "c.safetensors", model, tok)
    return model, tok, folder, cache


def one_line_error(argv, capsys) -> str:
    """Run a command in this process; it must exit non-zero with its error as one line on stderr
    (after whatever progress bars ran before it) and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err
    assert err.splitlines()[-1].startswith("gist-lightning: error: "), err
    return errors[0]


# -- context limits ----------------------------------------------------------------------------
def test_an_input_beyond_the_context_is_refused_with_the_numbers(exported):
    model, tok, _, _ = exported
    cache = compress(model, tok, ["Reverse the list."], 1)
    long_input = " ".join(["cat"] * 3000)
    with pytest.raises(ContextLengthError,
                       match=r"do not fit the model's 256 positions.*\+ 8 new tokens need \d+"):
        generate(model, tok, cache, [long_input], max_new_tokens=8)


def test_the_limit_is_exact(exported):
    """A prompt whose greedy continuation ends on the model's last position is served; one more new
    token is refused (the last new token is never fed back, so it needs no position)."""
    from gist_lightning.templates import encode_continuation

    model, tok, _, _ = exported
    cache = compress(model, tok, ["Reverse the list."], 1)
    text = "cat dog owl"
    room = 256 - int(cache.next_position[0]) - len(encode_continuation(tok, text, False))  # positions left
    generate(model, tok, cache, [text], max_new_tokens=room + 1)
    with pytest.raises(ContextLengthError, match=f"need {256 + 1} positions"):
        generate(model, tok, cache, [text], max_new_tokens=room + 2)


def test_truncate_input_cuts_words_never_gists_and_says_so(exported):
    model, tok, _, _ = exported
    cache = compress(model, tok, ["Reverse the list.", "Reverse the list."], 1)
    short = "cat dog owl"
    with pytest.warns(UserWarning, match=r"row 1: \d+ of 3000 words"):
        out = generate(model, tok, cache, [short, " ".join(["cat"] * 3000)], max_new_tokens=8,
                       on_overflow="truncate_input")
    # fitting rows unchanged
    assert out[0] == generate(model, tok, cache.select([0]), [short], max_new_tokens=8)[0]
    # the cut row now fits exactly as the refusal rule counts, with its gist and instruction intact
    from gist_lightning.generation import fit_inputs

    [cut] = fit_inputs(model, tok, cache.select([1]), [" ".join(["cat"] * 3000)], 8)
    assert 0 < len(cut.split()) < 3000
    generate(model, tok, cache.select([1]), [cut], max_new_tokens=8)
    with pytest.raises(ContextLengthError):
        generate(model, tok, cache.select([1]), [cut + " cat cat"], max_new_tokens=8)


def test_an_instruction_that_fills_the_context_is_refused(exported):
    model, tok, _, _ = exported
    with pytest.raises(ContextLengthError, match="leaves no room in the model's 256 positions"):
        compress(model, tok, [" ".join(["cat"] * 300)], 1)


def test_validation_that_cannot_fit_is_refused_before_training(run_config, tiny_models):
    from gist_lightning.cli import cli_main

    small = dict(tiny_models["llama"], max_position_embeddings=40)
    config = run_config(small)
    with pytest.raises(ContextLengthError, match=r"model.max_new_tokens=30 exceeds the model's 40 positions"):
        cli_main(["fit", "--config", str(config), "--data.limits.max_length", "40",
                  "--data.human_limits.max_length", "40", "--model.max_new_tokens", "30"])


# -- the command line ----------------------------------------------------------------------------
def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "score", "export", "compress", "generate"):
        assert f"\n  {command} " in out


def test_expected_failures_are_one_line(exported, tmp_path, capsys):
    _, _, folder, cache = exported
    inputs = tmp_path / "latin1.txt"
    inputs.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(cache.read_bytes()[:40])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prediction,reference\na,b\n")
    bad_ckpt = tmp_path / "bad.ckpt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    cases = [
        (["generate", "--model", str(folder), "--cache", str(cache), "--inputs", str(inputs)],
         "latin1.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
        (["generate", "--model", str(folder), "--cache", str(truncated), "--input", "x"],
         "truncated.safetensors: not a readable cache file, truncated or corrupt"),
        (["generate", "--model", str(folder), "--cache", str(cache), "--input", " ".join(["cat"] * 3000)],
         "do not fit the model's 256 positions"),
        (["generate", "--model", str(tmp_path / "nowhere"), "--cache", str(cache), "--input", "x"],
         "nowhere: no gist_config.json"),
        (["score", str(bad_csv)], "bad.csv: missing column(s) ['y_pred', 'y_true']"),
        (["export", "--ckpt", str(bad_ckpt), "--out", str(tmp_path / "out")],
         "bad.ckpt: not a readable Lightning checkpoint"),
        (["fit", "--config", str(CONFIG), "--model.num_gist_tokens", "0"],
         "num_gist_tokens must be >= 1; got 0"),
        (["fit", "--config", str(CONFIG), "--model.condition", "half"],
         "condition must be one of gist, pos_control, neg_control"),
        # the run folder under tmp_path: without a logger, Lightning writes the run's config.yaml there
        (["fit", "--config", str(CONFIG), "--data", "gist_lightning.data.AlpacaPlus", "--data.folder",
          str(tmp_path / "missing"), "--trainer.logger", "false", "--trainer.default_root_dir",
          str(tmp_path / "run")], "missing: no file for split 'train'"),
    ]
    for argv, wanted in cases:
        assert wanted in one_line_error(argv, capsys), argv


def test_a_segment_setting_out_of_range_is_named_alone(capsys):
    """model.segments' own checks, not jsonargparse's list of the optional type's subtypes."""
    long = str(CONFIG.parent / "tiny-long.yaml")
    for flag, value, wanted in [
        ("sink_tokens", "40", "sink_tokens (40) must be >= 0 and leave room in the first segment"),
        ("recent_segments", "-1", "recent_segments must be >= 0 segments; got -1"),
    ]:
        line = one_line_error(["fit", "--config", str(CONFIG), "--config", long, f"--model.segments.{flag}",
                               value], capsys)
        assert line.startswith(f"gist-lightning: error: {wanted}") and "Union" not in line, line


def test_the_installed_command_exits_1_with_one_line_and_traceback_on_debug(exported, tmp_path):
    _, _, folder, cache = exported
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(cache.read_bytes()[:40])
    argv = [BIN, "generate", "--model", str(folder), "--cache", str(truncated), "--input", "x"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    plain = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr, plain.stderr
    assert "t.safetensors: not a readable cache file" in plain.stderr.strip().splitlines()[-1]
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CorruptFileError" in debug.stderr
    usage = subprocess.run([BIN, "generate", "--model"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2


def test_a_store_with_a_corrupt_entry_lists_the_rest_and_names_it(exported, tmp_path):
    model, tok, _, _ = exported
    store = CacheStore(tmp_path / "store", model, tok, num_gist_tokens=1)
    store.add("Reverse the list.")
    bad = store.add("Copy the words.")
    bad.write_bytes(bad.read_bytes()[:30])
    assert store.list() == ["Reverse the list."]
    assert [p for p, _ in store.unreadable] == [bad] and "truncated or corrupt" in store.unreadable[0][1]
    with pytest.raises(GistError, match="truncated or corrupt"):
        store.get("Copy the words.")


# -- fuzzing the readers -------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12),
                                                                                       inner, max_size=4),
                           max_leaves=8)
records = st.lists(st.one_of(
    st.fixed_dictionaries({"instruction": st.text(max_size=10), "input": st.text(max_size=10),
                           "output": st.text(max_size=10)}, optional={"source": json_values}),
    json_values), max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.one_of(records.map(json.dumps), records.map(lambda rs: "\n".join(json.dumps(r) for r in rs)),
                 st.binary(max_size=60).map(lambda b: b.decode("latin-1")), st.text(max_size=60)),
       st.sampled_from(["utf-8", "latin-1"]))
def test_the_record_reader_accepts_or_refuses_with_its_own_error(tmp_path_factory, text, encoding):
    path = tmp_path_factory.mktemp("fuzz") / "split.jsonl"
    try:
        path.write_bytes(text.encode(encoding, errors="replace"))
    except UnicodeEncodeError:
        return
    try:
        out = load_records(path)
    except GistError:
        return
    assert all(set(r) == {"instruction", "input", "output", "source"} and isinstance(r["output"], str)
               for r in out)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.lists(st.lists(st.text(max_size=6), max_size=4), max_size=5).map(
                     lambda rows: _csv([["x", "y_pred", "y_true"], *rows])),
                 st.text(max_size=80), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))),
       st.sampled_from(["utf-8", "latin-1"]))
def test_the_csv_scorer_accepts_or_refuses_with_its_own_error(tmp_path_factory, text, encoding):
    path = tmp_path_factory.mktemp("fuzz") / "p.csv"
    path.write_bytes(text.encode(encoding, errors="replace"))
    try:
        out = score_csv(path)
    except GistError:
        return
    assert 0 <= out["rougeL"] <= 100 and out["count"] >= 0


def _csv(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def test_cache_files_from_this_package_are_not_refused_as_corrupt(exported):
    model, tok, _, cache = exported
    from gist_lightning.prompt_cache import load_cache

    assert torch.equal(load_cache(cache, model, tok).valid,
                       compress(model, tok, ["Reverse the list."], 1).valid)


def test_the_generate_command_can_truncate_instead_of_refusing(exported, capsys):
    _, _, folder, cache = exported
    long_input = " ".join(["cat"] * 3000)
    with pytest.warns(UserWarning, match=r"row 0: \d+ of 3000 words"):
        main(["generate", "--model", str(folder), "--cache", str(cache), "--input", long_input,
              "--max_new_tokens", "4", "--on_overflow", "truncate_input"])
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("cat cat")]
    assert line.startswith(long_input + "\t")
