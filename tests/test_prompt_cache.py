"""Caches on disk: round trips, refusals, a store under concurrent writers and crashes, a store at a URL."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys

import pytest
import torch

from gist_lightning import caching, compress
from gist_lightning.errors import GistError
from gist_lightning.export import export_pretrained, load_pretrained
from gist_lightning.padding import pad_batch
from gist_lightning.prompt_cache import CacheMismatchError, CacheStore, check_location, load_cache, save_cache
from gist_lightning.templates import encode_continuation

INSTRUCTIONS = ["reverse the list of words", "put cat first and remove every dog from the list please"]
INPUTS = ["apple banana cherry", "dog egg fig grape apple"]


def _logits(model, tok, cache):
    rows = [encode_continuation(tok, x, cache.encoder_decoder) for x in INPUTS]
    ids, mask = pad_batch(rows, tok.pad_token_id, "right" if cache.encoder_decoder else "left")
    kwargs = {"decoder_input_ids": torch.zeros((2, 1), dtype=torch.long)} if cache.encoder_decoder else {}
    return caching.continuation_logits(model, cache, ids, mask, **kwargs).logits


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_save_load_round_trip_gives_identical_logits(make_pair, tmp_path, family):
    model, tok, _ = make_pair(family)
    cache = compress(model, tok, INSTRUCTIONS, 2)
    path = save_cache(cache, tmp_path / "c.safetensors", model, tok, INSTRUCTIONS)
    loaded = load_cache(path, model, tok, num_gist_tokens=2)
    assert loaded.meta["instructions"] == INSTRUCTIONS and loaded.length == cache.length
    assert torch.equal(_logits(model, tok, cache), _logits(model, tok, loaded))


def test_a_cache_file_of_version_0_1_still_loads(make_pair, tmp_path):
    """0.1 files named the architecture (``encoder_decoder``) where files now name the backend."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, tok, _ = make_pair("t5")
    cache = compress(model, tok, INSTRUCTIONS, 2)
    path = save_cache(cache, tmp_path / "new.safetensors", model, tok, INSTRUCTIONS)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    from gist_lightning.tokens import tokenizer_fingerprint

    # 0.1 named the architecture, not the backend, and fingerprinted the tokenizer without its framing
    old = {k: v for k, v in meta.items() if k != "backend"} | {
        "encoder_decoder": "True", "tokenizer_fingerprint": tokenizer_fingerprint(tok, framing=False)}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=old)
    loaded = load_cache(tmp_path / "old.safetensors", model, tok)
    assert loaded.backend == "t5_encoder" and torch.equal(_logits(model, tok, cache),
                                                          _logits(model, tok, loaded))


def test_a_mismatched_model_tokenizer_k_or_dtype_is_refused(make_pair, tmp_path):
    model, tok, _ = make_pair("llama", seed=0)
    path = save_cache(compress(model, tok, INSTRUCTIONS, 1), tmp_path / "c.safetensors", model, tok)
    other_model, _, _ = make_pair("llama", seed=1)  # same architecture, other weights
    with pytest.raises(CacheMismatchError, match="different model"):
        load_cache(path, other_model, tok)
    tok.add_tokens(["zebra"])
    with pytest.raises(CacheMismatchError, match="different tokenizer"):
        load_cache(path, model, tok)
    model2, tok2, _ = make_pair("llama", seed=0)
    with pytest.raises(CacheMismatchError, match="k=1, asked for k=3"):
        load_cache(path, model2, tok2, num_gist_tokens=3)
    with pytest.raises(CacheMismatchError, match="different (model|dtype)"):
        load_cache(path, model2.to(torch.float64), tok2)


