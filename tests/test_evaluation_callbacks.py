"""The evaluation callbacks on a real validation run of a trained model: logged metrics equal the
written predictions re-scored, compression statistics equal their JSON, the summary prints the
typed results, and an export that was skipped says how to make it."""

from __future__ import annotations

import json
from dataclasses import asdict

import lightning as L
import pytest

from gist_lightning.cli import default_callbacks
from gist_lightning.data import EmbeddedSuite
from gist_lightning.evaluation.callbacks import (
    CompressionStats,
    ExportBest,
    PredictionWriter,
    RougeCallback,
    RunSummary,
    run_dir,
)
from gist_lightning.evaluation.metrics import score_csv
from gist_lightning.evaluation.results import ExportResult, SplitScores
from gist_lightning.module import GistLitModule
from gist_lightning.splits import VALIDATION_SPLITS, metric_key

pytestmark = pytest.mark.slow  # the trained fixture is a 2000-step fit


@pytest.fixture
def validated(trained_export, tmp_path):
    """(trainer, module) after one validation of the trained fixture with the default callbacks."""
    data = EmbeddedSuite(cache_dir=str(tmp_path / "cache"), train_size=64, validation_size=20,
                         max_validation_records=20, eval_batch_size=8)
    module = GistLitModule(model_name_or_path=str(trained_export), max_new_tokens=12)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=default_callbacks(), default_root_dir=str(tmp_path / "run"))
    trainer.validate(module, datamodule=data)
    return trainer, module


def _callback(trainer, cls):
    return next(c for c in trainer.callbacks if isinstance(c, cls))


def test_logged_metrics_equal_the_written_predictions_rescored(validated):
    trainer, _ = validated
    rouge, writer = _callback(trainer, RougeCallback), _callback(trainer, PredictionWriter)
    assert set(rouge.last) == set(VALIDATION_SPLITS) and all(isinstance(s, SplitScores)
                                                             for s in rouge.last.values())
    files = {p.stem.split("-", 1)[1]: p for p in writer.written}
    for split in VALIDATION_SPLITS:
        rescored = score_csv(files[split])
        scores = rouge.last[split]
        assert rescored == pytest.approx({"rougeL": scores.rougeL, "exact_match": scores.exact_match,
                                          "count": scores.count})
        assert float(trainer.callback_metrics[metric_key(split, "rougeL")]) == pytest.approx(scores.rougeL)
    assert 0 < rouge.last["validation_seen"].exact_match < 100  # a model that gets some right, not all


def test_compression_statistics_equal_their_json(validated):
    trainer, module = validated
    stats = _callback(trainer, CompressionStats).last
    [path] = (run_dir(trainer) / "predictions").glob("*-compression.json")
    assert json.loads(path.read_text()) == {split: asdict(s) for split, s in stats.items()}
    unseen = stats["validation_unseen"]
    assert unseen.num_gist_tokens == 1
    assert unseen.cached_positions_mean == 1  # a gist cache of k=1 position per record
    assert unseen.compression_ratio == pytest.approx(unseen.instruction_tokens_mean)
    assert unseen.instruction_cache_bytes == pytest.approx(unseen.instruction_tokens_mean
                                                           * unseen.gist_cache_bytes)


def test_the_summary_prints_the_typed_results(validated, capsys):
    trainer, module = validated
    export = _callback(trainer, ExportBest)
    export.result = ExportResult(path=None, source="zero.ckpt",
                                 skipped="not exported under DeepSpeed; run: x")
    RunSummary.print_summary(trainer, module)
    out = capsys.readouterr().out
    scores = _callback(trainer, RougeCallback).last
    for split in VALIDATION_SPLITS:
        line = next(line for line in out.splitlines() if line.startswith(split))
        assert f"{scores[split].rougeL:.1f}" in line and f"{scores[split].count}" in line
    assert "not exported under DeepSpeed; run: x" in out and "predictions:" in out
