"""The training progress bar of ``gist-lightning fit``: Lightning's rich bar, counting optimizer
steps out of ``trainer.max_steps`` when a run is bounded by steps (Lightning's counts batches of
the current epoch and reads ``Epoch 0/-2`` when no epoch count is set)."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    @staticmethod
    def _by_steps(trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        text = f"Step (epoch {current_epoch})"
        width = len(self.validation_description)
        return f"{text:{width}}" if width > len(text) else text

    def _show_steps(self, trainer) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, total=trainer.max_steps,
                                 completed=trainer.global_step)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps(trainer) and not self.is_disabled:
            self._show_steps(trainer)
            self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._by_steps(trainer) and not self.is_disabled:
            self._show_steps(trainer)
            self.refresh()

    def _update(self, progress_bar_id, current: int, visible: bool = True, hard: bool = False) -> None:
        # Lightning sets the training bar to the batch index of the epoch after every batch: set to
        # the step count instead (the drop to the index and the rise back counted every step of a
        # later epoch as all the epochs before it: ~100k it/s in the demo)
        if progress_bar_id is not None and progress_bar_id == self.train_progress_bar_id \
                and self._by_steps(self.trainer):
            current = self.trainer.global_step
        super()._update(progress_bar_id, current, visible, hard)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        # Lightning stops the bar at teardown, after on_fit_end: its last frame came below the
        # export and the run's summary
        self._stop_progress()


def use_step_progress_bar(trainer) -> None:
    """Put :class:`StepProgressBar` in place of Lightning's default rich bar (a bar of the user's
    choice, or none, is left as it is)."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[i] = StepProgressBar()
