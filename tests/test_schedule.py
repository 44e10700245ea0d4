"""model.stage_schedule: a stage that resumes a checkpoint with a larger max_steps runs a schedule of
its own (its warmup and decay over its own steps, up to its own rate), by the rates each step trained
at; a stage killed and resumed goes on with it exactly; without it a run keeps one schedule, and a
rate a resumed fit would ignore is refused."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gist_lightning.errors import GistError

BIN = str(Path(sys.executable).parent / "gist-lightning")
TESTS = str(Path(__file__).resolve().parent)
MONITOR = ("--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
           "--trainer.callbacks.logging_interval", "step")


def _args(config: Path, root: Path, max_steps: int, *extra: str) -> list[str]:
    # no validation; warmup_ratio 0.2: stage 2's 10 steps warm up over 2 of them (stage 1's 6 over 1)
    return ["fit", "--config", str(config), "--trainer.max_steps", str(max_steps),
            "--trainer.val_check_interval", "100", "--trainer.limit_val_batches", "0",
            "--trainer.log_every_n_steps", "1", "--model.warmup_ratio", "0.2",
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.version", "run",
            *MONITOR, *extra]


def _fit(*args: str):
    from gist_lightning.cli import cli_main

    return cli_main(list(args))


def _rates(run: Path) -> dict[int, float]:
    """The rate each optimizer step trained at (LearningRateMonitor's row at that step; the decayed
    group's)."""
    rows = csv.DictReader(open(run / "metrics.csv"))
    return {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")}


def _cosine(k: int, steps: int, warmup: int) -> float:
    if k < warmup:
        return k / warmup
    return 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup)))


def _resume_from(run: Path, how: str) -> str:
    """``--ckpt_path`` naming the run's last.ckpt as ``last`` or as its file (Lightning once laid a
    file's hyperparameters over the command line's)."""
    return "last" if how == "last" else str(run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["last", "file"])
def test_the_next_stage_runs_its_own_schedule_at_its_own_rate(run_config, tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    config, root = run_config(), tmp_path / "runs"
    run = root / "t" / "run"
    _fit(*_args(config, root, 6, "--model.learning_rate", "1e-2"))
    first = _rates(run)
    assert [round(first[s] / 1e-2, 6) for s in range(6)] == [round(_cosine(s, 6, 1), 6) for s in range(6)]
    _fit(*_args(config, root, 16, "--model.learning_rate", "4e-3", "--model.stage_schedule", "true",
                "--ckpt_path", _resume_from(run, how)))
    rates = _rates(run)
    # steps 6..15: a cosine over the stage's 10 steps, 2 of warmup, up to 4e-3 (the run's schedule
    # would have read a cosine over 16 steps at step 6, at 1e-2)
    want = [round(_cosine(k, 10, 2), 6) for k in range(10)]
    assert [round(rates[s] / 4e-3, 6) for s in range(6, 16)] == want
    assert max(rates[s] for s in range(6, 16)) == pytest.approx(4e-3)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    recorded = state["gist_schedule"]
    assert recorded == {"start": 6, "max_steps": 16, "max_epochs": recorded["max_epochs"],
                        "learning_rate": 4e-3, "stage_schedule": True}
    assert state["lr_schedulers"][0]["base_lrs"] == [4e-3, 4e-3]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["last", "file"])
def test_without_it_a_run_keeps_one_schedule_and_a_changed_rate_is_refused(run_config, tmp_path, monkeypatch,
                                                                           how):
    monkeypatch.chdir(tmp_path)
    config, root = run_config(), tmp_path / "runs"
    run = root / "t" / "run"
    _fit(*_args(config, root, 6, "--model.learning_rate", "1e-2"))
    with pytest.raises(GistError, match=r"model.learning_rate: 0.004 is not the 0.01 of the checkpoint "
                                        r"this fit resumes.*model.stage_schedule true"):
        _fit(*_args(config, root, 16, "--model.learning_rate", "4e-3", "--ckpt_path", _resume_from(run, how)))
    _fit(*_args(config, root, 16, "--model.learning_rate", "1e-2", "--ckpt_path", "last"))
    # the refused fit removed the config it wrote: one config per fit that trained
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config-resumed.yaml", "config.yaml"]
    # the cosine over all 16 steps (3 of warmup), read from step 6 on: step 6 too (it once trained at
    # the rate stage 1's last step had set, 0 at the end of its cosine)
    rates = _rates(run)
    want = [round(_cosine(s, 16, 3), 6) for s in range(6, 16)]
    assert [round(rates[s] / 1e-2, 6) for s in range(6, 16)] == want