def test_two_models_on_one_store_each_read_their_own_entries(make_pair, tmp_path):
    """Entries are named by the model's fingerprint too: a second model adding the same instruction
    writes an entry of its own instead of replacing the first model's."""
    a, tok, _ = make_pair("llama", seed=0)
    b, _, _ = make_pair("llama", seed=1)  # same architecture and tokenizer, other weights
    store_a, store_b = CacheStore(tmp_path, a, tok, 1, frozen=True), CacheStore(tmp_path, b, tok, 1)
    store_a.add(INSTRUCTIONS[0])
    assert INSTRUCTIONS[0] not in store_b and store_b.list() == []
    store_b.add(INSTRUCTIONS[0])
    store_b.add(INSTRUCTIONS[1])
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert store_a.list() == [INSTRUCTIONS[0]] and sorted(store_b.list()) == sorted(INSTRUCTIONS)
    for store, model in [(store_a, a), (store_b, b)]:  # each reads what it made, not the other's
        assert torch.equal(store.get(INSTRUCTIONS[0]).states[0][0],
                           compress(model, tok, [INSTRUCTIONS[0]], 1).states[0][0])
    # nor does one model under another dtype, k or condition read them
    assert CacheStore(tmp_path, make_pair("llama", seed=0)[0].to(torch.float64), tok, 1).list() == []
    assert CacheStore(tmp_path, a, tok, 2).list() == []
    assert CacheStore(tmp_path, a, tok, 1, "neg_control").list() == []


def test_store_entries_of_format_1_are_recognised_and_never_read(make_pair, tmp_path, caplog):
    """Format 1 named an entry by instruction, k and condition only. Such an entry is not found under
    the new names (whichever model wrote it), is listed apart, and still loads as a file."""
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model, tok, _ = make_pair("llama", seed=0)
    other, _, _ = make_pair("llama", seed=1)
    new = save_cache(compress(other, tok, [INSTRUCTIONS[0]], 1), tmp_path / "x.safetensors", other, tok,
                     [INSTRUCTIONS[0]])
    with safe_open(str(new), framework="pt") as f:
        meta, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    old_name = hashlib.sha256(json.dumps([INSTRUCTIONS[0], 1, "gist"]).encode()).hexdigest()[:32]
    old = tmp_path / "store" / f"{old_name}.safetensors"
    old.parent.mkdir()
    save_file(tensors, str(old), metadata={**meta, "format": "gist-lightning-cache/1"})
    new.unlink()

    store = CacheStore(tmp_path / "store", model, tok, 1)
    assert INSTRUCTIONS[0] not in store and store.list() == [] and store.older == [old]
    assert "1 entries of an older format are not used" in caplog.text
    fresh = store.get_or_add(INSTRUCTIONS[0])  # made again, beside the old entry, which is left as it was
    assert torch.equal(fresh.states[0][0], compress(model, tok, [INSTRUCTIONS[0]], 1).states[0][0])
    assert store.list() == [INSTRUCTIONS[0]] and store.older == [old] and len(list(old.parent.iterdir())) == 2
    assert load_cache(old, other, tok, 1).meta["instructions"] == [INSTRUCTIONS[0]]


@pytest.fixture
def saved_llama(make_pair, tmp_path):
    """A tiny LLaMA saved as an export folder, so that other processes load the same model."""
    model, tok, _ = make_pair("llama", seed=0)
    return export_pretrained(model, tok, tmp_path / "model", num_gist_tokens=1, condition="gist")


def _writer(model_dir, folder, worker, n):
    model, tok, _ = load_pretrained(model_dir)
    store = CacheStore(folder, model, tok, num_gist_tokens=1)
    for i in range(n):
        store.add(f"shared instruction {i % 3}")  # both workers write these keys
        store.add(f"instruction {worker}-{i}")


