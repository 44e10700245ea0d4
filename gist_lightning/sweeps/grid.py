"""A sweep's grid: which cells there are, what each one runs, and its name.

A cell is one run (one ``gist-lightning fit`` process, or a few in a row when it has stages) in its
own folder ``<runs>/<name>/``. Its name comes from its values (``gist-k2-seed0`` for
``model.condition=gist model.num_gist_tokens=2`` and seed 0), so a second sweep over the same folder
finds the cells it has already run.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import yaml

CONDITION, K = "model.condition", "model.num_gist_tokens"
MAX_STEPS = "{max_steps}"  # in a Stage's arguments: the step it trains to
CONTROLS = ("pos_control", "neg_control")  # their gist token is present but k does not matter: run once


@dataclass(frozen=True)
class Stage:
    """One fit of a cell: trained up to ``max_steps`` (None: the config's), or for ``steps`` steps
    from the step it starts at (where the stage before it ended, maybe early, by
    ``gist_lightning.curriculum.StopWhenLearned``; 0 for a first stage), with ``args`` added, in which
    ``{max_steps}`` stands for the step it trains to (e.g. ``--trainer.val_check_interval
    {max_steps}``: validated at its end; Lightning counts that interval in batches, so under gradient
    accumulation it is not one validation). Each stage after the first continues from the cell's
    ``last.ckpt``."""

    max_steps: int | None = None
    args: tuple[str, ...] = ()
    steps: int | None = None

    def __post_init__(self):
        if self.steps is not None and self.max_steps is not None:
            raise ValueError(f"Stage: give max_steps ({self.max_steps}) or steps ({self.steps}), not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Stage.steps must be >= 1; got {self.steps}")
        if self.max_steps is None and self.steps is None and any(MAX_STEPS in a for a in self.args):
            raise ValueError(f"Stage: {MAX_STEPS} in its arguments needs max_steps or steps (the config's "
                             "max_steps is not known to the sweep)")


def fill_max_steps(args, max_steps: int | None) -> list[str]:
    """A stage's arguments with ``{max_steps}`` the step it trains to."""
    return [a.replace(MAX_STEPS, str(max_steps)) for a in args]


@dataclass(frozen=True)
class Cell:
    """One run of the grid. ``values``: config key -> value, as given to ``gist-lightning fit``;
    ``args``: more arguments of this cell alone; ``needs``: names of cells that must have finished
    first (their folders are named in ``args`` by ``{cell:<name>}``, e.g.
    ``--model.model_name_or_path {cell:base-seed0}/run/export``)."""

    name: str
    values: dict = field(default_factory=dict)
    seed: int | None = None
    args: tuple[str, ...] = ()
    stages: tuple[Stage, ...] = (Stage(),)
    needs: tuple[str, ...] = ()

    @property
    def condition(self) -> str | None:
        return self.values.get(CONDITION)

    @property
    def k(self) -> int | None:
        return self.values.get(K)

    def fit_args(self) -> list[str]:
        """The cell's own arguments to ``gist-lightning fit`` (its values, seed and ``args``)."""
        out: list[str] = []
        for key, value in self.values.items():
            out += [f"--{key}", _arg(value)]
        if self.seed is not None:
            out += ["--seed_everything", str(self.seed), "--data.seed", str(self.seed)]
        return out + list(self.args)

    def summary(self) -> dict:
        """What the cell is, for its ``done.json`` and the tables: name, seed, values, and ``condition``
        and ``k`` where the grid sets them (controls are k=1)."""
        out = {"name": self.name, "seed": self.seed, "values": dict(self.values)}
        if self.condition is not None:
            out["condition"] = self.condition
            out["k"] = self.k if self.k is not None else 1
        return out


def _arg(value) -> str:
    """A value as the command line gives it (YAML: ``true``, ``null``, ``0.001``, ``[1, 2]``)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def parse_grid(specs: list[str]) -> dict[str, list]:
    """``["model.num_gist_tokens=1,2,5", "model.condition=gist,pos_control"]`` -> key -> values, each
    value read as YAML (``2`` an int, ``1e-3`` a float, ``null`` None, ``gist`` a string)."""
    out: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. model.num_gist_tokens=1,2,5,10)")
        if key in out:
            raise ValueError(f"--grid {spec!r}: {key} is given twice")
        if key in ("seed_everything", "data.seed"):
            raise ValueError(f"--grid {spec!r}: seeds are given with --seeds")
        out[key] = [yaml.safe_load(v.strip()) for v in values.split(",")]
    return out


_SHORT = {CONDITION: "", K: "k"}


def cell_name(values: dict, seed: int | None) -> str:
    """``gist-k2-seed0``; keys other than the condition and k by their last part:
    ``learning_rate0.001``. Characters other than letters, digits, ``.``, ``_``, ``-`` become ``_``."""
    parts = []
    for key, value in sorted(values.items(), key=lambda kv: (kv[0] not in _SHORT, kv[0] != CONDITION)):
        label = _SHORT.get(key, key.rsplit(".", 1)[-1])
        parts.append(f"{label}{value}")
    if seed is not None:
        parts.append(f"seed{seed}")
    return re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts)) or "run"


def expand(grid: dict[str, list], seeds: list[int] | None = None, args: tuple[str, ...] = (),
           stages: tuple[Stage, ...] = (Stage(),)) -> list[Cell]:
    """Every combination of the grid's values, for every seed, in order; a control
    (``model.condition`` pos_control / neg_control) runs once whatever k (at k=1, as the gist token is
    present and only the mask differs), so the k values collapse for it."""
    keys = list(grid)
    cells, names = [], set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        if values.get(CONDITION) in CONTROLS and K in values:
            values[K] = 1
        for seed in seeds if seeds else [None]:
            name = cell_name(values, seed)
            if name in names:
                continue
            names.add(name)
            cells.append(Cell(name=name, values=values, seed=seed, args=tuple(args), stages=tuple(stages)))
    return cells


__all__ = ["CONDITION", "CONTROLS", "Cell", "K", "Stage", "cell_name", "expand", "parse_grid"]
