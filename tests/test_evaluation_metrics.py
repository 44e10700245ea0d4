"""The authors' metric: our Metric and the CSV scorer equal a direct rouge_score computation."""

from __future__ import annotations

import csv

import pytest
from rouge_score import rouge_scorer

from gist_lightning.cli import main
from gist_lightning.evaluation.metrics import RougeL, score_csv

PAIRS = [
    ("the cats are running", "The cat runs "),
    ("  apple banana", "apple banana cherry"),
    ("", "something"),
    ("exactly this", "exactly this"),
    ("Paris is the capital of France.", "The capital of France is Paris."),
]


def direct_mean():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100 * sum(scorer.score(r.strip(), p.strip())["rougeL"].fmeasure for p, r in PAIRS) / len(PAIRS)


def test_metric_equals_rouge_score_and_accumulates():
    m = RougeL()
    m.update([p for p, _ in PAIRS[:2]], [r for _, r in PAIRS[:2]])
    m.update([p for p, _ in PAIRS[2:]], [r for _, r in PAIRS[2:]])
    out = m.compute()
    assert float(out["rougeL"]) == pytest.approx(direct_mean(), abs=1e-9)
    assert float(out["exact_match"]) == pytest.approx(100 * 1 / 5)
    assert int(out["count"]) == 5


def test_scorer_command_on_a_fixture_csv(tmp_path, capsys):
    path = tmp_path / "preds.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y_pred", "y_true"])
        for p, r in PAIRS:
            w.writerow(["prompt, with a comma\nand a newline", p, r])
    assert score_csv(path)["rougeL"] == pytest.approx(direct_mean(), abs=1e-9)
    main(["score", str(path)])
    assert f"rougeL={direct_mean():.2f}" in capsys.readouterr().out


def test_scorer_names_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prediction,reference\na,b\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['y_pred', 'y_true'\]"):
        score_csv(path)
