"""Experiment trackers beside the CSV log. A run's ``trainer.logger`` may be a list: the project's
``CSVLogger`` first (its ``metrics.csv`` is what sweeps and experiments read, and its folder is the
run's folder), then any of Lightning's ``TensorBoardLogger``, ``WandbLogger`` or ``MLFlowLogger``
(the ``track`` extra installs their packages). Lightning sends them the metrics (scores and
compression statistics per split) and the hyperparameters; :class:`TrackerUploads` adds what a
metric cannot carry: each validation's predictions per split (a W&B table, MLflow artifacts, a
TensorBoard text table) and its compression statistics file."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from .evaluation.callbacks import PredictionWriter
from .evaluation.metrics import read_predictions_csv

TEXT_ROWS = 20  # rows of a TensorBoard text table (the whole file goes to W&B and MLflow)


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class TrackerUploads(L.Callback):
    """After each validation (rank zero), the files it wrote go to every tracker among the run's
    loggers: predictions ``step<N>-<split>.csv`` and ``step<N>-compression.json``. A run that logs
    only to CSV does nothing here."""

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        trackers = [lg for lg in trainer.loggers
                    if isinstance(lg, (WandbLogger, MLFlowLogger, TensorBoardLogger))]
        writer = next((c for c in trainer.callbacks if isinstance(c, PredictionWriter)), None)
        if not trackers or writer is None:
            return
        step = trainer.global_step
        prefix = f"step{step:06d}-"
        files = [p for p in writer.written if p.name.startswith(prefix)]
        compression = files[0].parent / f"{prefix}compression.json" if files else None
        if compression is not None and not compression.is_file():
            compression = None
        tables = {}  # each predictions file read once (the tables of W&B and TensorBoard)
        for path in files:
            records = read_predictions_csv(path, set())
            columns = list(records[0]) if records else []
            tables[path] = columns, [[r[c] for c in columns] for r in records]
        for logger in trackers:
            for path in files:
                split = path.stem[len(prefix):]
                columns, rows = tables[path]
                if isinstance(logger, WandbLogger):
                    # at W&B's current step: it drops what is logged at a step below one it has seen
                    logger.log_table(f"predictions/{split}", columns=columns, data=rows)
                elif isinstance(logger, MLFlowLogger):
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="predictions")
                else:
                    shown = f" (first {TEXT_ROWS} of {len(rows)})" if len(rows) > TEXT_ROWS else ""
                    table = _markdown(columns, rows[:TEXT_ROWS])
                    logger.experiment.add_text(f"predictions/{split}", f"{path.name}{shown}\n\n{table}",
                                               global_step=step)
            if compression is None:
                continue
            if isinstance(logger, WandbLogger):
                logger.experiment.save(str(compression), base_path=str(compression.parent), policy="now")
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(compression), artifact_path="predictions")
            else:
                logger.experiment.add_text("compression", "```\n" + compression.read_text() + "```",
                                           global_step=step)
