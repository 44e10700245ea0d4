"""The learning-rate schedule over a run's stages.

A curriculum runs as stages: fits that each resume the run's ``last.ckpt`` with a larger
``trainer.max_steps`` (``gist_lightning.sweeps.Stage``). By default a run has one schedule: the
checkpoint's optimizer and scheduler carry on, and the config's schedule (say a cosine over the new
``max_steps``) is read at the resumed step, so a stage starts wherever the decay has got to.

With ``model.stage_schedule`` each stage has a schedule of its own: its warmup (``warmup_ratio`` of
its steps) and its decay (``model.scheduler``'s shape) run over the steps from the checkpoint it
starts from to its ``max_steps``, up to its own ``model.learning_rate``; the optimizer's moments
carry on. A fit is a new stage when its ``max_steps`` (or ``max_epochs``) differ from those its
checkpoint was saved under, or the checkpoint was saved without ``stage_schedule``; a fit resumed
under the same ones (a stage killed and resumed) goes on with its stage's schedule, exactly where it
was. Every resumed fit's first step trains at its schedule's rate for that step (schedules that are
a factor of the step: transformers' named ones but ``reduce_lr_on_plateau``).

    gist-lightning fit ... --trainer.max_steps 1000                       # stage 1
    gist-lightning fit ... --trainer.max_steps 2400 --ckpt_path last \\
      --model.stage_schedule true --model.learning_rate 1.5e-4            # stage 2: its own cosine

A resumed fit whose ``model.learning_rate`` is not its checkpoint's, where that rate would not be
used (no ``stage_schedule``, or the same stage resumed), is refused instead of silently running at
the checkpoint's rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from .errors import GistError

RECORD = "gist_schedule"  # the checkpoint's key: which stage its schedule belongs to


def record(start: int, trainer, learning_rate: float, stage_schedule: bool) -> dict:
    """What a checkpoint keeps of its schedule: the step its stage's schedule started at, the
    stage's ``max_steps``/``max_epochs`` and rate."""
    return {"start": int(start), "max_steps": int(trainer.max_steps), "max_epochs": trainer.max_epochs,
            "learning_rate": float(learning_rate), "stage_schedule": bool(stage_schedule)}


def resumed_stage(checkpoint: dict, trainer, learning_rate: float, stage_schedule: bool) -> tuple[int, bool]:
    """For a fit resuming ``checkpoint``: (the step its schedule starts at, whether it starts a new
    stage there). Raises :class:`GistError` where ``learning_rate`` would be ignored."""
    saved = checkpoint.get(RECORD)
    hparams = checkpoint.get("hyper_parameters", {})
    saved_rate = saved["learning_rate"] if saved else hparams.get("learning_rate")
    changed = saved_rate is not None and not math.isclose(float(saved_rate), learning_rate, rel_tol=1e-9)
    if not stage_schedule:
        if changed:
            raise GistError(
                f"model.learning_rate: {learning_rate:g} is not the {float(saved_rate):g} of the checkpoint "
                "this fit resumes; a resumed fit goes on with its checkpoint's schedule, so the new rate "
                "would not be used. Set model.stage_schedule true to start a stage with a schedule of its "
                "own at this rate (with a larger trainer.max_steps), or resume at the checkpoint's rate")
        return 0, False
    same = (saved is not None and saved.get("stage_schedule") and saved["max_steps"] == trainer.max_steps
            and saved.get("max_epochs") == trainer.max_epochs)
    if not same:
        return int(checkpoint["global_step"]), True
    if changed:
        raise GistError(
            f"model.learning_rate: {learning_rate:g} is not the {float(saved_rate):g} of the stage this fit "
            f"resumes (the same trainer.max_steps, {trainer.max_steps}: the stage goes on with its own "
            "schedule); resume it at its rate, or start a new stage with a larger trainer.max_steps")
    return int(saved["start"]), False


def stage_factor(name: str, warmup_ratio: float, start: int, total: int,
                 learning_rate: float) -> Callable[[int], float]:
    """The factor of the peak rate ``learning_rate`` at each optimizer step of a stage that runs from
    step ``start`` to ``total``: transformers' schedule ``name`` over the stage's steps, shifted to
    start there (built at that rate: ``polynomial`` ends at an absolute rate)."""
    steps = total - start
    if steps < 1:
        raise GistError(f"trainer.max_steps ({total}) must be larger than the step the stage starts at "
                        f"({start}): a stage of model.stage_schedule has steps of its own")
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=learning_rate)
    warmup = int(warmup_ratio * steps)
    scheduler = get_scheduler(name, probe, num_warmup_steps=warmup, num_training_steps=steps)
    if not isinstance(scheduler, LambdaLR):
        raise GistError(f"model.scheduler: {name!r} is not a schedule of the step alone; "
                        "model.stage_schedule takes a schedule of the step (cosine, linear, "
                        "constant_with_warmup...)")
    shape = scheduler.lr_lambdas[0]
    return lambda step: shape(step - start)


def resume(scheduler, new_stage_rate: float | None = None) -> None:
    """At a resumed fit's first step (its checkpoint's optimizer and scheduler restored): each step
    trains at the rate this fit's schedule gives it. The optimizer comes back at the rate its last
    step set, which is the schedule's only where the schedule is the checkpoint's: a run extended to a
    larger ``max_steps`` would train one step at the old schedule's rate (0 at the end of a cosine).
    ``new_stage_rate``: a new stage of ``model.stage_schedule``, whose peak is that rate."""
    if not isinstance(scheduler, LambdaLR):  # (not a factor of the step alone: left as restored)
        return
    lambdas = scheduler.lr_lambdas
    if new_stage_rate is not None:
        scheduler.base_lrs = [new_stage_rate for _ in scheduler.base_lrs]
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
    for group, base, rate in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, rates):
        group["lr"], group["initial_lr"] = rate, base
    scheduler._last_lr = rates


__all__ = ["RECORD", "record", "resumed_stage", "stage_factor", "resume"]
