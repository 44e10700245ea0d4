"""The serving engine in-process: what requests get back is what the library's cached generation
gives (the masked full forward, by test_caching), however requests arrive, batch, repeat, leave
or get cancelled; the cache policies of the three modes; refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FAMILIES, TINY_FAMILIES

from gist_lightning import compress, generate
from gist_lightning.errors import GistError
from gist_lightning.prompt_cache import CacheStore
from gist_lightning.serving import GenerationRequest, ServingEngine, parse_bytes
from gist_lightning.serving.engine import sum_stats
from gist_lightning.templates import encode_continuation

INSTRUCTIONS = ["reverse the list of words", "count the words", "Write a haiku about autumn leaves and rain.",
                "sort them, put cat first"]
INPUTS = ["apple banana", "", "cherry dog egg fig grape", "cat"]
K = 2


def _encoder_decoder(family: str) -> bool:
    return TINY_FAMILIES[family][0] in ("t5", "mt5", "umt5")


def reference(model, tok, instruction, input, max_tokens=10, condition="gist"):
    cache = compress(model, tok, [instruction], K, condition)
    return generate(model, tok, cache, [input], max_new_tokens=max_tokens)[0]


def run(engine, arrivals: dict[int, list[tuple[str, GenerationRequest]]],
        cancel: dict[int, str] | None = None):
    """Step ``engine`` until idle, submitting ``arrivals[step]`` before that step (and cancelling
    ``cancel[step]``); returns {uid: (text, finish_reason or error)} and every event."""
    texts, ends, events, step = {}, {}, [], 0
    while engine.busy() or any(s >= step for s in arrivals):
        for uid, req in arrivals.get(step, []):
            engine.submit(uid, req)
        if cancel and step in cancel:
            engine.cancel(cancel[step])
        for e in engine.step():
            events.append(e)
            texts[e.uid] = texts.get(e.uid, "") + e.text
            if e.done:
                ends[e.uid] = e.error or e.finish_reason
        step += 1
        assert step < 500, "the engine never went idle"
    return {uid: (texts[uid], ends[uid]) for uid in ends}, events


def staggered(max_tokens=10):
    """Requests arriving over three steps, the first instruction again with the first input."""
    req = [GenerationRequest(t, x, max_tokens=max_tokens) for t, x in zip(INSTRUCTIONS, INPUTS)]
    return {0: [("r0", req[0]), ("r1", req[1])], 2: [("r2", req[2]), ("r3", req[3]), ("r4", req[0])]}


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("mode", ["gist", "full", "instruction"])
def test_answers_equal_cached_generation_however_requests_arrive(make_pair, family, mode):
    if mode == "instruction" and _encoder_decoder(family):
        pytest.skip("instruction caching is decoder-only (test_refusals)")
    condition = "pos_control" if mode == "instruction" else "gist"
    # random weights: the first seed whose answers tell the requests apart (tiny random smollm3 answers
    # ":" to everything at the default init scale; a larger one then)
    for seed, overrides in [(0, {}), (1, {}), (0, {"initializer_range": 0.2}),
                            (1, {"initializer_range": 0.2})]:
        model, tok, _ = make_pair(family, seed=seed, **overrides)
        want = [reference(model, tok, t, x, condition=condition) for t, x in zip(INSTRUCTIONS, INPUTS)]
        if len(set(want)) > 1:
            break
    assert len(set(want)) > 1, "the model answers every request alike: the comparison would prove nothing"
    # max_batch_size 3: r3 waits for a free row, joins a batch already decoding (continuous batching)
    engine = ServingEngine(model, tok, K, "gist", mode=mode, max_batch_size=3)
    got, _ = run(engine, staggered())
    assert [got[f"r{i}"][0] for i in range(5)] == want + [want[0]]
    alone = ServingEngine(model, tok, K, "gist", mode=mode, max_batch_size=1)
    got_alone, _ = run(alone, staggered())
    assert got_alone == got
    if mode == "gist":  # static buffers (eager): rows joining and leaving, restacked into buckets
        static = ServingEngine(model, tok, K, "gist", mode=mode, max_batch_size=3, compile="static")
        assert run(static, staggered())[0] == got


def test_one_compression_per_instruction_however_many_ask(make_pair):
    model, tok, _ = make_pair("llama")
    engine = ServingEngine(model, tok, K, "gist", max_batch_size=4)
    same = {0: [(f"r{i}", GenerationRequest(INSTRUCTIONS[0], INPUTS[i % 4], max_tokens=4)) for i in range(6)]}
    got, events = run(engine, same)
    # four join at once and share one compression; two wait for a free row and find it in memory
    assert engine.counts["compressed"] == 1 and engine.counts["compressed_waits"] == 4
    assert [e.cache for e in events if e.cache] == ["compressed"] * 4 + ["memory"] * 2
    got2, events2 = run(engine, {0: [("again", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=4))]})
    assert engine.counts["compressed"] == 1 and [e.cache for e in events2 if e.cache] == ["memory"]
    assert got2["again"][0] == got["r0"][0] == reference(model, tok, INSTRUCTIONS[0], INPUTS[0], 4)
    # full mode: every request pays for its whole prompt
    full = ServingEngine(model, tok, K, "gist", mode="full", max_batch_size=4)
    run(full, same)
    assert full.counts["compressed"] == 6 and len(full.memory) == 0


def test_memory_is_an_lru_bounded_in_bytes(make_pair):
    model, tok, _ = make_pair("llama")
    one = ServingEngine(model, tok, K, "gist")
    run(one, {0: [("a", GenerationRequest(INSTRUCTIONS[0], max_tokens=1))]})
    entry = one.memory.used
    assert entry == 2 * 2 * 2 * 8 * K * 4  # K/V x layers x kv heads x head size x k positions x fp32

    engine = ServingEngine(model, tok, K, "gist", cache_memory=int(2.5 * entry))
    for i, t in enumerate(INSTRUCTIONS[:3]):
        run(engine, {0: [(f"r{i}", GenerationRequest(t, max_tokens=1))]})
    assert len(engine.memory) == 2 and engine.memory.evicted == 1
    assert engine.memory.used <= engine.memory.capacity
    assert list(engine.memory.entries) == INSTRUCTIONS[1:3]  # the least recently used left
    run(engine, {0: [("again", GenerationRequest(INSTRUCTIONS[1], max_tokens=1))]})
    assert engine.counts["memory_hits"] == 1
    run(engine, {0: [("back", GenerationRequest(INSTRUCTIONS[0], max_tokens=1))]})
    assert engine.counts["compressed"] == 4
    assert list(engine.memory.entries) == [INSTRUCTIONS[1], INSTRUCTIONS[0]]

    none = ServingEngine(model, tok, K, "gist", cache_memory="0")
    got, _ = run(none, {0: [("x", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6))]})
    assert len(none.memory) == 0 and got["x"][0] == reference(model, tok, INSTRUCTIONS[0], INPUTS[0], 6)


def test_instruction_mode_holds_whole_instructions(make_pair):
    model, tok, _ = make_pair("llama")
    sizes = {}
    for mode in ("gist", "instruction"):
        engine = ServingEngine(model, tok, K, "gist", mode=mode)
        _, events = run(engine, {0: [("a", GenerationRequest(INSTRUCTIONS[2], max_tokens=1))]})
        sizes[mode] = engine.memory.used
        prefix = events[-1].usage["prompt_tokens"] - len(encode_continuation(tok, "", False))
    # every prompt position vs the k gist positions
    assert sizes["instruction"] == sizes["gist"] * prefix // K


def test_cache_store_on_disk_serves_a_fresh_engine(make_pair, tmp_path):
    model, tok, _ = make_pair("llama")
    first = ServingEngine(model, tok, K, "gist", cache_dir=str(tmp_path))
    got, _ = run(first, {0: [("a", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6))]})
    assert INSTRUCTIONS[0] in CacheStore(tmp_path, model, tok, K, "gist")
    second = ServingEngine(model, tok, K, "gist", cache_dir=str(tmp_path))
    got2, events = run(second, {0: [("b", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6))]})
    assert second.counts["disk_hits"] == 1 and second.counts["compressed"] == 0 and events[0].cache == "disk"
    assert got2["b"][0] == got["a"][0]
    assert events[-1].usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_the_stats_of_two_engines_sum_to_those_of_one_that_served_both(make_pair):
    """What /v1/cache/stats answers for a server of several workers: one engine's stats, had one
    engine served every request (here, with instructions that differ between the two)."""
    model, tok, _ = make_pair("llama")
    requests = [(f"r{i}", GenerationRequest(t, x, max_tokens=4))
                for i, (t, x) in enumerate(zip(INSTRUCTIONS, INPUTS))]
    one, two, both = (ServingEngine(model, tok, K, "gist") for _ in range(3))
    again = [("again", requests[0][1])]  # its instruction from memory
    run(one, {0: requests[:1], 1: again})
    run(two, {0: requests[1:]})
    run(both, {0: requests, 1: again})
    run(two, {0: [("cancelled", requests[1][1])]}, cancel={0: "cancelled"})
    run(both, {0: [("cancelled", requests[1][1])]}, cancel={0: "cancelled"})
    total, alone = sum_stats([one.stats(), two.stats()]), both.stats()
    capacity = total.pop("cache_capacity")
    assert capacity == 2 * alone.pop("cache_capacity") and total == alone
    assert total["requests"] == 6 and total["cancelled"] == 1 and total["memory_hits"] == 1
    empty = sum_stats([])  # a server whose workers have not started
    assert empty["requests"] == 0 and empty["bytes_per_instruction"] is None


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_cancelled_request_leaves_and_the_others_go_on(make_pair, family):
    model, tok, _ = make_pair(family)
    want = [reference(model, tok, t, x, 12) for t, x in zip(INSTRUCTIONS, INPUTS)]
    engine = ServingEngine(model, tok, K, "gist", max_batch_size=4)
    reqs = [(f"r{i}", GenerationRequest(t, x, max_tokens=12))
            for i, (t, x) in enumerate(zip(INSTRUCTIONS, INPUTS))]
    got, _ = run(engine, {0: reqs[:2], 1: reqs[2:]}, cancel={3: "r1"})
    assert got["r1"][1] == "cancelled"
    assert [got[f"r{i}"][0] for i in (0, 2, 3)] == [want[0], want[2], want[3]]
    assert engine.counts["cancelled"] == 1 and not engine.running


def test_refusals_are_events_and_do_not_disturb_others(make_pair):
    model, tok, _ = make_pair("llama")  # 256 positions
    engine = ServingEngine(model, tok, K, "gist")
    good = GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6)
    got, events = run(engine, {0: [
        ("long", GenerationRequest(INSTRUCTIONS[0], "word " * 300, max_tokens=4)),
        ("many", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=250)),
        ("zero", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=0)),
        ("empty", GenerationRequest("  ", INPUTS[0])),
        ("ok", good)]})
    errors = {e.uid: e for e in events if e.error}
    assert set(errors) == {"long", "many", "zero", "empty"} and all(e.status == 400 for e in errors.values())
    assert errors["long"].code == errors["many"].code == "context_length_exceeded"
    assert "256 positions" in errors["many"].error and "max_tokens 250" in errors["many"].error
    assert got["ok"][0] == reference(model, tok, INSTRUCTIONS[0], INPUTS[0], 6)
    with pytest.raises(GistError, match="pos_control cannot be cached for an encoder-decoder"):
        ServingEngine(*make_pair("t5")[:2], K, "gist", mode="instruction")


def test_streamed_pieces_and_stop_strings(make_pair):
    model, tok, _ = make_pair("llama")
    full = reference(model, tok, INSTRUCTIONS[2], INPUTS[2], 16)
    engine = ServingEngine(model, tok, K, "gist")
    got, events = run(engine, {0: [("a", GenerationRequest(INSTRUCTIONS[2], INPUTS[2], max_tokens=16))]})
    pieces = [e.text for e in events if e.uid == "a"]
    assert "".join(pieces) == full and sum(bool(p) for p in pieces) > 3  # text arrives as it is made
    assert got["a"][1] == "length" and events[-1].usage["completion_tokens"] == 16
    stop = full[len(full) // 2:len(full) // 2 + 3]
    request = GenerationRequest(INSTRUCTIONS[2], INPUTS[2], max_tokens=16, stop=(stop,))
    got, events = run(engine, {0: [("s", request)]})
    assert got["s"] == (full[:full.index(stop)].rstrip(), "stop")
    assert stop not in "".join(e.text for e in events)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(make_pair):
    model, tok, _ = make_pair("llama")
    engine = ServingEngine(model, tok, K, "gist")
    sample = dict(instruction=INSTRUCTIONS[1], input=INPUTS[0], max_tokens=12, temperature=1.5)
    got, _ = run(engine, {0: [("a", GenerationRequest(**sample, seed=1)),
                              ("b", GenerationRequest(**sample, seed=1)),
                              ("c", GenerationRequest(**sample, seed=2)),
                              ("g", GenerationRequest(**sample, top_p=1e-6, seed=3))]})
    assert got["a"] == got["b"] and got["a"] != got["c"]
    assert got["g"][0] == reference(model, tok, INSTRUCTIONS[1], INPUTS[0], 12)


def test_a_literal_gist_token_in_user_text_is_text(make_pair):
    model, tok, gist_id = make_pair("llama")
    text = "cat <GIST> dog"
    assert gist_id not in encode_continuation(tok, text, False)
    engine = ServingEngine(model, tok, K, "gist")
    got, _ = run(engine, {0: [("a", GenerationRequest(INSTRUCTIONS[0] + " <GIST>", text, max_tokens=8))]})
    assert got["a"][0] == reference(model, tok, INSTRUCTIONS[0] + " <GIST>", text, 8)
    assert got["a"][0] != reference(model, tok, INSTRUCTIONS[0], text.replace("<GIST>", ""), 8)


def test_parse_bytes():
    assert parse_bytes("256MB") == 256 * 10**6 and parse_bytes("1GiB") == 2**30 and parse_bytes("0") == 0
    assert parse_bytes(" 1.5 kb") == 1500 and parse_bytes(4096) == 4096
    with pytest.raises(ValueError, match="as a size"):
        parse_bytes("lots")


@pytest.mark.parametrize("where", ["compress", "start", "step"])
def test_a_failed_step_answers_every_request_and_the_engine_goes_on(make_pair, monkeypatch, where):
    import gist_lightning.serving.engine as engine_module

    model, tok, _ = make_pair("llama")
    engine = ServingEngine(model, tok, K, "gist", max_batch_size=2)
    engine.submit("running", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=20))
    engine.step()
    # next step: a refusal, a stats question, a waiting request and one being admitted when it fails
    for uid, req in [("refused", GenerationRequest(INSTRUCTIONS[1], max_tokens=0)),
                     ("admitted", GenerationRequest(INSTRUCTIONS[1], INPUTS[1], max_tokens=5)),
                     ("waiting", GenerationRequest(INSTRUCTIONS[2], INPUTS[2], max_tokens=5))]:
        engine.submit(uid, req)
    engine.request_stats("stats")

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    if where == "compress":
        monkeypatch.setattr(engine_module, "compress", boom)
    else:
        monkeypatch.setattr(engine.backend, where, boom)
    events = engine.step()
    monkeypatch.undo()
    finals = {e.uid: e for e in events if e.done}
    assert sorted(finals) == ["admitted", "refused", "running", "stats", "waiting"]  # each answered once
    assert len([e for e in events if e.done]) == len(finals)
    assert finals["refused"].status == 400 and finals["stats"].stats is not None
    assert all(finals[u].status == 500 and "out of memory" in finals[u].error
               for u in ("admitted", "running", "waiting"))
    assert not engine.busy()
    got, _ = run(engine, {0: [("b", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6))]})
    assert got["b"][0] == reference(model, tok, INSTRUCTIONS[0], INPUTS[0], 6)
    assert torch.is_grad_enabled()  # the step's no_grad does not leak


def test_a_request_that_cannot_sample_fails_alone(make_pair):
    model, tok, _ = make_pair("llama")
    engine = ServingEngine(model, tok, K, "gist")
    got, events = run(engine, {0: [("ok", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6)),
                                   ("seed", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], temperature=1.0,
                                                              seed=10**30)),
                                   ("cold", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6,
                                                              temperature=1e-40))]})
    assert got["seed"][1].startswith("seed must be between") and got["ok"][1] == "length"
    want = reference(model, tok, INSTRUCTIONS[0], INPUTS[0], 6)
    assert got["ok"][0] == got["cold"][0] == want  # a temperature too small to divide by is greedy


def test_cancelling_a_waiting_request(make_pair):
    model, tok, _ = make_pair("llama")
    engine = ServingEngine(model, tok, K, "gist", max_batch_size=1)
    got, events = run(engine, {0: [("a", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6)),
                                   ("b", GenerationRequest(INSTRUCTIONS[1], INPUTS[1], max_tokens=6))]},
                      cancel={1: "b"})
    assert got["b"] == ("", "cancelled") and engine.counts["compressed"] == 1  # b never ran
    assert got["a"][0] == reference(model, tok, INSTRUCTIONS[0], INPUTS[0], 6)


def test_a_store_entry_of_another_model_is_made_again(make_pair, tmp_path):
    model, tok, _ = make_pair("llama")
    other, _, _ = make_pair("llama", seed=5)  # "retrained": same shape, other weights, same tokenizer
    run(ServingEngine(other, tok, K, "gist", cache_dir=str(tmp_path)),
        {0: [("a", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6))]})
    engine = ServingEngine(model, tok, K, "gist", cache_dir=str(tmp_path))
    got, events = run(engine, {0: [("b", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6))]})
    assert events[0].cache == "compressed"
    assert got["b"][0] == reference(model, tok, INSTRUCTIONS[0], INPUTS[0], 6)
    again = ServingEngine(model, tok, K, "gist", cache_dir=str(tmp_path))  # the entry was replaced
    _, events = run(again, {0: [("c", GenerationRequest(INSTRUCTIONS[0], INPUTS[0], max_tokens=6))]})
    assert events[0].cache == "disk"


@pytest.mark.parametrize("family, layout", [("qwen3", {}), ("llama", {}),  # llama: a BOS before the context
                                            ("llama", {"sink_tokens": 3, "recent_segments": 1})])
def test_long_contexts_are_compressed_once_by_segments_and_reused(make_pair, tmp_path, family, layout):
    """A model trained with model.segments serves long system prompts: one segment-by-segment
    compression per distinct context however many requests carry it (batched with contexts of other
    lengths), answers equal to the library's compress_context + generate, the usage saying how many
    context tokens went into how many cached positions, and a fresh engine reading them from disk.
    Layouts (sinks, a recent raw segment) too."""
    from gist_lightning.long_context import SegmentSettings, compress_context, encode_context
    from gist_lightning.tokens import encode_text, gist_token_id, special_frame

    model, tok, _ = make_pair(family, seed=1)
    settings = SegmentSettings(8, 2, "fine", **layout)
    contexts = [" ".join(INSTRUCTIONS * 3), " ".join(INSTRUCTIONS[::-1] * 5)]  # several segments, two lengths
    engine = ServingEngine(model, tok, 2, "gist", max_batch_size=4, segments=settings,
                           cache_dir=str(tmp_path))
    arrivals = {0: [(f"r{i}", GenerationRequest(contexts[i % 2], INPUTS[i % 4], max_tokens=6))
                    for i in range(6)]}
    got, events = run(engine, arrivals)
    assert engine.counts["compressed"] == 2  # one per distinct context
    for i in range(6):
        c, x = contexts[i % 2], INPUTS[i % 4]
        expected = generate(model, tok, compress_context(model, tok, [c], settings), [x], max_new_tokens=6)[0]
        assert got[f"r{i}"][0] == expected
    last = {e.uid: e for e in events if e.usage}
    if family == "llama":
        assert special_frame(tok)[0]  # the start tokens are not the context's
    for i in range(2):
        n = len(encode_text(tok, contexts[i]))
        held = settings.cached_positions(encode_context(tok, contexts[i], settings, gist_token_id(tok)),
                                         gist_token_id(tok))
        assert held == (-(-n // 8) * 2 if not layout else -(-n // 8) * 2 + 3 + n - (-(-n // 8) - 1) * 8)
        assert last[f"r{i}"].usage["compression"] == {"instruction_tokens": n, "cached_positions": held}
    fresh = ServingEngine(model, tok, 2, "gist", segments=settings, cache_dir=str(tmp_path))
    again, events = run(fresh, {0: [("b", GenerationRequest(contexts[1], INPUTS[1], max_tokens=6))]})
    assert fresh.counts["disk_hits"] == 1 and fresh.counts["compressed"] == 0
    assert again["b"][0] == got["r1"][0]
    # an engine of short instructions on the same folder does not take these entries
    short = ServingEngine(model, tok, 2, "gist", cache_dir=str(tmp_path))
    run(short, {0: [("c", GenerationRequest(contexts[1], INPUTS[1], max_tokens=2))]})
    assert short.counts["disk_hits"] == 0 and short.counts["compressed"] == 1


@pytest.mark.slow
def test_compiled_engine_answers_alike_and_joins_and_leaves_reuse_its_graphs(make_pair):
    """compile=True (CPU: inductor, fp32): the staggered stream (rows joining a running batch and
    leaving it) answers as the eager engine; served again, it adds no compiled graph: the buckets of
    rows and columns seen once are reused."""
    from torch._dynamo.utils import counters

    model, tok, _ = make_pair("llama", "sdpa", seed=0)
    eager, _ = run(ServingEngine(model, tok, K, "gist", max_batch_size=3), staggered())
    compiled, _ = run(ServingEngine(model, tok, K, "gist", max_batch_size=3, compile=True), staggered())
    assert compiled == eager
    graphs = counters["stats"]["unique_graphs"]
    again, _ = run(ServingEngine(model, tok, K, "gist", max_batch_size=3, compile=True), staggered())
    assert again == eager and counters["stats"]["unique_graphs"] == graphs


def test_a_long_context_is_compressed_a_segment_per_step_while_others_decode(make_pair):
    """Chunked prefill: a request bringing a long context (many segments) arrives while another
    streams; the running one gets a token at every step while the document is compressed, one
    segment per step (its first token comes after as many steps as it has segments), and both answers
    equal the library's compress_context + generate."""
    from gist_lightning.long_context import SegmentSettings, compress_context, encode_context
    from gist_lightning.tokens import gist_token_id

    model, tok, _ = make_pair("llama", seed=1)
    settings = SegmentSettings(8, 2, "fine")
    short, long = INSTRUCTIONS[0], " ".join(INSTRUCTIONS * 4)
    n_segments = encode_context(tok, long, settings, gist_token_id(tok)).count(gist_token_id(tok)) // 2
    assert n_segments >= 10  # (the model has 256 positions)
    engine = ServingEngine(model, tok, 2, "gist", max_batch_size=4, segments=settings)
    arrivals = {0: [("a", GenerationRequest(short, INPUTS[0], max_tokens=40))],
                3: [("b", GenerationRequest(long, INPUTS[2], max_tokens=6))]}
    tokens_at: dict[str, list[int]] = {"a": [], "b": []}
    step, ended = 0, {}
    while engine.busy() or step <= 3:
        for uid, req in arrivals.get(step, []):
            engine.submit(uid, req)
        for e in engine.step():
            tokens_at[e.uid].append(step)  # one event per token taken (its text may be held back)
            if e.done:
                ended[e.uid] = e.finish_reason
        step += 1
        assert step < 200
    first_b = min(tokens_at["b"])
    assert first_b >= 3 + n_segments  # b waited for its pieces, one per step from step 4
    assert ended["a"] == "length" and max(tokens_at["a"]) > first_b  # a ran through b's compression...
    start = tokens_at["a"][0]  # ...taking a token at every step from its first, never stalled
    assert tokens_at["a"] == list(range(start, start + 40))
    assert engine.counts["compressed"] == 2
    for uid, text, x, n in (("a", short, INPUTS[0], 40), ("b", long, INPUTS[2], 6)):
        want = generate(model, tok, compress_context(model, tok, [text], settings), [x], max_new_tokens=n)[0]
        got, _ = run(ServingEngine(model, tok, 2, "gist", segments=settings),
                     {0: [(uid, GenerationRequest(text, x, max_tokens=n))]})
        assert got[uid][0] == want


def test_a_token_budget_per_step_compresses_in_fewer_larger_pieces(make_pair):
    """prefill_tokens_per_step: segments until that many tokens per step; the document's first
    token comes sooner, its answer is the same; a negative budget is refused."""
    from gist_lightning.long_context import SegmentSettings

    model, tok, _ = make_pair("llama", seed=1)
    settings = SegmentSettings(8, 2, "fine")
    doc = " ".join(INSTRUCTIONS * 4)
    firsts, answers = {}, {}
    for budget in (0, 40):
        engine = ServingEngine(model, tok, 2, "gist", segments=settings, prefill_tokens_per_step=budget)
        engine.submit("d", GenerationRequest(doc, INPUTS[0], max_tokens=4))
        step, text = 0, ""
        while engine.busy():
            for e in engine.step():
                text += e.text
                firsts.setdefault(budget, step)
            step += 1
        answers[budget] = text
    assert answers[0] == answers[40] and firsts[40] * 3 < firsts[0]
    with pytest.raises(ValueError, match="prefill_tokens_per_step must be >= 0"):
        ServingEngine(model, tok, 2, "gist", segments=settings, prefill_tokens_per_step=-1)
