"""Resuming at the moments inside a step (test_resume.py has the phases of a run): a SIGTERM between
the micro-batches of one optimizer step keeps the last whole step, and a time-based validation
interval is decided once a step, by rank 0 for every rank (ranks whose clocks disagree validate at
the same steps). Split from test_resume.py so that the two files run on both test workers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_resume import BIN, TESTS, _command, _env, _folder, _loop_state, _same_run, _same_tensors, _state

pytestmark = pytest.mark.slow


def test_sigterm_between_micro_batches_keeps_the_last_whole_step(tmp_path):
    """With gradient accumulation a SIGTERM lands between the micro-batches of one optimizer step:
    no checkpoint is written there (it would lose their gradients); the resumed run from the last
    whole step ends as the uninterrupted one."""
    from conftest import _run_config

    config = _run_config(tmp_path, val_check_interval=20)
    accumulate = ("--trainer.accumulate_grad_batches", "2")
    want = tmp_path / "straight"
    done = subprocess.run(_command(config, want, 10, *accumulate), capture_output=True, text=True,
                          env=_env(tmp_path / "tmp"))
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "stopped"
    stopped = subprocess.run(_command(config, root, 10, *accumulate), capture_output=True, text=True,
                             env=_env(tmp_path / "tmp", "sigterm_accumulating:13"))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert torch.load(_folder(root) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    resumed = subprocess.run(_command(config, root, 10, *accumulate, "--ckpt_path", "last"),
                             capture_output=True, text=True, env=_env(tmp_path / "tmp"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(root, want)
    got, want = _folder(root) / "checkpoints" / "last.ckpt", _folder(want) / "checkpoints" / "last.ckpt"
    assert _same_tensors(_state(got), _state(want))
    assert _loop_state(got) == _loop_state(want)


def _clocked(config: Path, root: Path, tmp: Path, *extra: str, **env: str) -> list[int]:
    """A 12-step fit validated on a time-based interval of 1 s under ``validation_clock.TickingClock``
    (0.3 s a read: a validation every 4th step when the clock is read once a step), with a
    checkpoint every step; the steps rank 0 validated at."""
    command = [BIN, "fit", "--config", str(config), "--trainer.max_steps", "12",
               "--trainer.val_check_interval", "00:00:00:01", "--trainer.default_root_dir", str(root),
               "--trainer.logger.init_args.save_dir", str(root), "--checkpoint_every_n_steps", "1",
               "--trainer.callbacks+=validation_clock.TickingClock", *extra]
    out = tmp / "validated"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env=dict(_env(tmp), GIST_CLOCK_TICK="0.3", GIST_CLOCK_OUT=str(out), **env))
    try:
        _, err = proc.communicate(timeout=240)  # ranks that disagree would wait in a collective
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise AssertionError("the fit hung (ranks waiting in different collectives?)") from None
    assert proc.returncode == 0, err[-3000:]
    return json.loads(Path(f"{out}.rank0.json").read_text())


def test_a_time_based_validation_is_decided_once_a_step(tmp_path):
    """Lightning reads the clock each time it asks whether a validation is due; the clock checkpoint
    asks first, so a clock that moved between the two reads would let it save a step just before
    that step's validation (TickingClock fails the fit if one does)."""
    from conftest import _run_config

    assert _clocked(_run_config(tmp_path), tmp_path / "run", tmp_path / "tmp") == [4, 8, 12]


def test_ranks_whose_clocks_disagree_validate_at_the_same_steps(tmp_path):
    """Under DDP every rank reads its own clock; rank 1's runs slower here, so without one shared
    decision it would skip validations rank 0 runs and the ranks would wait in different collectives."""
    from conftest import _run_config

    ddp = str(Path(TESTS).parent / "configs" / "strategies" / "ddp-cpu.yaml")
    validated = _clocked(_run_config(tmp_path), tmp_path / "run", tmp_path / "tmp", "--config", ddp,
                         GIST_CLOCK_TICK_RANK1="0.2")
    assert validated == [4, 8, 12]
    assert json.loads((tmp_path / "tmp" / "validated.rank1.json").read_text()) == validated
