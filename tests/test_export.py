"""HF-format export with the gist settings, and loading it back without the training code."""

from __future__ import annotations

import json

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
