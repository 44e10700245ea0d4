"""The authors' metric as a torchmetrics Metric: ROUGE-L F-measure x100 (``rouge_score``,
``use_stemmer=True``), prediction and reference stripped of surrounding whitespace, averaged over
records; exact match beside it. The state is a sum and a count, so it syncs across processes."""

from __future__ import annotations

import csv
import io
import os

import torch
from rouge_score import rouge_scorer
from torchmetrics import Metric

from ..errors import DataFormatError, read_text
from ..splits import EXACT_MATCH, ROUGE_L

_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure x100 of one record."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100.0 * _SCORER.score(reference.strip(), prediction.strip())["rougeL"].fmeasure


class RougeL(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("rouge_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("exact_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        for p, r in zip(predictions, references):
            self.rouge_sum += rouge_l(p, r)
            self.exact_sum += float(p.strip() == r.strip())
        self.count += len(predictions)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1)
        return {ROUGE_L: self.rouge_sum / n, EXACT_MATCH: 100.0 * self.exact_sum / n, "count": self.count}


def read_predictions_csv(path: str | os.PathLike, columns: set[str]) -> list[dict[str, str]]:
    """The rows of a predictions CSV (as validation writes them: ``x, y_pred, y_true``), refused with
    the file named when it lacks one of ``columns`` or is not a CSV; a missing field reads as ""."""
    try:
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        missing = columns - set(reader.fieldnames or [])
        if missing:
            raise DataFormatError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        return [{k: v or "" for k, v in row.items()} for row in reader]
    except csv.Error as e:
        raise DataFormatError(f"{path}: not a readable CSV file ({e})") from None


def score_csv(path: str | os.PathLike) -> dict[str, float]:
    """ROUGE-L and exact match of a predictions CSV with ``y_pred`` and ``y_true`` columns."""
    rows = read_predictions_csv(path, {"y_pred", "y_true"})
    metric = RougeL()
    metric.update([r["y_pred"] for r in rows], [r["y_true"] for r in rows])
    out = metric.compute()
    return {ROUGE_L: float(out[ROUGE_L]), EXACT_MATCH: float(out[EXACT_MATCH]), "count": int(out["count"])}
