"""The family registry, over every entry of it: the model class, refusals with their reasons, our
masks against each model's own forward, and the gist mask honoured by every allowed attention
implementation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    LlamaConfig,
    T5Config,
)

from gist_lightning import masks
from gist_lightning.backends import gist_forward
from gist_lightning.families import FAMILIES, REFUSED_ATTENTION, family_of, family_table, model_class
from gist_lightning.padding import pad_batch
from gist_lightning.templates import encode_example

INSTRUCTIONS = ["reverse the list of words", "count the words",
                "put cat first and remove every dog from the list please", "sort them"]
INPUTS = ["apple banana cherry", "dog egg fig grape apple", "cat",
          "the quick brown fox jumps over the lazy dog"]
OUTPUTS = ["cherry banana apple", "five", "cat", "brown dog fox jumps lazy over quick the the"]


def _examples(model, tok, gist_id, k, instructions=INSTRUCTIONS):
    enc_dec = model.config.is_encoder_decoder
    return [encode_example(tok, t, x, y, k, gist_id, enc_dec)
            for t, x, y in zip(instructions, INPUTS, OUTPUTS)]


def _logits_after_gists(model, tok, gist_id, examples, condition):
    """Logits of the masked full forward at every position after the gist span, rows concatenated."""
    if model.config.is_encoder_decoder:
        src, src_mask = pad_batch([e.prompt for e in examples], tok.pad_token_id, "right")
        tgt, _ = pad_batch([e.target for e in examples], tok.pad_token_id, "right")
        out = gist_forward(model, src, src_mask, gist_id, condition,
                           decoder_input_ids=model._shift_right(tgt))
        return torch.cat([out.logits[i, : len(e.target)] for i, e in enumerate(examples)])
    ids, mask = pad_batch([e.prompt + e.target for e in examples], tok.pad_token_id, "left")
    out = gist_forward(model, ids, mask, gist_id, condition)
    return torch.cat([out.logits[i, -(len(e.suffix) + len(e.target)):] for i, e in enumerate(examples)])


def test_model_class_is_chosen_by_architecture():
    assert model_class(LlamaConfig()) is AutoModelForCausalLM
    assert model_class(T5Config()) is AutoModelForSeq2SeqLM


def test_every_registry_family_has_a_tiny_config(tiny_family_table):
    assert {model_type for model_type, _, _ in tiny_family_table.values()} == set(FAMILIES)


def test_what_is_refused_says_why(make_pair):
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported families: " + ", ".join(sorted(FAMILIES))):
        family_of(model)
    with pytest.raises(ValueError, match="chunked local attention"):
        family_of(AutoConfig.for_model("llama4_text"))
    for impl, why in REFUSED_ATTENTION.items():
        model, _, _ = make_pair("llama")
        model.config._attn_implementation = impl
        with pytest.raises(ValueError, match=f"{impl!r} cannot take the gist mask \\({why}"):
            family_of(model)
    gemma2, _, _ = make_pair("gemma2", attn="eager")
    gemma2.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="soft-capping is computed by eager and flex attention only"):
        family_of(gemma2)
    t5, _, _ = make_pair("t5")
    t5.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="no FlexAttention path for T5"):
        family_of(t5)
    config = AutoConfig.for_model("qwen3", layer_types=["full_attention", "chunked_attention"],
                                  num_hidden_layers=2)
    config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="layer types \\['chunked_attention'\\]"):
        family_of(config)


def test_the_documented_table_is_the_registry():
    table = family_table()
    assert all(f"| `{model_type}` |" in table for model_type in FAMILIES)
    page = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `")]  # the page's family rows
    assert rows == table.splitlines()[2:], "docs/families.md differs from family_table(); paste it in"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pos_control_equals_the_models_own_forward(make_pair, require_attention, family, attn):
    """With nothing masked beyond causality and padding, our 4D masks (sliding windows included)
    must reproduce the model's own forward pass."""
    require_attention(family, attn)
    model, tok, gist_id = make_pair(family, attn, seed=2)
    examples = _examples(model, tok, gist_id, 2)
    if model.config.is_encoder_decoder:
        src, src_mask = pad_batch([e.prompt for e in examples], tok.pad_token_id, "right")
        tgt, _ = pad_batch([e.target for e in examples], tok.pad_token_id, "right")
        ours = gist_forward(model, src, src_mask, gist_id, "pos_control", labels=tgt).logits
        native = model(input_ids=src, attention_mask=src_mask, labels=tgt).logits
        lengths = [len(e.target) for e in examples]
    else:
        ids, mask = pad_batch([e.prompt + e.target for e in examples], tok.pad_token_id, "right")
        assert ids.shape[1] > 12  # longer than the sliding windows (8) of the tiny configs
        ours = gist_forward(model, ids, mask, gist_id, "pos_control").logits
        native = model(input_ids=ids, attention_mask=mask).logits
        lengths = mask.sum(-1).tolist()
    diff = max((ours[i, :n] - native[i, :n]).abs().max().item() for i, n in enumerate(lengths))
    print(f"{family}/{attn}: pos_control vs the model's own forward, max abs diff {diff:.1e}")
    assert diff < 1e-4


