"""StopWhenLearned: a stage that ends once its loss is learned (the mean over a window under a
threshold), writes the last.ckpt the next stage resumes from, keeps its window in checkpoints, and
names a metric the run does not log."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA

from gist_lightning.curriculum import StopWhenLearned
from gist_lightning.errors import GistError

ROOT = Path(__file__).resolve().parents[1]
TINY = json.dumps(TINY_LLAMA)
CALLBACK = "--trainer.callbacks+=gist_lightning.curriculum.StopWhenLearned"


def _fit(tmp_path, max_steps, *extra):
    from gist_lightning.cli import cli_main

    return cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
                     "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "1000",
                     "--trainer.limit_val_batches", "0",
                     "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
                     "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--trainer.logger.init_args.version", "run", "--model.model_config", TINY,
                     "--data.train_size", "64", "--data.validation_size", "2", "--data.batch_size", "4",
                     "--data.cache_dir", str(tmp_path / "cache"), *extra])


def _stopper(cli) -> StopWhenLearned:
    return next(c for c in cli.trainer.callbacks if isinstance(c, StopWhenLearned))


def _steps(run: Path) -> list[int]:
    return sorted({int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")})


@pytest.mark.slow
def test_a_stage_stops_once_learned_and_the_next_resumes_from_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # any loss is under 1e6: learned as soon as the window (3 steps) is full
    cli = _fit(tmp_path, 10, CALLBACK, "--trainer.callbacks.below", "1e6", "--trainer.callbacks.window", "3")
    assert cli.trainer.global_step == 3 and _stopper(cli).stopped_at == 3
    run = Path(cli.trainer.log_dir)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    [kept] = [v for k, v in state["callbacks"].items() if "StopWhenLearned" in k]
    assert len(kept["values"]) == 3  # the window, for a resumed stage
    # saved at the stop as at max_steps: mid-epoch (16 batches an epoch), not after the loop closed it
    assert state["epoch"] == 0
    # the same stage again (killed after its stop, before the sweep marked it done): ends at once
    again = _fit(tmp_path, 10, CALLBACK, "--trainer.callbacks.below", "1e6",
                 "--trainer.callbacks.window", "3", "--ckpt_path", "last")
    assert again.trainer.global_step == 3 and _stopper(again).stopped_at == 3
    # the next stage (no stop) continues from that step to its own max_steps
    nxt = _fit(tmp_path, 6, "--ckpt_path", "last")
    assert nxt.trainer.global_step == 6 and _steps(run)[-1] == 5
    assert Path(nxt.trainer.ckpt_path) == run / "checkpoints" / "last.ckpt"  # (resumed, not restarted)
    # a loss never under the threshold: the cap (max_steps) ends the stage
    never = _fit(tmp_path / "never", 5, CALLBACK, "--trainer.callbacks.below", "-1",
                 "--trainer.callbacks.window", "2")
    assert never.trainer.global_step == 5 and _stopper(never).stopped_at is None


@pytest.mark.slow
def test_the_window_counts_optimizer_steps_under_gradient_accumulation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 2 batches an optimizer step: one value a step, so a window of 3 is full at step 3 (6 batches)
    cli = _fit(tmp_path, 10, CALLBACK, "--trainer.callbacks.below", "1e6", "--trainer.callbacks.window", "3",
               "--trainer.accumulate_grad_batches", "2")
    assert cli.trainer.global_step == 3 and _stopper(cli).stopped_at == 3
    assert len(_stopper(cli)._values) == 3


@pytest.mark.slow
def test_a_metric_the_run_does_not_log_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GistError, match=r"'train/lm_loss' is not logged by this run \(logged: train/loss"):
        _fit(tmp_path, 3, CALLBACK, "--trainer.callbacks.below", "1",
             "--trainer.callbacks.monitor", "train/lm_loss")


def test_the_window_round_trips_and_must_hold_a_step():
    stopper = StopWhenLearned(below=0.5, window=3)
    stopper._values.extend([0.9, 0.4, 0.3, 0.2])  # (the last 3 kept)
    again = StopWhenLearned(below=0.5, window=3)
    again.load_state_dict(stopper.state_dict())
    assert list(again._values) == [0.4, 0.3, 0.2]
    other = StopWhenLearned(below=0.5, monitor="train/lm_loss", window=3)
    other.load_state_dict(stopper.state_dict())  # another metric's window: not taken
    assert list(other._values) == [] and other.state_key != stopper.state_key
    with pytest.raises(ValueError, match="window must be >= 1"):
        StopWhenLearned(below=0.5, window=0)


@pytest.mark.slow
def test_a_sweep_cell_takes_a_stopped_stage_as_done_and_extends_it(run_config, tmp_path):
    """In a sweep cell (the long-context experiment's +learn row), a first stage that stopped once
    learned counts as done, and the second resumes from where it stopped."""
    from gist_lightning.sweeps import Cell, Stage, Sweep
    from gist_lightning.sweeps.engine import LocalLauncher

    config = str(run_config(max_steps=10, val_check_interval=10))
    stop = (CALLBACK, "--trainer.callbacks.below", "1e6", "--trainer.callbacks.window", "2",
            "--trainer.limit_val_batches", "0")
    cell = Cell(name="learn", values={}, seed=0,
                stages=(Stage(max_steps=10, args=stop), Stage(max_steps=5)))
    logs: list[str] = []
    sweep = Sweep([cell], [config], tmp_path / "runs", LocalLauncher(), ["--model.max_new_tokens", "2"],
                  log=logs.append, poll_seconds=0.2)
    assert sweep.run() == 0, logs
    folder = tmp_path / "runs" / "learn"
    assert (folder / "stage0.done").exists() and (folder / "run" / "done.json").exists()
    assert "StopWhenLearned: the mean train/loss of the last 2 steps is under 1000000.0; stopping at step 2" \
        in (folder / "stdout.log").read_text()
    last = torch.load(folder / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5


@pytest.mark.slow
def test_a_stage_of_steps_trains_that_many_after_where_the_stage_before_stopped(run_config, tmp_path):
    """Stage(steps=3) after a stage StopWhenLearned ended at step 2 trains to step 5, and its
    ``{max_steps}`` (here its one validation) reads 5; its start is recorded for a resumed attempt."""
    from gist_lightning.sweeps import Cell, Stage, Sweep
    from gist_lightning.sweeps.engine import LocalLauncher

    config = str(run_config(max_steps=10, val_check_interval=10))
    stop = (CALLBACK, "--trainer.callbacks.below", "1e6", "--trainer.callbacks.window", "2",
            "--trainer.limit_val_batches", "0")
    cell = Cell(name="learn", values={}, seed=0,
                stages=(Stage(max_steps=10, args=stop),
                        Stage(steps=3, args=("--trainer.val_check_interval", "{max_steps}"))))
    logs: list[str] = []
    sweep = Sweep([cell], [config], tmp_path / "runs", LocalLauncher(), ["--model.max_new_tokens", "2"],
                  log=logs.append, poll_seconds=0.2)
    assert sweep.run() == 0, logs
    folder = tmp_path / "runs" / "learn"
    assert (folder / "stage1.start").read_text() == "2"
    assert "--trainer.val_check_interval 5 --trainer.max_steps 5" in (folder / "stdout.log").read_text()
    last = torch.load(folder / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5
    rows = csv.DictReader(open(folder / "run" / "metrics.csv"))
    validated = [r for r in rows if r.get("validation_seen/rougeL")]
    assert [int(r["step"]) for r in validated] == [4]  # (the step counted from 0: the 5th)


RANKS_SCRIPT = '''
import json, sys
import lightning as L
import torch
from gist_lightning.curriculum import StopWhenLearned

class Ranked(L.LightningModule):
    """Logs a loss that differs by rank (0.0 on rank 0, 1.0 on rank 1): only their mean is under 0.6."""
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        self.log("train/loss", torch.tensor(float(self.global_rank)))
        return self.layer(batch[0]).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(64, 2)), batch_size=2)

stopper = StopWhenLearned(below=0.6, window=3)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                    callbacks=[stopper], enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
trainer.fit(Ranked())
with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"stopped_at": stopper.stopped_at, "global_step": trainer.global_step,
               "window": list(stopper._values)}, f)
'''


@pytest.mark.slow
def test_every_rank_stops_at_the_same_step_on_the_ranks_mean(tmp_path):
    """On 2 DDP processes whose losses differ (0 and 1), each rank's window holds the ranks' mean
    (0.5), so both stop at the window's first full step; ranks judging their own losses alone
    would hold different windows, and rank 1 would never stop."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # its own session: ranks stopping apart would hang in DDP, and the timeout kills every rank
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["stopped_at"] for r in ranks] == [3, 3] and [r["global_step"] for r in ranks] == [3, 3], ranks
    assert ranks[0]["window"] == ranks[1]["window"] == [0.5, 0.5, 0.5]
