"""Sweeps: a grid of cells (:mod:`.grid`), each one ``gist-lightning fit`` run in its own folder
(:mod:`.cell`), started on this machine or on SLURM (:mod:`.launchers`) by a driver that can be
killed and started again (:mod:`.engine`).

The names below are imported when first used, not with the package: a cell's process is
``python -m gist_lightning.sweeps.cell``, and a package that imported :mod:`.cell` (through the
engine) before runpy runs it as ``__main__`` would hold two copies of it (and Python warns so)."""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (for type checkers and editors; at run time, __getattr__)
    from .engine import Sweep, SweepStopped, main
    from .grid import Cell, Stage, expand, parse_grid
    from .launchers import LocalLauncher, SlurmLauncher

_WHERE = {"Sweep": "engine", "SweepStopped": "engine", "main": "engine", "Cell": "grid", "Stage": "grid",
          "expand": "grid", "parse_grid": "grid", "LocalLauncher": "launchers", "SlurmLauncher": "launchers"}
__all__ = ["Cell", "LocalLauncher", "SlurmLauncher", "Stage", "Sweep", "SweepStopped", "expand", "main",
           "parse_grid"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
