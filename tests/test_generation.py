"""The decoding core (gist_lightning/decoding.py): streamed text equals the one-shot answer for any
tokens (partial UTF-8 characters, stop strings across tokens) at bounded work per token; the
library samples and stops as the engine does; per-row budgets; ZeRO-3 rank synchronisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gist_lightning.decoding as decoding
from gist_lightning import compress, generate
from gist_lightning.decoding import DecodingBatch, Row, Sampling, TextStream, continuation_batch, final_text
from gist_lightning.generation import generate_ids
from gist_lightning.serving import GenerationRequest, ServingEngine
from gist_lightning.templates import encode_continuation
from gist_lightning.tokens import load_tokenizer

K = 2
SUITE = load_tokenizer("suite")  # byte-level BPE: single tokens hold parts of UTF-8 characters
VOCAB = len(SUITE)
# tokens whose bytes are not whole characters (e.g. the first or last byte of "é"), and ones that are
PARTIAL = [i for i in range(VOCAB) if "\ufffd" in SUITE.decode([i])]
TEXTS = ["Héllo wörld — naïve café 日本語 🎉 done", "  leading space, then  double  spaces  ", "a\n\nb \n c"]


def stream_text(tokenizer, ids, stop=()):
    """Feed ``ids`` to a TextStream until it stops: (the pieces, how many ids it took)."""
    stream, pieces = TextStream(tokenizer, stop), []
    for n, token in enumerate(ids, 1):
        pieces.append(stream.push(token))
        if stream.stopped:
            return pieces, n
    pieces.append(stream.finish())
    return pieces, len(ids)


def first_stop(tokenizer, ids, stop):
    """The one-shot rule for where decoding stops: the first prefix of ``ids`` whose text holds a stop
    string."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True).lstrip()
        if any(s in text for s in stop if s):
            return n
    return len(ids)


token_ids = (st.lists(st.one_of(st.integers(0, VOCAB - 1), st.sampled_from(PARTIAL)), max_size=40)
             | st.sampled_from(TEXTS).map(lambda t: SUITE.encode(t, add_special_tokens=False)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=token_ids, data=st.data())
def test_streamed_pieces_equal_the_one_shot_answer(ids, data):
    # stop strings cut from the text itself (so they straddle tokens), or arbitrary short ones
    text = SUITE.decode(ids, skip_special_tokens=True)
    cut = st.tuples(st.integers(0, max(len(text) - 1, 0)), st.integers(1, 4)).map(
        lambda a: text[a[0]:a[0] + a[1]])
    stop = tuple(s for s in data.draw(st.lists(cut | st.text(min_size=1, max_size=3), max_size=3)) if s)
    pieces, taken = stream_text(SUITE, ids, stop)
    assert "".join(pieces) == final_text(SUITE, ids[:taken], stop)
    assert taken == first_stop(SUITE, ids, stop)  # it stops at the token that completes a stop string
    if stop:
        assert not any(s in "".join(pieces) for s in stop)


def test_streaming_holds_back_only_what_may_change():
    ids = SUITE.encode("naïve café. STOP here", add_special_tokens=False)
    pieces, _ = stream_text(SUITE, ids, ("STOP",))
    assert "".join(pieces) == "naïve café." and all("\ufffd" not in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 3  # text arrives while it is made, not at the end


def test_detokenization_work_per_token_is_bounded(monkeypatch):
    """Each new token decodes a window of a few tokens, not the answer so far (which was quadratic)."""
    ids = SUITE.encode(" ".join(["Héllo wörld, naïve café 日本語 🎉"] * 40), add_special_tokens=False)
    windows = []
    decode = SUITE.decode
    monkeypatch.setattr(SUITE, "decode", lambda x, **kw: windows.append(len(x)) or decode(x, **kw))
    pieces, _ = stream_text(SUITE, ids)
    monkeypatch.undo()
    assert "".join(pieces) == final_text(SUITE, ids)
    assert len(ids) > 300 and max(windows) <= 8 and sum(windows) <= 4 * len(ids)


def test_rows_end_at_eos_stop_or_length():
    ids = SUITE.encode("one two three", add_special_tokens=False)
    eos = SUITE.eos_token_id
    row = Row(10, eos, stream=TextStream(SUITE))
    assert "".join(row.push(t) for t in ids + [eos]) == "one two three" and row.finish_reason == "stop"
    assert row.answer_ids == ids and row.tokens[-1] == eos
    row = Row(len(ids), eos, stream=TextStream(SUITE, ("two",)))
    texts = [row.push(t) for t in ids[:3]]
    assert row.finish_reason == "stop" and "".join(texts) == "one" and len(row.tokens) <= 3
    row = Row(2, eos)
    row.push(ids[0]), row.push(ids[1])
    assert row.finish_reason == "length" and row.text == ""


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0),
                                 dict(top_p=1.5), dict(seed=-1), dict(seed=2**63)])
def test_sampling_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Sampling(**bad)


# -- the library and the engine: one core -------------------------------------------------------------
INSTRUCTIONS = ["reverse the list of words", "Write a haiku about autumn leaves and rain."]
INPUTS = ["apple banana", "cherry dog egg fig grape"]


