"""Model families through their public interfaces: the model class, refusals, our masks against
each model's own forward, and the gist mask honoured by every allowed attention implementation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GPT2Config, LlamaConfig, T5Config

from gist_lightning.families import gist_forward, model_class
from gist_lightning.padding import pad_batch
from gist_lightning.templates import encode_example

INSTRUCTIONS = ["reverse the list of words", "count the words",
                "put cat first and remove every dog from the list please", "sort them"]
INPUTS = ["apple banana cherry", "dog egg fig grape apple", "cat", "the quick brown fox jumps over the lazy dog"]
OUTPUTS = ["cherry banana apple", "five", "cat", "brown dog fox jumps lazy over quick the the"]


def _examples(model, tok, gist_id, k, instructions=INSTRUCTIONS):
    enc_dec = model.config.is_encoder_decoder
    return [encode_example(tok, t, x, y, k, gist_id, enc_dec) for t, x, y in zip(instructions, INPUTS, OUTPUTS)]


def _logits_after_gists(model, tok, gist_id, examples, condition):
    """Logits of the masked full forward at every position after the gist span, rows concatenated."""
    if model.config.is_encoder_decoder:
        src, src_mask = pad_batch([e.prompt for e in examples], tok.pad_token_id, "right")
        tgt, _ = pad_batch([e.target for e in examples], tok.pad_token_id, "right")
        out = gist_forward(model, src, src_mask, gist_id, condition, decoder_input_ids=model._shift_right(tgt))
        return torch.cat([out.logits[i, : len(e.target)] for i, e in enumerate(examples)])
    ids, mask = pad_batch([e.prompt + e.target for e in examples], tok.pad_token_id, "left")
    out = gist_forward(model, ids, mask, gist_id, condition)
    return torch.cat([out.logits[i, -(len(e.suffix) + len(e.target)):] for i, e in enumerate(examples)])


def test_model_class_is_chosen_by_architecture():
    assert model_class(LlamaConfig()) is AutoModelForCausalLM
    assert model_class(T5Config()) is AutoModelForSeq2SeqLM


def test_unsupported_family_and_attention_are_named(make_pair):
    from gist_lightning.families import family_of

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported families: gpt_neox, llama, mistral, qwen2, t5"):
        family_of(model)
    model, _, _ = make_pair("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="eager"):
        family_of(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pos_control_equals_the_models_own_forward(make_pair, family, attn):
    """With nothing masked beyond causality and padding, our 4D masks (sliding windows included)
    must reproduce the model's own forward pass."""
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
        assert ids.shape[1] > 12  # longer than the sliding windows of the tiny Mistral/Qwen2 configs
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


def test_eager_and_sdpa_agree_under_the_gist_mask(make_pair, family):
    """If one implementation ignored the mask, the two would differ (the gist mask hides the
    instruction, so ignoring it changes every logit after the gists)."""
    outs = []
    for attn in ("eager", "sdpa"):
        model, tok, gist_id = make_pair(family, attn, seed=3)
        outs.append(_logits_after_gists(model, tok, gist_id, _examples(model, tok, gist_id, 2), "gist"))
    assert (outs[0] - outs[1]).abs().max() < 1e-4
