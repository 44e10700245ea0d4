"""The pairwise judge's pieces: reading a verdict, combining the two orders, pairing prediction CSVs,
intervals. Its run against a real endpoint is in test_serving_server (this project's own server)."""

from __future__ import annotations

import csv

import pytest

from gist_lightning.errors import DataFormatError
from gist_lightning.evaluation.judge import (
    combine,
    parse_verdict,
    read_predictions,
    summarize,
    task_text,
)


@pytest.mark.parametrize("reply,verdict", [
    ("A", "A"), ("B.", "B"), (" answer b: it is shorter", "B"), ("Tie", "TIE"), ("TIE\nboth fine", "TIE"), ("(A)", "A"),
    ("A good answer would be B", None), ("Both", None), ("", None), ("B because", None)])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_both_orders_must_agree_for_a_win():
    # first question shows (A, B); the swapped one shows (B, A), so "B" there is a vote for A
    assert combine("A", "B") == "win" and combine("B", "A") == "loss"
    assert combine("A", "A") == "tie"  # always the first position: position bias, cancelled
    assert combine("B", "B") == "tie" and combine("TIE", "B") == "tie" and combine(None, "B") == "tie"


def test_predictions_pair_by_prompt_whatever_k(tmp_path):
    def write(name, rows):
        path = tmp_path / name
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["x", "y_pred", "y_true"])
            w.writerows(rows)
        return path

    k1 = write("k1.csv", [["Instruction: Sort.\n<GIST>\nInput: b a\nOutput:", "a b", "a b"]])
    k5 = write("k5.csv", [["Instruction: Sort.\n" + "<GIST>" * 5 + "\nInput: b a\nOutput:", "b a", "a b"]])
    assert read_predictions(k1) == {"Instruction: Sort.\nInput: b a": "a b"}
    assert read_predictions(k1).keys() == read_predictions(k5).keys()
    assert task_text("Instruction: Name a color.\n<GIST>\nOutput:") == "Instruction: Name a color."
    twice = write("twice.csv", [["Instruction: X\n<GIST>\nOutput:", "1", ""], ["Instruction: X\n<GIST><GIST>\nOutput:", "2", ""]])
    with pytest.raises(DataFormatError, match="line 3: the prompt occurs twice"):
        read_predictions(twice)
    no_x = tmp_path / "no_x.csv"
    no_x.write_text("y_pred,y_true\na,b\n")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['x'\]"):
        read_predictions(no_x)


def test_summary_rates_and_intervals():
    outcomes = ["win"] * 60 + ["tie"] * 20 + ["loss"] * 20
    s = summarize(outcomes)
    assert (s["win_rate"], s["tie_rate"], s["loss_rate"]) == (0.6, 0.2, 0.2)
    assert s["win_rate_ties_half"] == pytest.approx(0.7)
    lo, hi = s["win_rate_ties_half_interval"]
    assert lo < 0.7 < hi and 0.05 < hi - lo < 0.25  # about +-1.96 * sqrt(.7 * .3 / 100) ~ +-0.09
