"""A run killed at any moment and resumed with ``--ckpt_path last`` ends as the uninterrupted run:
the same predictions, metrics rows, best checkpoint, export, last weights and loop counters, with
nothing left behind, and extending ``max_steps`` from its last.ckpt gives the same weights as from the
uninterrupted run's. Kills land from inside the process at named moments (``tests/kill_points.py``), with the
clock checkpoint every 10 steps (dividing the validation interval of 20) and every 7 (not)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_outputs
from safetensors.torch import load_file

BIN = str(Path(sys.executable).parent / "gist-lightning")
TESTS = str(Path(__file__).resolve().parent)
pytestmark = pytest.mark.slow


def _command(config: Path, folder: Path, every: int, *extra: str) -> list[str]:
    # 40 steps, validation at 20 and 40; a fixed logger version, so a resumed run finds its folder
    return [BIN, "fit", "--config", str(config), "--trainer.max_steps", "40",
            "--trainer.val_check_interval", "20", "--trainer.log_every_n_steps", "5",
            "--trainer.default_root_dir", str(folder),
            "--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.version", "run",
            "--checkpoint_every_n_steps", str(every), "--trainer.callbacks+=kill_points.KillAt", *extra]


def _env(tmp: Path, kill_at: str = "") -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=TESTS, GIST_KILL_AT=kill_at, TMPDIR=str(tmp))


def _folder(root: Path) -> Path:
    return root / "t" / "run"



def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loop_state(path: Path) -> dict:
    """The checkpoint's loop counters (epoch and batch progress, steps, the fit loop's own state), flat."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    ckpt = torch.load(path, weights_only=True)
    return {"epoch": ckpt["epoch"], "global_step": ckpt["global_step"], **flat(ckpt["loops"])}


EXTEND_TO = 46  # 6 steps past the end: mid-epoch (16 batches an epoch), no validation


