"""The paper's templates, tokenized piece by piece around the gist span."""

from __future__ import annotations

import pytest

from gist_lightning.templates import encode_example, prompt_text


@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_template_strings_are_exact(make_pair, encoder_decoder):
    family = "t5" if encoder_decoder else "llama"
    model, tok, gist_id = make_pair(family)
    ex = encode_example(tok, "Sort the words.", "b a", "a b", 2, gist_id, encoder_decoder)
    text = tok.decode(ex.prompt)
    if encoder_decoder:
        assert text == "Instruction: Sort the words.\n<GIST><GIST>\nInput: b a</s>"
    else:
        assert text == "<s>Instruction: Sort the words.\n<GIST><GIST>\nInput: b a\nOutput:"
    assert tok.decode(ex.target) == "a b</s>"
    framed = text.removeprefix("<s>").removesuffix("</s>")
    assert prompt_text("Sort the words.", "b a", 2, encoder_decoder) == framed
    empty = encode_example(tok, "Say hi.", "", "hi", 1, gist_id, encoder_decoder)
    want = ("Instruction: Say hi.\n<GIST>\nInput: </s>" if encoder_decoder
            else "<s>Instruction: Say hi.\n<GIST>\nOutput:")
    assert tok.decode(empty.prompt) == want


def test_k_below_one_is_an_error(make_pair):
    model, tok, gist_id = make_pair("llama")
    with pytest.raises(ValueError, match=">= 1"):
        encode_example(tok, "a", "b", "c", 0, gist_id, False)