def _env(kill_at: str = "") -> dict:
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, GIST_KILL_AT=kill_at)


def _stage2(config: Path, root: Path, kill_at: str = "", rate: str = "4e-3") -> subprocess.CompletedProcess:
    return subprocess.run([BIN, *_args(config, root, 16, "--model.learning_rate", rate,
                                       "--model.stage_schedule", "true", "--ckpt_path", "last",
                                       "--checkpoint_every_n_steps", "100",
                                       "--trainer.callbacks+=kill_points.KillAt")],
                          capture_output=True, text=True, env=_env(kill_at))


@pytest.mark.slow
def test_a_stage_killed_and_resumed_goes_on_with_its_own_schedule_exactly(run_config, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    config, straight = run_config(), tmp_path / "straight"
    _fit(*_args(config, straight, 6, "--model.learning_rate", "1e-2"))
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    done = _stage2(config, straight)
    assert done.returncode == 0, done.stderr[-3000:]
    # stopped by a SIGTERM at step 11 (last.ckpt written there), then resumed under the same max_steps
    stopped = _stage2(config, killed, "sigterm_train:11")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = killed / "t" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 11
    # the same stage resumed at another rate: refused, nothing trained
    other = _stage2(config, killed, rate="2e-3")
    assert other.returncode != 0 and "is not the 0.004 of the stage this fit resumes" in other.stderr, \
        other.stderr[-3000:]
    resumed = _stage2(config, killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = (torch.load(r / "t" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
                 for r in (killed, straight))
    assert got["global_step"] == want["global_step"] == 16
    assert all(torch.equal(got["state_dict"][k], want["state_dict"][k]) for k in want["state_dict"])
    assert _rates(killed / "t" / "run") == pytest.approx(_rates(straight / "t" / "run"), rel=1e-12)
    assert got["gist_schedule"]["start"] == 6


@pytest.mark.parametrize("name", ["cosine", "linear", "polynomial", "constant_with_warmup",
                                  "inverse_sqrt"])
def test_a_stage_from_step_0_is_the_plain_schedule_and_one_later_its_shift(name):
    """The stage's factors are transformers' schedule over its steps, at its rate (polynomial ends at
    an absolute rate), shifted to its first step."""
    from transformers import get_scheduler

    from gist_lightning.schedule import stage_factor

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    plain = get_scheduler(name, optimizer, num_warmup_steps=3, num_training_steps=20).lr_lambdas[0]
    assert [stage_factor(name, 0.15, 0, 20, 1e-3)(s) for s in range(20)] == [plain(s) for s in range(20)]
    assert [stage_factor(name, 0.15, 7, 27, 1e-3)(s + 7) for s in range(20)] == [plain(s) for s in range(20)]


def test_a_stage_with_no_steps_of_its_own_or_no_schedule_of_the_step_is_refused():
    from gist_lightning.schedule import stage_factor

    factor = stage_factor("cosine", 0.0, 6, 16, 1e-3)
    assert factor(6) == 1.0 and factor(11) == 0.5
    with pytest.raises(GistError, match=r"trainer.max_steps \(6\) must be larger than the step the stage "
                                        r"starts at \(6\)"):
        stage_factor("cosine", 0.1, 6, 6, 1e-3)
    with pytest.raises(GistError, match="'reduce_lr_on_plateau' is not a schedule of the step"):
        stage_factor("reduce_lr_on_plateau", 0.1, 0, 6, 1e-3)