def test_neg_control_ignores_the_instruction_pos_control_does_not(make_pair, family):
    """Invariance by behaviour: what the mask hides cannot change what comes after the gists."""
    model, tok, gist_id = make_pair(family, "eager")
    a = _examples(model, tok, gist_id, 2, ["reverse the list of words"])
    b = _examples(model, tok, gist_id, 2, ["count the dog and the cat"])  # other tokens, other length
    for condition, same in (("neg_control", True), ("pos_control", False), ("gist", False)):
        diff = (_logits_after_gists(model, tok, gist_id, a, condition)
                - _logits_after_gists(model, tok, gist_id, b, condition)).abs().max()
        assert (diff < 1e-4) if same else (diff > 1e-3), (condition, float(diff))


def test_eager_and_sdpa_agree_under_the_gist_mask(make_pair, require_attention, family):
    """If one implementation ignored the mask, the two would differ (the gist mask hides the
    instruction, so ignoring it changes every logit after the gists)."""
    require_attention(family, "sdpa")
    outs = []
    for attn in ("eager", "sdpa"):
        model, tok, gist_id = make_pair(family, attn, seed=3)
        outs.append(_logits_after_gists(model, tok, gist_id, _examples(model, tok, gist_id, 2), "gist"))
    assert (outs[0] - outs[1]).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen3"])
def test_the_segment_mask_is_honoured_by_the_model(make_pair, family):
    """Long contexts, by behaviour: in a one-layer model the question sees only the context's gist
    tokens, so changing every raw context token leaves its logits unchanged under gist (and
    neg_control), and changes them under pos_control; eager and sdpa agree."""
    from gist_lightning.families import self_attention_masks

    outs = {}
    for attn in ("eager", "sdpa"):
        if attn == "sdpa" and family == "gemma2":
            continue  # soft-capping: eager and flex only
        model, tok, gist_id = make_pair(family, attn, num_hidden_layers=1)
        question = [30, 31, 32]
        rows = [masks.interleave_gists(list(range(first, first + 12)), 4, 2, "fine", gist_id) + question
                for first in (5, 40)]
        ids = torch.tensor(rows)
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        for condition in masks.CONDITIONS:
            allowed = masks.long_context_attention_mask(ids, None, gist_id, 2, condition)
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=pos,
                               attention_mask=self_attention_masks(model, allowed, pos, pos)).logits[:, -3:]
            outs[attn, condition] = logits
            diff = (logits[0] - logits[1]).abs().max()
            assert (diff < 1e-5) if condition != "pos_control" else (diff > 1e-3), (condition, float(diff))
    if ("sdpa", "gist") in outs:
        assert (outs["eager", "gist"] - outs["sdpa", "gist"]).abs().max() < 1e-4
