"""The pairwise judge's pieces: reading a verdict, combining the two orders, pairing prediction CSVs,
intervals. Its run against a real endpoint is in test_serving_server (this project's own server)."""

from __future__ import annotations

import csv

import pytest

from gist_lightning.errors import DataFormatError, GistError
from gist_lightning.evaluation.judge import (
    combine,
    journal_path,
    judge,
    parse_verdict,
    read_predictions,
    summarize,
    task_text,
)


@pytest.mark.parametrize("reply,verdict", [
    ("A", "A"), ("B.", "B"), (" answer b: it is shorter", "B"), ("Tie", "TIE"), ("TIE\nboth fine", "TIE"),
    ("(A)", "A"), ("A good answer would be B", None), ("Both", None), ("", None), ("B because", None)])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_both_orders_must_agree_for_a_win():
    # first question shows (A, B); the swapped one shows (B, A), so "B" there is a vote for A
    assert combine("A", "B") == "win" and combine("B", "A") == "loss"
    assert combine("A", "A") == "tie"  # always the first position: position bias, cancelled
    assert combine("B", "B") == "tie" and combine("TIE", "B") == "tie" and combine(None, "B") == "tie"


def write_predictions(path, rows):
    """A predictions CSV (columns x, y_pred, y_true) with ``rows``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y_pred", "y_true"])
        w.writerows(rows)
    return path


def test_predictions_pair_by_prompt_whatever_k(tmp_path):
    def write(name, rows):
        return write_predictions(tmp_path / name, rows)

    k1 = write("k1.csv", [["Instruction: Sort.\n<GIST>\nInput: b a\nOutput:", "a b", "a b"]])
    k5 = write("k5.csv", [["Instruction: Sort.\n" + "<GIST>" * 5 + "\nInput: b a\nOutput:", "b a", "a b"]])
    assert read_predictions(k1) == {"Instruction: Sort.\nInput: b a": "a b"}
    assert read_predictions(k1).keys() == read_predictions(k5).keys()
    assert task_text("Instruction: Name a color.\n<GIST>\nOutput:") == "Instruction: Name a color."
    twice = write("twice.csv",
                  [["Instruction: X\n<GIST>\nOutput:", "1", ""],
                   ["Instruction: X\n<GIST><GIST>\nOutput:", "2", ""]])
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


class FakeJudge:
    """Prefers the longer answer (so verdicts depend on the records); fails on questions it is told to."""

    url, model = "http://judge.invalid/v1", "fake"

    def __init__(self, fail_on=(), error=None):
        self.asked, self.fail_on = [], list(fail_on)
        self.error = error or GistError("the judge at http://judge.invalid/v1 answered HTTP 400: bad")

    def ask(self, question):
        self.asked.append(question)
        if any(s in question for s in self.fail_on):
            raise self.error
        first = question.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        second = question.split("Answer B:\n")[1].split("\n\nWhich")[0]
        return "TIE" if len(first) == len(second) else "A" if len(first) > len(second) else "B"


def test_a_failed_request_loses_no_reply_and_the_same_command_resumes(tmp_path):
    def write(name, answers):
        rows = [[f"Instruction: task {i}\n<GIST>\nOutput:", ans, ""] for i, ans in enumerate(answers)]
        return write_predictions(tmp_path / name, rows)

    a = write("a.csv", ["long answer", "x", "same", "longer one", "b"])
    b = write("b.csv", ["short", "yy", "sama", "no", "bb"])
    whole = judge(a, b, FakeJudge(), tmp_path / "whole.csv")
    assert (whole["win_rate"], whole["tie_rate"], whole["loss_rate"]) == (0.4, 0.2, 0.4)

    out = tmp_path / "v.csv"
    broken = FakeJudge(fail_on=["task 3", "task 4"])  # both orders of records 3 and 4 fail
    with pytest.raises(GistError,
                       match=r"4 of 10 judge requests failed .* the 6 replies received are kept in .*"
                                        r"run the same command again"):
        judge(a, b, broken, out)
    assert not out.exists() and len(journal_path(out).read_text().splitlines()) == 6
    with open(journal_path(out), "a") as f:
        f.write('{"key": "cut sho')  # a line cut short by a killed run
    # another kind of failure (a reply that is not JSON, say) is a failed request too; the rest go on
    odd = FakeJudge(fail_on=["task 4"], error=ValueError("Expecting value: line 1 column 1"))
    with pytest.raises(GistError, match=r"2 of 4 judge requests failed \(first: Expecting value"):
        judge(a, b, odd, out)
    again = FakeJudge()
    assert judge(a, b, again, out) == whole
    assert len(again.asked) == 2 and all("task 4" in q for q in again.asked)  # only what was missing
    assert not journal_path(out).exists()
    assert list(csv.DictReader(open(out))) == list(csv.DictReader(open(tmp_path / "whole.csv")))
    # replies of one judge model are not reused for another
    with pytest.raises(GistError):
        judge(a, b, FakeJudge(fail_on=["task 0"]), tmp_path / "other.csv")
    assert len(journal_path(tmp_path / "other.csv").read_text().splitlines()) == 8
    other = FakeJudge()
    other.model = "another"
    judge(a, b, other, tmp_path / "other.csv")
    assert len(other.asked) == 10
