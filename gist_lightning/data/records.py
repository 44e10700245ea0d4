"""Instruction records ``{"instruction", "input", "output", "source"}`` (the released Alpaca+
schema): reading JSON and JSONL files, checking every record, writing them atomically.

Every read checks every record and names the file and the record (index, and line for JSONL)
on error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataFormatError, read_text
from ..files import write_text_atomic

FIELDS = ("instruction", "input", "output")


def record_location(path: Path, index: int, line: int | None) -> str:
    return f"{path}: record {index}" + (f" (line {line})" if line is not None else "")


def read_json_records(path: str | os.PathLike) -> list[tuple[dict, int, int | None]]:
    """(record, index, line) for a JSON list file or a JSONL file; malformed JSON names the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: malformed JSON at line {e.lineno}, "
                                  f"column {e.colno}: {e.msg}") from None
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
        raise DataFormatError(f"{record_location(path, index, line)}: expected an object, got "
                              f"{type(rec).__name__}")
    for field in fields:
        if field not in rec:
            raise DataFormatError(f"{record_location(path, index, line)}: missing field {field!r}")
        if not isinstance(rec[field], str):
            raise DataFormatError(
                f"{record_location(path, index, line)}: field {field!r} must be a string, got "
                f"{type(rec[field]).__name__}"
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
            raise DataFormatError(f"{record_location(path, index, line)}: field 'source' must be a string")
        out.append({"instruction": rec["instruction"], "input": rec["input"], "output": rec["output"],
                    "source": source})
    return out


def write_records(path: str | os.PathLike, records: list[dict], overwrite: bool = False) -> Path:
    """Write records as a JSON list through a temporary file; never clobber unless ``overwrite``."""
    text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    return write_text_atomic(path, text, overwrite=overwrite)
