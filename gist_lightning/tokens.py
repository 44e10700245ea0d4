"""Tokenizers and the gist token: loading a tokenizer (the suite's shipped one or any HF one),
adding ``<GIST>`` (and a pad token where missing) to it and to a model, telling tokenizers apart,
and tokenizing user text so that it can never produce a gist token."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

GIST_TOKEN = "<GIST>"
PAD_TOKEN = "<PAD>"
# the embedded suite's byte-level BPE tokenizer, shipped with the package
SUITE_TOKENIZER_NAME = "suite"
SUITE_TOKENIZER = Path(__file__).resolve().parent / "assets" / "suite_tokenizer"


def load_tokenizer(name_or_path: str):
    """A tokenizer by hub id or local folder, as it is (no gist token added); ``"suite"`` is the
    one shipped for the embedded suite."""
    if name_or_path == SUITE_TOKENIZER_NAME:
        name_or_path = str(SUITE_TOKENIZER)
    return AutoTokenizer.from_pretrained(name_or_path)


def tokenizer_fingerprint(tokenizer, framing: bool = True) -> str:
    """A short hash of the vocabulary, the special tokens and the ids framing a text (BOS before,
    EOS after...): equal for tokenizers that encode alike. ``framing=False`` is the fingerprint of
    version 0.1, which left the framing out (kept to read its cache files)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]).encode())
    if framing:
        h.update(json.dumps(special_frame(tokenizer)).encode())
    return h.hexdigest()[:16]


def add_gist_token(tokenizer, model=None) -> int:
    """Add ``<GIST>`` to ``tokenizer`` (and resize ``model``); return the gist token id.

    A tokenizer without a pad token gets a new ``<PAD>`` token: reusing EOS as padding would
    make padding-aware code drop or mask the real end-of-sequence token of every target.
    New embedding rows (input, and output head when untied) are the mean of the existing
    vocabulary rows. Calling it twice is harmless.
    """
    new_ids = add_special_tokens(tokenizer)
    if model is not None:
        fit_embeddings(model, tokenizer, new_ids)
    return gist_token_id(tokenizer)


def add_special_tokens(tokenizer) -> list[int]:
    """Add ``<GIST>`` (and ``<PAD>`` where there is no pad token) to the tokenizer alone; return
    the ids added now (empty when it had both), for :func:`fit_embeddings` to give them rows."""
    n_before = len(tokenizer)
    if GIST_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [GIST_TOKEN]},
                                     replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return list(range(n_before, len(tokenizer)))


def fit_embeddings(model, tokenizer, new_ids: list[int]) -> None:
    """Give the model rows for the tokens ``new_ids`` that :func:`add_special_tokens` added (the
    mean of the rows before them), and the tokenizer's pad id (an encoder-decoder without a decoder
    start token starts from pad)."""
    if new_ids:
        resize_with_mean(model, len(tokenizer), min(new_ids), new_ids)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.config.is_encoder_decoder and model.config.decoder_start_token_id is None:
        model.config.decoder_start_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


@torch.no_grad()
def resize_with_mean(model, vocab_size: int, n_old: int, new_ids: list[int]) -> None:
    """Grow the embeddings to hold ``vocab_size`` tokens (never shrink: T5 keeps spare rows) and
    set the rows of ``new_ids`` to the mean of the first ``n_old`` rows."""
    if not new_ids:
        return
    current = model.get_input_embeddings().weight.shape[0]
    if vocab_size > current:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    inp = model.get_input_embeddings().weight
    out_layer = model.get_output_embeddings()
    ids = torch.tensor(new_ids, device=inp.device)
    inp[ids] = inp[:n_old].mean(0, keepdim=True).to(inp.dtype)
    if out_layer is not None and out_layer.weight.data_ptr() != inp.data_ptr():
        out = out_layer.weight
        out[ids] = out[:n_old].mean(0, keepdim=True).to(out.dtype)
        if getattr(out_layer, "bias", None) is not None:
            out_layer.bias[ids] = out_layer.bias[:n_old].mean()


def gist_token_id(tokenizer) -> int:
    """The id of ``<GIST>`` in a tokenizer that went through :func:`add_gist_token`."""
    if GIST_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no {GIST_TOKEN} token; call gist_lightning.add_gist_token first")
    return tokenizer.convert_tokens_to_ids(GIST_TOKEN)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of user text with special tokens neutralised: a literal ``<GIST>`` (or ``</s>``)
    inside ``text`` is tokenized as plain characters, never as the special token."""
    if not text:
        return []
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    if any(i in special for i in ids):
        raise ValueError(f"could not neutralise special tokens in text {text[:60]!r}")
    return ids


@functools.lru_cache(maxsize=32)
def _special_frame(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    probe = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(probe) + 1):
        if full[start : start + len(probe)] == probe:
            return tuple(full[:start]), tuple(full[start + len(probe) :])
    return (), ()


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids a tokenizer puts before and after a text (e.g. BOS for LLaMA, EOS for T5)."""
    before, after = _special_frame(tokenizer)
    return list(before), list(after)
