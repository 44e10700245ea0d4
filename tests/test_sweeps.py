"""The sweep engine: the grid (names, controls once, bad input in one line), the local launcher's
share of GPUs and cores (a stub command records the environment it was given), the fit arguments
checked before anything runs, and the driver on real tiny fits: N at once, finished cells skipped,
failed cells set aside and run again, stages and cells that start from another cell's export."""

from __future__ import annotations

import json
import os
import sys

import pytest

from gist_lightning.sweeps import Cell, LocalLauncher, Stage, Sweep, expand, parse_grid
from gist_lightning.sweeps.engine import FAILED, FINISHED, NEW, check_args, main

_RECORD_ENV = ("import json, os, sys; json.dump({k: os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', "
               "'OMP_NUM_THREADS')}, open(sys.argv[1], 'w'))")


def test_the_grid_names_its_cells_and_runs_controls_once():
    grid = parse_grid(["model.num_gist_tokens=1,2,5", "model.condition=pos_control,gist",
                       "model.learning_rate=0.001"])
    assert grid == {"model.num_gist_tokens": [1, 2, 5], "model.condition": ["pos_control", "gist"],
                    "model.learning_rate": [0.001]}
    cells = expand(grid, [0, 1])
    assert [c.name for c in cells] == [
        "pos_control-k1-learning_rate0.001-seed0", "pos_control-k1-learning_rate0.001-seed1",
        "gist-k1-learning_rate0.001-seed0", "gist-k1-learning_rate0.001-seed1",
        "gist-k2-learning_rate0.001-seed0", "gist-k2-learning_rate0.001-seed1",
        "gist-k5-learning_rate0.001-seed0", "gist-k5-learning_rate0.001-seed1"]
    assert cells[4].fit_args() == ["--model.num_gist_tokens", "2", "--model.condition", "gist",
                                   "--model.learning_rate", "0.001", "--seed_everything", "0",
                                   "--data.seed", "0"]
    assert cells[0].summary() == {"name": cells[0].name, "seed": 0, "condition": "pos_control", "k": 1,
                                  "values": {"model.num_gist_tokens": 1, "model.condition": "pos_control",
                                             "model.learning_rate": 0.001}}


@pytest.mark.parametrize("spec, message", [
    ("model.num_gist_tokens", "expected KEY=V1,V2"),
    ("=1,2", "expected KEY=V1,V2"),
    ("seed_everything=1,2", "seeds are given with --seeds"),
])
def test_a_bad_grid_is_refused_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_grid([spec])


def test_the_fit_arguments_are_checked_before_anything_runs(run_config):
    config = str(run_config())
    check_args(["--config", config, "--model.num_gist_tokens", "2"])
    with pytest.raises(ValueError, match="model.num_gist_tokenz"):
        check_args(["--config", config, "--model.num_gist_tokenz", "2"])
    with pytest.raises(ValueError, match="num_gist_tokens"):
        check_args(["--config", config, "--model.num_gist_tokens", "two"])


