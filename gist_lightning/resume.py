"""What a run killed at any moment needs in order to come back whole: ``last.ckpt`` written only
at moments a resumed run continues from exactly (never between a training step and that step's
validation), checkpoint files written beside their target and renamed into place, ``metrics.csv``
cut back to the rows the checkpoint had seen, and a SIGTERM that says how to resume.

Lightning counts a step whose checkpoint was written at the end of its training batch as done,
validation included: a run killed during that step's validation would resume without it (no
predictions, no metrics, another "best" checkpoint). Hence the deferral in :class:`ClockCheckpoint`.
"""

from __future__ import annotations

import csv
import io
import shlex
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import SIGTERM_EXIT
from .files import atomic_path, remove_strays, remove_strays_at, write_text_atomic


def validation_due(trainer) -> bool:
    """Whether the training step that just ended is followed by a validation (Lightning's own rule)."""
    loop = trainer.fit_loop.epoch_loop
    return loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


class _OneValidationDecision:
    """Lightning's "is a validation due" rule, decided once per training batch and, under several
    processes, by rank 0 for all. With a time-based ``val_check_interval`` Lightning reads the clock
    each time it asks, on every rank: :class:`ClockCheckpoint` asking first could see no validation
    and save just before one runs, and ranks whose clocks disagree would enter the validation's
    collectives apart and hang."""

    def __init__(self, trainer, rule):
        self.trainer, self.rule = trainer, rule
        self._batch, self._due = None, False

    def __call__(self, data_fetcher) -> bool:
        batch = self.trainer.fit_loop.epoch_loop.total_batch_idx  # the same from a batch's start to its end
        if batch != self._batch:
            due = bool(self.rule(data_fetcher))
            if self.trainer.world_size > 1:
                due = bool(self.trainer.strategy.broadcast(due, src=0))
            self._batch, self._due = batch, due
        return self._due


def decide_validation_once(trainer) -> None:
    """Make the trainer's time-based validation rule one decision per batch, shared by all ranks
    (:class:`_OneValidationDecision`); a step-based rule reads no clock and is left as it is."""
    loop = trainer.fit_loop.epoch_loop
    if getattr(trainer, "_val_check_time_interval", None) is None or isinstance(loop._should_check_val_fx,
                                                                                 _OneValidationDecision):
        return
    loop._should_check_val_fx = _OneValidationDecision(trainer, loop._should_check_val_fx)


class ClockCheckpoint(ModelCheckpoint):
    """``last.ckpt`` on a clock: every ``train_time_interval`` or ``every_n_train_steps``, at the
    last step (``max_steps``, or a callback's stop; otherwise when training ends), and when a
    SIGTERM stops training between steps. (Lightning 2.6 refreshes
    ``last.ckpt`` at a validation only when the best checkpoint improved, so without this a killed
    run could lose everything since its last improving validation.)

    A save that falls on a step with a validation waits until that validation has ended: a
    checkpoint never says a step is done while its validation is still to run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._validation_due = False  # inside on_train_batch_end of a step that validates
        self._deferred = False  # a save waits for the end of this step's validation

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        decide_validation_once(trainer)

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        # a time-triggered save between micro-batches of one accumulation would lose their gradients
        if trainer.fit_loop._should_accumulate():
            return
        self._validation_due = validation_due(trainer)
        try:
            super().on_train_batch_end(trainer, *args, **kwargs)
            if ((last_step(trainer) or stopping(trainer)) and not self._deferred
                    and not self._should_skip_saving_checkpoint(trainer)):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._validation_due = False

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if self._validation_due:
            self._deferred = True
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        self._deferred = False  # a due validation that did not run (no batches) leaves nothing to wait for

    def on_validation_end(self, trainer, pl_module) -> None:
        # (Lightning's skip rule covers sanity checks, stages other than fit and a step saved already)
        if (self._deferred or trainer.received_sigterm) and not self._should_skip_saving_checkpoint(trainer):
            # after the best-checkpoint callback (Lightning runs checkpoint callbacks last, in order),
            # so this checkpoint holds the validation's outcome too. A SIGTERM that let the validation
            # finish saves here too: Lightning resumes a checkpoint of this moment exactly, while one
            # written when it raises (after the step's counters moved on) shifts the metrics' step by one
            self._deferred = False
            super()._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        self._deferred = False
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # saved already when max_steps ended the run (at its last step); left for max_epochs and stops
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning raises SIGTERMException between training steps (their validations done) or
        # inside a validation; only the first is a state a resumed run continues from exactly
        # (nor between the micro-batches of one accumulation: their gradients are not in a checkpoint)
        if (isinstance(exception, SIGTERMException) and not trainer.validating and not self._deferred
                and not trainer.fit_loop._should_accumulate()
                and not self._should_skip_saving_checkpoint(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def last_step(trainer) -> bool:
    """Whether the optimizer step that just ended is the run's last (``max_steps`` reached)."""
    return trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step


def stopping(trainer) -> bool:
    """Whether a callback (e.g. :class:`gist_lightning.curriculum.StopWhenLearned`) asked the run to
    stop after the step that just ended, and it may: saved then, as at ``max_steps`` (mid-epoch, not
    after the loop closed the epoch, whose counters a run resumed with a larger ``max_steps`` would
    start a new epoch from)."""
    return bool(trainer.should_stop) and trainer.fit_loop._can_stop_early


class BestCheckpoint(ModelCheckpoint):
    """Lightning's best-checkpoint callback, except that it leaves the ``last.ckpt`` of a run's end
    to :class:`ClockCheckpoint`.

    Lightning's own ``on_train_end`` writes ``last.ckpt`` when this process has not written one,
    after the loop has closed the epoch that ``max_steps`` cut short: a resumed run that found no
    better validation would end with other loop counters than the uninterrupted run, and extending
    ``max_steps`` from it would start another epoch on other batches."""

    def on_train_end(self, trainer, pl_module) -> None:
        pass


