"""Trackers beside the CSV log (issue 31): a sweep's cells log to TensorBoard, W&B (offline) and MLflow
(a local file store), grouped by sweep, and what the trackers hold is read back and compared with the
cells' own metrics.csv: the same validation scores at the same steps, the hyperparameters, the
predictions, the compression statistics."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from gist_lightning.sweeps import LocalLauncher, Sweep, expand, parse_grid
from gist_lightning.sweeps.engine import check_args, main
from gist_lightning.sweeps.tracking import Tracking

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

SCORE = "validation_seen/rougeL"


def _validation_rows(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[SCORE]) for r in csv.DictReader(f) if r.get(SCORE)}


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then a LevelDB
    log (32 KiB blocks; each chunk: crc32 (4), length (2), type (1: whole, 2: first, 3: middle,
    4: last)), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pending, pos, block = path.read_bytes(), [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_the_cells_trackers_are_fixed_by_the_sweep_and_made_once(tmp_path, run_config, monkeypatch):
    """A W&B id and an MLflow run per cell that every attempt of the cell reuses (a requeued cell
    continues its tracker run), one MLflow parent run per sweep; a check of the arguments makes no
    run; the fit parses the logger list (CSV first)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    runs = tmp_path / "runs"
    tracking = Tracking(["tensorboard", "wandb", "mlflow"], group="g", project="p",
                        mlflow_uri=f"file:{tmp_path / 'mlruns'}")
    tracking.check()
    unmade = tracking.loggers(runs, "gist-k1-seed0", create=False)
    assert unmade[2]["init_args"]["run_id"] is None and not (runs / "tracking.json").exists()
    first = tracking.loggers(runs, "gist-k1-seed0")
    assert tracking.loggers(runs, "gist-k1-seed0") == first
    other = tracking.loggers(runs, "gist-k2-seed0")
    assert first[1]["init_args"]["id"] != other[1]["init_args"]["id"]
    assert first[2]["init_args"]["run_id"] != other[2]["init_args"]["run_id"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    parent = json.loads((runs / "tracking.json").read_text())["mlflow_parent_run_id"]
    for loggers in (first, other):
        run = client.get_run(loggers[2]["init_args"]["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent

    sweep = Sweep(expand(parse_grid(["model.num_gist_tokens=1"]), [0]), [str(run_config())], runs,
                  LocalLauncher(), tracking=tracking)
    args = sweep.args(sweep.cells[0], create=False)
    loggers = json.loads(args[args.index("--trainer.logger") + 1])
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in loggers] == ["CSVLogger", "TensorBoardLogger",
                                                                      "WandbLogger", "MLFlowLogger"]
    check_args(args)


@pytest.mark.parametrize("argv, message", [
    (["--track", "mlflow"], "--track mlflow needs --mlflow_uri"),
    (["--track", "comet"], "invalid choice: 'comet'"),
])
def test_a_tracker_that_cannot_work_is_refused_before_anything_runs(argv, message, run_config, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    with pytest.raises((ValueError, SystemExit)) as e:
        main(["--config", str(run_config()), "--runs", str(runs), "--grid", "model.num_gist_tokens=1", *argv])
    assert message in (str(e.value) if isinstance(e.value, ValueError) else capsys.readouterr().err)
    assert not runs.exists() or not list(runs.iterdir())


@pytest.mark.slow
def test_a_sweep_logs_every_cell_to_each_tracker_grouped(run_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = str(run_config(max_steps=4, val_check_interval=2))
    runs = tmp_path / "runs"
    tracking = Tracking(["tensorboard", "wandb", "mlflow"], group="k-sweep", project="gisting",
                        wandb_mode="offline", mlflow_uri=f"file:{tmp_path / 'mlruns'}")
    cells = expand(parse_grid(["model.num_gist_tokens=1,2"]), [0])
    logs: list[str] = []
    sweep = Sweep(cells, [config], runs, LocalLauncher(cells_at_once=2, cores=2),
                  ["--model.max_new_tokens", "2"], log=logs.append, poll_seconds=0.2, tracking=tracking)
    assert sweep.run() == 0, logs

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    parent = json.loads((runs / "tracking.json").read_text())["mlflow_parent_run_id"]
    children = client.search_runs([client.get_experiment_by_name("gisting").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(c.name for c in cells)
    for cell in cells:
        run = runs / cell.name / "run"
        want = _validation_rows(run)
        assert len(want) == 2  # two validations (metrics.csv steps count from 0)

        # TensorBoard: the event files under the cell's run folder
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
        events.Reload()
        assert {e.step: pytest.approx(e.value) for e in events.Scalars(SCORE)} == want
        assert "predictions/validation_seen/text_summary" in events.Tags()["tensors"]

        # MLflow: the cell's child run, its history, params and artifacts
        [child] = [r for r in children if r.info.run_name == cell.name]
        history = client.get_metric_history(child.info.run_id, SCORE)
        assert {m.step: pytest.approx(m.value) for m in history} == want
        assert child.data.params["num_gist_tokens"] == str(cell.k)
        assert child.info.status == "FINISHED"
        files = {Path(a.path).name for a in client.list_artifacts(child.info.run_id, "predictions")}
        assert {"step000004-validation_seen.csv", "step000004-compression.json"} <= files

        # W&B offline: the run file's records (group, config, history) and the prediction tables
        [folder] = (run / "wandb").glob("offline-run-*")
        records = wandb_records(next(folder.glob("run-*.wandb")))
        [info] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert info.run_group == "k-sweep" and info.display_name == cell.name
        config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
                  for i in r.config.update}
        assert config["num_gist_tokens"] == cell.k
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                if SCORE in items:
                    history[int(items["trainer/global_step"])] = items[SCORE]
        assert history == {step: pytest.approx(v) for step, v in want.items()}
        tables = [p.name for p in (folder / "files" / "media" / "table" / "predictions").iterdir()]
        assert any(name.startswith("validation_seen_") for name in tables), tables
