"""Where a sweep's cells report, beside the CSV log the sweep itself reads: TensorBoard, Weights &
Biases, MLflow (``--track``). The sweep groups its cells so that the tracker's own UI compares them:
one W&B group (the sweep's name) with one run per cell, an MLflow parent run with one child run per
cell, TensorBoard runs ``<cell>/run/tensorboard`` under the sweep's folder. An interrupted or
requeued cell continues its own tracker run: its W&B id is fixed by the sweep and the cell, its
MLflow run is created once by the driver and named in ``<cell>/tracking.json``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_text_atomic

TRACKERS = ("tensorboard", "wandb", "mlflow")
_CLASSES = {"tensorboard": "lightning.pytorch.loggers.TensorBoardLogger",
            "wandb": "lightning.pytorch.loggers.WandbLogger",
            "mlflow": "lightning.pytorch.loggers.MLFlowLogger"}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@dataclass
class Tracking:
    """``trackers``: names of :data:`TRACKERS`; ``group``: the W&B group and MLflow parent run's name;
    ``project``: W&B project and MLflow experiment; ``wandb_mode``: ``online`` / ``offline`` (None: W&B's
    own default, ``WANDB_MODE``); ``mlflow_uri``: the MLflow tracking URI (None: ``MLFLOW_TRACKING_URI``)."""

    trackers: list[str] = field(default_factory=list)
    group: str = "sweep"
    project: str = "gist-lightning"
    wandb_mode: str | None = None
    mlflow_uri: str | None = None

    def check(self) -> None:
        """One line for what cannot work, before anything runs: an unknown tracker, a package that is
        not installed, MLflow without a tracking URI."""
        import importlib.util

        for name in self.trackers:
            if name not in TRACKERS:
                raise ValueError(f"--track {name}: expected one of {', '.join(TRACKERS)}")
            if importlib.util.find_spec(_PACKAGES[name]) is None:
                raise ValueError(f"--track {name}: the {_PACKAGES[name]} package is not installed "
                                 "(pip install 'gist-lightning[track]')")
        if self.wandb_mode not in (None, "online", "offline"):
            raise ValueError(f"--wandb_mode {self.wandb_mode}: expected online or offline")
        if "mlflow" in self.trackers and not (self.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            raise ValueError("--track mlflow needs --mlflow_uri (or MLFLOW_TRACKING_URI): a tracking server "
                             "(http://...), a database (sqlite:///mlflow.db), or a folder (file:/path; "
                             "MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE=true for that)")

    @property
    def uri(self) -> str | None:
        return self.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")

    def loggers(self, runs: Path, cell: str, create: bool = True) -> list[dict]:
        """The cell's trackers as ``trainer.logger`` entries (after the sweep's CSV logger); with
        ``create=False`` (a check of the arguments) no MLflow run is made (``run_id`` None)."""
        out = []
        for name in self.trackers:
            if name == "tensorboard":
                args = {"save_dir": str(runs), "name": cell, "version": "run", "sub_dir": "tensorboard",
                        "default_hp_metric": False}
            elif name == "wandb":
                args = {"project": self.project, "group": self.group, "name": cell,
                        "id": _wandb_id(runs, cell), "resume": "allow", "save_dir": str(runs / cell / "run"),
                        "tags": ["sweep", self.group]}
                if self.wandb_mode is not None:
                    args["offline"] = self.wandb_mode == "offline"
            else:
                args = {"tracking_uri": self.uri, "experiment_name": self.project,
                        "run_id": self._mlflow_run(runs, cell) if create else None}
            out.append({"class_path": _CLASSES[name], "init_args": args})
        return out

    # -- MLflow: the sweep's parent run and one child run per cell, made once by the driver ---------
    def _mlflow_run(self, runs: Path, cell: str) -> str:
        record = runs / cell / "tracking.json"
        known = json.loads(record.read_text()) if record.is_file() else {}
        if known.get("mlflow_uri") == self.uri and known.get("mlflow_run_id"):
            return known["mlflow_run_id"]
        client, experiment = self._mlflow(runs)
        parent = self._parent(runs, client, experiment)
        run = client.create_run(experiment, run_name=cell,
                                tags={"mlflow.parentRunId": parent, "sweep": self.group, "cell": cell})
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps({"mlflow_uri": self.uri,
                                              "mlflow_run_id": run.info.run_id}) + "\n")
        return run.info.run_id

    def _mlflow(self, runs: Path):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        found = client.get_experiment_by_name(self.project)
        return client, found.experiment_id if found else client.create_experiment(self.project)

    def _parent(self, runs: Path, client, experiment: str) -> str:
        record = runs / "tracking.json"
        known = json.loads(record.read_text()) if record.is_file() else {}
        if known.get("mlflow_uri") == self.uri and known.get("mlflow_parent_run_id"):
            return known["mlflow_parent_run_id"]
        parent = client.create_run(experiment, run_name=self.group, tags={"sweep": self.group,
                                                                          "runs": str(runs)})
        write_text_atomic(record, json.dumps({"mlflow_uri": self.uri,
                                              "mlflow_parent_run_id": parent.info.run_id}) + "\n")
        return parent.info.run_id


def _wandb_id(runs: Path, cell: str) -> str:
    """A W&B run id fixed by the sweep's folder and the cell: every attempt of a cell is one W&B run."""
    return hashlib.sha1(f"{runs.resolve()}/{cell}".encode()).hexdigest()[:16]


def add_tracking_arguments(parser) -> None:
    group = parser.add_argument_group("trackers (beside each cell's metrics.csv)")
    group.add_argument("--track", action="append", default=[], choices=TRACKERS,
                       help="also log every cell to this tracker (repeat for several): its metrics, "
                       "hyperparameters, predictions and compression statistics, grouped by sweep")
    group.add_argument("--track_project", default="gist-lightning",
                       help="W&B project and MLflow experiment (default gist-lightning)")
    group.add_argument("--track_group", default=None,
                       help="W&B group and MLflow parent run (default: the runs folder's name)")
    group.add_argument("--wandb_mode", default=None, choices=["online", "offline"],
                       help="default: W&B's own (WANDB_MODE)")
    group.add_argument("--mlflow_uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")


def tracking_from(cfg, runs: Path) -> Tracking | None:
    if not cfg.track:
        return None
    tracking = Tracking(list(dict.fromkeys(cfg.track)), group=cfg.track_group or Path(runs).resolve().name,
                        project=cfg.track_project, wandb_mode=cfg.wandb_mode, mlflow_uri=cfg.mlflow_uri)
    tracking.check()
    return tracking
