"""Export a trained gist model as an HF folder (model, tokenizer with ``<GIST>``, gist settings),
and load it back for caching without the training code."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from .families import model_class
from .files import write_text_atomic
from .tokens import GIST_TOKEN, gist_token_id

SETTINGS_FILE = "gist_config.json"


def export_pretrained(model, tokenizer, out_dir: str | os.PathLike, num_gist_tokens: int, condition: str,
                      overwrite: bool = False) -> Path:
    out_dir = Path(out_dir)
    if (out_dir / SETTINGS_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds an exported model; refusing to overwrite it")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    settings = {"num_gist_tokens": num_gist_tokens, "condition": condition, "gist_token": GIST_TOKEN,
                "gist_token_id": gist_token_id(tokenizer)}
    write_text_atomic(out_dir / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")
    return out_dir


def load_pretrained(path: str | os.PathLike, attn_implementation: str = "sdpa", dtype=None):
    """(model in eval mode, tokenizer, settings) of an exported folder."""
    path = Path(path)
    settings_path = path / SETTINGS_FILE
    if not settings_path.is_file():
        raise FileNotFoundError(f"{path}: no {SETTINGS_FILE}; is this a folder made by gist-lightning export?")
    settings = json.loads(settings_path.read_text())
    config = AutoConfig.from_pretrained(path)
    model = model_class(config).from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if gist_token_id(tokenizer) != settings["gist_token_id"]:
        raise ValueError(f"{path}: the tokenizer's <GIST> id differs from {SETTINGS_FILE}")
    return model, tokenizer, settings