@pytest.mark.slow
def test_store_with_two_concurrent_writers_and_a_crashed_one(saved_llama, tmp_path):
    folder = tmp_path / "store"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(saved_llama, folder, w, 6)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    # a writer that dies half-way leaves only a temporary file behind
    (folder / ".deadbeef.safetensors.123.tmp").write_bytes(b"\x00" * 100)
    model, tok, _ = load_pretrained(saved_llama)
    store = CacheStore(folder, model, tok, num_gist_tokens=1)
    listed = store.list()
    assert sorted(listed) == sorted({f"shared instruction {i}" for i in range(3)}
                                    | {f"instruction {w}-{i}" for w in range(2) for i in range(6)})
    fresh = compress(model, tok, ["instruction 1-4"], 1)
    assert torch.equal(store.get("instruction 1-4").states[0][0], fresh.states[0][0])
    assert store.delete("instruction 1-4") and "instruction 1-4" not in store
    with pytest.raises(KeyError, match="no cache for instruction"):
        store.get("instruction 1-4")


def test_killed_writer_never_leaves_a_half_file(saved_llama, tmp_path):
    """Kill a process inside the write (after the bytes, before the rename): the store stays readable."""
    script = f"""
import os
import gist_lightning.files as files
from gist_lightning.export import load_pretrained
from gist_lightning.prompt_cache import CacheStore
model, tok, _ = load_pretrained({str(saved_llama)!r})
store = CacheStore({str(tmp_path / 'store')!r}, model, tok, 1)
store.add("kept")
files.os.replace = lambda *a: os._exit(9)   # die between writing and renaming
store.add("lost")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    model, tok, _ = load_pretrained(saved_llama)
    store = CacheStore(tmp_path / "store", model, tok, 1)
    assert store.list() == ["kept"] and "lost" not in store
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "store").iterdir())


# -- a store at an fsspec URL (in-process memory filesystem; S3 in test_serving_scaleout) ----------

def test_a_store_at_a_url_sees_entries_another_writer_added_after_it_opened(make_pair):
    import fsspec

    model, tok, _ = make_pair("llama")
    url = "memory://gist-store-test"
    first, second = CacheStore(url, model, tok, 1), CacheStore(url, model, tok, 1, frozen=True)
    assert second.list() == [] and "reverse the list of words" not in second
    key = first.add("reverse the list of words")
    assert key == second.path("reverse the list of words") and key.startswith("memory://")
    assert second.list() == ["reverse the list of words"] and "reverse the list of words" in second
    assert torch.equal(_logits(model, tok, second.get("reverse the list of words").concat(
        [second.get("reverse the list of words")] * 2)),
        _logits(model, tok, compress(model, tok, ["reverse the list of words"] * 2, 1)))
    fs = fsspec.filesystem("memory")
    before = fs.cat_file(key)
    second.add("reverse the list of words")  # a second writer of the same instruction: same key, same bytes
    assert fs.cat_file(key) == before and len(fs.ls(url)) == 1
    # a damaged entry is listed as unreadable and refused when read, named by its URL
    bad = first.add("put cat first")
    fs.pipe_file(bad, fs.cat_file(bad)[:30])
    assert second.list() == ["reverse the list of words"] and second.unreadable[0][0] == bad
    with pytest.raises(GistError, match="truncated or corrupt"):
        second.get("put cat first")
    other, _, _ = make_pair("llama", seed=1)  # another model's store in the same place: its own entries
    assert "reverse the list of words" not in CacheStore(url, other, tok, 1)
    with pytest.raises(KeyError, match="no cache for instruction"):
        CacheStore(url, other, tok, 1).get("reverse the list of words")
    assert second.delete("put cat first") and not second.delete("put cat first")
    fs.rm(url, recursive=True)


def test_a_store_location_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    check_location(tmp_path / "new" / "store")  # made when missing
    assert (tmp_path / "new" / "store").is_dir() and not list((tmp_path / "new" / "store").iterdir())
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(GistError, match=r"cache store .*a-file/store: cannot write there \(") as e:
        check_location(tmp_path / "a-file" / "store")
    assert "\n" not in str(e.value)
    with pytest.raises(GistError, match="cannot write there"):
        check_location("nosuchprotocol://bucket/store")
