"""A callback that SIGKILLs (or SIGTERMs) its own process at a named moment of a fit, for the kill
tests (``GIST_KILL_AT=<point>:<step>`` in the environment; points in ``POINTS``; without it the
callback does nothing). A kill from inside lands at exactly that moment, where a kill from outside
races the run. With ``GIST_KILL_GROUP=1`` the SIGKILL goes to the whole process group, every rank of
a multi-process run at once, as a node failure does (start the run in a session of its own)."""

from __future__ import annotations

import os
import signal

import lightning as L

POINTS = ("optimizer_step", "validation_start", "validation_batch", "validation_end", "export",
          "checkpoint_write", "sigterm_train", "sigterm_validation", "sigterm_validation_end",
          "sigterm_accumulating")


def _die() -> None:
    if os.environ.get("GIST_KILL_GROUP") == "1":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    def __init__(self):
        point, _, step = os.environ.get("GIST_KILL_AT", "").partition(":")
        assert point in POINTS or not point, f"GIST_KILL_AT={point!r}: expected one of {POINTS}"
        self.point, self.step = point, int(step or 0)

    def _here(self, trainer, point: str) -> bool:
        return self.point == point and trainer.global_step == self.step and not trainer.sanity_checking

    def setup(self, trainer, pl_module, stage):
        if self.point == "checkpoint_write":
            self._die_inside_checkpoint_writes(trainer)
        if self.point == "export":  # after the weights are written, before the settings file
            import gist_lightning.export as export

            def finish_then_die(*args, **kwargs):
                _die()

            export._finish = finish_then_die

    def _die_inside_checkpoint_writes(self, trainer) -> None:
        """The first checkpoint written at ``step`` gets half its bytes, then the process dies:
        whether it is written by torch.save to a path, or (Lightning's own writer) saved to memory
        and written through fsspec to a temporary file."""
        import io

        import fsspec.implementations.local as local
        import torch

        save, write = torch.save, local.LocalFileOpener.write

        def save_half_then_die(obj, f, *args, **kwargs):
            if trainer.global_step != self.step or not isinstance(f, (str, os.PathLike)):
                return save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            save(obj, buf, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: buf.tell() // 2])
            _die()

        def write_half_then_die(opener, data):
            if trainer.global_step != self.step or opener.autocommit:  # a transaction's file, not metrics.csv
                return write(opener, data)
            write(opener, data[: len(data) // 2])
            opener.flush()
            _die()

        torch.save, local.LocalFileOpener.write = save_half_then_die, write_half_then_die

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # inside training step step + 1: its gradients computed (and all-reduced), the weights not updated
        if self._here(trainer, "optimizer_step"):
            _die()

    def on_validation_start(self, trainer, pl_module):
        if self._here(trainer, "validation_start"):
            _die()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._here(trainer, "sigterm_train"):  # Lightning stops after this step (and its validation)
            os.kill(os.getpid(), signal.SIGTERM)
        if self._here(trainer, "sigterm_accumulating") and trainer.fit_loop._should_accumulate():
            os.kill(os.getpid(), signal.SIGTERM)  # between the micro-batches of one optimizer step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and dataloader_idx == 1:
            if self._here(trainer, "validation_batch"):
                _die()
            if self._here(trainer, "sigterm_validation"):
                os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_end(self, trainer, pl_module):
        # predictions and metrics are written; Lightning runs checkpoint callbacks after this one
        if self._here(trainer, "validation_end"):
            _die()
        if self._here(trainer, "sigterm_validation_end"):  # the validation has finished
            os.kill(os.getpid(), signal.SIGTERM)
