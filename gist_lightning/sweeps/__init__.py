"""Sweeps: a grid of cells (:mod:`.grid`), each one ``gist-lightning fit`` run in its own folder
(:mod:`.cell`), started on this machine or on SLURM (:mod:`.launchers`) by a driver that can be
killed and started again (:mod:`.engine`). The names below are imported when first used
(:mod:`gist_lightning.lazy`)."""

from typing import TYPE_CHECKING

from ..lazy import lazy_names as _lazy_names

if TYPE_CHECKING:  # (for type checkers and editors; at run time, __getattr__)
    from .engine import Sweep, SweepStopped, main
    from .grid import Cell, Stage, expand, parse_grid
    from .launchers import LocalLauncher, SlurmLauncher

__all__ = ["Cell", "LocalLauncher", "SlurmLauncher", "Stage", "Sweep", "SweepStopped", "expand", "main",
           "parse_grid"]
__getattr__, __dir__ = _lazy_names(__name__, {
    "Sweep": "engine", "SweepStopped": "engine", "main": "engine", "Cell": "grid", "Stage": "grid",
    "expand": "grid", "parse_grid": "grid", "LocalLauncher": "launchers", "SlurmLauncher": "launchers"})
