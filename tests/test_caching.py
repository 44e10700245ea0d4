"""The defining property of gist caching, for every supported family and attention implementation:
the cached path equals the masked full-prompt forward (logits and greedy tokens), batched."""

from __future__ import annotations

import pytest
import torch

from gist_lightning import caching, compress, generate
from gist_lightning.backends import gist_forward
from gist_lightning.cache import GistCache
from gist_lightning.generation import generate_ids
from gist_lightning.padding import pad_batch
from gist_lightning.templates import encode_example
from gist_lightning.tokens import gist_token_id

INSTRUCTIONS = [
    "reverse the list of words",
    "count the words",
    "put cat first and remove every dog from the list please",
    "sort them",
]
INPUTS = ["apple banana cherry", "dog egg fig grape apple", "cat",
          "the quick brown fox jumps over the lazy dog"]
OUTPUTS = ["cherry banana apple", "five", "cat", "brown dog fox jumps lazy over quick the the"]
TOLERANCE = 1e-4


def _examples(model, tok, gist_id, k, bsz):
    enc_dec = model.config.is_encoder_decoder
    return [encode_example(tok, INSTRUCTIONS[i], INPUTS[i], OUTPUTS[i], k, gist_id, enc_dec)
            for i in range(bsz)]


def _full_logits_after_gist(model, tok, gist_id, examples, condition, k):
    """Logits of the masked full forward at every position after the gist span, per row."""
    if model.config.is_encoder_decoder:
        src, src_mask = pad_batch([e.prompt for e in examples], tok.pad_token_id, "right")
        tgt, tgt_mask = pad_batch([e.target for e in examples], tok.pad_token_id, "right")
        dec_in = model._shift_right(tgt)
        out = gist_forward(model, src, src_mask, gist_id, condition, decoder_input_ids=dec_in,
                           num_gist_tokens=k)
        return [out.logits[i, : len(e.target)] for i, e in enumerate(examples)], dec_in
    ids, mask = pad_batch([e.prompt + e.target for e in examples], tok.pad_token_id, "left")
    out = gist_forward(model, ids, mask, gist_id, condition, num_gist_tokens=k)
    return [out.logits[i, -(len(e.suffix) + len(e.target)) :] for i, e in enumerate(examples)], None


def _cached_logits(model, tok, gist_id, examples, condition, k, dec_in):
    prefix, pmask = pad_batch([e.prefix + e.gists for e in examples], tok.pad_token_id, "left")
    cache = caching.compress_ids(model, prefix, pmask, gist_id, condition, k)
    if model.config.is_encoder_decoder:
        cont, cmask = pad_batch([e.suffix for e in examples], tok.pad_token_id, "right")
        out = caching.continuation_logits(model, cache, cont, cmask, decoder_input_ids=dec_in)
        return [out.logits[i, : len(e.target)] for i, e in enumerate(examples)], cache
    cont, cmask = pad_batch([e.suffix + e.target for e in examples], tok.pad_token_id, "left")
    out = caching.continuation_logits(model, cache, cont, cmask)
    return [out.logits[i, -(len(e.suffix) + len(e.target)) :] for i, e in enumerate(examples)], cache


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("condition", ["gist", "pos_control", "neg_control"])
@pytest.mark.parametrize("bsz,k", [(1, 1), (4, 2), (4, 3)])
def test_cached_logits_equal_masked_full_forward(make_pair, require_attention, family, attn, condition, bsz,
                                                 k):
    require_attention(family, attn)
    model, tok, gist_id = make_pair(family, attn)
    examples = _examples(model, tok, gist_id, k, bsz)
    if model.config.is_encoder_decoder and condition == "pos_control":
        with pytest.raises(ValueError, match="bidirectional encoder"):
            _cached_logits(model, tok, gist_id, examples, condition, k, None)
        return
    window = getattr(model.config, "sliding_window", None)
    if window and bsz > 1:  # the windowed layers must matter: an instruction longer than the window
        assert max(len(e.prefix) for e in examples) > window
    full, dec_in = _full_logits_after_gist(model, tok, gist_id, examples, condition, k)
    cached, cache = _cached_logits(model, tok, gist_id, examples, condition, k, dec_in)
    diff = max((f - c).abs().max().item() for f, c in zip(full, cached))
    print(f"{family}/{attn}/{condition}/b{bsz}/k{k}: cached vs masked full forward, max abs diff {diff:.1e}")
    assert diff <= TOLERANCE, f"{family}/{attn}/{condition}: max abs diff {diff}"
    expected_len = {"gist": k, "neg_control": 0}.get(condition)
    if expected_len is not None:
        assert cache.length == expected_len and bool(cache.valid.all())


def _greedy_full(model, tok, gist_id, example, condition, max_new):
    """Reference: greedy decoding by re-running the masked full forward on one row, no cache."""
    out = []
    for _ in range(max_new):
        if model.config.is_encoder_decoder:
            src = torch.tensor([example.prompt])
            dec = torch.tensor([[model.config.decoder_start_token_id] + out])
            logits = gist_forward(model, src, torch.ones_like(src), gist_id, condition,
                                  decoder_input_ids=dec).logits
        else:
            ids = torch.tensor([example.prompt + out])
            logits = gist_forward(model, ids, torch.ones_like(ids), gist_id, condition).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return out