def _extended(config: Path, root: Path, every: int, tmp: Path) -> Path:
    """Extend the finished run in ``root`` to ``EXTEND_TO`` steps from its last.ckpt (a copy of the run
    folder, so the original is kept); the extended run's last.ckpt."""
    copy = root.parent / f"{root.name}-extended"
    shutil.copytree(root, copy)
    done = subprocess.run(_command(config, copy, every, "--trainer.max_steps", str(EXTEND_TO),
                                   "--ckpt_path", "last"), capture_output=True, text=True, env=_env(tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    last = _folder(copy) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == EXTEND_TO
    return last


# the phases after which extending the run is checked too (a process each): the end of a finished run
# (where Lightning's own last.ckpt once held another epoch), a clock that does not divide validation,
# a SIGTERM between steps; every case compares the last weights and loop counters
EXTENDED_AFTER = {"validation_end:40", "validation_batch:20@7", "sigterm_train:25"}


def _same_end(config: Path, root: Path, want_root: Path, every: int, tmp: Path, want_every: int = 10,
              extend: bool = True) -> None:
    """The resumed run's last.ckpt has the uninterrupted run's weights and loop counters, and (with
    ``extend``) extending ``max_steps`` from either gives the same weights and counters (a resumed run
    that ended in another loop state would start another epoch on other batches)."""
    got, want = _folder(root) / "checkpoints" / "last.ckpt", _folder(want_root) / "checkpoints" / "last.ckpt"
    assert _same_tensors(_state(got), _state(want))
    assert _loop_state(got) == _loop_state(want)
    if not extend:
        return
    got, want = _extended(config, root, every, tmp), _extended_straight(config, want_root, want_every, tmp)
    assert _same_tensors(_state(got), _state(want))
    assert _loop_state(got) == _loop_state(want)


_EXTENDED: dict = {}


def _extended_straight(config: Path, root: Path, every: int, tmp: Path) -> Path:
    """:func:`_extended` of the uninterrupted run, made once per run folder and clock."""
    if (root, every) not in _EXTENDED:
        _EXTENDED[root, every] = _extended(config, root, every, tmp)
    return _EXTENDED[root, every]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run (its config, folder and printed output)."""
    from conftest import _run_config

    base = tmp_path_factory.mktemp("resume")
    config = _run_config(base, val_check_interval=20)
    root = base / "straight"
    done = subprocess.run(_command(config, root, 10, "--trainer.enable_progress_bar", "true"),
                          capture_output=True, text=True, env=_env(base / "tmp-straight"))
    assert done.returncode == 0, done.stderr[-3000:]
    return config, root, done


def test_the_uninterrupted_run_shows_steps_and_no_library_warnings(straight):
    _, root, done = straight
    assert "40/40" in done.stdout and "Epoch 0/-" not in done.stdout  # steps out of max_steps
    assert "LeafSpec" not in done.stderr
    assert (_folder(root) / "checkpoints" / "best-step20.ckpt").is_file()  # the case the kills must keep


CASES = [  # (clock every n steps, where the kill lands)
    (10, "validation_start:20"),
    (10, "validation_batch:20"),  # (the same phases of the second validation: no other path)
    (10, "validation_end:40"),
    (10, "export:40"),
    (10, "checkpoint_write:20"),  # best-step20.ckpt cut in half; last.ckpt of step 10 whole
    (7, "validation_batch:20"),  # a clock that does not divide the validation interval
]


@pytest.mark.parametrize("every, kill_at", CASES, ids=[f"every{n}-{k.replace(':', '@')}" for n, k in CASES])
def test_a_kill_at_any_phase_resumes_to_the_uninterrupted_result(straight, tmp_path, every, kill_at):
    config, want_root, _ = straight
    root, tmp = tmp_path / "killed", tmp_path / "tmp"
    killed = subprocess.run(_command(config, root, every), capture_output=True, text=True,
                            env=_env(tmp, kill_at))
    assert killed.returncode == -9, killed.stderr[-3000:]  # it died where it was told to
    resumed = subprocess.run(_command(config, root, every, "--ckpt_path", "last"), capture_output=True,
                             text=True, env=_env(tmp))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    got, want = _folder(root), _folder(want_root)
    assert_same_outputs(got, want)  # every prediction file once, the same metrics rows
    # the same best checkpoint, and the export made from it
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == ["best-step20.ckpt", "last.ckpt"]
    assert _same_tensors(_state(got / "checkpoints" / "best-step20.ckpt"), _state(want / "checkpoints" /
                                                                                  "best-step20.ckpt"))
    assert sorted(p.name for p in got.iterdir() if p.name.startswith("export")) == ["export"]  # no export-1
    assert json.loads((got / "export" / "gist_config.json").read_text())["source"] == \
        {"checkpoint": "best-step20.ckpt", "global_step": 20}
    assert _same_tensors(load_file(got / "export" / "model.safetensors"),
                         load_file(want / "export" / "model.safetensors"))
    # the summary reports the validation it kept, and nothing is left of the killed writes, in the
    # run folder or in $TMPDIR (Lightning's own writer puts its temporary file there)
    assert "best validation_unseen/rougeL" in resumed.stdout and "validation_human" in resumed.stdout
    assert "no validation ran" not in resumed.stdout
    assert not list(got.rglob("*.tmp"))
    assert not [p for p in tmp.iterdir() if not p.name.startswith("torchinductor")]  # torch's compile cache
    _same_end(config, root, want_root, every, tmp,
              extend=kill_at in EXTENDED_AFTER or f"{kill_at}@{every}" in EXTENDED_AFTER)


@pytest.mark.parametrize("every, kill_at, stopped_at, held", [
    (10, "sigterm_train:25", 25, 25),  # between steps: last.ckpt holds the stopping step
    (10, "sigterm_validation:20", 20, 10),  # inside a validation: the clock's step before it
    # after a finished validation: saved then (the step column stays)
    (7, "sigterm_validation_end:20", 20, 20),
])
def test_sigterm_says_how_to_resume_and_the_command_does(straight, tmp_path, every, kill_at, stopped_at,
                                                         held):
    config, want_root, _ = straight
    root, tmp = tmp_path / "stopped", tmp_path / "tmp"
    stopped = subprocess.run(_command(config, root, every), capture_output=True, text=True,
                             env=_env(tmp, kill_at))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if "stopped early by SIGTERM" in line]
    assert len(lines) == 1 and f"at step {stopped_at} of 40 (last.ckpt holds step {held})" in lines[0], \
        stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    step = torch.load(_folder(root) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step == held
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[0] == "gist-lightning" and command[-4:] == ["--ckpt_path", "last",
                                                              "--trainer.logger.init_args.version", "run"]
    resumed = subprocess.run([BIN, *command[1:]], capture_output=True, text=True, env=_env(tmp))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(root, want_root)
    _same_end(config, root, want_root, every, tmp, extend=kill_at in EXTENDED_AFTER)


def _same_run(root: Path, want_root: Path) -> None:
    assert_same_outputs(_folder(root), _folder(want_root))
    assert _same_tensors(load_file(_folder(root) / "export" / "model.safetensors"),
                         load_file(_folder(want_root) / "export" / "model.safetensors"))


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
