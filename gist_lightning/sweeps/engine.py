"""The sweep driver: lays out the cells' folders, finds what an earlier driver left (finished,
still queued or running on the scheduler, interrupted, failed), starts what must run on a launcher,
and waits. It can be killed and started again at any moment: what finished is kept, what runs is
watched, an interrupted cell resumes from its ``last.ckpt``, a failed one is set aside with its log
and run again. Each experiment keeps its own aggregation; it reads the finished cells'
``run/done.json``.

    gist-lightning sweep --config configs/tiny.yaml --runs runs/k-sweep \\
        --grid model.condition=pos_control,gist,neg_control --grid model.num_gist_tokens=1,2,5,10 \\
        --seeds 0 1 2 --cells_at_once 2 [-- more fit arguments for every cell]
"""

from __future__ import annotations

import fcntl
import json
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..files import write_text_atomic
from . import cell as cell_process
from .grid import Cell, expand, fill_max_steps, parse_grid
from .launchers import LocalLauncher, SlurmLauncher
from .tracking import Tracking, add_tracking_arguments, tracking_from

FINISHED, IN_FLIGHT, FAILED, INTERRUPTED, NEW = "finished", "in flight", "failed", "interrupted", "new"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what stops a running sweep, saved


class SweepStopped(RuntimeError):
    """Raised by an ``on_finished`` check to stop starting cells (e.g. runs that validated other records);
    a cell that filled the slot the checked cell freed while the check ran (one that does not need
    it) runs to its end."""


def cell_args(cell: Cell, configs: list[str], runs: Path, extra: list[str],
              trackers: list[dict] = ()) -> list[str]:
    """The ``gist-lightning fit`` arguments of ``cell``: the configs, its values, the run folder
    ``<runs>/<name>/run`` (a CSV logger there: the sweep reads its metrics.csv; ``trackers``, more
    ``trainer.logger`` entries, after it), then ``extra``. ``{cell:<name>}`` in an argument is the
    folder of that cell."""
    args = [a for c in configs for a in ("--config", str(c))]
    args += cell.fit_args()
    csv_logger = {"class_path": "gist_lightning.loggers.CSVLogger",
                  "init_args": {"save_dir": str(runs), "name": cell.name, "version": "run"}}
    args += ["--trainer.logger", json.dumps([csv_logger, *trackers]) if trackers else json.dumps(csv_logger)]
    args += list(extra)
    return [_fill(a, runs) for a in args]


def _fill(arg: str, runs: Path) -> str:
    while "{cell:" in arg:
        start = arg.index("{cell:")
        end = arg.index("}", start)
        arg = arg[:start] + str(runs / arg[start + 6:end]) + arg[end + 1:]
    return arg


def _stages_of(cell: Cell) -> list[dict]:
    """The cell's stages as ``cell.json`` records them (JSON's lists for tuples; ``steps`` only where
    given, so the folders of stages without it read as before)."""
    stages = [{k: v for k, v in asdict(s).items() if k != "steps" or v is not None} for s in cell.stages]
    return json.loads(json.dumps([s | {"args": list(s["args"])} for s in stages]))


