"""Sweeps: a grid of cells (:mod:`.grid`), each one ``gist-lightning fit`` run in its own folder
(:mod:`.cell`), started on this machine or on SLURM (:mod:`.launchers`) by a driver that can be
killed and started again (:mod:`.engine`)."""

from .engine import Sweep, SweepStopped, main
from .grid import Cell, Stage, expand, parse_grid
from .launchers import LocalLauncher, SlurmLauncher

__all__ = ["Cell", "LocalLauncher", "SlurmLauncher", "Stage", "Sweep", "SweepStopped", "expand", "main",
           "parse_grid"]
