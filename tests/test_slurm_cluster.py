"""The one-node SLURM the sweep tests run on (the ``slurm_cluster`` fixture, experiments/slurm_local.sh):
a job array runs each of its tasks, and a job sent the signal SLURM sends before a time limit, then
requeued, runs again and knows it is a restart."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

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
