"""A CSV logger that a resumed run appends to. Lightning's deletes ``metrics.csv`` when it opens a
run folder that exists, so a run resumed into its own folder (``--ckpt_path last`` with a fixed
``version``) would lose every metric logged before the crash."""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # keep metrics.csv and its columns; new rows are appended (resume.ResumableRun first drops
        # the rows logged after the checkpoint a run resumes from: their steps are redone)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, except that an existing ``metrics.csv`` is appended to, never deleted,
    and rows reach the disk as they are logged (``flush_logs_every_n_steps=1``), so a killed run
    keeps what it logged."""

    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs):
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
