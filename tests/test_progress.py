"""What ``gist-lightning fit`` prints of Lightning's own: the step progress bar (its count, its
rate, printed before what the run prints at its end) and the model summary (no FLOPs it did not
count). A plain Lightning model trains here, a few milliseconds a step."""

from __future__ import annotations

import re
import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from gist_lightning.progress import StepProgressBar, use_step_progress_bar

STEP_SECONDS = 0.01


class SlowSteps(L.Callback):
    """Every step takes at least STEP_SECONDS, and the run prints a last line when fit ends (as the
    run summary does)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(STEP_SECONDS)

    def on_fit_end(self, trainer, pl_module):
        print("the end of the run", flush=True)


def fit(tmp_path, max_steps=12, batches_per_epoch=4) -> tuple[StepProgressBar, L.Trainer]:
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, limit_train_batches=batches_per_epoch,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[SlowSteps()], default_root_dir=tmp_path)
    use_step_progress_bar(trainer)
    [bar] = [c for c in trainer.callbacks if isinstance(c, RichProgressBar)]
    assert type(bar) is StepProgressBar
    trainer.fit(BoringModel())
    return bar, trainer


def test_the_bar_counts_steps_at_the_rate_they_ran_across_epochs(tmp_path):
    bar, trainer = fit(tmp_path)  # 3 epochs of 4 steps
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.completed, task.total) == (12, 12) and trainer.current_epoch == 3
    # no step ran faster than STEP_SECONDS (the bar once counted every step of a later epoch as
    # all the steps of the epochs before it: 8 per step in the third epoch here, ~100k it/s in the demo)
    assert task.speed is not None and 0 < task.speed <= 1 / STEP_SECONDS


def test_the_bar_is_printed_once_before_what_the_run_prints_at_its_end(tmp_path, capsys):
    fit(tmp_path)
    out = capsys.readouterr().out
    bars = [m.start() for m in re.finditer(r"Step \(epoch \d+\)", out)]
    end = out.index("the end of the run")
    assert len(bars) == 1 and bars[0] < end, out
    assert "12/12" in out[bars[0]:end]
    assert not out[end:].replace("the end of the run", "").strip(), out
