"""Export a trained gist model as an HF folder (model, tokenizer with ``<GIST>``, gist settings),
and load it back for caching without the training code. A parameter-efficient run exports either
merged (a plain HF folder) or as an adapter folder: PEFT's adapters with the trained token rows,
the tokenizer and the settings, naming the base model they go on."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from .families import FAMILIES, LOAD_OPTIONS, model_class
from .files import write_text_atomic
from .tokens import GIST_TOKEN, fit_embeddings, gist_token_id

SETTINGS_FILE = "gist_config.json"
ADAPTER_FILE = "adapter_config.json"  # PEFT's


def _start(out_dir, overwrite: bool) -> Path:
    out_dir = Path(out_dir)
    if (out_dir / SETTINGS_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds an exported model; refusing to overwrite it")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


@contextmanager
def _no_deepspeed_import():
    """Saving would import deepspeed where it is installed (transformers unwraps the model with
    accelerate, which imports DeepSpeed to ask whether the model is a ``DeepSpeedEngine``): ~4 s of
    every export on 2 cores, and DeepSpeed's import announces on stdout which accelerator it found.
    A model can only be a DeepSpeed engine once DeepSpeed is imported, so where it is not, the
    question is answered "no" without importing it; a run that uses DeepSpeed imported it before and
    is unwrapped as usual."""
    if "deepspeed" in sys.modules:
        yield
        return
    try:
        import accelerate.utils.other as probe
    except ImportError:  # without accelerate, transformers does not look for DeepSpeed here
        probe = None
    asked = getattr(probe, "is_deepspeed_available", None)
    if asked is None:  # no accelerate, or another one: nothing to skip
        yield
        return
    probe.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        probe.is_deepspeed_available = asked


def _finish(out_dir: Path, tokenizer, num_gist_tokens: int, condition: str, **extra) -> Path:
    tokenizer.save_pretrained(out_dir)
    settings = {"num_gist_tokens": num_gist_tokens, "condition": condition, "gist_token": GIST_TOKEN,
                "gist_token_id": gist_token_id(tokenizer), **extra}
    # last: marks it complete
    write_text_atomic(out_dir / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")
    return out_dir


def _extra(source: dict | None, segments: dict | None, objectives: dict | None = None) -> dict:
    return {k: v for k, v in (("source", source), ("segments", segments), ("objectives", objectives)) if v}


def export_pretrained(model, tokenizer, out_dir: str | os.PathLike, num_gist_tokens: int, condition: str,
                      overwrite: bool = False, source: dict | None = None,
                      segments: dict | None = None, objectives: dict | None = None) -> Path:
    """A whole model (or a PEFT model merged into its base) as an HF folder. ``source`` (e.g. the
    checkpoint and step the weights come from), ``segments`` (the segment settings of a model
    that gists long contexts) and ``objectives`` (what its training loss added) are kept in the
    settings file."""
    out_dir = _start(out_dir, overwrite)
    with _no_deepspeed_import():
        model.save_pretrained(out_dir)
    return _finish(out_dir, tokenizer, num_gist_tokens, condition, **_extra(source, segments, objectives))


def export_adapter(peft_model, tokenizer, out_dir: str | os.PathLike, num_gist_tokens: int, condition: str,
                   base_model: str, added_token_ids: list[int], overwrite: bool = False,
                   source: dict | None = None, segments: dict | None = None,
                   objectives: dict | None = None) -> Path:
    """PEFT's adapter files (LoRA weights and the trained token rows) with the tokenizer and the gist
    settings; ``base_model`` (hub id or folder) is what :func:`load_pretrained` puts them on, after
    giving it rows for ``added_token_ids``."""
    out_dir = _start(out_dir, overwrite)
    if Path(base_model).is_dir():
        base_model = str(Path(base_model).resolve())  # loadable from another working directory
    # the token rows are adapter parameters, saved with the adapters; no full embedding copy
    with _no_deepspeed_import():
        peft_model.save_pretrained(out_dir, save_embedding_layers=False)
    return _finish(out_dir, tokenizer, num_gist_tokens, condition,
                   adapter={"base_model": base_model, "added_token_ids": list(added_token_ids)},
                   **_extra(source, segments, objectives))


def read_settings(path: str | os.PathLike) -> dict | None:
    """The gist settings of an exported folder, or None where the folder holds no complete export."""
    try:
        return json.loads((Path(path) / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None


def load_pretrained(path: str | os.PathLike, attn_implementation: str | None = None, dtype=None,
                    base_model: str | None = None, merge: bool = True):
    """Load a folder written by ``gist-lightning export`` (or a run's ``export/``) for caching and generation.

    For an adapter folder the base is loaded from where the export names it (or ``base_model``),
    given the added token rows, and the adapters are merged into it.

    Args:
        path: the exported folder (it holds ``gist_config.json``).
        attn_implementation: the HF attention; None: sdpa where the family takes the gist mask under
            it, else eager.
        dtype: the weights' dtype (e.g. ``torch.bfloat16``); None: as saved.
        base_model: for an adapter folder, where its base is when not where the export names it.
        merge: fold adapters into the base weights; False keeps them as separate layers.

    Returns:
        tuple: ``(model, tokenizer, settings)``: the model in eval mode, its tokenizer (with
        ``<GIST>``), and the export's settings (``num_gist_tokens``, ``condition``, ``gist_token_id``,
        and where it came from).

    Raises:
        FileNotFoundError: the folder is no export, or an adapter's base cannot be loaded.
        ValueError: the tokenizer's ``<GIST>`` id differs from the settings'.

    Example:
        >>> model, tok, settings = load_pretrained("runs/tiny/version_0/export")
        >>> settings["num_gist_tokens"], settings["condition"]
        (1, 'gist')
        >>> cache = compress(model, tok, ["Reverse the list."], settings["num_gist_tokens"])
    """
    path = Path(path)
    settings_path = path / SETTINGS_FILE
    if not settings_path.is_file():
        raise FileNotFoundError(f"{path}: no {SETTINGS_FILE}; is this a folder made by gist-lightning "
                                "export?")
    settings = json.loads(settings_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if gist_token_id(tokenizer) != settings["gist_token_id"]:
        raise ValueError(f"{path}: the tokenizer's <GIST> id differs from {SETTINGS_FILE}")
    adapter = settings.get("adapter")
    source = (base_model or adapter["base_model"]) if adapter else path
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        if not adapter:
            raise
        raise FileNotFoundError(f"{path}: the adapters go on the base model {source!r}, which cannot be "
                                f"loaded ({e}); pass its location as base_model") from None
    if attn_implementation is None:
        family = FAMILIES.get(config.model_type)  # an unknown family is refused by the backends
        attn_implementation = family.preferred_attention if family else "sdpa"
    model = model_class(config).from_pretrained(source, attn_implementation=attn_implementation, dtype=dtype,
                                                **LOAD_OPTIONS)
    if adapter:
        from peft import PeftModel

        fit_embeddings(model, tokenizer, adapter["added_token_ids"])
        model = PeftModel.from_pretrained(model, path)
        model = model.merge_and_unload() if merge else model.get_base_model()
    return model.eval(), tokenizer, settings