def _engine_answer(model, tok, **request):
    engine = ServingEngine(model, tok, K, "gist")
    engine.submit("a", GenerationRequest(**request))
    text, n = "", 0
    while engine.busy():
        for e in engine.step():
            text += e.text
            n = e.usage["completion_tokens"] if e.usage else n
        assert n < 500
    return text, n


def test_library_samples_and_stops_as_the_engine_does(make_pair):
    model, tok, _ = make_pair("llama")
    cache = compress(model, tok, INSTRUCTIONS, K)
    greedy = generate(model, tok, cache, INPUTS, max_new_tokens=16)
    assert greedy == generate(model, tok, cache, INPUTS, max_new_tokens=16, temperature=0.0, seed=3)
    sampled = generate(model, tok, cache, INPUTS, max_new_tokens=16, temperature=1.5, seed=7)
    assert sampled == generate(model, tok, cache, INPUTS, max_new_tokens=16, temperature=1.5, seed=7)
    assert sampled != greedy and sampled != generate(model, tok, cache, INPUTS, max_new_tokens=16,
                                                     temperature=1.5, seed=8)
    for i in range(2):  # row i draws with seed + i, as a request with that seed does
        got, _ = _engine_answer(model, tok, instruction=INSTRUCTIONS[i], input=INPUTS[i], max_tokens=16,
                                temperature=1.5, seed=7 + i)
        assert got == sampled[i]
    stop = greedy[1][len(greedy[1]) // 2:][:2]
    stopped = generate(model, tok, cache, INPUTS, max_new_tokens=16, stop=[stop])
    assert stopped[1] == greedy[1][:greedy[1].index(stop)].rstrip()
    assert stopped[1] == _engine_answer(model, tok, instruction=INSTRUCTIONS[1], input=INPUTS[1],
                                        max_tokens=16, stop=(stop,))[0]


def test_rows_with_their_own_budgets_are_checked_each_against_its_own(make_pair):
    """A long prompt with a small budget decodes beside a short one with a large budget (the
    engine batches such requests): neither is refused for the other's numbers."""
    model, tok, _ = make_pair("llama")  # 256 positions
    cache = compress(model, tok, INSTRUCTIONS[:1] * 2, K)
    long_input = "word " * 100
    rows = [encode_continuation(tok, x, False) for x in (long_input, "cat")]
    ids, mask = continuation_batch(rows, tok.pad_token_id, False)
    budgets = [256 - int(cache.next_position[0]) - len(rows[0]) + 1, 200]
    batch, _ = DecodingBatch.start(model, cache, ids, mask, [Row(b, tok.eos_token_id) for b in budgets],
                                   tok.pad_token_id)
    assert len(batch.rows) == 2
    with pytest.raises(decoding.ContextLengthError, match="1 of 2 prompts"):
        DecodingBatch.start(model, cache, ids, mask, [Row(b + 1, tok.eos_token_id) for b in budgets],
                            tok.pad_token_id)


def test_a_rank_done_early_steps_on_with_padding_until_every_rank_is(make_pair, monkeypatch):
    model, tok, _ = make_pair("llama")
    cache = compress(model, tok, INSTRUCTIONS, K)
    ids, mask = continuation_batch([encode_continuation(tok, x, False) for x in INPUTS], tok.pad_token_id,
                                   False)
    first = generate_ids(model, cache, ids, mask, 1, tok.eos_token_id, tok.pad_token_id)[:, 0]
    eos = int(first[0])  # make row 0's first token its end, so that this rank is done after one step
    single = generate_ids(model, cache.select([0]), ids[:1], mask[:1], 8, eos, tok.pad_token_id)
    assert single.tolist() == [[eos]]  # alone, it stops at once
    calls = []

    def other_rank_busy_twice(flag, op=None):  # what a rank still decoding sends: "not done"
        calls.append(int(flag))
        if len(calls) <= 2:
            flag.zero_()

    monkeypatch.setattr(decoding.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(decoding.dist, "all_reduce", other_rank_busy_twice)
    synced = generate_ids(model, cache.select([0]), ids[:1], mask[:1], 8, eos, tok.pad_token_id,
                          sync_ranks=True)
    assert synced.tolist() == [[eos, tok.pad_token_id, tok.pad_token_id]] and calls == [1, 1, 1]


def test_decoding_steps_write_keys_in_place(make_pair):
    """Each step writes its keys/values into the running batch's buffers (no copy of the whole cache
    per token); the answers equal the masked full forward by test_caching and test_serving_engine."""
    model, tok, _ = make_pair("llama")
    cache = compress(model, tok, INSTRUCTIONS, K, "pos_control")  # whole instructions: a cache worth copying
    ids, mask = continuation_batch([encode_continuation(tok, x, False) for x in INPUTS], tok.pad_token_id,
                                   False)
    batch, _ = DecodingBatch.start(model, cache, ids, mask, [Row(20, -1) for _ in INPUTS], tok.pad_token_id)
    layer = batch.state["past"].layers[0]
    where, width = layer.keys.data_ptr(), layer.keys.shape[-2]
    for step in range(1, 20):
        batch.step()
        assert layer.keys.shape[-2] == width + step and layer.keys.data_ptr() == where
    assert torch.equal(batch.state["key_valid"].sum(-1), mask.sum(-1) + cache.valid.sum(-1) + 19)
