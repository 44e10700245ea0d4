"""HF-format export with the gist settings, and loading it back without the training code."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from gist_lightning import compress, generate
from gist_lightning.export import SETTINGS_FILE, export_pretrained, load_pretrained
from gist_lightning.tokens import GIST_TOKEN


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_export_then_load_gives_the_same_weights_and_answers(make_pair, tmp_path, family):
    model, tok, gist_id = make_pair(family, seed=5)
    out = export_pretrained(model, tok, tmp_path / "m", num_gist_tokens=2, condition="neg_control")
    loaded, tok2, settings = load_pretrained(out, attn_implementation="eager")
    assert settings == {"num_gist_tokens": 2, "condition": "neg_control", "gist_token": GIST_TOKEN,
                        "gist_token_id": gist_id}
    assert tok2.convert_tokens_to_ids(GIST_TOKEN) == gist_id and not loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    instructions, inputs = ["reverse the list of words", "count the words"], ["apple banana", "dog egg fig"]
    want = generate(model, tok, compress(model, tok, instructions, 2), inputs, max_new_tokens=5)
    assert generate(loaded, tok2, compress(loaded, tok2, instructions, 2), inputs, max_new_tokens=5) == want


def test_export_never_overwrites(make_pair, tmp_path):
    model, tok, _ = make_pair("llama")
    export_pretrained(model, tok, tmp_path / "m", 1, "gist")
    before = (tmp_path / "m" / SETTINGS_FILE).read_text()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        export_pretrained(model, tok, tmp_path / "m", 3, "gist")
    assert (tmp_path / "m" / SETTINGS_FILE).read_text() == before


def test_a_folder_without_settings_or_with_another_gist_id_is_refused(make_pair, tmp_path):
    model, tok, _ = make_pair("llama")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match=f"no {SETTINGS_FILE}"):
        load_pretrained(tmp_path / "plain")
    out = export_pretrained(model, tok, tmp_path / "m", 1, "gist")
    settings = json.loads((out / SETTINGS_FILE).read_text())
    (out / SETTINGS_FILE).write_text(json.dumps({**settings, "gist_token_id": settings["gist_token_id"] + 1}))
    with pytest.raises(ValueError, match="<GIST> id differs"):
        load_pretrained(out)


EXPORT_IN_A_FRESH_PROCESS = """
import sys
from transformers import LlamaConfig, LlamaForCausalLM
from gist_lightning import add_gist_token
from gist_lightning.export import export_pretrained
from gist_lightning.tokens import load_tokenizer

tok = load_tokenizer("suite")
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2))
add_gist_token(tok, model)
export_pretrained(model, tok, sys.argv[1], num_gist_tokens=1, condition="gist")
assert "deepspeed" not in sys.modules, "the export imported deepspeed"
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_an_export_prints_nothing_of_deepspeed(tmp_path):
    """Saving would import deepspeed where it is installed (transformers unwraps the model with
    accelerate, which looks for a DeepSpeedEngine): seconds of every export, and its import
    announces on stdout which accelerator it found. An export in a process that never used DeepSpeed
    imports none of it (a fresh process: this one may have imported it already)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", EXPORT_IN_A_FRESH_PROCESS, str(tmp_path / "m")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "m" / SETTINGS_FILE).is_file()
    printed = done.stdout + done.stderr
    assert "accelerator" not in printed.lower(), printed
    assert not re.search(r"^\[\d{4}-\d\d-\d\d ", printed, re.M), printed  # deepspeed's log lines


def test_every_load_leaves_hub_kernels_off(random_export, monkeypatch):
    """transformers turns hub kernels on by default: on a GPU, loading and every train() / eval()
    swap layers for kernels downloaded at run time. Both loaders (an export; a fit's
    model_name_or_path) turn them off: with the swap made to fail, they load, train and eval."""
    import transformers.modeling_utils

    from gist_lightning.module import GistLitModule

    def refuse(*args, **kwargs):
        raise AssertionError("hub kernels were asked for")

    monkeypatch.setattr(transformers.modeling_utils, "kernelize", refuse)
    model, _, _ = load_pretrained(random_export)
    module = GistLitModule(model_name_or_path=str(random_export), num_gist_tokens=1)
    module.configure_model()
    for loaded in (model, module.model):
        loaded.train()
        loaded.eval()
        assert not loaded.use_kernels
