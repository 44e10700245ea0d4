"""Test-only: a clock for Lightning's time-based validation rule that moves a fixed amount each
time it is read (``GIST_CLOCK_TICK`` seconds; ``GIST_CLOCK_TICK_RANK1`` on rank 1), so that two
reads within one step disagree, and two ranks disagree, the same way on every run; and a check,
at every validation, that the clock checkpoint has not saved that step already (a save just before
a validation would say the step is done while its validation is still to run).

    --trainer.callbacks+=validation_clock.TickingClock --trainer.val_check_interval 00:00:00:01
"""

from __future__ import annotations

import json
import os

import lightning as L

from gist_lightning.resume import ClockCheckpoint


class _Clock:
    def __init__(self, tick: float):
        self.now, self.tick = 1000.0, tick

    def monotonic(self) -> float:
        self.now += self.tick
        return self.now

    def __getattr__(self, name):  # time.time() and the rest: the real module's
        import time

        return getattr(time, name)


class TickingClock(L.Callback):
    def __init__(self):
        self.validated: list[int] = []

    def setup(self, trainer, pl_module, stage):
        import lightning.pytorch.loops.evaluation_loop as evaluation_loop
        import lightning.pytorch.loops.fit_loop as fit_loop
        import lightning.pytorch.loops.training_epoch_loop as training_epoch_loop

        key = "GIST_CLOCK_TICK_RANK1" if trainer.global_rank == 1 else "GIST_CLOCK_TICK"
        clock = _Clock(float(os.environ.get(key) or os.environ["GIST_CLOCK_TICK"]))
        for module in (evaluation_loop, fit_loop, training_epoch_loop):
            module.time = clock

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        [clock] = [c for c in trainer.callbacks if isinstance(c, ClockCheckpoint)]
        assert clock._last_global_step_saved != trainer.global_step, \
            f"last.ckpt of step {trainer.global_step} was saved before its validation"
        self.validated.append(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        out = os.environ.get("GIST_CLOCK_OUT")
        if out:
            with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
                json.dump(self.validated, f)