def _without_logger(args: list[str]) -> list[str]:
    """Fit arguments less ``--trainer.logger`` and its value (the sweep's loggers: its CSV folder, and
    trackers whose run ids a check does not make), which do not change what trains."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--trainer.logger":
            skip = True
        else:
            out.append(a)
    return out


def _units(args: list[str]) -> list[tuple[str, ...]]:
    """Arguments as options: ``--key value`` pairs, a lone ``--flag``, a lone value."""
    out: list[tuple[str, ...]] = []
    for a in args:
        if out and out[-1][0].startswith("--") and len(out[-1]) == 1 and not a.startswith("--"):
            out[-1] = (out[-1][0], a)
        else:
            out.append((a,))
    return out


def _difference(a: list[str], b: list[str]) -> str:
    """The options of ``a`` that ``b`` lacks (as many times as they are missing), quoted as a shell
    reads them; '-' when none."""
    units = _units(a)
    missing, out = Counter(units) - Counter(_units(b)), []
    for unit in units:
        if missing[unit]:
            missing[unit] -= 1
            out += unit
    return shlex.join(out) or "-"


class _Parsed(Exception):
    pass


def check_args(args: list[str]) -> None:
    """Parse ``gist-lightning fit`` arguments as the fit would (every config file, key and type),
    without building anything; a ValueError naming what is wrong."""
    import contextlib
    import io

    from ..cli import GistCLI, cli_main  # the fit's own parser, defaults and callbacks

    class ParseOnly(GistCLI):
        def _set_seed(self) -> None:  # the fit seeds; a check does not
            pass

        def before_instantiate_classes(self) -> None:
            raise _Parsed

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LightningCLI's note that args and sys.argv are both given
            cli_main(["fit", *args], cli_class=ParseOnly)
    except _Parsed:
        return
    except SystemExit:
        text = err.getvalue()
        # jsonargparse's message: "error: <what>" and its detail on the lines after
        what = text[text.rfind("error: ") + 7:] if "error: " in text else "the fit arguments do not parse"
        raise ValueError(" ".join(what.split())) from None


class Sweep:
    """The cells of one sweep over one runs folder, run on ``launcher``. ``on_finished(summary)``
    is called for every finished cell (earlier ones included) and may raise :class:`SweepStopped`."""

    def __init__(self, cells: list[Cell], configs: list[str], runs: str | Path, launcher,
                 extra: list[str] = (), retries: int = 0, log: Callable[[str], None] = print,
                 on_finished: Callable[[dict], None] | None = None, poll_seconds: float = 1.0,
                 tracking: Tracking | None = None):
        names = [c.name for c in cells]
        if len(set(names)) != len(names):
            raise ValueError(f"cells named twice: {sorted({n for n in names if names.count(n) > 1})}")
        unknown = sorted({n for c in cells for n in c.needs if n not in names})
        if unknown:
            raise ValueError(f"cells need cells that are not in the sweep: {', '.join(unknown)}")
        self.cells, self.configs, self.extra = cells, [str(c) for c in configs], list(extra)
        self.runs, self.launcher, self.retries = Path(runs).resolve(), launcher, retries
        self.log, self.on_finished, self.poll_seconds = log, on_finished, poll_seconds
        self.tracking = tracking
        self.failed: dict[str, str] = {}  # name -> its log
        self.signalled: int | None = None  # a SIGTERM or SIGINT asked the running sweep to stop

    # -- the cells' folders ----------------------------------------------------------------------
    def folder(self, cell: Cell | str) -> Path:
        return self.runs / (cell if isinstance(cell, str) else cell.name)

    def args(self, cell: Cell, create: bool = True) -> list[str]:
        """The cell's fit arguments; ``create=False`` for a check: no tracker run is made."""
        trackers = self.tracking.loggers(self.runs, cell.name, create=create) if self.tracking else []
        return cell_args(cell, self.configs, self.runs, self.extra, trackers)

    def check(self) -> None:
        """Every cell's arguments parse (one line for the first that does not), before anything runs."""
        checked: set[tuple] = set()
        for cell in self.cells:
            for stage in cell.stages:
                # (the step a stage of steps trains to is known when it starts: a number stands in)
                end = stage.max_steps or stage.steps or 1
                args = self.args(cell, create=False) + fill_max_steps(stage.args, end)
                if tuple(args) in checked:
                    continue
                checked.add(tuple(args))
                try:
                    check_args(args)
                except ValueError as e:
                    raise ValueError(f"cell {cell.name}: {e}") from None

    def write_spec(self, cell: Cell) -> None:
        folder = self.folder(cell)
        folder.mkdir(parents=True, exist_ok=True)
        spec = {"name": cell.name, "args": self.args(cell), "stages": _stages_of(cell),
                "summary": cell.summary()}
        write_text_atomic(folder / cell_process.SPEC, json.dumps(spec, indent=1) + "\n")

    def changed(self, cell: Cell, state: str) -> str | None:
        """For a cell in ``state`` that trained (or trains) under its folder's ``cell.json`` (finished,
        running or interrupted), what differs between that record and ``cell`` (its fit arguments,
        loggers aside, and its stages), in one line; None when they agree, nothing is recorded, or
        the cell is new or failed (a failed attempt is set aside and run anew)."""
        path = self.folder(cell) / cell_process.SPEC
        if state not in (FINISHED, IN_FLIGHT, INTERRUPTED) or not path.is_file():
            return None
        recorded = json.loads(path.read_text())
        was, now = _without_logger(recorded["args"]), _without_logger(self.args(cell, create=False))
        if was != now:
            return f"arguments (recorded {_difference(was, now)}; now {_difference(now, was)})"
        stages = _stages_of(cell)
        if recorded.get("stages") != stages:
            return f"stages (recorded {json.dumps(recorded.get('stages'))}; now {json.dumps(stages)})"
        return None

    def state(self, cell: Cell) -> str:
        folder = self.folder(cell)
        if (folder / "run" / cell_process.DONE).is_file():
            return FINISHED
        launch = folder / "launch.json"
        if launch.is_file() and self.launcher.in_flight(folder, json.loads(launch.read_text()).get("job")):
            return IN_FLIGHT
        if (folder / cell_process.FAILED).is_file():
            return FAILED
        if (folder / "run").exists():
            return INTERRUPTED
        return NEW

    def describe(self, cell: Cell) -> str:
        """The cell's state, and for a cell a run would refuse, what differs from its record. A cell
        that a driver in another process runs on this machine now reads ``running (pid N, since ...)``."""
        state = self.state(cell)
        alive = cell_process.running_here(self.folder(cell)) if state in (INTERRUPTED, NEW) else None
        if alive:
            return f"running (pid {alive['pid']}, since {alive['start']}, under another driver)"
        why = self.changed(cell, state)
        return f"{state}, made with other {why}: a run refuses it" if why else state

    def set_aside(self, cell: Cell, why: str) -> Path:
        """Move a failed (or unresumable) attempt's files into ``<cell>/<why>-<time>/``, log included."""
        folder = self.folder(cell)
        aside = folder / f"{why}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{aside.name.split('.')[0]}.{n}"), n + 1
        aside.mkdir()
        for path in folder.iterdir():
            if path.name in ("run", cell_process.FAILED, "attempts.json", "launch.json", "launcher.log") \
                    or path.name.startswith(("stage", "stdout")):
                shutil.move(str(path), str(aside / path.name))
        return aside

    def summary_of(self, cell: Cell) -> dict:
        return json.loads((self.folder(cell) / "run" / cell_process.DONE).read_text())

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Run the sweep to its end; 0 when every cell finished, 1 otherwise, 128 + the signal when a
        SIGTERM or SIGINT (Ctrl-C) stopped the driver: its local cells were stopped as a SIGTERM stops
        a fit (``last.ckpt`` written) and waited for, so a rerun resumes them; SLURM jobs go on."""
        self.runs.mkdir(parents=True, exist_ok=True)
        with open(self.runs / ".sweep.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another sweep driver is running on {self.runs}") from None
            with self._stopped_by_signals():
                code = self._run()
            # (a signal during the last cell's on_finished, or before anything started: no cell to stop)
            return 128 + self.signalled if self.signalled else code

    @contextmanager
    def _stopped_by_signals(self):
        """While the sweep runs (in the main thread), SIGTERM, SIGINT and SIGHUP only ask it to stop:
        the loop stops the cells and returns, instead of the driver dying and its cells with it,
        unsaved. A second signal acts as it did before (a driver that must go at once can)."""
        self.signalled = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {}

        def ask(signum, _frame):
            self.signalled = signum
            for sig, handler in before.items():
                signal.signal(sig, handler)

        for sig in STOP_SIGNALS:
            before[sig] = signal.signal(sig, ask)
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        todo, watched = [], {}
        states = {cell.name: self.state(cell) for cell in self.cells}
        # a cell that trained (or trains) under other arguments would be kept or resumed as if it were
        # this one: refused before anything runs
        changed = [(c, why) for c in self.cells if (why := self.changed(c, states[c.name]))]
        if changed:
            cell, why = changed[0]
            more = f" (and {len(changed) - 1} more cell(s))" if len(changed) > 1 else ""
            raise ValueError(
                f"{self.folder(cell) / cell_process.SPEC}: cell {cell.name} ({states[cell.name]}) was made "
                f"with other {why}{more}; give the sweep another runs folder, or move that cell's folder "
                "away to train it again"
            )
        for cell in self.cells:  # the finished ones first: a check of them may refuse the whole call
            if states[cell.name] == FINISHED:
                self.log(f"{self._tag(cell)}: finished before, skipped")
                if not self._finished(cell, self._tag(cell)):
                    return 1  # before anything is written or started
        for cell in self.cells:
            state, tag = states[cell.name], self._tag(cell)
            if state == FINISHED:
                continue
            self.write_spec(cell)
            if state == IN_FLIGHT:
                job = json.loads((self.folder(cell) / "launch.json").read_text())["job"]
                self.launcher.watch(self.folder(cell), job)
                watched[self.folder(cell)] = cell
                self.log(f"{tag}: still queued or running on the scheduler (job {job}), watched")
                continue
            if state == FAILED:
                self.log(f"{tag}: failed before; that attempt set aside in {self.set_aside(cell, 'failed')}")
            elif state == INTERRUPTED:
                if not (self.folder(cell) / "run" / "checkpoints" / "last.ckpt").exists():
                    aside = self.set_aside(cell, "interrupted")
                    self.log(f"{tag}: interrupted before its first checkpoint; set aside in {aside}")
                else:
                    self.log(f"{tag}: interrupted; resumes from its last.ckpt")
            todo.append(cell)
        return self._launch(todo, watched)

    def _finished(self, cell: Cell, tag: str) -> bool:
        if self.on_finished is None:
            return True
        try:
            self.on_finished(self.summary_of(cell))
        except SweepStopped as e:
            self.log(f"{tag}: stopping the sweep: {e}")
            return False
        return True

    def _tag(self, cell: Cell) -> str:
        return f"[{self.cells.index(cell) + 1}/{len(self.cells)}] {cell.name}"

    def _launch(self, todo: list[Cell], running: dict[Path, Cell]) -> int:
        """Start the cells of ``todo`` as their needs finish and the launcher has room, until every
        cell has ended; ``running``: cells of an earlier driver still on the scheduler."""
        tries: dict[str, int] = {}  # attempts this driver started again (failures and outside stops)
        started: dict[Path, float] = {}
        stop = False
        while todo or running:
            if self.signalled:
                return self._stop(todo, running)
            for c in [c for c in todo if any(d in self.failed for d in c.needs)]:
                todo.remove(c)
                self.failed[c.name] = "needs " + ", ".join(d for d in c.needs if d in self.failed)
                self.log(f"{self._tag(c)}: not run: it {self.failed[c.name]}, which failed")
            if stop:
                for c in todo:
                    self.log(f"{self._tag(c)}: not started (the sweep stopped)")
                todo = []
            self._start_ready(todo, running, started)
            ended = []  # finished now: recorded (on_finished) once the slots they freed are filled
            for folder, code in self.launcher.poll():
                c = running.pop(folder)
                since = started.pop(folder, None)  # None: started by an earlier driver
                minutes = (time.time() - since) / 60 if since else float("nan")
                took = f" in {minutes:.1f} min" if since else ""
                state = self.state(c)
                if state == FINISHED:
                    self.log(f"{self._tag(c)}: done{took}" + _headline(self.summary_of(c)))
                    ended.append(c)
                    continue
                tries[c.name] = tries.get(c.name, 0) + 1
                exit_note = f" (exit {code})" if code is not None else ""
                if state == FAILED and tries[c.name] <= self.retries:
                    aside = self.set_aside(c, "failed")
                    self.log(f"{self._tag(c)}: FAILED{exit_note}; set aside in {aside}, running again")
                    self.write_spec(c)
                    todo.append(c)
                elif state == FAILED or tries[c.name] > max(self.retries, 2):
                    self.failed[c.name] = str(self.folder(c) / "stdout.log")
                    self.log(f"{self._tag(c)}: FAILED{exit_note}{took.replace(' in', ' after')}; see "
                             f"{self.failed[c.name]}")
                else:  # stopped from outside (cancelled, killed, a time limit not requeued): resume it
                    self.log(f"{self._tag(c)}: stopped before its end{exit_note}; resumes from its last.ckpt")
                    todo.append(c)
            if ended and self.on_finished and not (stop or self.signalled):  # a record (an evaluation)
                # can take minutes: the freed slots first, with the cells ahead of the first that
                # needs one of these (whose record may stop the sweep), so the order stays the sweep's
                self._start_ready(todo, running, started, waiting_on={c.name for c in ended})
            for c in ended:
                stop = stop or not self._finished(c, self._tag(c))
            if todo or running:
                time.sleep(self.poll_seconds)
        if self.failed:
            self.log(f"{len(self.failed)} cell(s) failed: "
                     + "; ".join(f"{name} ({why})" for name, why in self.failed.items()))
        return 1 if self.failed or stop else 0

    def _start_ready(self, todo: list[Cell], running: dict[Path, Cell], started: dict[Path, float],
                     waiting_on: set[str] = frozenset()) -> None:
        """Start what the launcher has room for among the cells of ``todo`` whose needs finished; with
        ``waiting_on`` (cells finished, not yet recorded), only among the cells ahead of the first that
        needs one of them."""
        ahead = next((i for i, c in enumerate(todo) if waiting_on & set(c.needs)), len(todo))
        ready = [c for c in todo[:ahead]
                 if all((self.folder(d) / "run" / cell_process.DONE).is_file() for d in c.needs)]
        ready = ready[:max(0, self.launcher.free())]
        for c in ready:
            todo.remove(c)
            running[self.folder(c)] = c
            started[self.folder(c)] = time.time()
        if ready:
            self._start(ready)

    def _stop(self, todo: list[Cell], running: dict[Path, Cell]) -> int:
        """The driver was asked to stop (:meth:`run`): stop the running cells, log what each left."""
        name = signal.Signals(self.signalled).name
        self.log(f"{name}: stopping {len(running)} running cell(s) (each writes its last.ckpt); "
                 f"{len(todo)} not started")
        self.launcher.stop_all()
        for folder, code in self.launcher.poll():
            c = running.pop(folder)
            state = self.state(c)
            if state == FINISHED:  # it ended as it was asked to stop: what follows a finished cell
                self.log(f"{self._tag(c)}: done" + _headline(self.summary_of(c)))
                self._finished(c, self._tag(c))
            elif state == FAILED:
                self.failed[c.name] = str(folder / "stdout.log")
                self.log(f"{self._tag(c)}: FAILED (exit {code}); see {self.failed[c.name]}")
            elif (folder / "run" / "checkpoints" / "last.ckpt").exists():
                self.log(f"{self._tag(c)}: stopped; resumes from its last.ckpt when the sweep runs again")
            else:
                self.log(f"{self._tag(c)}: stopped before its first checkpoint; starts again when the sweep "
                         "runs again")
        for c in running.values():  # on a scheduler: left to it, watched by the next driver
            self.log(f"{self._tag(c)}: left running on the scheduler")
        return 128 + self.signalled

    def _start(self, cells: list[Cell]) -> None:
        folders = [self.folder(c) for c in cells]
        if isinstance(self.launcher, SlurmLauncher):
            jobs = self.launcher.submit(folders)
            for c, folder in zip(cells, folders):
                write_text_atomic(folder / "launch.json", json.dumps({"launcher": "slurm",
                                                                     "job": jobs[folder]}))
                self.log(f"{self._tag(c)}: submitted (job {jobs[folder]})")
            return
        for c, folder in zip(cells, folders):
            self.log(f"{self._tag(c)}: running ({self.launcher.start(folder)})")


def _headline(summary: dict) -> str:
    return f", {summary['attempts']} attempt(s)" if summary.get("attempts", 1) > 1 else ""


def add_launcher_arguments(parser) -> None:
    """The launcher's options (``--launcher``, ``--cells_at_once``, the SLURM ones, ``--retries``) on an
    argparse parser: ``gist-lightning sweep`` and the experiments' scripts share them."""
    group = parser.add_argument_group("where the cells run")
    group.add_argument("--launcher", choices=["local", "slurm"], default="local")
    group.add_argument("--cells_at_once", type=int, default=1, help="local: cells at once (default 1)")
    group.add_argument("--devices_per_cell", type=int, default=0,
                       help="local: GPUs per cell, given out through CUDA_VISIBLE_DEVICES (0: CPU, the "
                       "cores split between the cells through OMP_NUM_THREADS)")
    group.add_argument("--threads_per_cell", type=int, default=None,
                       help="local, on CPU: OMP_NUM_THREADS of each cell (default: cores / cells_at_once)")
    group.add_argument("--partition", default=None, help="slurm: partition")
    group.add_argument("--gpus_per_node", type=int, default=0,
                       help="slurm: GPUs per node of a cell, one task each (0: one task, CPU)")
    group.add_argument("--nodes", type=int, default=1, help="slurm: nodes per cell")
    group.add_argument("--cpus_per_task", type=int, default=None, help="slurm: CPUs per task")
    group.add_argument("--timeout_min", type=int, default=60,
                       help="slurm: time limit of one attempt; a cell that reaches it is requeued and "
                       "resumes from its last.ckpt")
    group.add_argument("--array_parallelism", type=int, default=256, help="slurm: array tasks at once")
    group.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: another #SBATCH option (repeat), e.g. --sbatch account=abc")
    group.add_argument("--retries", type=int, default=0,
                       help="runs a cell that failed again this often in one call (a failed cell found "
                       "from an earlier call is always set aside and run again)")