def test_a_stage_of_steps_reads_its_start_once_and_records_it(tmp_path):
    """Stage.steps: its start is the run's last.ckpt step at its first attempt (0 without one),
    recorded in stage<i>.start and read back by a resumed attempt whatever the checkpoint's step is
    then; cell.json names ``steps`` only where given (older folders read the same); a stage with
    both or with no step is refused; a checkpoint folder cannot say its step and is refused."""
    import torch

    from gist_lightning.sweeps.cell import stage_start
    from gist_lightning.sweeps.engine import _stages_of

    run = tmp_path / "run"
    assert stage_start(tmp_path, run, 0, first=True) == 0 and (tmp_path / "stage0.start").read_text() == "0"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 7}, run / "checkpoints" / "last.ckpt")
    assert stage_start(tmp_path, run, 1, first=False) == 7 and not (tmp_path / "stage1.start").exists()
    assert stage_start(tmp_path, run, 1, first=True) == 7
    torch.save({"global_step": 9}, run / "checkpoints" / "last.ckpt")  # (the stage's own, mid-way)
    assert stage_start(tmp_path, run, 1, first=False) == 7
    cell = Cell(name="c", stages=(Stage(max_steps=4, args=("--a",)), Stage(steps=3)))
    assert _stages_of(cell) == [{"max_steps": 4, "args": ["--a"]},
                                {"max_steps": None, "args": [], "steps": 3}]
    with pytest.raises(ValueError, match=r"give max_steps \(4\) or steps \(3\), not both"):
        Stage(max_steps=4, steps=3)
    with pytest.raises(ValueError, match="Stage.steps must be >= 1; got 0"):
        Stage(steps=0)
    (run / "checkpoints" / "last.ckpt").unlink()
    (run / "checkpoints" / "last.ckpt").mkdir()
    with pytest.raises(RuntimeError, match="a checkpoint folder \\(DeepSpeed"):
        stage_start(tmp_path, run, 2, first=True)
    (run / "checkpoints" / "last.ckpt").rmdir()
    (run / "checkpoints" / "last.ckpt").write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match=r"last.ckpt: its step cannot be read \(.*Error"):
        stage_start(tmp_path, run, 3, first=True)
    assert not (tmp_path / "stage3.start").exists()
    with pytest.raises(ValueError, match=r"\{max_steps\} in its arguments needs max_steps or steps"):
        Stage(args=("--trainer.val_check_interval", "{max_steps}"))


def test_a_stage_of_steps_is_checked_with_a_number_for_its_end_and_fails_saying_why(run_config, tmp_path):
    """Sweep.check parses {max_steps} as a number (an int-typed argument passes); a stage whose start
    cannot be read fails before its fit with failed.json saying why, not as a stop to resume."""
    from gist_lightning.sweeps import cell as cell_process

    stage = Stage(steps=3, args=("--trainer.log_every_n_steps", "{max_steps}"))
    Sweep([Cell(name="c", stages=(Stage(max_steps=2), stage))], [str(run_config())], tmp_path / "runs",
          LocalLauncher(), []).check()
    folder = tmp_path / "cell"
    (folder / "run" / "checkpoints" / "last.ckpt").mkdir(parents=True)  # (a folder: no step to read)
    (folder / "stage0.done").touch()
    spec = {"args": [], "stages": [{"max_steps": 2, "args": []}, {"max_steps": None, "args": [], "steps": 3}]}
    assert cell_process._stages(folder, spec, folder / "run", folder / "stdout.log", True, 0.0) == 1
    failed = json.loads((folder / "failed.json").read_text())
    assert failed["stage"] == 1 and "a checkpoint folder" in failed["error"]
    assert "stage 1 cannot start: RuntimeError" in (folder / "stdout.log").read_text()


def test_a_sweep_with_a_bad_key_runs_nothing(run_config, tmp_path, capsys):
    with pytest.raises(ValueError, match="cell .*: unrecognized arguments: --model.conditon gist"):
        main(["--config", str(run_config()), "--runs", str(tmp_path / "runs"), "--grid",
              "model.conditon=gist", "--grid", "model.num_gist_tokens=1", "--seeds", "0"])
    assert not list((tmp_path / "runs").glob("*/cell.json"))


