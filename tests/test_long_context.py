"""Long contexts compressed segment by segment: the cache equals the single masked full forward
over the whole prompt for every decoder family, both placements, left padding and contexts of
different lengths; it holds the gists only, and compression never holds more than the gists plus
one segment; bad settings are refused with the numbers."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from conftest import TINY_LLAMA

from gist_lightning import generate
from gist_lightning.caching import continuation_logits
from gist_lightning.errors import ContextLengthError
from gist_lightning.long_context import SegmentSettings, compress_context, encode_context, masked_forward
from gist_lightning.padding import pad_batch
from gist_lightning.templates import encode_continuation
from gist_lightning.tokens import gist_token_id

TOLERANCE = 1e-5
CONTEXTS = [  # contexts of several segments of 8 tokens, of different lengths (the tiny windows are 8)
    "the code of amber is 4417 and the code of blue is 9",
    "apple banana cherry dog egg fig grape and the code of amber is 4417 while cats sleep all day long",
    "Write a haiku about autumn leaves and rain. Translate this sentence into French. count the words, sort "
    "them, put cat first, remove every dog",
]
QUESTIONS = ["what is the code of amber?", "which fruit?", "sort them"]


def _full_and_cached(model, tok, gist_id, settings, condition, rows=3):
    contexts, questions = CONTEXTS[:rows], QUESTIONS[:rows]
    prefixes = [encode_context(tok, c, settings, gist_id) for c in contexts]
    conts = [encode_continuation(tok, q, False) for q in questions]
    ids, mask = pad_batch([p + c for p, c in zip(prefixes, conts)], tok.pad_token_id, "left")
    with torch.no_grad():
        full = masked_forward(model, ids, mask, gist_id, settings, condition).logits
    cache = compress_context(model, tok, contexts, settings, condition)
    q_ids, q_mask = pad_batch(conts, tok.pad_token_id, "left")
    cached = continuation_logits(model, cache, q_ids, q_mask).logits
    diffs = [(full[b, -len(c):] - cached[b, -len(c):]).abs().max().item() for b, c in enumerate(conts)]
    return max(diffs), cache, prefixes


@pytest.mark.parametrize("placement", ["coarse", "fine"])
@pytest.mark.parametrize("condition", ["gist", "pos_control", "neg_control"])
def test_the_segment_cache_equals_the_masked_full_forward(make_pair, family, placement, condition):
    model, tok, gist_id = make_pair(family, "eager")
    if model.config.is_encoder_decoder:
        with pytest.raises(ValueError, match="decoder-only"):
            compress_context(model, tok, CONTEXTS[:1], SegmentSettings(8, 2, placement))
        return
    settings = SegmentSettings(segment_tokens=8, gists_per_segment=2, placement=placement)
    diff, cache, prefixes = _full_and_cached(model, tok, gist_id, settings, condition)
    assert diff <= TOLERANCE, f"{family}/{placement}/{condition}: max abs diff {diff:.1e}"
    gists = [sum(t == gist_id for t in p) for p in prefixes]
    assert len(set(gists)) >= 2 and min(gists) >= 4  # several segments, rows of different lengths
    held = cache.valid.sum(-1).tolist()
    want = {"gist": gists, "neg_control": [0, 0, 0], "pos_control": [len(p) for p in prefixes]}[condition]
    assert held == want
    if condition == "gist":  # one segment at a time: the gists plus one segment, never the context
        assert (cache.meta["peak_positions"]
                <= max(gists) + settings.segment_tokens + settings.gists_per_segment + 1)
        assert cache.meta["peak_positions"] < max(len(p) for p in prefixes)


LAYOUT = dict(sink_tokens=3, recent_segments=1)  # UniGist-style: sinks and a window of raw segments


@pytest.mark.parametrize("placement", ["coarse", "fine"])
def test_sinks_and_recent_segments_keep_exactly_what_the_rule_lets_through(make_pair, family, placement):
    """Layouts: the cache compressed segment by segment, keeping the sinks, every gist and the raw
    tokens of the last segment, equals the masked full forward; it holds what the rule lets the
    question see (SegmentSettings.cached_positions), and compression never holds more than sinks +
    gists + the recent segments + one segment."""
    model, tok, gist_id = make_pair(family, "eager")
    if model.config.is_encoder_decoder:
        pytest.skip("T5-style models gist no long contexts (refused: test_the_segment_cache_equals_...)")
    settings = SegmentSettings(segment_tokens=8, gists_per_segment=2, placement=placement, **LAYOUT)
    diff, cache, prefixes = _full_and_cached(model, tok, gist_id, settings, "gist")
    assert diff <= TOLERANCE, f"{family}/{placement}: max abs diff {diff:.1e}"
    held = cache.valid.sum(-1).tolist()
    gists = [sum(t == gist_id for t in p) for p in prefixes]
    assert held == [settings.cached_positions(p, gist_id) for p in prefixes]
    assert all(h > g for h, g in zip(held, gists))  # sinks and raw tokens beside the gists
    unit = settings.segment_tokens + settings.gists_per_segment
    specials = len(prefixes[0]) - len(tok(CONTEXTS[0], add_special_tokens=False).input_ids) - gists[0]
    bound = settings.sink_tokens + max(gists) + (settings.recent_segments + 1) * unit + specials
    assert cache.meta["peak_positions"] <= bound < max(len(p) for p in prefixes)
    plain = _full_and_cached(model, tok, gist_id, SegmentSettings(8, 2, placement), "gist")[1]
    assert not torch.allclose(cache.states[-1][0][:, :, -1], plain.states[-1][0][:, :, -1])  # it matters


def test_compression_refuses_to_keep_more_than_the_layouts_bound(make_pair, monkeypatch):
    """The bound (sinks + gists + the last raw segments) is checked as each segment is compressed:
    a cache over it is an error, never a silent memory blow-up (here the bound is made too small)."""
    from gist_lightning.long_context import ContextCompression

    model, tok, gist_id = make_pair("llama", "eager")
    settings = SegmentSettings(segment_tokens=8, gists_per_segment=2, **LAYOUT)
    compress_context(model, tok, CONTEXTS[:2], settings)  # within the bound
    init = ContextCompression.__init__

    def narrower(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.widest_raw = 0  # (the last raw segment kept, as if none were)

    monkeypatch.setattr(ContextCompression, "__init__", narrower)
    with pytest.raises(RuntimeError, match=r"segment 0: the cache keeps \d+ positions, over the layout"):
        compress_context(model, tok, CONTEXTS[:2], settings)


def test_a_window_of_segments_and_generation_from_the_cache(make_pair):
    """With window=1 a segment sees only the previous segment's gists: still exact; and greedy
    generation from the cache runs as from any gist cache. The windowed cache differs from the
    unwindowed one (the window matters)."""
    model, tok, gist_id = make_pair("llama", "eager", seed=1)
    windowed = SegmentSettings(segment_tokens=8, gists_per_segment=2, window=1)
    diff, cache, _ = _full_and_cached(model, tok, gist_id, windowed, "gist")
    assert diff <= TOLERANCE
    _, full_cache, _ = _full_and_cached(model, tok, gist_id, SegmentSettings(8, 2), "gist")
    assert not torch.allclose(cache.states[-1][0], full_cache.states[-1][0])
    out = generate(model, tok, cache, QUESTIONS, max_new_tokens=4)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)


@pytest.mark.parametrize("settings, match", [
    (dict(segment_tokens=2, gists_per_segment=4), "at least"),
    (dict(segment_tokens=6, gists_per_segment=4, placement="fine"), "multiple"),
    (dict(segment_tokens=8, gists_per_segment=2, window=0), "window"),
    (dict(segment_tokens=8, gists_per_segment=2, sink_tokens=8),
     "sink_tokens \\(8\\) must be >= 0 and leave room"),
    (dict(segment_tokens=8, gists_per_segment=2, recent_segments=-1), "recent_segments must be >= 0"),
    (dict(segment_tokens=8, gists_per_segment=2, sink_tokens=2, compact_positions=True),
     "cannot be combined with sink_tokens or recent_segments"),
    (dict(segment_tokens=32, gists_per_segment=8, train_ratios=(2, 3)),
     "ratio 3 does not divide segment_tokens 32"),
    (dict(segment_tokens=32, gists_per_segment=8, train_ratios=(64,)),
     "ratio 64 does not divide segment_tokens 32"),
])
def test_bad_settings_are_refused_with_the_numbers(settings, match):
    with pytest.raises(ValueError, match=match):
        SegmentSettings(**settings)


def test_a_ratio_that_does_not_divide_the_segment_is_refused_when_run_at():
    settings = SegmentSettings(32, 8, "fine", train_ratios=(2, 4))
    assert settings.at_ratio(16).gists_per_segment == 2 and settings.most_gists == 16
    with pytest.raises(ValueError, match="ratio 5 does not divide segment_tokens 32"):
        settings.at_ratio(5)


def test_contexts_too_long_are_refused_never_truncated(make_pair):
    model, tok, gist_id = make_pair("llama", "eager")
    with pytest.raises(ContextLengthError, match="max_context_tokens 5"):
        compress_context(model, tok, CONTEXTS[:1], SegmentSettings(8, 2, max_context_tokens=5))
    positions = model.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match=f"model's {positions} positions"):
        compress_context(model, tok, ["word " * positions], SegmentSettings(8, 2))


def test_packed_rows_train_as_their_examples_alone(make_pair):
    """Training with data.packing: two segmented examples in one row give each its logits alone."""
    model, tok, gist_id = make_pair("qwen3", "eager")  # sliding layers too
    settings = SegmentSettings(8, 2, "fine")
    examples = [encode_context(tok, c, settings, gist_id) + encode_continuation(tok, q, False)
                for c, q in zip(CONTEXTS[:2], QUESTIONS[:2])]
    packed = torch.tensor([examples[0] + examples[1]])
    seg = torch.tensor([[1] * len(examples[0]) + [2] * len(examples[1])])
    with torch.no_grad():
        together = masked_forward(model, packed, None, gist_id, settings, segment_ids=seg).logits[0]
        start = 0
        for ex in examples:
            ids = torch.tensor([ex])
            alone = masked_forward(model, ids, torch.ones_like(ids), gist_id, settings).logits[0]
            assert (together[start:start + len(ex)] - alone).abs().max() <= TOLERANCE
            start += len(ex)


@pytest.mark.slow
def test_a_segment_model_trains_validates_through_segment_caches_and_exports(tmp_path, monkeypatch):
    """configs/tiny-long.yaml, shrunk: fit with the segment mask, validation answering from caches
    compressed one segment at a time, an export that records the segment settings and reloads to
    answer from a fresh compress_context as validation did."""
    import csv
    from pathlib import Path

    from gist_lightning.cli import cli_main
    from gist_lightning.evaluation.callbacks import ExportBest
    from gist_lightning.export import load_pretrained

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(root / "configs" / "tiny.yaml"),
                    "--config", str(root / "configs" / "tiny-long.yaml"), "--trainer.max_steps", "6",
                    "--trainer.val_check_interval", "6", "--trainer.enable_progress_bar", "false",
                    "--model.model_config", '{"model_type": "llama", "hidden_size": 32, '
                    '"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
                    '"num_key_value_heads": 2, "max_position_embeddings": 2048}', "--data.train_size", "48",
                    "--data.validation_size", "6", "--data.eval_batch_size", "3",
                    "--data.context_words", "[60, 90]", "--data.cache_dir", str(tmp_path / "cache"),
                    "--model.max_new_tokens", "4"])
    export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportBest)).path
    model, tok, settings = load_pretrained(export)
    assert settings["segments"] == {"segment_tokens": 32, "gists_per_segment": 4, "placement": "fine",
                                    "window": None, "max_context_tokens": None, "train_ratios": None,
                                    "compact_positions": False, "sink_tokens": 0, "recent_segments": 0}
    run = Path(cli.trainer.log_dir)
    [seen] = (run / "predictions").glob("*-validation_seen.csv")
    rows = list(csv.DictReader(open(seen)))
    assert len(rows) == 6
    # the exported model answers the first validation context as validation did, from a fresh cache
    from gist_lightning.data.records import load_records

    first = load_records(cli.datamodule.split_path("validation_seen"))[0]
    cache = compress_context(model, tok, [first["instruction"]], SegmentSettings(**settings["segments"]))
    assert generate(model, tok, cache, [first["input"]], max_new_tokens=4)[0] == rows[0]["y_pred"]
    # the compression statistics count what the segment caches hold (every segment's gists), not k
    import json

    from gist_lightning.long_context import encode_context
    from gist_lightning.tokens import gist_token_id

    gist = gist_token_id(tok)
    encoded = [encode_context(tok, r["instruction"], SegmentSettings(**settings["segments"]), gist)
               for r in load_records(cli.datamodule.split_path("validation_seen"))]
    held = [row.count(gist) for row in encoded]
    assert len(set(held)) > 1  # contexts of several lengths, so of several segment counts
    [stats_file] = (run / "predictions").glob("*-compression.json")
    stats = json.loads(stats_file.read_text())["validation_seen"]
    tokens = sum(len(row) - n for row, n in zip(encoded, held)) / len(held)
    assert stats["cached_positions_mean"] == pytest.approx(sum(held) / len(held))
    assert stats["instruction_tokens_mean"] == pytest.approx(tokens)
    assert stats["compression_ratio"] == pytest.approx(tokens / (sum(held) / len(held)))
    assert stats["gist_cache_bytes"] == pytest.approx(stats["cached_positions_mean"] * cache.nbytes()
                                                      / int(cache.valid.sum()))


@pytest.mark.slow
def test_compression_statistics_count_a_layouts_sinks_and_window(tmp_path, monkeypatch):
    """With sinks and the last raw segment kept, the statistics count every position the cache holds
    (sinks, gists, window), as a cache compressed afresh from the export holds, record by record."""
    import json
    from pathlib import Path

    from gist_lightning.cli import cli_main
    from gist_lightning.data.records import load_records
    from gist_lightning.evaluation.callbacks import ExportBest
    from gist_lightning.export import load_pretrained

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(root / "configs" / "tiny.yaml"),
                    "--config", str(root / "configs" / "tiny-long.yaml"), "--trainer.max_steps", "2",
                    "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
                    "--model.model_config", json.dumps({**TINY_LLAMA, "max_position_embeddings": 2048}),
                    "--model.segments.sink_tokens", "4", "--model.segments.recent_segments", "1",
                    "--data.train_size", "12", "--data.validation_size", "6", "--data.eval_batch_size", "3",
                    "--data.context_words", "[40, 90]", "--data.cache_dir", str(tmp_path / "cache"),
                    "--model.max_new_tokens", "2"])
    model, tok, settings = load_pretrained(next(c for c in cli.trainer.callbacks
                                                if isinstance(c, ExportBest)).path)
    layout = SegmentSettings(**settings["segments"])
    assert (layout.sink_tokens, layout.recent_segments) == (4, 1)
    records = load_records(cli.datamodule.split_path("validation_seen"))
    held = [int(compress_context(model, tok, [r["instruction"]], layout).valid.sum()) for r in records]
    gists = [encode_context(tok, r["instruction"], layout, gist_token_id(tok)).count(gist_token_id(tok))
             for r in records]
    assert len(set(held)) > 1 and all(h >= g + 4 for h, g in zip(held, gists))  # sinks and window counted
    [stats_file] = (Path(cli.trainer.log_dir) / "predictions").glob("*-compression.json")
    stats = json.loads(stats_file.read_text())["validation_seen"]
    assert stats["cached_positions_mean"] == pytest.approx(sum(held) / len(held))


def test_segment_settings_must_agree_with_k():
    from gist_lightning.module import GistLitModule

    with pytest.raises(ValueError, match=r"num_gist_tokens \(1\) must equal "
                                         r"model.segments.gists_per_segment \(4\)"):
        GistLitModule(model_config={"model_type": "llama"},
                      segments={"segment_tokens": 32, "gists_per_segment": 4})


def _segment_export(make_pair, tmp_path, settings):
    from gist_lightning.export import export_pretrained

    model, tok, gist_id = make_pair("llama", seed=0)
    export_pretrained(model, tok, tmp_path / "m", num_gist_tokens=settings.gists_per_segment,
                      condition="gist", segments=asdict(settings))
    return model, tok, gist_id


def test_cache_files_and_the_store_keep_contexts_and_refuse_other_segment_settings(make_pair, tmp_path):
    """A context cache saved and loaded answers alike (same logits); a store of contexts compresses
    once and reuses; a file or store made with other segment settings is refused with the numbers."""
    from gist_lightning.prompt_cache import CacheMismatchError, CacheStore, load_cache, save_cache

    model, tok, gist_id = make_pair("llama", seed=0)
    settings, other = SegmentSettings(8, 2, "fine"), SegmentSettings(8, 4, "fine")
    cache = compress_context(model, tok, [CONTEXTS[1]], settings)
    save_cache(cache, tmp_path / "c.safetensors", model, tok, [CONTEXTS[1]])
    loaded = load_cache(tmp_path / "c.safetensors", model, tok, 2, segments=asdict(settings))
    q_ids, q_mask = pad_batch([encode_continuation(tok, QUESTIONS[0], False)], tok.pad_token_id, "left")
    assert torch.equal(continuation_logits(model, cache, q_ids, q_mask).logits,
                       continuation_logits(model, loaded, q_ids, q_mask).logits)
    with pytest.raises(CacheMismatchError, match="segments of 8 tokens with 2 fine gists each, the model "
                                                 "runs segments of 8 tokens with 4 fine gists each"):
        load_cache(tmp_path / "c.safetensors", model, tok, 2, segments=asdict(other))
    with pytest.raises(CacheMismatchError, match="the model runs a short instruction's gists"):
        load_cache(tmp_path / "c.safetensors", model, tok, 2, segments=None)

    store = CacheStore(tmp_path / "store", model, tok, 2, segments=settings)
    first = store.get_or_add(CONTEXTS[2])
    assert store.list() == [CONTEXTS[2]] and first.meta["segments"]["gists_per_segment"] == 2
    again = store.get_or_add(CONTEXTS[2])
    direct = compress_context(model, tok, [CONTEXTS[2]], settings)
    for (k1, v1), (k2, v2) in zip(again.states, direct.states):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # another layout in the same folder is another entry, never the first one's gists
    assert CacheStore(tmp_path / "store", model, tok, 2,
                      segments=SegmentSettings(8, 2, "coarse")).list() == []
    assert CacheStore(tmp_path / "store", model, tok, 2,
                      segments=SegmentSettings(8, 2, "fine", compact_positions=True)).list() == []
    # layouts: a file and a store entry of sinks and recent segments are theirs alone
    layout = SegmentSettings(8, 2, "fine", **LAYOUT)
    for other in (SegmentSettings(8, 2, "fine", sink_tokens=3),
                  SegmentSettings(8, 2, "fine", recent_segments=1)):
        assert CacheStore(tmp_path / "store", model, tok, 2, segments=other).list() == []
    with pytest.raises(CacheMismatchError, match="it holds segments of 8 tokens with 2 fine gists each, the "
                                                 "model runs .* each, sink tokens 3, recent segments 1"):
        load_cache(tmp_path / "c.safetensors", model, tok, 2, segments=asdict(layout))
    layered = CacheStore(tmp_path / "store", model, tok, 2, segments=layout).get_or_add(CONTEXTS[2])
    direct = compress_context(model, tok, [CONTEXTS[2]], layout)
    assert torch.equal(layered.valid, direct.valid) and layered.length > first.length
    assert CacheStore(tmp_path / "store", model, tok, 2, segments=layout).list() == [CONTEXTS[2]]


def test_compress_and_generate_commands_take_a_context_file(make_pair, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    settings = SegmentSettings(8, 2, "fine")
    model, tok, _ = _segment_export(make_pair, tmp_path, settings)
    context = tmp_path / "doc.txt"
    context.write_text(CONTEXTS[2] + "\n")
    bin_ = str(Path(sys.executable).parent / "gist-lightning")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([bin_, "compress", "--model", str(tmp_path / "m"), "--context", str(context),
                          "--out", str(tmp_path / "c.safetensors"), "--input", QUESTIONS[2],
                          "--max_new_tokens", "4"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    n_tokens = len(tok(CONTEXTS[2], add_special_tokens=False)["input_ids"])
    positions = -(-n_tokens // 8) * 2  # two gists per started segment of 8
    assert f"{n_tokens} tokens -> {positions} cached position(s)" in out.stdout
    expected = generate(model, tok, compress_context(model, tok, [CONTEXTS[2]], settings), [QUESTIONS[2]],
                        max_new_tokens=4)[0]
    assert out.stdout.strip().splitlines()[-1] == f"{QUESTIONS[2]}\t{expected}"
    gen = subprocess.run([bin_, "generate", "--model", str(tmp_path / "m"),
                          "--cache", str(tmp_path / "c.safetensors"), "--input", QUESTIONS[2],
                          "--max_new_tokens", "4"], capture_output=True, text=True, env=env)
    assert gen.returncode == 0 and gen.stdout.strip() == f"{QUESTIONS[2]}\t{expected}", gen.stderr[-2000:]
    # a short-instruction command on this model, and an existing --out, are refused in one line
    bad = subprocess.run([bin_, "compress", "--model", str(tmp_path / "m"), "--instruction", "x"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "pass the text as --context FILE" in bad.stderr
    again = subprocess.run([bin_, "compress", "--model", str(tmp_path / "m"), "--context", str(context),
                            "--out", str(tmp_path / "c.safetensors")],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "exists; refusing to overwrite" in again.stderr


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "mistral", "gpt_neox"])
@pytest.mark.parametrize("placement", ["coarse", "fine"])
def test_compacted_positions_fit_contexts_longer_than_the_model_and_stay_exact(make_pair, family, placement):
    """segments.compact_positions: a context of more tokens than the model has positions is
    compressed segment by segment, and the question's logits equal the masked full forward with the
    same compacted positions; without the option the same context is refused with the numbers."""
    from gist_lightning.masks import compact_position_ids

    model, tok, gist_id = make_pair(family, "eager", max_position_embeddings=40)
    settings = SegmentSettings(8, 2, placement, compact_positions=True)
    prefixes = [encode_context(tok, c, settings, gist_id) for c in CONTEXTS]
    assert max(len(p) for p in prefixes) > 40  # longer than the model's positions
    diff, cache, _ = _full_and_cached(model, tok, gist_id, settings, "gist")
    assert diff <= TOLERANCE, f"{family}/{placement}: max abs diff {diff:.1e}"
    gists = [p.count(gist_id) for p in prefixes]
    assert cache.next_position.tolist() == gists  # what follows starts after the gists
    ids = torch.tensor([prefixes[2]])
    positions = compact_position_ids(ids, torch.ones_like(ids), gist_id, 2)[0].tolist()
    # the earlier segments' gists, then one segment of 8 raw tokens and its 2 gists (BOS: in segment 0 only)
    assert max(positions) < gists[2] + 8 < len(prefixes[2]) and positions[:3] == [0, 1, 2]
    with pytest.raises(ContextLengthError, match="compact_positions"):
        compress_context(model, tok, CONTEXTS, SegmentSettings(8, 2, placement))


@pytest.mark.slow
@pytest.mark.parametrize("condition, layout", [("gist", LAYOUT), ("pos_control", {})])
def test_under_flex_the_segment_rule_gives_the_dense_logits_and_exact_caches(make_pair, require_attention,
                                                                            family, condition, layout):
    """FlexAttention BlockMasks built from the segment rule (masks.long_context_mask_mod, sliding
    layers included; under gist with sinks and a recent segment) give the dense mask's logits, and
    the segment-by-segment cache of a model under flex equals its flex full forward (compiles per
    shape on first use, cached on disk)."""
    model, tok, gist_id = make_pair(family, seed=3)
    if model.config.is_encoder_decoder:
        pytest.skip("T5-style models gist no long contexts (refused: test_the_segment_cache_equals_...)")
    require_attention(family, "flex_attention")
    settings = SegmentSettings(8, 2, "fine", **layout)
    dense_diff, _, prefixes = _full_and_cached(model, tok, gist_id, settings, condition)
    conts = [encode_continuation(tok, q, False) for q in QUESTIONS]
    ids, mask = pad_batch([p + c for p, c in zip(prefixes, conts)], tok.pad_token_id, "left")
    with torch.no_grad():
        dense = masked_forward(model, ids, mask, gist_id, settings, condition).logits
        model.set_attn_implementation("flex_attention")
        flex = masked_forward(model, ids, mask, gist_id, settings, condition).logits
    real = mask.bool()
    assert (flex - dense)[real].abs().max().item() <= TOLERANCE, family
    flex_diff, _, _ = _full_and_cached(model, tok, gist_id, settings, condition)
    assert model.config._attn_implementation == "flex_attention"  # compression switched back
    assert max(dense_diff, flex_diff) <= TOLERANCE, (family, dense_diff, flex_diff)