@pytest.mark.parametrize("condition", ["gist", "neg_control", "pos_control"])
def test_batched_greedy_generation_equals_full_forward(make_pair, family, condition):
    model, tok, gist_id = make_pair(family, seed=1)
    if model.config.is_encoder_decoder and condition == "pos_control":
        pytest.skip("pos_control cannot be cached for encoder-decoders (tested above)")
    k, max_new = 2, 8
    examples = [encode_example(tok, t, x, None, k, gist_id, model.config.is_encoder_decoder)
                for t, x in zip(INSTRUCTIONS, INPUTS)]
    want = [_greedy_full(model, tok, gist_id, e, condition, max_new) for e in examples]
    cache = compress(model, tok, INSTRUCTIONS, k, condition)
    side = "right" if model.config.is_encoder_decoder else "left"
    for rows in ([0], [0, 1, 2, 3]):  # batch 1 and batch 4 with mixed instruction lengths
        cont, cmask = pad_batch([examples[i].suffix for i in rows], tok.pad_token_id, side)
        got = generate_ids(model, cache.select(rows), cont, cmask, max_new, tok.eos_token_id,
                           tok.pad_token_id)
        for row, i in zip(got.tolist(), rows):
            assert row[: len(want[i])] == want[i], (family, condition, i)
    texts = generate(model, tok, cache, INPUTS, max_new_tokens=max_new)
    assert texts == [tok.decode(w[:-1] if w[-1] == tok.eos_token_id else w, skip_special_tokens=True).strip()
                     for w in want]


@pytest.mark.parametrize("condition", ["gist", "neg_control"])
def test_cached_logits_equal_masked_full_forward_with_adapters(make_pair, family, condition):
    """model.peft puts LoRA layers and trainable token rows into the model: the cache still equals
    the masked full forward, with adapters and a gist row that are far from their initial values."""
    from gist_lightning.adapters import PeftSettings, apply_peft

    model, tok, gist_id = make_pair(family, seed=2)
    examples = _examples(model, tok, gist_id, 2, 4)
    before = _full_logits_after_gist(model, tok, gist_id, examples, condition, 2)[0]
    apply_peft(model, PeftSettings(rank=4, dropout=0.0), [gist_id])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # lora_B starts at zero and the row delta at the base row: move both
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    examples = _examples(model, tok, gist_id, 2, 4)
    full, dec_in = _full_logits_after_gist(model, tok, gist_id, examples, condition, 2)
    # the adapters are in the path
    assert max((f - b).abs().max().item() for f, b in zip(full, before)) > 1e-3
    cached, _ = _cached_logits(model, tok, gist_id, examples, condition, 2, dec_in)
    diff = max((f - c).abs().max().item() for f, c in zip(full, cached))
    scale = max(1.0, max(f.abs().max().item() for f in full))  # the perturbed adapters make logits larger
    print(f"{family}/{condition}: diff {diff:.1e} scale {scale:.1f}")
    assert diff <= TOLERANCE * scale, f"{family}/{condition}: max abs diff {diff} at logits up to {scale}"


def test_local_from_pretrained_round_trip(make_pair, family, tmp_path):
    """The real loading path (from_pretrained of a folder) gives the same cache and generations."""
    from transformers import AutoTokenizer

    from gist_lightning.families import LOAD_OPTIONS, model_class

    model, tok, gist_id = make_pair(family, seed=4)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = model_class(model.config).from_pretrained(tmp_path, attn_implementation="eager", **LOAD_OPTIONS)
    model2 = loaded.eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    a = generate(model, tok, compress(model, tok, INSTRUCTIONS, 1), INPUTS, max_new_tokens=6)
    b = generate(model2, tok2, compress(model2, tok2, INSTRUCTIONS, 1), INPUTS, max_new_tokens=6)
    assert a == b


def test_concatenated_caches_equal_one_batched_compress(make_pair):
    """Caches made one by one (as a store holds them) and concatenated give the batched result,
    also when their lengths differ (pos_control keeps whole instructions)."""
    model, tok, _ = make_pair("llama")
    for condition in ("gist", "pos_control"):
        together = compress(model, tok, INSTRUCTIONS, 2, condition)
        joined = GistCache.concat([compress(model, tok, [t], 2, condition) for t in INSTRUCTIONS])
        assert joined.length == together.length and torch.equal(joined.valid, together.valid)
        cont, cmask = pad_batch([encode_example(tok, t, x, None, 2, gist_token_id(tok),
                                                False).suffix for t, x in zip(INSTRUCTIONS, INPUTS)],
                                tok.pad_token_id, "left")
        a = caching.continuation_logits(model, together, cont, cmask).logits
        b = caching.continuation_logits(model, joined, cont, cmask).logits
        assert (a - b).abs().max() < 1e-4
