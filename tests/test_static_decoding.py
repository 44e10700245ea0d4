"""Decoding in static key/value buffers (batch and capacity padded to powers of two): the same
tokens as the growing cache on every decoder family, eager; through torch.compile, one step is one
graph with no break, the answers are the eager ones, and a second call of the same buckets
compiles nothing new; a backend that cannot says so and decodes eagerly."""

from __future__ import annotations

import pytest
import torch

from gist_lightning import compress, generate
from gist_lightning.backends import backend_named
from gist_lightning.backends.decoder_kv import bucket, graph_replays, static_step
from gist_lightning.decoding import continuation_batch
from gist_lightning.generation import generate_ids
from gist_lightning.templates import encode_continuation

INSTRUCTIONS = ["Reverse the list of words.", "Sort these words, please", "Count the animals here"]
INPUTS = ["cat dog owl", "red green blue yellow", "one"]  # three lengths: left padding differs per row


def _ids(model, tok, compile, n=10):
    cache = compress(model, tok, INSTRUCTIONS, 1)
    ids, mask = continuation_batch([encode_continuation(tok, x, cache.encoder_decoder) for x in INPUTS],
                                   tok.pad_token_id, cache.encoder_decoder)
    return generate_ids(model, cache, ids, mask, n, -1, tok.pad_token_id, compile=compile), cache, ids, mask


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 5, 32, 33)] == [1, 2, 4, 8, 32, 64]
    assert bucket(10, 64) == 64 and bucket(65, 64) == 128


def test_static_buffers_give_the_growing_caches_logits_on_every_family(make_pair, family):
    """Eager, static buffers (3 rows padded to 4, sliding layers masked by position) against the
    growing cache, fed the same tokens: the same logits at every step (1e-5, fp32), rows whose
    logits differ, and the same greedy tokens through generate_ids."""
    model, tok, _ = make_pair(family, seed=2)
    if model.config.is_encoder_decoder:
        with pytest.warns(UserWarning, match="cannot decode in static buffers; decoding eagerly"):
            static, *_ = _ids(model, tok, "static", 4)
        assert torch.equal(static, _ids(model, tok, False, 4)[0])
        return
    growing, cache, ids, mask = _ids(model, tok, False)
    backend = backend_named(cache.backend)
    with torch.no_grad():
        eager, state = backend.start(model, cache, ids, mask)
        fixed, fixed_state = backend.start_static(model, cache, ids, mask, 10)
        for _ in range(9):
            assert (eager - fixed).abs().max() <= 1e-5, family
            tokens = eager.argmax(-1)
            eager, state = backend.step(model, state, tokens)
            fixed, fixed_state = backend.step_static(model, fixed_state, tokens, False)
        assert (eager - fixed).abs().max() <= 1e-5, family
    assert (eager[0] - eager[1]).abs().max() > 1e-4  # the rows are answered apart
    assert torch.equal(_ids(model, tok, "static")[0], growing), family


@pytest.mark.slow
def test_compiled_steps_have_no_graph_break_answer_alike_and_do_not_recompile(make_pair):
    """torch.compile (the default mode on CPU; fp32): the step is one graph with no break
    (dynamo's explain), greedy answers equal the eager ones, and another call with other inputs of
    the same buckets adds no graph."""
    from torch._dynamo.utils import counters

    model, tok, _ = make_pair("llama", "sdpa", seed=2)
    eager, cache, ids, mask = _ids(model, tok, False)
    with torch.no_grad():
        _, state = backend_named(cache.backend).start_static(model, cache, ids, mask, 10)
        step = torch._dynamo.explain(static_step)
        explained = step(model, state["static"], torch.zeros(4, dtype=torch.long), state["position"],
                         state["key_valid"], state["key_positions"])
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled, *_ = _ids(model, tok, True)
    assert torch.equal(compiled, eager)
    graphs = counters["stats"]["unique_graphs"]
    other = generate(model, tok, compress(model, tok, INSTRUCTIONS[::-1], 1), ["owl", "a b", "c d e"],
                     max_new_tokens=10, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs  # the same buckets: nothing recompiled
    assert other == generate(model, tok, compress(model, tok, INSTRUCTIONS[::-1], 1), ["owl", "a b", "c d e"],
                             max_new_tokens=10)


def test_cuda_graph_steps_return_what_the_next_replay_cannot_overwrite(monkeypatch):
    """Under CUDA graphs a replay writes its outputs into the graph's own buffers; the library's
    compiled step hands back copies and marks a new step before each call. Simulated here (no GPU):
    a step that writes into the same buffers at every call, like a replay."""
    buffers = (torch.zeros(2, 5), torch.zeros(2, 8, dtype=torch.bool), torch.zeros(2, 8, dtype=torch.long))

    def replay(value):
        for buffer in buffers:
            buffer.fill_(value)
        return buffers

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(marks)))
    step = graph_replays(replay)
    first = step(1)
    second = step(0)
    assert all(bool((out == 1).all()) for out in first) and all(bool((out == 0).all()) for out in second)
    assert [out.dtype for out in first] == [b.dtype for b in buffers] and marks == [0, 1]


def test_the_gpu_step_is_compiled_with_cuda_graphs_and_hands_back_copies(monkeypatch):
    """The wiring, without a GPU: compiled_step("cuda") compiles with CUDA graphs behind
    graph_replays; the CPU step is compiled plainly and returns what it computes."""
    from gist_lightning.backends import decoder_kv

    outputs = (torch.zeros(2, 5), torch.zeros(2, 8, dtype=torch.bool), torch.zeros(2, 8, dtype=torch.long))
    modes = []

    def fake_compile(fn, mode=None, **kwargs):
        modes.append(mode)
        return lambda *args: outputs

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(decoder_kv, "_COMPILED", {})
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    on_gpu = decoder_kv.compiled_step("cuda")(None)
    assert modes == ["reduce-overhead"] and marks == [1]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(on_gpu, outputs))
    assert decoder_kv.compiled_step("cpu")(None) is outputs and modes == ["reduce-overhead", None]
