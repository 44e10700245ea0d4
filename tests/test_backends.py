"""The masked full forward in its two other forms, for every decoder family: FlexAttention
BlockMasks give the dense mask's logits (and caches made under flex equal the full forward), and a
packed row gives every example the logits and loss it has alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gist_lightning import caching, compress, generate
from gist_lightning.backends import gist_forward
from gist_lightning.data.collate import IGNORE_INDEX, GistCollator
from gist_lightning.padding import pad_batch
from gist_lightning.templates import encode_example

INSTRUCTIONS = ["reverse the list of words and then put cat first please", "count the words", "sort them",
                "remove every dog from the list"]
INPUTS = ["apple banana cherry", "dog egg fig grape apple", "cat",
          "the quick brown fox jumps over the lazy dog"]
OUTPUTS = ["cherry banana apple", "five", "cat", "brown fox jumps lazy over quick the the"]
TOLERANCE = 1e-4


def _examples(model, tok, gist_id, k):
    return [encode_example(tok, t, x, y, k, gist_id, False) for t, x, y in zip(INSTRUCTIONS, INPUTS, OUTPUTS)]


def _decoder_only(family, tiny_family_table):
    if tiny_family_table[family][0] in ("t5", "mt5", "umt5"):
        pytest.skip("packing and FlexAttention are for decoder-only families (T5 refuses flex: "
                    "test_families)")


@torch.no_grad()
def _full(model, tok, gist_id, examples, condition, k):
    ids, mask = pad_batch([e.prompt + e.target for e in examples], tok.pad_token_id, "left")
    logits = gist_forward(model, ids, mask, gist_id, condition, num_gist_tokens=k).logits
    return [logits[i, -(len(e.suffix) + len(e.target)):] for i, e in enumerate(examples)]


@torch.no_grad()
def _cached(model, tok, gist_id, examples, condition, k):
    prefix, pmask = pad_batch([e.prefix + e.gists for e in examples], tok.pad_token_id, "left")
    cache = caching.compress_ids(model, prefix, pmask, gist_id, condition, k)
    cont, cmask = pad_batch([e.suffix + e.target for e in examples], tok.pad_token_id, "left")
    logits = caching.continuation_logits(model, cache, cont, cmask).logits
    return [logits[i, -(len(e.suffix) + len(e.target)):] for i, e in enumerate(examples)]


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# The attention paths flex takes: plain causal (llama), a sliding window (mistral), logit soft-capping
# with sliding and global layers (gemma2). Each family compiles its own kernels (25-70 s on 2 cores),
# and past dynamo's recompile limit the later families of one process ran another path whose logits
# differed by up to 0.04 (seen for qwen3-no-sliding, olmo2; not examined): the dense, cached and
# packed tests cover every family, this one the three paths.
FLEX_FAMILIES = ["llama", "mistral", "gemma2"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_flex_block_masks_give_the_dense_logits_and_exact_caches(make_pair, require_attention, family,
                                                                 tiny_family_table):
    """FlexAttention compiles on first use (about half a minute on 2 cores, then cached on disk)."""
    _decoder_only(family, tiny_family_table)
    require_attention(family, "flex_attention")
    model, tok, gist_id = make_pair(family, seed=3)
    dense_impl = model.config._attn_implementation
    k = 2
    examples = _examples(model, tok, gist_id, k)
    window = getattr(model.config, "sliding_window", None)
    if window:  # the windowed layers must matter
        assert max(len(e.prompt) for e in examples) > window
    for condition in ("gist", "neg_control", "pos_control"):
        model.set_attn_implementation(dense_impl)
        dense = _full(model, tok, gist_id, examples, condition, k)
        model.set_attn_implementation("flex_attention")
        flex = _full(model, tok, gist_id, examples, condition, k)
        assert _max_diff(flex, dense) <= TOLERANCE, (family, condition)
        cached = _cached(model, tok, gist_id, examples, condition, k)
        assert _max_diff(cached, flex) <= TOLERANCE, (family, condition)
    # greedy generation from caches made under flex equals generation under the dense mask
    model.set_attn_implementation("flex_attention")
    flex_answers = generate(model, tok, compress(model, tok, INSTRUCTIONS, k), INPUTS, max_new_tokens=6)
    assert model.config._attn_implementation == "flex_attention"  # decoding switched back
    model.set_attn_implementation(dense_impl)
    assert flex_answers == generate(model, tok, compress(model, tok, INSTRUCTIONS, k), INPUTS,
                                    max_new_tokens=6)
    model.set_attn_implementation("flex_attention")
    # the rule reaches the layers: under flex, gist and pos_control differ after the gists
    gist = _full(model, tok, gist_id, examples, "gist", k)
    pos = _full(model, tok, gist_id, examples, "pos_control", k)
    assert _max_diff(gist, pos) > 1e-3


def _per_example_losses(logits, labels, segments=None):
    """Mean next-token loss of each example (of each segment, for packed rows)."""
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none",
                             ignore_index=IGNORE_INDEX).view(labels.shape[0], -1)
    counted = labels[:, 1:] != IGNORE_INDEX
    if segments is None:
        return [(losses[i][counted[i]].mean()).item() for i in range(labels.shape[0])]
    out = []
    for i in range(labels.shape[0]):
        for s in range(1, int(segments[i].max()) + 1):
            sel = counted[i] & (segments[i, 1:] == s)
            out.append(losses[i][sel].mean().item())
    return out


@pytest.mark.parametrize("condition", ["gist", "pos_control", "neg_control"])
def test_a_packed_row_gives_each_example_its_own_loss(make_pair, family, tiny_family_table, condition):
    _decoder_only(family, tiny_family_table)
    model, tok, gist_id = make_pair(family, seed=5)
    k = 1
    rows = [dict(prefix=e.prefix, gists=e.gists, suffix=e.suffix, target=e.target)
            for e in _examples(model, tok, gist_id, k)]
    window = getattr(model.config, "sliding_window", None)
    plain = GistCollator(tok.pad_token_id, gist_id, condition, False, k)(rows)
    packed = GistCollator(tok.pad_token_id, gist_id, condition, False, k, packed=True)([rows[:3], rows[3:]])
    if window:  # segments start past the window: positions must restart, and the window follow them
        assert packed["input_ids"].shape[1] > 2 * window
    seen = {}
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        alone = gist_forward(model, plain["input_ids"], plain["attention_mask"], gist_id, condition, k,
                             labels=plain["labels"])
        together = gist_forward(model, packed["input_ids"], packed["attention_mask"], gist_id, condition, k,
                                segment_ids=packed["segment_ids"], labels=packed["labels"])
    hook.remove()
    # RoPE sees relative positions only, so restarting them shows in what the model is given, not in its loss
    for i in range(2):
        for s in packed["segment_ids"][i].unique().tolist():
            cols = (packed["segment_ids"][i] == s).nonzero().flatten()
            if s:
                assert seen["position_ids"][i, cols].tolist() == list(range(len(cols)))
    want = _per_example_losses(alone.logits, plain["labels"])
    got = _per_example_losses(together.logits, packed["labels"], packed["segment_ids"])
    assert max(abs(a - b) for a, b in zip(want, got)) <= 1e-5, (want, got)
    # the batch losses agree too: HF averages over the same target tokens
    assert abs(alone.loss.item() - together.loss.item()) <= 1e-5
    # without its segments the row reads as one example with several gist spans: refused
    with pytest.raises(ValueError, match="more than one separate span"):
        gist_forward(model, packed["input_ids"], packed["attention_mask"], gist_id, condition, k)


@pytest.mark.slow
def test_a_packed_row_under_flex_gives_the_dense_logits(make_pair, require_attention, family,
                                                        tiny_family_table):
    _decoder_only(family, tiny_family_table)
    require_attention(family, "flex_attention")
    model, tok, gist_id = make_pair(family, seed=6)
    rows = [dict(prefix=e.prefix, gists=e.gists, suffix=e.suffix, target=e.target)
            for e in _examples(model, tok, gist_id, 1)]
    packed = GistCollator(tok.pad_token_id, gist_id, "gist", False, 1, packed=True)([rows[:2], rows[2:]])
    args = (packed["input_ids"], packed["attention_mask"], gist_id, "gist", 1)
    with torch.no_grad():
        dense = gist_forward(model, *args, segment_ids=packed["segment_ids"]).logits
        model.set_attn_implementation("flex_attention")
        flex = gist_forward(model, *args, segment_ids=packed["segment_ids"]).logits
    real = packed["segment_ids"] > 0
    assert (flex - dense)[real].abs().max().item() <= TOLERANCE
