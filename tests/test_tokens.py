"""The gist token, pad-token handling, neutralising literal <GIST>, and the exact templates."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, make_pair, tiny_config
from transformers import AutoModelForCausalLM, GPT2Config

from gist_lightning import GIST_TOKEN, add_gist_token
from gist_lightning.families import family_of
from gist_lightning.templates import encode_example, prompt_text
from gist_lightning.tokens import encode_text


def test_add_gist_token_mean_init_untied_head_and_new_pad():
    tok = build_tokenizer("llama")
    assert tok.pad_token is None
    n_before = len(tok)
    eos_before = tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", n_before, tie_word_embeddings=False))
    inp_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    gist_id = add_gist_token(tok, model)
    assert tok.convert_ids_to_tokens(gist_id) == GIST_TOKEN
    assert tok.pad_token_id not in (None, tok.eos_token_id) and tok.eos_token_id == eos_before
    new = [gist_id, tok.pad_token_id]
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    assert inp.shape[0] == len(tok) == n_before + 2
    assert torch.allclose(inp[new], inp_before.mean(0).expand(2, -1))
    assert torch.allclose(out[new], out_before.mean(0).expand(2, -1))
    assert torch.equal(inp[:n_before], inp_before)
    # a second call adds nothing
    assert add_gist_token(tok, model) == gist_id and len(tok) == n_before + 2


def test_add_gist_token_never_shrinks_spare_rows():
    """T5 checkpoints keep more embedding rows than the tokenizer has tokens."""
    tok = build_tokenizer("t5")
    tok.add_special_tokens({"pad_token": "<pad>"})
    cfg = tiny_config("t5", len(tok) + 20)
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_config(cfg)
    n = len(tok)
    before = model.get_input_embeddings().weight.detach().clone()
    gist_id = add_gist_token(tok, model)
    assert gist_id == n and model.get_input_embeddings().weight.shape[0] == n + 20
    assert torch.allclose(model.get_input_embeddings().weight[gist_id], before[:n].mean(0))


def test_literal_gist_in_user_text_is_neutralised():
    model, tok, gist_id = make_pair("llama")
    assert gist_id not in encode_text(tok, f"say {GIST_TOKEN} twice {GIST_TOKEN}</s>")
    ex = encode_example(tok, f"copy {GIST_TOKEN} please", f"a {GIST_TOKEN} b", f"x {GIST_TOKEN}", 3, gist_id, False)
    ids = ex.prompt + ex.target
    assert ids.count(gist_id) == 3 and ex.gists == [gist_id] * 3
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    # the neutralised text still reads back as written
    assert tok.decode(encode_text(tok, f"a {GIST_TOKEN} b")) == f"a {GIST_TOKEN} b"


@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_template_strings_are_exact(encoder_decoder):
    family = "t5" if encoder_decoder else "llama"
    model, tok, gist_id = make_pair(family)
    ex = encode_example(tok, "Sort the words.", "b a", "a b", 2, gist_id, encoder_decoder)
    text = tok.decode(ex.prompt)
    if encoder_decoder:
        assert text == "Instruction: Sort the words.\n<GIST><GIST>\nInput: b a</s>"
    else:
        assert text == "<s>Instruction: Sort the words.\n<GIST><GIST>\nInput: b a\nOutput:"
    assert tok.decode(ex.target) == "a b</s>"
    assert prompt_text("Sort the words.", "b a", 2, encoder_decoder) == text.removeprefix("<s>").removesuffix("</s>")
    empty = encode_example(tok, "Say hi.", "", "hi", 1, gist_id, encoder_decoder)
    want = "Instruction: Say hi.\n<GIST>\nInput: </s>" if encoder_decoder else "<s>Instruction: Say hi.\n<GIST>\nOutput:"
    assert tok.decode(empty.prompt) == want


def test_k_below_one_is_an_error():
    model, tok, gist_id = make_pair("llama")
    with pytest.raises(ValueError, match=">= 1"):
        encode_example(tok, "a", "b", "c", 0, gist_id, False)


def test_unsupported_family_and_attention_are_named():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported families: gpt_neox, llama, mistral, qwen2, t5"):
        family_of(model)
    model, _, _ = make_pair("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="eager"):
        family_of(model)
