"""The one-node SLURM the sweep tests run on (the ``slurm_cluster`` fixture, experiments/slurm_local.sh):
a job array runs each of its tasks, and a job sent the signal SLURM sends before a time limit, then
requeued, runs again and knows it is a restart."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from gist_lightning.sweeps import LocalLauncher, Sweep, expand, parse_grid

pytestmark = pytest.mark.slow


def slurm(cluster, *args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, timeout=30,
                          env=dict(os.environ, **cluster.env)).stdout


def wait_for(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.1)
    return result


def final_states(cluster, job_id: str) -> dict[str, str] | None:
    """Task id -> state of every task of the job once none is pending, running or completing (squeue
    keeps finished jobs for MinJobAge, 10 s here)."""
    lines = slurm(cluster, "squeue", "--noheader", "--array", "--states=all", f"--jobs={job_id}",
                  "--format=%i %T").split()
    states = dict(zip(lines[::2], lines[1::2]))
    if states and not {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING"} & set(states.values()):
        return states
    return None


def test_array_runs_each_task(slurm_cluster, tmp_path):
    job = slurm(slurm_cluster, "sbatch", "--parsable", "--array=0-2", f"--output={tmp_path}/task_%a.out",
                "--wrap", "echo task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT").strip()

    states = wait_for(lambda: final_states(slurm_cluster, job), f"array job {job} finished")
    assert states == {f"{job}_{i}": "COMPLETED" for i in range(3)}
    outputs = [(tmp_path / f"task_{i}.out").read_text() for i in range(3)]
    assert outputs == [f"task {i} of 3\n" for i in range(3)]


def test_signalled_then_requeued_job_runs_again(slurm_cluster, tmp_path):
    """USR1 as SLURM sends it before a time limit (here by hand, to the batch shell), then
    `scontrol requeue`: the job runs again with SLURM_RESTART_COUNT=1 (unset the first time), under
    the same job id. A requeued job may start again 5 s later (cred_expire of the cluster)."""
    log = tmp_path / "log"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
echo "start ${{SLURM_RESTART_COUNT-unset}} $SLURM_JOB_ID" >> {log}
if [ -n "${{SLURM_RESTART_COUNT-}}" ]; then echo end >> {log}; exit 0; fi
trap 'echo USR1 >> {log}' USR1
for i in $(seq 600); do sleep 0.1; done  # bash runs the trap between two sleeps
""")
    job = slurm(slurm_cluster, "sbatch", "--parsable", f"--output={tmp_path}/job.out", str(script)).strip()
    lines = lambda: log.read_text().splitlines() if log.exists() else []  # noqa: E731

    wait_for(lambda: lines() == [f"start unset {job}"], "the job started")
    slurm(slurm_cluster, "scancel", "--signal=USR1", "--batch", job)
    wait_for(lambda: lines()[1:] == ["USR1"], "the job trapped USR1")
    slurm(slurm_cluster, "scontrol", "requeue", job)

    wait_for(lambda: final_states(slurm_cluster, job) == {job: "COMPLETED"}, "the requeued job finished")
    assert lines() == [f"start unset {job}", "USR1", f"start 1 {job}", "end"]
    assert "Restarts=1" in slurm(slurm_cluster, "scontrol", "show", "job", job)


# -- the sweep engine's slurm launcher on it (here, not in test_sweeps.py: the cluster is one per
# machine, and pytest-xdist gives each file to one worker) -------------------------------------

def _weights(folder: Path) -> dict:
    import torch

    return torch.load(folder / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _metric_rows(folder: Path) -> list[str]:
    return (folder / "run" / "metrics.csv").read_text().splitlines()


def test_slurm_cells_end_as_local_ones_and_a_preempted_cell_resumes(slurm_cluster, run_config, tmp_path,
                                                                    monkeypatch):
    """The same grid (k in {1, 2}) through the slurm launcher (a real one-node SLURM, one CPU per array
    task) and the local one: the same metrics and weights per cell. A cell sent submitit's pre-timeout
    signal mid-run writes last.ckpt, is requeued and resumes from it: it ends with the weights and
    metrics of the uninterrupted cell, in 2 attempts. A driver started while the array is queued or
    running submits nothing again."""
    from gist_lightning.sweeps import SlurmLauncher

    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = str(run_config(max_steps=30, val_check_interval=15))
    extra = ["--model.max_new_tokens", "2", "--checkpoint_every_n_steps", "5"]
    cells = expand(parse_grid(["model.num_gist_tokens=1,2"]), [0])
    local = Sweep(cells, [config], tmp_path / "local", LocalLauncher(cells_at_once=2, cores=2), extra,
                  log=lambda m: None, poll_seconds=0.2)
    assert local.run() == 0

    logs: list[str] = []
    runs = tmp_path / "slurm"
    launcher = SlurmLauncher(runs.resolve(), partition=slurm_cluster.partition, cpus_per_task=1,
                             timeout_min=10)
    sweep = Sweep(cells, [config], runs, launcher, extra, log=logs.append, poll_seconds=0.5)
    sweep.check()
    for cell in cells:
        sweep.write_spec(cell)
    sweep._start(cells)  # submitted; the driver below only watches
    jobs = {c.name: json.loads((runs / c.name / "launch.json").read_text())["job"] for c in cells}
    # preempt k2 once its run has a checkpoint: submitit's signal, as SLURM sends it before a limit
    first = runs / "k2-seed0" / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not first.exists():
        assert time.monotonic() < deadline, (runs / "k2-seed0" / "stdout.log").read_text()[-3000:]
        time.sleep(0.2)
    # (to the job's steps, where submitit's process runs, as SLURM sends --signal=USR2@90; not --batch)
    subprocess.run(["scancel", "--signal=USR2", jobs["k2-seed0"]], check=True, env=os.environ)
    # a second driver finds both cells on the scheduler and submits nothing
    logs.clear()
    watcher = Sweep(cells, [config], runs, SlurmLauncher(runs.resolve(), partition=slurm_cluster.partition),
                    extra, log=logs.append, poll_seconds=0.5)
    assert watcher.run() == 0, logs
    assert sum("still queued or running on the scheduler" in line for line in logs) == 2, logs
    assert not any("submitted" in line for line in logs), logs
    for cell in cells:
        got, want = runs / cell.name, tmp_path / "local" / cell.name
        assert _metric_rows(got) == _metric_rows(want), cell.name
        a, b = _weights(got), _weights(want)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), cell.name
    attempts = json.loads((runs / "k2-seed0" / "attempts.json").read_text())
    assert [a["restart"] for a in attempts] == [None, "1"], attempts  # requeued once, resumed
    assert json.loads((runs / "k2-seed0" / "run" / "done.json").read_text())["attempts"] == 2
