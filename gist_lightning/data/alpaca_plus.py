"""Alpaca+ (the paper's data): the DataModule over a folder of released split files, and the
builder of those splits from the raw Alpaca and Self-Instruct sources by the paper's recipe.

Records are ``{"instruction", "input", "output", "source"}`` (the released schema); reading and
checking them is :mod:`gist_lightning.data.records`.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from pathlib import Path

from ..splits import SPLITS
from .datamodule import GistDataModule
from .records import (
    DataFormatError,
    check_record,
    load_records,
    read_json_records,
    record_location,
    write_records,
)


def split_file(folder: str | os.PathLike, split: str) -> Path:
    """The file of ``split`` in a folder of released split files (``alpaca_plus_<split>.json``)."""
    folder = Path(folder)
    for name in (f"alpaca_plus_{split}.json", f"{split}.json", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no file for split {split!r} (looked for alpaca_plus_{split}.json, "
                            f"{split}.json[l])")



class AlpacaPlus(GistDataModule):
    """Alpaca+ split files in ``folder`` (``alpaca_plus_<split>.json``, or ``<split>.json[l]``), as
    released by the authors or made by :func:`build_alpaca_plus`. Nothing is downloaded.

    Args:
        folder: the folder of split files.
        kwargs: batch sizes, length limits, ... of :class:`~gist_lightning.data.datamodule.GistDataModule`.
    """

    def __init__(
        self,
        folder: str = "data/alpaca_plus",
        **kwargs,
    ):
        super().__init__(**kwargs)

    def split_path(self, split: str) -> Path:
        return split_file(self.hparams.folder, split)


def build_alpaca_plus(
    alpaca_path: str | os.PathLike,
    self_instruct_path: str | os.PathLike,
    user_oriented_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    seen_size: int = 1000,
    unseen_size: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Build the four Alpaca+ splits from the raw sources and write them to ``out_dir``.

    - validation_seen: Self-Instruct instructions with 2+ instances that have an input; the
      first such instance is held out, the others stay in train.
    - validation_unseen: Alpaca examples with an input whose instruction appears nowhere in train.
    - validation_human: every instance of the user-oriented instructions.
    - train: the rest, without duplicate (instruction, input) pairs.

    Every input is read and checked before anything is written; existing files are not
    overwritten unless ``overwrite``. Returns the sizes.
    """
    out_dir = Path(out_dir)
    targets = {s: out_dir / f"alpaca_plus_{s}.json" for s in SPLITS}
    if not overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass overwrite=True)")
    alpaca = [dict(r, source="alpaca") for r in load_records(alpaca_path)]
    self_instruct = [dict(r, source="self_instruct") for r in load_records(self_instruct_path)]
    human = []
    path = Path(user_oriented_path)
    for rec, index, line in read_json_records(path):
        check_record(rec, path, index, line, fields=("instruction",))
        if not isinstance(rec.get("instances"), list):
            raise DataFormatError(f"{record_location(path, index, line)}: missing list field 'instances'")
        for j, inst in enumerate(rec["instances"]):
            try:
                check_record(inst, path, index, line, fields=("input", "output"))
            except DataFormatError as e:
                raise DataFormatError(f"{e} (in instance {j})") from None
            human.append({"instruction": rec["instruction"], "input": inst["input"], "output": inst["output"],
                          "source": "self_instruct"})

    rng = random.Random(seed)
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in self_instruct:
        groups.setdefault(r["instruction"], []).append(r)
    candidates = [t for t, rs in groups.items() if sum(1 for r in rs if r["input"]) >= 2]
    if len(candidates) < seen_size:
        raise ValueError(f"only {len(candidates)} Self-Instruct instructions qualify for validation_seen; "
                         f"asked {seen_size}")
    seen_instr = set(rng.sample(candidates, seen_size))
    seen, held = [], set()
    for t in candidates:
        if t in seen_instr:
            first = next(r for r in groups[t] if r["input"])
            seen.append(first)
            held.add(id(first))

    si_instructions = set(groups)
    unseen_candidates = list(OrderedDict.fromkeys(r["instruction"] for r in alpaca
                                                  if r["input"] and r["instruction"] not in si_instructions))
    if len(unseen_candidates) < unseen_size:
        raise ValueError(f"only {len(unseen_candidates)} Alpaca instructions qualify for validation_unseen; "
                         f"asked {unseen_size}")
    unseen_instr = set(rng.sample(unseen_candidates, unseen_size))
    unseen, taken = [], set()
    for r in alpaca:
        if r["instruction"] in unseen_instr and r["input"] and r["instruction"] not in taken:
            unseen.append(r)
            taken.add(r["instruction"])

    train, pairs = [], set()
    for r in self_instruct + alpaca:
        if id(r) in held or r["instruction"] in unseen_instr:
            continue
        key = (r["instruction"], r["input"])
        if key in pairs:
            continue
        pairs.add(key)
        train.append(r)
    seen_pairs = {(r["instruction"], r["input"]) for r in seen}
    train = [r for r in train if (r["instruction"], r["input"]) not in seen_pairs]

    splits = dict(zip(SPLITS, (train, seen, unseen, human)))
    for split, path in targets.items():
        write_records(path, splits[split], overwrite=overwrite)
    return {s: len(v) for s, v in splits.items()}
