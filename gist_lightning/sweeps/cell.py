"""One cell of a sweep, run where a launcher puts it (a local process, a SLURM array task):
``python -m gist_lightning.sweeps.cell <runs>/<name>``.

It reads the folder's ``cell.json`` (written by the driver), runs its stages as ``gist-lightning fit``
processes and leaves in the folder what the driver reads back:

- ``run/``: the run folder (checkpoints, metrics.csv, predictions, export: the last stage's; an
  earlier stage's is kept as ``export-stage<i>``);
- ``stage<i>.done`` after each stage, ``run/done.json`` when every stage is done;
- ``failed.json`` when a fit failed on its own (an exit that is not a kill or a SIGTERM);
- ``stdout.log``: what the fits printed, attempt after attempt (other ranks: ``stdout.rank<r>.log``).

A stage that finds the run's ``last.ckpt`` continues from it (``--ckpt_path last``): an interrupted
cell resumes through the project's resume path, and a stage after the first extends the run.
A SIGTERM (or the signal a scheduler sends before a time limit) is passed to the fit, which writes
``last.ckpt`` and exits 143; the cell exits 143 too, and is resumed when it runs again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import SIGTERM_EXIT
from ..files import write_text_atomic
from ..machine import cpu_model
from .grid import fill_max_steps

SPEC, DONE, FAILED = "cell.json", "done.json", "failed.json"
RUNNING = "running.json"  # while a cell's process runs: its pid and host (a second process's listing)
STOPPED = {SIGTERM_EXIT, -signal.SIGTERM, -signal.SIGKILL, 137}  # stopped from outside: resumable, not failed
_child: subprocess.Popen | None = None
_stop_asked = False  # a stop signal came: no further fit starts, and the cell's exit reads as stopped


def rank() -> int:
    """This process's rank in a multi-task cell (SLURM's task id; 0 for a one-process cell)."""
    return int(os.environ.get("SLURM_PROCID", "0") or 0)


def fit_program() -> list[str]:
    """``gist-lightning`` of this Python (Lightning's DDP launcher re-runs that command line)."""
    script = Path(sys.executable).parent / "gist-lightning"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gist_lightning.cli"]


def die_with_parent() -> None:
    """In a child process: die when its parent dies (Linux), as a killed driver's cells do."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fit_child() -> None:
    """In the fit's process: die with the cell, and ignore the user signals a scheduler sends every
    process of a job before a time limit (SLURM sends them to the whole job step): the cell stops
    the fit with a SIGTERM, which writes ``last.ckpt``; USR1/USR2 would kill it before. (SIG_IGN
    survives exec; Lightning's own SLURM requeue handler, on USR1, replaces it where it applies.)"""
    die_with_parent()
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def stop_fit(*_) -> None:
    """Ask the running fit to stop as a SIGTERM stops it (``last.ckpt`` written, exit 143), and the
    cell to start no further fit (a stop between two stages would otherwise be lost)."""
    global _stop_asked
    _stop_asked = True
    child = _child
    if child is not None and child.returncode is None:
        try:
            child.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass


def wait_for_fit() -> None:
    """Wait until the running fit has exited, without reaping it: called from a signal handler while
    the main thread waits on it (Popen.wait holds a lock a second wait would block on forever)."""
    child = _child
    if child is None or child.returncode is not None:
        return
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped already
        pass


def _fit(args: list[str], log: Path) -> int:
    global _child
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} gist-lightning fit {' '.join(args)}\n")
        out.flush()
        _child = subprocess.Popen([*fit_program(), "fit", *args], stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=_fit_child)
        try:
            return _child.wait()
        finally:
            _child = None


def run(folder: str | os.PathLike) -> int:
    """Run the cell in ``folder`` to its end (or until stopped); its exit code."""
    folder = Path(folder)
    spec = json.loads((folder / SPEC).read_text())
    run_dir, first = folder / "run", rank() == 0
    log = folder / ("stdout.log" if first else f"stdout.rank{rank()}.log")
    start = time.time()
    if first:
        _record_killed_attempt(folder)
        write_text_atomic(folder / RUNNING, json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                        "start": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                        "started": start}))
    try:
        return _stages(folder, spec, run_dir, log, first, start)
    finally:
        if first:
            _attempt(folder, start)
            (folder / RUNNING).unlink(missing_ok=True)


def running_here(folder: Path) -> dict | None:
    """``running.json`` of the cell in ``folder`` when its process is alive on this machine (a cell a
    driver in another process runs now), else None (none recorded, another host's, or a dead one's)."""
    try:
        record = json.loads((folder / RUNNING).read_text())
        if record["host"] != os.uname().nodename:
            return None
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, KeyError):
        return None
    return record if str(folder) in cmdline.split("\0") else None


def recorded_attempts(folder: Path) -> list[dict]:
    """A cell folder's ``attempts.json``: one record per attempt (minutes, host, CPU, SLURM job)."""
    path = folder / "attempts.json"
    return json.loads(path.read_text()) if path.exists() else []


def _record_killed_attempt(folder: Path) -> None:
    """An attempt killed outright on this machine (SIGKILL, the machine or session ending) left its
    ``running.json`` and never recorded itself: record it now, its minutes up to the last write of
    its log or run folder, so that ``done.json``'s minutes count every attempt's training."""
    try:
        record = json.loads((folder / RUNNING).read_text())
        if record["host"] != os.uname().nodename or (running_here(folder) and record["pid"] != os.getpid()):
            return  # another machine's (it may still run) or alive (not merely this process's pid again)
        start = record.get("started") or time.mktime(time.strptime(record["start"], "%Y-%m-%d %H:%M:%S"))
    except (OSError, ValueError, KeyError):
        return
    run = folder / "run"
    if not (folder / "stdout.log").exists() and not run.exists():
        return  # its files were set aside (killed before its first checkpoint): its attempt went with them
    written = [p.stat().st_mtime for p in [folder / "stdout.log", *(run.rglob("*") if run.is_dir() else [])]
               if p.is_file()]
    end = max([start, *written])
    _attempt(folder, start, end, ended="killed (minutes to its last write)")


