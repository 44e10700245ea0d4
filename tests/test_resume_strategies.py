"""A 2-process run (DDP, DeepSpeed ZeRO-3 on its CPU engine, FSDP2) whose every rank is killed, as a
node failure kills them, first inside a training step and then, resumed, inside a validation, ends
after a second ``--ckpt_path last`` as the uninterrupted run of the same strategy: the same
weights, metrics rows, prediction files and export. The first resume starts from the checkpoint of
an epoch's last batch, the second from one mid-epoch. The kills are one chain of three runs (not
two pairs) because most of a run's time is its two processes starting.

Kills land from inside (``tests/kill_points.py``); ``GIST_KILL_GROUP=1`` sends the SIGKILL to the
run's process group, which holds every rank (Lightning's launcher starts the other ranks as
children of the command). Each run is started in a session of its own, stopped with its whole group
after a wall-clock limit (a rank left waiting in a collective would wait for gloo's 30-minute
timeout), and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_outputs
from safetensors.torch import load_file

BIN = str(Path(sys.executable).parent / "gist-lightning")
ROOT = Path(__file__).resolve().parents[1]
TESTS = str(Path(__file__).resolve().parent)
LIMIT_S = 600  # per run: a hang ends here, not at gloo's timeout (runs took 25-70 s on 2 busy cores)
pytestmark = pytest.mark.slow

STRATEGIES = {
    "ddp": ["--config", str(ROOT / "configs/strategies/ddp-cpu.yaml")],
    # the ZeRO-3 preset with the CPU engine of tests/deepspeed_cpu.py (Lightning refuses DeepSpeed on CPU)
    "deepspeed": ["--config", str(ROOT / "configs/strategies/deepspeed-zero3.yaml"),
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
                  "--trainer.strategy.class_path", "deepspeed_cpu.CPUDeepSpeedStrategy",
                  "--trainer.strategy.init_args.process_group_backend", "gloo"],
    "fsdp": ["--config", str(ROOT / "configs/strategies/fsdp-cpu.yaml")],
}


def _command(config: Path, strategy: str, *extra: str) -> list[str]:
    # 16 steps (8 per epoch on each rank), validation at 8 and 16, last.ckpt every 4 steps, training
    # rows every 2 (rows a resumed run must not log twice); 4 records per split, one batch per rank
    return [BIN, "fit", "--config", str(config), *STRATEGIES[strategy], "--trainer.max_steps", "16",
            "--trainer.val_check_interval", "8", "--trainer.log_every_n_steps", "2",
            "--data.init_args.max_validation_records", "4", "--data.init_args.eval_batch_size", "2",
            "--model.max_new_tokens", "4", "--trainer.logger.init_args.version", "run",
            "--checkpoint_every_n_steps", "4", "--trainer.callbacks+=kill_points.KillAt", *extra]


def _fit(command: list[str], tmp: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    """Run ``command`` in a session of its own; on the wall-clock limit, kill its process group."""
    tmp.mkdir(parents=True, exist_ok=True)
    # the package beside these tests, whichever checkout is installed (and kill_points beside them)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([TESTS, str(ROOT)]),
               GIST_KILL_AT=kill_at, GIST_KILL_GROUP="1", DS_ACCELERATOR="cpu", TMPDIR=str(tmp))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run did not end within {LIMIT_S} s; its process group was killed\n{err[-3000:]}")
    finally:
        _assert_group_gone(proc.pid)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _assert_group_gone(group: int) -> None:
    """No process of the run is left: none dead-locked waiting for a rank that died."""
    deadline = time.monotonic() + 30  # a rank that outlives rank 0 by a moment is still exiting
    while (alive := _members(group)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive:
        os.killpg(group, signal.SIGKILL)
        pytest.fail(f"processes {alive} of the run outlived it (killed now)")


def _members(group: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its closing ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended while being read
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _folder(root: Path) -> Path:
    return root / "runs" / "t" / "run"



def _held_step(ckpt: Path) -> int:
    """The step a checkpoint holds: a file, or DeepSpeed's folder (Lightning's state in rank 0's shard)."""
    if ckpt.is_dir():
        ckpt = ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def _weights(ckpt: Path, scratch: Path) -> dict:
    """A checkpoint's full weights; a DeepSpeed folder is consolidated as `gist-lightning export` does."""
    if ckpt.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        out = scratch / f"{ckpt.name}.consolidated"
        convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), str(out))
        ckpt = out
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_rank_killed_in_training_then_in_validation_resumes_to_the_uninterrupted_run(
        tmp_path, strategy):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    from conftest import _run_config

    config = _run_config(tmp_path)  # one data cache for the four runs
    want_root, root = tmp_path / "straight", tmp_path / "killed"
    done = _fit(_command(config, strategy, "--trainer.default_root_dir", str(want_root / "runs"),
                         "--trainer.logger.init_args.save_dir", str(want_root / "runs")), tmp_path / "tmp")
    assert done.returncode == 0, done.stderr[-3000:]
    here = ("--trainer.default_root_dir", str(root / "runs"), "--trainer.logger.init_args.save_dir",
            str(root / "runs"))
    last = _folder(root) / "checkpoints" / "last.ckpt"

    # inside training step 11 (its gradients reduced, the weights not updated): last.ckpt holds step 8,
    # written after step 8's validation
    killed = _fit(_command(config, strategy, *here), tmp_path / "tmp", "optimizer_step:10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _held_step(last) == 8
    # resumed, then killed inside the validation of step 16: last.ckpt holds step 12 (the save due at
    # 16 waits for that validation)
    killed = _fit(_command(config, strategy, *here, "--ckpt_path", "last"), tmp_path / "tmp",
                  "validation_batch:16")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _held_step(last) == 12
    resumed = _fit(_command(config, strategy, *here, "--ckpt_path", "last"), tmp_path / "tmp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    got, want = _folder(root), _folder(want_root)
    # every prediction file once, the same metrics rows (training loss every 2 steps, both validations)
    assert_same_outputs(got, want)
    # the same best and last weights (single files gathered on rank 0; DeepSpeed's folders of shards)
    assert sorted(p.name for p in (got / "checkpoints").iterdir()) == ["best-step8.ckpt", "last.ckpt"]
    weights = {name: _weights(got / "checkpoints" / name, tmp_path)
               for name in ("best-step8.ckpt", "last.ckpt")}
    for name, got_weights in weights.items():
        assert _same_tensors(got_weights, _weights(want / "checkpoints" / name, tmp_path)), name
    # DDP exports the best checkpoint; the sharded strategies leave it to `gist-lightning export`
    exports = sorted(p.name for p in got.iterdir() if p.name.startswith("export"))
    assert exports == (["export"] if strategy == "ddp" else [])
    if strategy == "ddp":
        assert _same_tensors(load_file(got / "export" / "model.safetensors"),
                             load_file(want / "export" / "model.safetensors"))
    if strategy == "deepspeed":  # the ZeRO-3 folder of shards converts to an HF folder of those weights
        from gist_lightning.cli import main
        from gist_lightning.export import load_pretrained

        main(["export", "--ckpt", str(got / "checkpoints" / "best-step8.ckpt"), "--out",
              str(tmp_path / "hf")])
        model, _, settings = load_pretrained(tmp_path / "hf", attn_implementation="eager")
        assert settings["num_gist_tokens"] == 1
        best = weights["best-step8.ckpt"]  # consolidated above
        assert _same_tensors({f"model.{k}": v for k, v in model.state_dict().items()},
                             {k: v for k, v in best.items() if k.startswith("model.")})
    assert "best validation_unseen/rougeL" in resumed.stdout and "no validation ran" not in resumed.stdout
    assert not list(got.rglob("*.tmp"))
    assert not [p for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor")]