def launcher_from(cfg, runs: Path):
    """The launcher the parsed options of :func:`add_launcher_arguments` ask for (a ValueError for
    bad input, before anything runs)."""
    if cfg.launcher == "slurm":
        bad = [item for item in cfg.sbatch if "=" not in item]
        if bad:
            raise ValueError(f"--sbatch {bad[0]!r}: expected KEY=VALUE")
        return SlurmLauncher(runs.resolve(), partition=cfg.partition, gpus_per_node=cfg.gpus_per_node,
                             nodes=cfg.nodes, cpus_per_task=cfg.cpus_per_task, timeout_min=cfg.timeout_min,
                             array_parallelism=cfg.array_parallelism,
                             sbatch=dict(item.split("=", 1) for item in cfg.sbatch))
    return LocalLauncher(cfg.cells_at_once, cfg.devices_per_cell, threads_per_cell=cfg.threads_per_cell)


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the script's own arguments, those after ``--``: every cell's fit arguments)."""
    if "--" in argv:
        return argv[:argv.index("--")], argv[argv.index("--") + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    """``gist-lightning sweep``."""
    import argparse

    argv, extra = split_extra(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(prog="gist-lightning sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="base config(s) of every cell, in order")
    parser.add_argument("--runs", required=True, help="the sweep's folder: one folder per cell")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values of any config key (repeat: every combination)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of every cell (seed_everything and data.seed)")
    parser.add_argument("--dry_run", action="store_true", help="list the cells and their state; run nothing")
    add_launcher_arguments(parser)
    add_tracking_arguments(parser)
    cfg = parser.parse_args(argv)
    runs = Path(cfg.runs)
    sweep = Sweep(expand(parse_grid(cfg.grid), cfg.seeds), cfg.config, runs, launcher_from(cfg, runs), extra,
                  retries=cfg.retries, log=lambda m: print(m, flush=True), tracking=tracking_from(cfg, runs))
    sweep.check()
    if cfg.dry_run:
        for cell in sweep.cells:
            print(f"{cell.name}: {sweep.describe(cell)}")
        return 0
    print(f"sweep of {len(sweep.cells)} cells into {runs} ({cfg.launcher})"
          + (f", passing {' '.join(extra)}" if extra else ""), flush=True)
    code = sweep.run()
    finished = sum(sweep.state(c) == FINISHED for c in sweep.cells)
    print(f"{finished} of {len(sweep.cells)} cells finished; each cell's results: {runs}/<cell>/run/ "
          "(metrics.csv, predictions/, export/, done.json)", flush=True)
    return code


__all__ = ["FAILED", "FINISHED", "INTERRUPTED", "IN_FLIGHT", "NEW", "Sweep", "SweepStopped",
           "add_launcher_arguments", "cell_args", "check_args", "launcher_from", "main", "split_extra"]
