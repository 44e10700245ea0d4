"""Where a sweep's cells run. One interface, two places (as submitit's executors): ``local`` runs
N cells at once as processes of this machine, each with its own GPUs (``CUDA_VISIBLE_DEVICES``) or
its share of the cores (``OMP_NUM_THREADS``); ``slurm`` submits them as one job array per wave
through submitit, requeued from their last checkpoint when SLURM signals a time limit or a
preemption. Both run the same thing: ``python -m gist_lightning.sweeps.cell <cell folder>``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cell import die_with_parent


def visible_gpus() -> list[str]:
    """The GPU ids this process may give out: ``CUDA_VISIBLE_DEVICES`` when set, else every device
    torch sees (none without CUDA)."""
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ids is not None:
        return [i for i in (x.strip() for x in ids.split(",")) if i and i != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch/CUDA: no GPUs
        return []


class LocalLauncher:
    """``cells_at_once`` cells at a time on this machine. With ``devices_per_cell`` > 0 each running
    cell holds that many GPUs of :func:`visible_gpus` (so at most len(gpus) // devices_per_cell at
    once); without, the cores are split between the running cells (``OMP_NUM_THREADS``), or each gets
    ``threads_per_cell``."""

    name = "local"

    def __init__(self, cells_at_once: int = 1, devices_per_cell: int = 0, cores: int | None = None,
                 threads_per_cell: int | None = None):
        if cells_at_once < 1:
            raise ValueError(f"--cells_at_once {cells_at_once}: must be at least 1")
        self.devices_per_cell, self.gpus = devices_per_cell, visible_gpus() if devices_per_cell else []
        if devices_per_cell > len(self.gpus):
            raise ValueError(f"--devices_per_cell {devices_per_cell}: only {len(self.gpus)} GPU(s) visible "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        if devices_per_cell:
            cells_at_once = min(cells_at_once, len(self.gpus) // devices_per_cell)
        self.cells_at_once = cells_at_once
        self.cores = cores or len(os.sched_getaffinity(0))
        self.threads_per_cell = threads_per_cell
        self._running: dict[Path, tuple[subprocess.Popen, int]] = {}  # folder -> (process, slot)

    def slot_env(self, slot: int) -> dict[str, str]:
        """The environment of the cell in ``slot`` (0 .. cells_at_once - 1)."""
        if self.devices_per_cell:
            ids = self.gpus[slot * self.devices_per_cell:(slot + 1) * self.devices_per_cell]
            return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}
        threads = str(self.threads_per_cell or max(1, self.cores // self.cells_at_once))
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def free(self) -> int:
        return self.cells_at_once - len(self._running)

    def start(self, folder: Path, command: list[str] | None = None) -> str:
        """Start the cell in ``folder`` in a free slot; an id for the log. ``command``: what to run
        instead of the cell (tests)."""
        slot = min(set(range(self.cells_at_once)) - {s for _, s in self._running.values()})
        env = dict(os.environ, **self.slot_env(slot))
        command = command or [sys.executable, "-m", "gist_lightning.sweeps.cell", str(folder)]
        with open(folder / "launcher.log", "a", encoding="utf-8") as log:
            # its own session: a Ctrl-C at the driver's terminal reaches the driver alone, which stops
            # the cells as a SIGTERM does (a SIGINT would end a fit without its last.ckpt)
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=die_with_parent, start_new_session=True)
        self._running[folder] = (proc, slot)
        return f"pid {proc.pid}, " + ", ".join(f"{k}={v}" for k, v in self.slot_env(slot).items()
                                               if k != "MKL_NUM_THREADS")

    def poll(self) -> list[tuple[Path, int]]:
        """The cells that ended since the last call, with their exit codes."""
        ended = [(folder, proc.returncode) for folder, (proc, _) in self._running.items()
                 if proc.poll() is not None]
        for folder, _ in ended:
            del self._running[folder]
        return ended

    def running(self) -> list[Path]:
        return list(self._running)

    def stop_all(self, grace_seconds: float = 600.0) -> list[Path]:
        """Stop every running cell as a SIGTERM stops it (its fit writes ``last.ckpt`` and exits 143)
        and wait for them, ``grace_seconds`` in all before the rest are killed; the cells stopped
        (their exits are left for :meth:`poll`)."""
        procs = [(folder, proc) for folder, (proc, _) in self._running.items() if proc.poll() is None]
        for _, proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for _, proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [folder for folder, _ in procs]

    def in_flight(self, folder: Path, job: str | None = None) -> bool:
        """Whether a cell of an earlier driver is still queued or running: locally, none is (a cell's
        process dies with its driver)."""
        return False

    def watch(self, folder: Path, job: str) -> None:
        raise RuntimeError("a local cell is never left running by an earlier driver")


@dataclass
class SlurmLauncher:
    """Cells as SLURM array tasks through submitit: one array job per wave of cells, ``nodes`` x
    ``gpus_per_node`` per cell (one task per GPU, as Lightning's SLURMEnvironment expects; one task
    on a CPU partition), ``timeout_min`` each, at most ``array_parallelism`` at once, and ``sbatch``:
    more ``#SBATCH`` options (``{"account": "x", "qos": "y"}``). Logs: ``<cell>/stdout.log`` (the
    fit) and submitit's own under ``<runs>/.slurm/``."""

    runs: Path
    partition: str | None = None
    gpus_per_node: int = 0
    nodes: int = 1
    cpus_per_task: int | None = None
    timeout_min: int = 60
    array_parallelism: int = 256
    sbatch: dict = field(default_factory=dict)
    name = "slurm"

    def __post_init__(self):
        missing = [tool for tool in ("sbatch", "squeue", "scontrol") if shutil.which(tool) is None]
        if missing:
            raise ValueError(f"--launcher slurm: {', '.join(missing)} not found on PATH (is this a SLURM "
                             "login node?)")
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise ValueError("--launcher slurm needs submitit: pip install 'gist-lightning[slurm]'") from None
        self._jobs: dict[Path, str] = {}

    def executor(self):
        import submitit

        executor = submitit.AutoExecutor(folder=str(self.runs / ".slurm" / "%j"), cluster="slurm")
        tasks = max(1, self.gpus_per_node)
        params = dict(nodes=self.nodes, tasks_per_node=tasks, timeout_min=self.timeout_min,
                      slurm_array_parallelism=self.array_parallelism, name=f"sweep-{self.runs.name}",
                      slurm_additional_parameters=dict(self.sbatch))
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        executor.update_parameters(**params)
        return executor

    def free(self) -> int:
        return 1 << 30  # SLURM queues them; array_parallelism bounds what runs

    def submit(self, folders: list[Path]) -> dict[Path, str]:
        """Submit ``folders`` as one job array; folder -> job id (``<array>_<index>``)."""
        from .slurm_job import CellJob

        jobs = self.executor().map_array(CellJob(), [str(f) for f in folders])
        ids = {folder: job.job_id for folder, job in zip(folders, jobs)}
        self._jobs.update(ids)
        return ids

    def queued(self) -> dict[str, str]:
        """Job id -> state of this user's jobs that SLURM still holds (pending, running, requeued...)."""
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-u", str(os.getuid())],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"squeue failed: {out.stderr.strip()}")
        return dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())

    def in_flight(self, folder: Path, job: str | None = None) -> bool:
        job = job or self._jobs.get(folder)
        return job is not None and job in self.queued()

    def watch(self, folder: Path, job: str) -> None:
        self._jobs[folder] = job

    def poll(self) -> list[tuple[Path, int | None]]:
        """The cells whose jobs left the queue (exit code unknown here: the cell's files say)."""
        queued = self.queued()
        ended = [(folder, None) for folder, job in self._jobs.items() if job not in queued]
        for folder, _ in ended:
            del self._jobs[folder]
        return ended

    def running(self) -> list[Path]:
        return list(self._jobs)

    def stop_all(self, grace_seconds: float = 0.0) -> list[Path]:
        """A stopped driver leaves its jobs to the scheduler (a later driver watches them): none."""
        return []


__all__ = ["LocalLauncher", "SlurmLauncher", "visible_gpus"]
