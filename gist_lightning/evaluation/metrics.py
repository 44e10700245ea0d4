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


def score_csv(path: str | os.PathLike) -> dict[str, float]:
    """ROUGE-L and exact match of a predictions CSV with ``y_pred`` and ``y_true`` columns."""
    try:
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        missing = {"y_pred", "y_true"} - set(reader.fieldnames or [])
        if missing:
            raise DataFormatError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        preds, refs = [], []
        for row in reader:
            preds.append(row["y_pred"] or "")
            refs.append(row["y_true"] or "")
    except csv.Error as e:
        raise DataFormatError(f"{path}: not a readable CSV file ({e})") from None
    metric = RougeL()
    metric.update(preds, refs)
    out = metric.compute()
    return {ROUGE_L: float(out[ROUGE_L]), EXACT_MATCH: float(out[EXACT_MATCH]), "count": int(out["count"])}
