"""Curricula: a training stage that ends once the model has learned what the stage is for.

A long-context gist model fine-tuned from a base first learns the lookup on short contexts, then
trains on the task's; whether the second stage leaves its loss plateau depends on whether the first
had learned the lookup when it ended (docs/long-context.md). :class:`StopWhenLearned` ends such a
stage on that condition instead of after a fixed number of steps, ``trainer.max_steps`` its cap.
"""

from __future__ import annotations

from collections import deque

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from .errors import GistError


class StopWhenLearned(L.Callback):
    """Ends the fit once the mean of ``monitor`` over the last ``window`` optimizer steps is under
    ``below``.

    ``monitor`` is a training loss the module logs every step: ``train/loss``, or, where objectives
    add terms to it, the answer's own ``train/lm_loss``. The window is kept in checkpoints, so a
    stage killed and resumed stops where the uninterrupted one would; the stop writes ``last.ckpt``
    (:class:`gist_lightning.resume.ClockCheckpoint`), which the next stage resumes from
    (``--ckpt_path last`` with a larger ``max_steps``); a stage resumed after its stop (killed before
    the sweep marked it done) ends at once. On several devices each step's value is the ranks' mean,
    so every rank holds the same window and stops at the same step.

        gist-lightning fit ... --trainer.max_steps 1500 \\
          --trainer.callbacks+=gist_lightning.curriculum.StopWhenLearned \\
          --trainer.callbacks.below 0.25 --trainer.callbacks.monitor train/lm_loss
    """

    def __init__(self, below: float, monitor: str = "train/loss", window: int = 200):
        if window < 1:
            raise ValueError(f"StopWhenLearned.window must be >= 1 step; got {window}")
        self.below, self.monitor, self.window = below, monitor, window
        self._values: deque[float] = deque(maxlen=window)
        self.stopped_at: int | None = None  # the global step the fit stopped at, if it did here

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    def _learned(self) -> bool:
        return len(self._values) == self.window and sum(self._values) / self.window < self.below

    def on_train_start(self, trainer, pl_module) -> None:
        if self._learned():  # resumed from the checkpoint its stop wrote: nothing more to train
            trainer.should_stop = True
            self.stopped_at = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():  # (one value per optimizer step)
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = sorted(k for k in trainer.callback_metrics if k.startswith("train/"))
            raise GistError(f"StopWhenLearned.monitor: {self.monitor!r} is not logged by this run "
                            f"(logged: {', '.join(logged) or 'nothing yet'}); train/lm_loss exists only "
                            "with model.objectives")
        # (the ranks' mean: one window on every rank, as a checkpoint holds rank 0's)
        self._values.append(float(trainer.strategy.reduce(value.detach().float(), reduce_op="mean")))
        if self._learned():
            trainer.should_stop = True
            self.stopped_at = trainer.global_step
            rank_zero_info(f"StopWhenLearned: the mean {self.monitor} of the last {self.window} steps is "
                           f"under {self.below}; stopping at step {trainer.global_step}")

    def state_dict(self) -> dict:
        return {"values": list(self._values), "monitor": self.monitor}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("monitor", self.monitor) == self.monitor:  # (another metric's values: dropped)
            self._values = deque(state_dict["values"], maxlen=self.window)


__all__ = ["StopWhenLearned"]