def _attempt(folder: Path, start: float, end: float | None = None, ended: str | None = None) -> None:
    """Record one attempt (its minutes, host, CPU and SLURM job) in ``attempts.json``."""
    record = {"start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
              "minutes": round(((time.time() if end is None else end) - start) / 60, 3),
              "host": os.uname().nodename, "cpu": cpu_model(),
              "job": None if ended else os.environ.get("SLURM_JOB_ID"),
              "restart": None if ended else os.environ.get("SLURM_RESTART_COUNT"),
              **({"ended": ended} if ended else {})}
    attempts = recorded_attempts(folder) + [record]
    write_text_atomic(folder / "attempts.json", json.dumps(attempts, indent=1) + "\n")


def _stages(folder: Path, spec: dict, run_dir: Path, log: Path, first: bool, start: float) -> int:
    for i, stage in enumerate(spec["stages"]):
        if (folder / f"stage{i}.done").exists():
            continue
        max_steps = stage.get("max_steps")
        if stage.get("steps") is not None:  # from where the stage starts, recorded at its first attempt
            try:
                max_steps = stage_start(folder, run_dir, i, first) + stage["steps"]
            except Exception as e:  # noqa: BLE001 - a checkpoint that cannot say its step: failed, said why
                return _failed_before_fit(folder, log, first, i, f"{type(e).__name__}: {e}")
        args = list(spec["args"]) + fill_max_steps(stage["args"], max_steps)
        if max_steps is not None:
            args += ["--trainer.max_steps", str(max_steps)]
        if (run_dir / "checkpoints" / "last.ckpt").exists():
            args += ["--ckpt_path", "last"]
        if first and i > 0:
            _keep_export(run_dir, i - 1)
        if _stop_asked:
            return SIGTERM_EXIT
        code = _fit(args, log)
        if code != 0 and _stop_asked:  # asked to stop: whatever the fit's exit, resumable, not failed
            code = SIGTERM_EXIT
        if code != 0:
            if first and code not in STOPPED:
                _record_failed(folder, i, log, code)
            return code
        if first:
            (folder / f"stage{i}.done").touch()
    if first:  # the minutes of every attempt, this one included
        attempts = recorded_attempts(folder)
        minutes = round(sum(a["minutes"] for a in attempts) + (time.time() - start) / 60, 2)
        write_text_atomic(run_dir / DONE, json.dumps({**spec["summary"], "minutes": minutes,
                                                      "attempts": len(attempts) + 1}, indent=1) + "\n")
    return 0


def _record_failed(folder: Path, stage: int, log: Path, code: int, error: str | None = None) -> None:
    """``failed.json``: the cell failed on its own (the driver sets the attempt aside and reports it)."""
    write_text_atomic(folder / FAILED, json.dumps({"exit": code, "stage": stage, "log": str(log),
                                                  **({"error": error} if error else {}),
                                                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}))


def _failed_before_fit(folder: Path, log: Path, first: bool, stage: int, error: str) -> int:
    """A stage that cannot start: the reason in the cell's log and (rank 0) ``failed.json``, so the
    driver reports it and sets the attempt aside instead of resuming it again and again."""
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} stage {stage} cannot start: {error}\n")
    if first:
        _record_failed(folder, stage, log, 1, error)
    return 1


def stage_start(folder: Path, run_dir: Path, stage: int, first: bool) -> int:
    """The step stage ``stage`` starts at: the step of the run's ``last.ckpt`` (0 without one) when
    it first runs, recorded in ``stage<i>.start`` by rank 0, so that an attempt resumed from a
    checkpoint of the stage's own trains to the same end. (Other ranks of a first attempt read the
    same checkpoint: none of the stage's is written before every rank has started its fit.)"""
    path = folder / f"stage{stage}.start"
    if path.exists():
        return int(path.read_text())
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_dir():
        raise RuntimeError(f"{last}: a checkpoint folder (DeepSpeed, or FSDP's distributed checkpoint); a "
                           "stage of steps needs a single-file last.ckpt to read its first step from: give "
                           "the stage max_steps")
    step = _checkpoint_step(last) if last.exists() else 0
    if first:
        write_text_atomic(path, str(step))
    return step


def _checkpoint_step(last: Path) -> int:
    """``last``'s global step, read in a child process: reading it needs torch, which the cell's own
    process would then hold (~350 MB) for as long as the fit it launches runs."""
    package_root = str(Path(__file__).resolve().parents[2])  # (this process's gist_lightning, first)
    paths = [package_root, os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    code = ("import sys; from gist_lightning.resume import checkpoint_step; "
            "print(checkpoint_step(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(last)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"{last}: its step cannot be read ({said})")
    return int(proc.stdout.split()[-1])


def _keep_export(run_dir: Path, stage: int) -> None:
    """Before a stage extends the run, the export of the stage before it moves to
    ``export-stage<i>``: ``export`` is then the last stage's (once), and no stage's export is lost."""
    export, kept = run_dir / "export", run_dir / f"export-stage{stage}"
    if export.is_dir() and not kept.exists():
        export.rename(kept)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m gist_lightning.sweeps.cell <cell folder>", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, stop_fit)
    return run(argv[0])


if __name__ == "__main__":
    sys.exit(main())