def test_the_local_launcher_gives_each_cell_its_own_gpus(tmp_path, monkeypatch):
    """8 GPUs, 2 per cell: 4 cells at once, each with 2 GPUs no other running cell holds."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    launcher = LocalLauncher(cells_at_once=8, devices_per_cell=2)
    assert launcher.cells_at_once == 4
    seen = []
    for i in range(4):
        folder = tmp_path / f"cell{i}"
        folder.mkdir()
        launcher.start(folder, [sys.executable, "-c", _RECORD_ENV, str(folder / "env.json")])
        seen.append(folder)
    assert launcher.free() == 0
    while launcher.running():
        launcher.poll()
    envs = [json.loads((f / "env.json").read_text()) for f in seen]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["0,1", "2,3", "4,5", "6,7"]
    with pytest.raises(ValueError, match="--devices_per_cell 3: only 2 GPU"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
        LocalLauncher(devices_per_cell=3)


def test_the_local_launcher_splits_the_cores_between_cells(tmp_path):
    launcher = LocalLauncher(cells_at_once=2, cores=2)
    for i in range(2):
        (tmp_path / f"c{i}").mkdir()
        launcher.start(tmp_path / f"c{i}", [sys.executable, "-c", _RECORD_ENV, str(tmp_path / f"c{i}.json")])
    while launcher.running():
        launcher.poll()
    threads = [json.loads((tmp_path / f"c{i}.json").read_text())["OMP_NUM_THREADS"] for i in range(2)]
    assert threads == ["1", "1"]
    assert LocalLauncher(cells_at_once=3, cores=8).slot_env(0)["OMP_NUM_THREADS"] == "2"
    assert LocalLauncher(cells_at_once=1, cores=8, threads_per_cell=1).slot_env(0)["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_a_sweep_runs_cells_at_once_skips_finished_and_reruns_failed(run_config, tmp_path):
    """Two cells at once on the 2 cores; a second call skips them; a cell that failed (its fit exits
    with an error) is reported, then set aside with its log by the next call and run again."""
    config = str(run_config(max_steps=4, val_check_interval=4))
    runs = tmp_path / "runs"
    logs: list[str] = []
    cells = expand(parse_grid(["model.num_gist_tokens=1,2"]), [0])
    extra = ["--model.max_new_tokens", "2"]
    sweep = Sweep(cells, [config], runs, LocalLauncher(cells_at_once=2, cores=2), extra, log=logs.append,
                  poll_seconds=0.2)
    assert sweep.run() == 0, logs
    assert [line.split(": ")[1].split(" (")[0] for line in logs[:2]] == ["running", "running"]  # at once
    for cell in cells:
        done = json.loads((runs / cell.name / "run" / "done.json").read_text())
        assert done["name"] == cell.name and done["attempts"] == 1 and done["minutes"] > 0
        assert (runs / cell.name / "run" / "export" / "model.safetensors").is_file()
        # the cell ran as itself: runpy found no copy of it imported with its package
        assert "found in sys.modules" not in (runs / cell.name / "launcher.log").read_text()
    logs.clear()
    assert sweep.run() == 0 and all("finished before, skipped" in line for line in logs), logs

    # a failing fit: an attention implementation this machine does not have
    bad = Sweep(expand(parse_grid(["model.num_gist_tokens=3"]), [0]), [config], runs, LocalLauncher(),
                extra + ["--model.attn_implementation", "flash_attention_2"], log=logs.append,
                poll_seconds=0.2)
    logs.clear()
    assert bad.run() == 1
    assert any("k3-seed0: FAILED" in line for line in logs), logs
    assert bad.state(bad.cells[0]) == FAILED
    log = runs / "k3-seed0" / "stdout.log"
    assert "flash_attention_2" in log.read_text()
    fixed = Sweep(bad.cells, [config], runs, LocalLauncher(), extra, log=logs.append, poll_seconds=0.2)
    logs.clear()
    assert fixed.run() == 0, logs
    assert any("failed before; that attempt set aside in" in line for line in logs), logs
    [aside] = (runs / "k3-seed0").glob("failed-*")
    assert "flash_attention_2" in (aside / "stdout.log").read_text()
    assert fixed.state(fixed.cells[0]) == FINISHED


@pytest.mark.slow
def test_stages_and_a_cell_that_starts_from_another_cells_export(run_config, tmp_path):
    """A base cell, then a variant fine-tuned from its export; the variant has two stages (the
    second extends the run from its last.ckpt) and waits for the base."""
    config = str(run_config(max_steps=4, val_check_interval=4))
    runs = tmp_path / "runs"
    base = Cell(name="base", values={"model.condition": "pos_control"}, seed=0)
    variant = Cell(name="variant", values={"model.condition": "gist"}, seed=0, needs=("base",),
                   args=("--model.model_config", "null",
                         "--model.model_name_or_path", "{cell:base}/run/export"),
                   stages=(Stage(max_steps=4),
                           Stage(max_steps=6, args=("--trainer.val_check_interval", "2"))))
    logs: list[str] = []
    sweep = Sweep([variant, base], [config], runs, LocalLauncher(cells_at_once=2, cores=2),
                  ["--model.max_new_tokens", "2"], log=logs.append, poll_seconds=0.2)
    assert sweep.state(variant) == NEW
    assert sweep.run() == 0, logs
    assert [line.split("] ")[1].split(":")[0] for line in logs if "running" in line] == ["base", "variant"]
    metrics = (runs / "variant" / "run" / "metrics.csv").read_text()
    assert sorted({int(row.split(",")[0]) for row in metrics.splitlines()[1:] if row}) != []
    import torch

    last = torch.load(runs / "variant" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # the second stage extended the first
    spec = json.loads((runs / "variant" / "cell.json").read_text())
    assert str(runs / "base" / "run" / "export") in spec["args"]
    assert (runs / "variant" / "stage0.done").exists() and (runs / "variant" / "stage1.done").exists()
    # each stage's export (of the best checkpoint so far): the first stage's kept aside, the last
    # stage's, written after the first stage ended, where the export goes
    run = runs / "variant" / "run"
    assert json.loads((run / "export-stage0" / "gist_config.json").read_text())["source"]["global_step"] == 4
    stage0_end = (runs / "variant" / "stage0.done").stat().st_mtime
    assert (run / "export" / "gist_config.json").stat().st_mtime > stage0_end
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("export")) == ["export", "export-stage0"]
    assert os.path.exists(runs / "variant" / "run" / "done.json")


def test_a_cell_made_with_other_arguments_is_refused_not_kept_or_resumed(run_config, tmp_path):
    """A finished (or interrupted) cell whose recorded arguments or stages differ from the sweep's
    would be kept (or resumed) as if it were the cell asked for: the run refuses, naming the cell and
    what differs, before anything is written or started; the same cell is kept as before, and a
    failed one is still set aside and run anew (not refused)."""
    import dataclasses

    config = str(run_config(max_steps=4, val_check_interval=4))
    runs, logs = tmp_path / "runs", []
    cells = expand(parse_grid(["model.num_gist_tokens=1,2"]), [0])
    sweep = Sweep(cells, [config], runs, LocalLauncher(), ["--model.max_new_tokens", "2"], log=logs.append)
    for cell in cells:  # as a finished run leaves them (no fit needed to be refused)
        sweep.write_spec(cell)
        (runs / cell.name / "run").mkdir(parents=True)
        (runs / cell.name / "run" / "done.json").write_text("{}")
    assert sweep.run() == 0 and len(logs) == 2 and all("finished before, skipped" in m for m in logs), logs
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file() and p.name != ".sweep.lock"}

    other = Sweep(cells, [config], runs, LocalLauncher(), ["--model.max_new_tokens", "3"], log=logs.append)
    with pytest.raises(ValueError, match=r"k1-seed0 \(finished\) was made with other arguments \(recorded "
                                         r"--model.max_new_tokens 2; now --model.max_new_tokens 3\) "
                                         r"\(and 1 more cell"):
        other.run()
    assert other.describe(cells[0]).startswith("finished, made with other arguments")
    longer = Sweep([dataclasses.replace(cells[0], stages=(Stage(max_steps=8),))], [config], runs,
                   LocalLauncher(), ["--model.max_new_tokens", "2"], log=logs.append)
    with pytest.raises(ValueError, match=r"other stages \(recorded .*null.*; now .*8"):
        longer.run()
    (runs / cells[0].name / "run" / "done.json").unlink()  # interrupted: it would resume
    before.pop(runs / cells[0].name / "run" / "done.json")
    with pytest.raises(ValueError, match=r"k1-seed0 \(interrupted\) was made with other arguments"):
        other.run()
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file() and p.name != ".sweep.lock"} == before
    (runs / cells[0].name / "failed.json").write_text("{}")  # a failed attempt: set aside, run anew
    assert other.describe(cells[0]) == FAILED


@pytest.mark.slow
def test_ctrl_c_at_the_drivers_terminal_stops_its_cells_with_a_checkpoint_and_a_rerun_resumes(run_config,
                                                                                             tmp_path):
    """A Ctrl-C at the driver's terminal (SIGINT to its whole process group; a SIGTERM to the driver
    goes the same way) stops its running cells as a SIGTERM stops a fit: each writes ``last.ckpt``,
    the driver waits for them and exits 130 saying so, no process is left; the next driver resumes
    the cell from that checkpoint. Before, the driver died at once and took its cells with it,
    unsaved; and cells in the driver's process group got the SIGINT themselves, which ends a fit
    with exit 1 and no checkpoint (a failed cell, trained again from its start). While it runs, a
    listing from another process says the cell is running (before: "interrupted")."""
    import signal
    import subprocess
    import time

    config = str(run_config(max_steps=150, val_check_interval=150, log_every_n_steps=1))
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "gist_lightning.cli", "sweep", "--config", config, "--runs", str(runs),
            "--grid", "model.num_gist_tokens=1", "--seeds", "0", "--", "--model.max_new_tokens", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)  # a process group of its own, as a terminal's job
    metrics = runs / "k1-seed0" / "run" / "metrics.csv"
    start = time.time()
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 3):  # training, a few steps in
        assert driver.poll() is None and time.time() - start < 300, driver.stdout.read()
        time.sleep(0.1)
    # another process's listing (this one's, as --dry_run or long_context.py --check_args) sees it running
    listing = Sweep(expand(parse_grid(["model.num_gist_tokens=1"]), [0]), [config], runs, LocalLauncher(),
                    ["--model.max_new_tokens", "2"])
    assert listing.describe(listing.cells[0]).startswith("running (pid ")
    assert "under another driver" in listing.describe(listing.cells[0])
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C does
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, out
    assert "SIGINT: stopping 1 running cell(s)" in out
    assert "k1-seed0: stopped; resumes from its last.ckpt when the sweep runs again" in out
    assert (runs / "k1-seed0" / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (runs / "k1-seed0" / "run" / "done.json").exists()
    assert not (runs / "k1-seed0" / "running.json").exists()
    assert listing.describe(listing.cells[0]) == "interrupted"
    left = [p for p in os.listdir("/proc") if p.isdigit() and str(runs).encode() in _cmdline(p)]
    assert not left, "a cell outlived its stopped driver"
    rerun = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stdout[-2000:]
    assert "k1-seed0: interrupted; resumes from its last.ckpt" in rerun.stdout
    assert json.loads((runs / "k1-seed0" / "run" / "done.json").read_text())["attempts"] == 2


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


class _ScriptedLauncher:
    """A launcher whose cells end when the test says: ``finish(folder)`` writes ``run/done.json``
    and reports the exit at the next poll; ``on_stop``: what ``stop_all`` does."""

    def __init__(self, on_stop=None):
        self.ended, self.started, self.on_stop = [], [], on_stop

    def free(self):
        return 2 - len(self.started) + len(self.ended)

    def start(self, folder):
        self.started.append(folder)
        return "scripted"

    def finish(self, folder):
        (folder / "run").mkdir(parents=True, exist_ok=True)
        (folder / "run" / "done.json").write_text(json.dumps({"name": folder.name}))
        self.ended.append((folder, 0))

    def poll(self):
        out, self.ended = self.ended, []
        return out

    def stop_all(self):
        if self.on_stop:
            self.on_stop(self)
        return []

    def in_flight(self, folder, job=None):
        return False


def test_a_stop_asked_during_the_last_cells_record_or_while_a_cell_ends_is_kept(tmp_path):
    """Two windows of a stop (a signal sets ``signalled``; tested without processes): a signal while
    the last cell's ``on_finished`` runs (an evaluation can take minutes) still makes the sweep
    return 128 + the signal, so its caller does not go on; a cell that finishes as the stop asks it
    to is recorded (``on_finished``), not left for a later sitting to train again."""
    import signal

    cells = [Cell("a", ()), Cell("b", ())]
    launcher = _ScriptedLauncher()
    seen = []

    def on_finished(summary):
        seen.append(summary["name"])
        sweep.signalled = signal.SIGTERM  # the signal arrives while this runs

    sweep = Sweep(cells[:1], [], tmp_path, launcher, on_finished=on_finished, poll_seconds=0.01)
    sweep.write_spec = lambda cell: None
    real_start = sweep._start
    sweep._start = lambda cs: (real_start(cs), [launcher.finish(sweep.folder(c)) for c in cs])
    assert sweep.run() == 128 + signal.SIGTERM and seen == ["a"]

    # a stop while b runs; b ends (finished) as it is stopped: recorded
    def stop(launcher):
        launcher.finish(sweep2.folder(cells[1]))

    launcher2, seen2 = _ScriptedLauncher(on_stop=stop), []
    sweep2 = Sweep(cells[1:], [], tmp_path / "2", launcher2, on_finished=lambda s: seen2.append(s["name"]),
                   poll_seconds=0.01)
    sweep2.write_spec = lambda cell: None
    real_start2 = sweep2._start

    def start_then_signal(cs):
        real_start2(cs)
        sweep2.signalled = signal.SIGINT

    sweep2._start = start_then_signal
    assert sweep2.run() == 128 + signal.SIGINT
    assert seen2 == ["b"] and sweep2.state(cells[1]) == FINISHED


def test_a_slot_a_cell_frees_is_filled_before_its_record_runs(tmp_path):
    """``on_finished`` (an evaluation of minutes) runs after the slot its cell freed is given to the
    next cell, which does not need it, so no slot stands empty meanwhile; a cell that needs it starts
    only after its record (which may stop the sweep)."""
    cells = [Cell("a", ()), Cell("b", ()), Cell("d", ()), Cell("c", (), needs=("a",))]

    class Slots(_ScriptedLauncher):
        def free(self):  # 2 slots, each freed when its cell ends
            return 2 - len(self.started) + len(ends)

        def finish(self, folder):
            ends.append(folder)
            super().finish(folder)

    launcher, ends, done, at_record = Slots(), [], [], {}

    def on_finished(summary):
        name = summary["name"]
        at_record[name] = sorted(f.name for f in launcher.started)  # what had started when it ran
        done.append(name)

    sweep = Sweep(cells, [], tmp_path, launcher, on_finished=on_finished, poll_seconds=0.01)
    sweep.write_spec = lambda cell: None
    real_start = sweep._start

    def start(cs):  # a ends as soon as it starts; the others one after another, as cells end
        real_start(cs)
        for c in cs:
            if c.name in ("a", "d", "c"):
                launcher.finish(sweep.folder(c))
    sweep._start = start
    real_finished = sweep._finished

    def finished(cell, tag):
        out = real_finished(cell, tag)
        if cell.name == "d":
            launcher.finish(sweep.folder(cells[1]))  # b ends after d's record
        return out
    sweep._finished = finished
    assert sweep.run() == 0
    assert at_record["a"] == ["a", "b", "d"], at_record  # d filled a's slot before a's record; c waited
    assert at_record["c"] == ["a", "b", "c", "d"] and sorted(done) == ["a", "b", "c", "d"]


class _OldestEnds:
    """2 slots; each poll reports the oldest running cell finished (``interrupt``: stopped instead)."""

    def __init__(self):
        self.running, self.starts, self.ended = [], [], []

    def free(self):
        return 2 - len(self.running)

    def start(self, folder):
        self.running.append(folder)
        self.starts.append(folder.name)
        return "x"

    def interrupt(self, folder):  # stopped from outside: reported at the next poll, resumable
        (folder / "run").mkdir(parents=True, exist_ok=True)
        self.ended.append((folder, 143))

    def finish(self, folder):  # finished: reported at the next poll
        (folder / "run").mkdir(parents=True, exist_ok=True)
        (folder / "run" / "done.json").write_text(json.dumps({"name": folder.name}))
        self.ended.append((folder, 0))

    def poll(self):
        out, self.ended = self.ended, []
        if not out and self.running:
            out = [(self.running[0], 0)]
            (out[0][0] / "run").mkdir(parents=True, exist_ok=True)
            (out[0][0] / "run" / "done.json").write_text(json.dumps({"name": out[0][0].name}))
        for f, _ in out:
            self.running.remove(f)
        return out

    def stop_all(self):
        return []

    def in_flight(self, folder, job=None):
        return False


def test_filling_freed_slots_keeps_the_sweeps_order_and_a_stopped_sweep_starts_nothing(tmp_path):
    """The early fill takes only cells ahead of the first that needs the cell just finished (bases
    beside their gist models stay in pairs); after a record stopped the sweep, a cell stopped from
    outside is not started again, even when another cell finishes in the same poll."""
    from gist_lightning.sweeps import SweepStopped

    cells = [c for i in range(3) for c in (Cell(f"base{i}", ()), Cell(f"gist{i}", (), needs=(f"base{i}",)))]
    launcher, at_record = _OldestEnds(), {}
    sweep = Sweep(cells, [], tmp_path / "order", launcher, poll_seconds=0.0, log=lambda m: None,
                  on_finished=lambda s: at_record.setdefault(s["name"], list(launcher.starts)))
    sweep.write_spec = lambda cell: None
    assert sweep.run() == 0
    assert launcher.starts == ["base0", "base1", "gist0", "gist1", "base2", "gist2"], launcher.starts
    assert not any(f"gist{i}" in at_record[f"base{i}"] for i in range(3)), at_record  # after the record

    cells, launcher, logged = [Cell("a", ()), Cell("b", ()), Cell("c", ())], _OldestEnds(), []

    def record(summary):
        if summary["name"] == "a":  # b is stopped from outside and c ends, both at the next poll
            launcher.interrupt(sweep.folder("b"))
            launcher.finish(sweep.folder("c"))
            raise SweepStopped("a's evaluation failed")

    sweep = Sweep(cells, [], tmp_path / "stop", launcher, on_finished=record, poll_seconds=0.0,
                  log=logged.append)
    sweep.write_spec = lambda cell: None
    assert sweep.run() == 1
    assert launcher.starts == ["a", "b", "c"], (launcher.starts, logged)  # c filled a's slot; b not again
    assert any("b: not started (the sweep stopped)" in m for m in logged), logged


def test_a_cell_asked_to_stop_starts_no_further_fit_and_reads_as_stopped(tmp_path, monkeypatch):
    """The cell process: a stop between two stages (no fit running to pass it to) is not lost, and a
    fit that exits otherwise than 143 after a stop was asked (a SIGINT ends a fit with 1) is a stopped
    cell to resume, not a failed one to set aside and train again."""
    from gist_lightning.sweeps import cell as cell_process

    spec = {"args": [], "stages": [{"args": [], "max_steps": 2}, {"args": [], "max_steps": 4}]}
    fits = []

    def fit(args, log):
        fits.append(args)
        cell_process.stop_fit()  # the stop comes while this stage's fit runs...
        return 1  # ...and the fit ends with 1, as a SIGINT ends it

    monkeypatch.setattr(cell_process, "_fit", fit)
    monkeypatch.setattr(cell_process, "_stop_asked", False)
    code = cell_process._stages(tmp_path, spec, tmp_path / "run", tmp_path / "log", True, 0.0)
    assert code == 143 and len(fits) == 1  # the second stage never started
    assert not (tmp_path / cell_process.FAILED).exists()


def test_running_here_matches_the_cell_folder_exactly(tmp_path):
    """A stale running.json whose pid now runs another cell (k1-seed10, a name that k1-seed1 starts)
    is not read as this cell running."""
    import subprocess
    import time
    from pathlib import Path

    from gist_lightning.sweeps.cell import RUNNING, running_here

    other = tmp_path / "k1-seed10"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(other)])
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        for _ in range(200):  # until it has exec'd (before, its cmdline is this process's)
            if str(other).encode() in cmdline.read_bytes():
                break
            time.sleep(0.05)
        for name in ("k1-seed1", "k1-seed10"):
            (tmp_path / name).mkdir()
            (tmp_path / name / RUNNING).write_text(json.dumps({"pid": proc.pid, "host": os.uname().nodename,
                                                               "start": "now"}))
        assert running_here(tmp_path / "k1-seed1") is None
        assert running_here(tmp_path / "k1-seed10")["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert running_here(tmp_path / "k1-seed10") is None  # its process gone


def test_an_attempt_killed_outright_is_counted_when_the_cell_runs_again(tmp_path):
    """A cell killed by SIGKILL (a session or machine ending) never records its attempt; the next
    run of the cell records it from its running.json, its minutes up to the last write of its files,
    so that done.json's minutes count it. A running.json whose process lives is left alone."""
    import subprocess
    import time

    from gist_lightning.sweeps import cell as cell_process

    start = time.time() - 3600
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / cell_process.RUNNING).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                                             "start": stamp}))
    for path, minutes in ((tmp_path / "stdout.log", 7), (tmp_path / "run" / "checkpoints" / "last.ckpt", 8)):
        path.write_text("x")
        os.utime(path, (start + 60 * minutes, start + 60 * minutes))
    cell_process._record_killed_attempt(tmp_path)
    (attempt,) = json.loads((tmp_path / "attempts.json").read_text())
    assert attempt["start"] == stamp and abs(attempt["minutes"] - 8.0) < 0.05, attempt
    assert attempt["ended"].startswith("killed")
    assert attempt["host"] == os.uname().nodename and attempt["cpu"] == cell_process.cpu_model() != ""
    # done.json of the next attempt's end counts it
    spec = {"stages": [{"args": [], "max_steps": 1}], "args": [], "summary": {"name": "c"}}
    (tmp_path / "stage0.done").touch()
    assert cell_process._stages(tmp_path, spec, tmp_path / "run", tmp_path / "log", True, time.time()) == 0
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["attempts"] == 2 and done["minutes"] >= 8.0
    # a running.json whose process lives (its cmdline names the folder, as a cell's does) is left alone
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(tmp_path)])
    try:
        for _ in range(200):
            if str(tmp_path).encode() in open(f"/proc/{alive.pid}/cmdline", "rb").read():
                break
            time.sleep(0.05)
        record = {"pid": alive.pid, "host": os.uname().nodename, "start": stamp}
        (tmp_path / cell_process.RUNNING).write_text(json.dumps(record))
        cell_process._record_killed_attempt(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    assert len(json.loads((tmp_path / "attempts.json").read_text())) == 1


def test_the_next_run_of_a_killed_cell_counts_its_attempt_and_a_set_aside_one_does_not(tmp_path, monkeypatch):
    """Through ``run``: a stale running.json of a dead process (its log written) adds the killed
    attempt before this one; one whose files were set aside (killed before its first checkpoint)
    adds none. And the recorded pid being the recording process's own (a fresh machine hands pids
    out alike), under a command line naming the folder, is no sign of life."""
    import subprocess
    import time

    from gist_lightning.sweeps import cell as cell_process

    monkeypatch.setattr(cell_process, "_stages", lambda *a: 0)
    spec = {"stages": [{"args": [], "max_steps": 1}], "args": [], "summary": {"name": "c"}}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, log in (("killed", True), ("set-aside", False)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / cell_process.SPEC).write_text(json.dumps(spec))
        record = {"pid": dead.pid, "host": os.uname().nodename, "start": "2026-01-01 00:00:00",
                  "started": time.time() - 600}
        (folder / cell_process.RUNNING).write_text(json.dumps(record))
        if log:
            (folder / "stdout.log").write_text("x")
        assert cell_process.run(folder) == 0
        attempts = json.loads((folder / "attempts.json").read_text())
        assert [a.get("ended", "").split(" ")[0] for a in attempts] == (["killed", ""] if log else [""]), name
        if log:
            assert 9.9 < attempts[0]["minutes"] < 10.1  # from "started" to the log's write, just now
    own = tmp_path / "own-pid"
    own.mkdir()
    (own / "stdout.log").write_text("x")
    script = ("import json, os, sys, time; from pathlib import Path; from gist_lightning.sweeps import cell; "
              "f = Path(sys.argv[1]); (f / cell.RUNNING).write_text(json.dumps({'pid': os.getpid(), "
              "'host': os.uname().nodename, 'start': '', 'started': time.time() - 60})); "
              "assert cell.running_here(f); cell._record_killed_attempt(f)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script, str(own)], check=True, env=env)
    assert json.loads((own / "attempts.json").read_text())[0]["ended"].startswith("killed")
