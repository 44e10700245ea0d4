"""What a SLURM array task of a sweep runs (through submitit): the cell, in this process, and on the
signal SLURM sends before a time limit or a preemption, a stop that writes ``last.ckpt`` and a
requeue of the same cell, which then resumes from it (submitit's ``Checkpointable`` protocol)."""

from __future__ import annotations

import submitit

from . import cell


class CellJob(submitit.helpers.Checkpointable):
    def __call__(self, folder: str) -> int:
        code = cell.run(folder)
        if code not in (0, *cell.STOPPED):
            raise RuntimeError(f"cell {folder} failed (exit {code}); see its stdout.log")
        return code

    def checkpoint(self, folder: str) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the pre-timeout / preemption signal: the fit writes ``last.ckpt`` and
        stops (as on a SIGTERM); the requeued task runs the cell again, which resumes from it."""
        cell.stop_fit()
        cell.wait_for_fit()
        return submitit.helpers.DelayedSubmission(self, folder)
