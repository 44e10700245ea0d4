"""Alpaca+ records: reading and checking split files, and building the splits from the raw
Alpaca and Self-Instruct sources by the paper's recipe.

Records are ``{"instruction", "input", "output", "source"}`` (the released schema). Every read
checks every record and names the file and the record (index, and line for JSONL) on error.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections import OrderedDict
from pathlib import Path

FIELDS = ("instruction", "input", "output")
SPLITS = ("train", "validation_seen", "validation_unseen", "validation_human")
VALIDATION_SPLITS = SPLITS[1:]


class DataFormatError(ValueError):
    """A data file that does not hold what it should; the message names the file and record."""


def _where(path: Path, index: int, line: int | None) -> str:
    return f"{path}: record {index}" + (f" (line {line})" if line is not None else "")


def read_json_records(path: str | os.PathLike) -> list[tuple[dict, int, int | None]]:
    """(record, index, line) for a JSON list file or a JSONL file; malformed JSON names the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return [(rec, i, None) for i, rec in enumerate(data)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), len(records), lineno))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: malformed JSON on line {lineno}: {e.msg}") from None
    return records


def check_record(rec, path: Path, index: int, line: int | None, fields=FIELDS) -> dict:
    if not isinstance(rec, dict):
        raise DataFormatError(f"{_where(path, index, line)}: expected an object, got {type(rec).__name__}")
    for field in fields:
        if field not in rec:
            raise DataFormatError(f"{_where(path, index, line)}: missing field {field!r}")
        if not isinstance(rec[field], str):
            raise DataFormatError(
                f"{_where(path, index, line)}: field {field!r} must be a string, got {type(rec[field]).__name__}"
            )
    return rec


def load_records(path: str | os.PathLike, default_source: str = "local") -> list[dict]:
    """Checked records of a split file (JSON list or JSONL in the released schema)."""
    path = Path(path)
    out = []
    for rec, index, line in read_json_records(path):
        rec = check_record(rec, path, index, line)
        source = rec.get("source", default_source)
        if not isinstance(source, str):
            raise DataFormatError(f"{_where(path, index, line)}: field 'source' must be a string")
        out.append({"instruction": rec["instruction"], "input": rec["input"], "output": rec["output"], "source": source})
    return out


def split_file(folder: str | os.PathLike, split: str) -> Path:
    """The file of ``split`` in a folder of released split files (``alpaca_plus_<split>.json``)."""
    folder = Path(folder)
    for name in (f"alpaca_plus_{split}.json", f"{split}.json", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no file for split {split!r} (looked for alpaca_plus_{split}.json, {split}.json[l])")


def write_json_atomic(path: Path, obj, overwrite: bool = False) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder; never clobber by default."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
            raise DataFormatError(f"{_where(path, index, line)}: missing list field 'instances'")
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
        raise ValueError(f"only {len(candidates)} Self-Instruct instructions qualify for validation_seen; asked {seen_size}")
    seen_instr = set(rng.sample(candidates, seen_size))
    seen, held = [], set()
    for t in candidates:
        if t in seen_instr:
            first = next(r for r in groups[t] if r["input"])
            seen.append(first)
            held.add(id(first))

    si_instructions = set(groups)
    unseen_candidates = list(OrderedDict.fromkeys(r["instruction"] for r in alpaca if r["input"] and r["instruction"] not in si_instructions))
    if len(unseen_candidates) < unseen_size:
        raise ValueError(f"only {len(unseen_candidates)} Alpaca instructions qualify for validation_unseen; asked {unseen_size}")
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

    splits = {"train": train, "validation_seen": seen, "validation_unseen": unseen, "validation_human": human}
    for split, path in targets.items():
        write_json_atomic(path, splits[split], overwrite=overwrite)
    return {s: len(v) for s, v in splits.items()}