def clock_checkpoint(minutes: float | None = 10.0, every_n_steps: int | None = None) -> ModelCheckpoint:
    """The :class:`ClockCheckpoint` for ``minutes`` of training or ``every_n_steps`` steps (None / 0:
    no clock; it still writes ``last.ckpt`` at the last step and on a SIGTERM)."""
    common = dict(save_top_k=0, save_last=True, enable_version_counter=False)
    if every_n_steps:
        return ClockCheckpoint(every_n_train_steps=every_n_steps, **common)
    if minutes:
        return ClockCheckpoint(train_time_interval=timedelta(minutes=minutes), **common)
    return ClockCheckpoint(every_n_train_steps=0, every_n_epochs=0, **common)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with the temporary file beside the checkpoint (Lightning's
    goes to ``$TMPDIR``: a kill leaves litter there, and a ``$TMPDIR`` on another filesystem turns
    the final move into a copy that a kill can cut). Remote paths (``s3://``...) go to Lightning's."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def use_atomic_checkpoints(trainer) -> None:
    """Give the trainer's strategy :class:`AtomicCheckpointIO` where it writes single files with
    Lightning's default writer (DeepSpeed writes folders of its own and keeps its writer)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class ResumableRun(L.Callback):
    """Keeps a resumed run's folder as the uninterrupted run would have left it.

    - ``metrics.csv``: rows logged after the checkpoint a run resumes from (Lightning's ``step``
      column is the number of optimizer steps before the row's step, so rows of steps the
      checkpoint holds are below its ``global_step``) are dropped; the resumed run logs them again
      as it redoes those steps, and the file ends as the uninterrupted run's.
    - Temporaries of writes a kill cut short (``.*.tmp`` files, partial export folders) are removed
      from the run folder when a fit starts.
    """

    def __init__(self):
        self._resumed_step: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._resumed_step = None
        if stage != "fit":
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # a collective call: every rank makes it
        if trainer.is_global_zero:
            # only where this project writes (a run folder may be the working directory)
            for sub in ("checkpoints", "predictions"):
                if (folder / sub).is_dir():
                    remove_strays(folder / sub)
            for stray in folder.glob(".export*.tmp") if folder.is_dir() else ():
                remove_strays_at(stray)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.state.fn == "fit":
            self._resumed_step = checkpoint.get("global_step")

    def on_train_start(self, trainer, pl_module) -> None:
        # after the checkpoint is restored, whatever the strategy (DeepSpeed and FSDP restore it
        # after on_fit_start)
        step, self._resumed_step = self._resumed_step, None
        logger = trainer.logger
        path = getattr(getattr(logger, "experiment", None), "metrics_file_path", None) if logger else None
        if (step is None or not trainer.is_global_zero or not path or "://" in str(path)
                or not Path(path).is_file()):
            return
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows or "step" not in rows[0]:
            return
        col = rows[0].index("step")
        # a row of another length was cut by a kill in the middle of an append
        kept = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0]) and not _at_or_after(r, col, step)]
        if len(kept) < len(rows):
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(kept)
            write_text_atomic(path, buf.getvalue())

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._resumed_step = None


def _at_or_after(row: list[str], col: int, step: int) -> bool:
    try:
        return int(float(row[col])) >= step
    except (IndexError, ValueError):
        return False


def checkpoint_step(path: Path) -> int:
    """The global step of a Lightning checkpoint file (memory-mapped: the weights stay unread)."""
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"])


def resume_command(argv: list[str], version) -> str:
    """The command line that resumes the run ``argv`` started: the same arguments with
    ``--ckpt_path last`` and the logger version of the run folder."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--ckpt_path", "--trainer.logger.init_args.version"):
            skip = True
            continue
        if a.startswith(("--ckpt_path=", "--trainer.logger.init_args.version=")):
            continue
        args.append(a)
    args += ["--ckpt_path", "last"]
    if version is not None:
        args += ["--trainer.logger.init_args.version", str(version)]
    return shlex.join(["gist-lightning", *args])


def stopped_early_message(trainer, argv: list[str]) -> str:
    """One line for a fit that a SIGTERM stopped: where it stopped, the step ``last.ckpt`` holds
    (when this process wrote it) and the command that resumes it."""
    where = f"step {trainer.global_step}"
    if trainer.max_steps and trainer.max_steps > 0:
        where += f" of {trainer.max_steps}"
    ckpt = trainer.checkpoint_callback
    last = Path(ckpt.dirpath or "") / "last.ckpt" if ckpt else None
    if last is None or not last.exists():  # a DeepSpeed checkpoint is a folder
        return (f"stopped early by SIGTERM at {where}; no checkpoint was written yet: run the same command "
                "again")
    held = ""
    if last.is_file():
        try:
            held = f" (last.ckpt holds step {checkpoint_step(last)})"
        except Exception:  # noqa: BLE001 - the line is still useful without it
            held = ""
    version = getattr(trainer.logger, "version", None) if trainer.logger else None
    return f"stopped early by SIGTERM at {where}{held}; resume with: {resume_command(argv, version)}"


__all__ = ["AtomicCheckpointIO", "BestCheckpoint", "ClockCheckpoint", "ResumableRun", "SIGTERM_EXIT",
           "clock_checkpoint", "decide_validation_once", "last_step", "resume_command",
           "stopped_early_message", "use_atomic_checkpoints", "validation_due"]
