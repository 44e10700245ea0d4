"""The gist token, pad-token handling, the tokenizer split from the model's resize, fingerprints,
and neutralising a literal <GIST> in user text."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from gist_lightning import GIST_TOKEN, add_gist_token
from gist_lightning.templates import encode_example
from gist_lightning.tokens import (
    add_special_tokens,
    encode_text,
    fit_embeddings,
    load_tokenizer,
    tokenizer_fingerprint,
)


def test_add_gist_token_mean_init_untied_head_and_new_pad(make_tokenizer, make_hf_config):
    tok = make_tokenizer("llama")
    assert tok.pad_token is None
    n_before = len(tok)
    eos_before = tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_hf_config("llama", n_before, tie_word_embeddings=False))
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


def test_add_gist_token_never_shrinks_spare_rows(make_tokenizer, make_hf_config):
    """T5 checkpoints keep more embedding rows than the tokenizer has tokens."""
    tok = make_tokenizer("t5")
    tok.add_special_tokens({"pad_token": "<pad>"})
    cfg = make_hf_config("t5", len(tok) + 20)
    model = AutoModelForSeq2SeqLM.from_config(cfg)
    n = len(tok)
    before = model.get_input_embeddings().weight.detach().clone()
    gist_id = add_gist_token(tok, model)
    assert gist_id == n and model.get_input_embeddings().weight.shape[0] == n + 20
    assert torch.allclose(model.get_input_embeddings().weight[gist_id], before[:n].mean(0))


def test_literal_gist_in_user_text_is_neutralised(make_pair):
    model, tok, gist_id = make_pair("llama")
    assert gist_id not in encode_text(tok, f"say {GIST_TOKEN} twice {GIST_TOKEN}</s>")
    ex = encode_example(tok, f"copy {GIST_TOKEN} please", f"a {GIST_TOKEN} b", f"x {GIST_TOKEN}", 3, gist_id,
                        False)
    ids = ex.prompt + ex.target
    assert ids.count(gist_id) == 3 and ex.gists == [gist_id] * 3
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    # the neutralised text still reads back as written
    assert tok.decode(encode_text(tok, f"a {GIST_TOKEN} b")) == f"a {GIST_TOKEN} b"


def test_tokenizer_first_then_model_equals_both_at_once(make_tokenizer, make_hf_config):
    """The module adds <GIST> to its tokenizer before the model exists and resizes the model later:
    the same rows as adding both at once."""
    at_once, split = make_tokenizer("llama"), make_tokenizer("llama")
    n = len(at_once)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(make_hf_config("llama", n, tie_word_embeddings=False)))
    add_gist_token(at_once, models[0])
    new_ids = add_special_tokens(split)
    assert new_ids == [n, n + 1] and add_special_tokens(split) == []
    fit_embeddings(models[1], split, new_ids)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    assert models[1].config.pad_token_id == split.pad_token_id == at_once.pad_token_id


def test_fingerprint_tells_tokenizers_apart(make_tokenizer):
    a, b = make_tokenizer("llama"), make_tokenizer("llama")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    add_special_tokens(b)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    # the same vocabulary framed otherwise (BOS before a text, or nothing) encodes otherwise
    assert tokenizer_fingerprint(make_tokenizer("llama")) != tokenizer_fingerprint(make_tokenizer("neox"))


def test_the_suite_tokenizer_is_shipped():
    tok = load_tokenizer("suite")
    assert GIST_TOKEN not in tok.get_vocab() and tok.pad_token == "<PAD>" and len(tok) == 900
