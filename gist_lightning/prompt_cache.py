"""Compressed instructions on disk: one safetensors file per cache, and a store of many.

A file holds a :class:`~gist_lightning.cache.GistCache` (one or more rows) plus what is
needed to check that it belongs to a model: a fingerprint of the model (config and a sample of
its weights), of the tokenizer (vocabulary and special tokens), k, the condition and the dtype.
Loading into anything else is refused with an error that says what differs.

Files are written to a temporary name in the same folder and renamed into place, so a reader
never sees half a file, a crash leaves at most a stray temporary file, and two writers of the
same key leave one complete file (the last one).

A :class:`CacheStore` may also live at an fsspec URL (``s3://bucket/prefix``, ``gs://...``,
``memory://...``), shared by server replicas on several machines: there an entry is written in one
put (an object store shows the whole object or none of it) and read in one get. A store entry is named
by what it was made from and with (:func:`store_key`: the instruction, k, the condition, the segment
settings, the model's and tokenizer's fingerprints, the dtype), so models that share a store each
read their own entries.

Format versions (``FORMAT``, recorded in every file): 1 named store entries by instruction, k,
condition (and segments) only, so two models on one store replaced each other's entries; 2 adds the
model's and tokenizer's fingerprints and the dtype to that name, and ``compact_positions`` to the
segment settings compared; 3 adds the layouts' ``sink_tokens`` and ``recent_segments`` to them.
Files of older formats still load as files; in a store they are never found under the new names and
:meth:`CacheStore.list` reports them apart (``older``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .backends import backend_named
from .cache import GistCache
from .caching import compress
from .errors import CorruptFileError, GistError
from .files import atomic_path
from .long_context import compress_context
from .tokens import tokenizer_fingerprint

FORMAT = "gist-lightning-cache/3"
# every format this version reads (see the module docstring)
READABLE = ("gist-lightning-cache/1", "gist-lightning-cache/2", FORMAT)
log = logging.getLogger(__name__)


class CacheMismatchError(GistError, ValueError):
    """A cache file made for another model, tokenizer, k, condition or dtype."""


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Config plus a strided sample of every parameter: cheap for a 7B model, and it tells two
    fine-tunes of one base model apart."""
    h = hashlib.sha256()
    h.update(model.config.to_json_string(use_diff=True).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprints(model, tokenizer) -> dict[str, str]:
    """What a cache file records of the model and tokenizer it belongs to."""
    return {"model_fingerprint": model_fingerprint(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}


def _meta(cache: GistCache, model, tokenizer, instructions: list[str] | None,
          prints: dict | None) -> dict[str, str]:
    return {
        "format": FORMAT,
        "num_gist_tokens": str(cache.num_gist_tokens),
        "condition": cache.condition,
        "backend": cache.backend,
        "dtype": str(cache.tensors()[0].dtype if cache.tensors() else model.dtype),
        "model": getattr(model.config, "_name_or_path", "") or model.config.model_type,
        **(prints or fingerprints(model, tokenizer)),
        "instructions": json.dumps(instructions or []),
        # a long context's segment settings (None: a short instruction's k gists)
        "segments": json.dumps(cache.meta.get("segments")),
    }


def _tensors(cache: GistCache) -> dict[str, torch.Tensor]:
    out = {"valid": cache.valid, "positions": cache.positions, "next_position": cache.next_position,
           **cache.ops.named_tensors(cache.states)}
    return {name: t.detach().contiguous().cpu() for name, t in out.items()}


def _serialize(cache: GistCache, model, tokenizer, instructions: list[str] | None,
               prints: dict | None) -> bytes:
    """The file's bytes, the same for the same cache in every process: safetensors writes its header's
    keys in the order of a Rust hash map (random per call), so the header is written again, sorted
    (two replicas that compress one instruction write one key with the same bytes)."""
    data = save_bytes(_tensors(cache), metadata=_meta(cache, model, tokenizer, instructions, prints))
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


def save_cache(cache: GistCache, path: str | os.PathLike, model, tokenizer,
               instructions: list[str] | None = None, prints: dict[str, str] | None = None) -> Path:
    """Write ``cache`` (with the checks its loader needs) to ``path`` (a ``.safetensors`` file);
    ``prints``: :func:`fingerprints` of model and tokenizer when the caller has them already."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(_serialize(cache, model, tokenizer, instructions, prints))
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such cache file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise CorruptFileError(f"{path}: not a readable cache file, truncated or corrupt ({e})") from None
    if meta.get("format") not in READABLE:
        raise CacheMismatchError(f"{path}: not a gist-lightning cache file (format {meta.get('format')!r})")
    return meta


def load_cache(path: str | os.PathLike, model, tokenizer, num_gist_tokens: int | None = None,
               prints: dict[str, str] | None = None, segments: dict | None | bool = False) -> GistCache:
    """Read a cache file for ``model``/``tokenizer``; refuse one made for something else
    (``prints``: their :func:`fingerprints`, when the caller has them already; ``segments``: the
    segment settings the cache must have been made with, as a dict, None for a short instruction's
    cache, False: not checked)."""
    path = Path(path)
    meta = read_metadata(path)
    _check(path, meta, model, tokenizer, num_gist_tokens, prints, segments)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device=str(model.device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no iterator)
                tensors[name] = f.get_tensor(name)
    except Exception as e:  # noqa: BLE001
        raise CorruptFileError(f"{path}: the cache file's tensors cannot be read, truncated or corrupt "
                               f"({e})") from None
    return _from_tensors(meta, tensors)


def _check(path, meta: dict, model, tokenizer, num_gist_tokens: int | None, prints: dict | None,
           segments: dict | None | bool = False) -> None:
    # files of version 0.1 (no "backend" key) hold the tokenizer's fingerprint without the framing
    current = prints if prints and "backend" in meta else {
        "model_fingerprint": prints["model_fingerprint"] if prints else model_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer, framing="backend" in meta)}
    checks = [
        ("model", meta["model_fingerprint"], current["model_fingerprint"],
         f"it was made with model {meta['model']!r}"),
        ("tokenizer", meta["tokenizer_fingerprint"], current["tokenizer_fingerprint"],
         "its vocabulary, special tokens or framing differ"),
        ("dtype", meta["dtype"], str(model.dtype),
         f"it holds {meta['dtype']}, the model runs in {model.dtype}"),
    ]
    if num_gist_tokens is not None:
        checks.append(("k", meta["num_gist_tokens"], str(num_gist_tokens),
                       f"it holds k={meta['num_gist_tokens']}, asked for k={num_gist_tokens}"))
    for what, stored, current, why in checks:
        if stored != current:
            raise CacheMismatchError(f"{path}: refusing to load this cache into a different {what}: {why}")
    stored_segments = _stored_segments(meta)
    if segments is not False and _segment_key(stored_segments) != _segment_key(segments):
        raise CacheMismatchError(f"{path}: refusing a cache made with other segment settings: it holds "
                                 f"{_describe(stored_segments)}, the model runs {_describe(segments)}")


def _stored_segments(meta: dict) -> dict | None:
    """The segment settings a file's metadata records (None: a short instruction's cache, or a file
    written before segments existed)."""
    return json.loads(meta.get("segments", "null"))


def _segment_key(segments: dict | None):
    """What of the segment settings decides a cache's content (not the length limit, nor the ratios
    training draws). A new setting that changes what a cache holds goes here, in the change that makes
    a new ``FORMAT`` (:func:`store_key` names entries by this)."""
    if not segments:
        return None
    return (segments["segment_tokens"], segments["gists_per_segment"], segments["placement"],
            segments.get("window"), segments.get("compact_positions", False), segments.get("sink_tokens", 0),
            segments.get("recent_segments", 0))


def _describe(segments: dict | None) -> str:
    if not segments:
        return "a short instruction's gists (no segments)"
    extra = "".join(f", {name} {segments[key]}" for key, name in (
        ("window", "window"), ("sink_tokens", "sink tokens"), ("recent_segments", "recent segments"))
        if segments.get(key))
    return (f"segments of {segments['segment_tokens']} tokens with {segments['gists_per_segment']} "
            f"{segments['placement']} gists each{extra}")


def _from_tensors(meta: dict, tensors: dict[str, torch.Tensor]) -> GistCache:
    # files of version 0.1 name the architecture instead of the backend
    name = meta.get("backend") or ("t5_encoder" if meta.get("encoder_decoder") == "True" else "decoder_kv")
    return GistCache(states=backend_named(name).states_from(tensors), valid=tensors["valid"],
                     positions=tensors["positions"], next_position=tensors["next_position"],
                     num_gist_tokens=int(meta["num_gist_tokens"]), condition=meta["condition"], backend=name,
                     meta={"instructions": json.loads(meta["instructions"]),
                           **({"segments": stored} if (stored := _stored_segments(meta)) else {})})


def _metadata_of(where: str, head: bytes) -> dict[str, str]:
    """The metadata in the header of a safetensors file whose first bytes are ``head`` (the 8-byte
    header length, then the JSON header)."""
    try:
        (n,) = struct.unpack("<Q", head[:8])
        meta = json.loads(head[8:8 + n])["__metadata__"] if 0 < n <= len(head) - 8 else None
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{where}: not a readable cache file, truncated or corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{where}: not a readable cache file, truncated or corrupt (no complete "
                               "header)")
    if meta.get("format") not in READABLE:
        raise CacheMismatchError(f"{where}: not a gist-lightning cache file (format {meta.get('format')!r})")
    return meta


def store_key(instruction: str, num_gist_tokens: int, condition: str, segments: dict | None,
              prints: dict[str, str], dtype: str) -> dict:
    """What names a store entry of ``FORMAT`` (its file name is a hash of this): everything an entry's
    content depends on, so that stores of two models (or of one model under two settings) sharing a
    folder never meet. A new such setting goes here (a segment setting: in :func:`_segment_key`) in
    the same change as a new ``FORMAT``: the format is part of the key, so entries of the older
    format are then not found under the new names, and :meth:`CacheStore.list` reports them apart."""
    return {"format": FORMAT, "instruction": instruction, "num_gist_tokens": num_gist_tokens,
            "condition": condition, "segments": _segment_key(segments),
            "model_fingerprint": prints["model_fingerprint"],
            "tokenizer_fingerprint": prints["tokenizer_fingerprint"], "dtype": dtype}


def check_location(location: str | os.PathLike) -> None:
    """Refuse, in one line, a store location that cannot be reached or written: a probe file is
    written there, read back and removed (what ``gist-lightning serve --cache_dir`` does at start)."""
    try:
        fs, root = url_to_fs(str(location))
        if isinstance(fs, LocalFileSystem):
            # an object store has no folders to make (nor a bucket to create)
            fs.makedirs(root, exist_ok=True)
        probe = f"{root.rstrip('/')}/.probe-{uuid.uuid4().hex}.tmp"
        fs.pipe_file(probe, b"gist-lightning")
        ok = fs.cat_file(probe) == b"gist-lightning"
        fs.rm_file(probe)
    except Exception as e:  # noqa: BLE001 - whatever the filesystem raises, one line that names the location
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise GistError(f"cache store {location}: cannot write there ({why})") from None
    if not ok:
        raise GistError(f"cache store {location}: a file written there reads back different")


class CacheStore:
    """Many compressed instructions in one folder (or at an fsspec URL), keyed by their text.

    One file per instruction and model (named by a hash of :func:`store_key`: the text, the settings
    and the model's fingerprints), so concurrent writers never share a file that is being written,
    two writers of one instruction write the same key (the same bytes, or a harmless replace), stores
    of different models in one folder keep apart, and the listing is read from the files themselves
    (there is no index to corrupt). Every lookup asks the storage itself, so entries another process
    (a server replica, on this machine or another) wrote after this store was opened are found.
    """

    def __init__(self, folder: str | os.PathLike, model, tokenizer, num_gist_tokens: int,
                 condition: str = "gist", frozen: bool = False, segments=None):
        """``folder``: a path, or an fsspec URL (``s3://bucket/prefix``). ``frozen``: the model's
        weights do not change while the store is used (serving), so its fingerprint is computed once
        instead of at every read and write. ``segments``: the model gists long contexts segment by
        segment (:class:`~gist_lightning.long_context.SegmentSettings`): entries are contexts
        compressed with :func:`~gist_lightning.long_context.compress_context`, keyed by them too."""
        self.fs, root = url_to_fs(str(folder))
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.folder = Path(root)
            self.folder.mkdir(parents=True, exist_ok=True)
        else:
            self.folder = self.fs.unstrip_protocol(root.rstrip("/"))
            self._root = root.rstrip("/")
        self.model, self.tokenizer = model, tokenizer
        self.num_gist_tokens, self.condition = num_gist_tokens, condition
        self.prints = fingerprints(model, tokenizer) if frozen else None
        self.segments = segments
        self._segments_dict = asdict(segments) if segments is not None else None

    def _prints(self) -> dict[str, str]:
        """The model's and tokenizer's fingerprints (computed again each time unless ``frozen``)."""
        return self.prints or fingerprints(self.model, self.tokenizer)

    def _name(self, instruction: str, prints: dict[str, str]) -> str:
        key = store_key(instruction, self.num_gist_tokens, self.condition, self._segments_dict, prints,
                        str(self.model.dtype))
        return f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]}.safetensors"

    def path(self, instruction: str, prints: dict[str, str] | None = None) -> Path | str:
        """The entry's file (a URL for a store at a URL)."""
        name = self._name(instruction, prints or self._prints())
        return self.folder / name if self.local else f"{self.folder}/{name}"

    def _remote(self, instruction: str, prints: dict[str, str]) -> str:
        return f"{self._root}/{self._name(instruction, prints)}"

    def add(self, instruction: str, cache: GistCache | None = None) -> Path | str:
        """Store the compressed ``instruction`` (compressing it now unless ``cache`` is given)."""
        if cache is None and self.segments is not None:
            cache = compress_context(self.model, self.tokenizer, [instruction], self.segments, self.condition)
        elif cache is None:
            cache = compress(self.model, self.tokenizer, [instruction], self.num_gist_tokens, self.condition)
        if cache.batch_size != 1:
            raise ValueError(f"a store entry holds one instruction; got a cache of {cache.batch_size} rows")
        prints = self._prints()
        if self.local:
            return save_cache(cache, self.path(instruction, prints), self.model, self.tokenizer,
                              [instruction], prints)
        data = _serialize(cache, self.model, self.tokenizer, [instruction], prints)
        # one put: readers see the old object or the new
        self.fs.pipe_file(self._remote(instruction, prints), data)
        return self.path(instruction, prints)

    def get(self, instruction: str) -> GistCache:
        prints = self._prints()
        path = self.path(instruction, prints)
        if self.local:
            if not path.is_file():
                raise KeyError(f"no cache for instruction {instruction[:80]!r} in {self.folder}")
            return load_cache(path, self.model, self.tokenizer, self.num_gist_tokens, prints,
                              self._segments_dict)
        try:
            data = self.fs.cat_file(self._remote(instruction, prints))  # a plain get, never a cached listing
        except FileNotFoundError:
            raise KeyError(f"no cache for instruction {instruction[:80]!r} in {self.folder}") from None
        meta = _metadata_of(path, data)
        _check(path, meta, self.model, self.tokenizer, self.num_gist_tokens, prints, self._segments_dict)
        try:
            tensors = load_bytes(data)
        except Exception as e:  # noqa: BLE001
            raise CorruptFileError(f"{path}: the cache file's tensors cannot be read, truncated or corrupt "
                                   f"({e})") from None
        return _from_tensors(meta, {name: t.to(self.model.device) for name, t in tensors.items()})

    def get_or_add(self, instruction: str) -> GistCache:
        if instruction not in self:
            self.add(instruction)
        return self.get(instruction)

    def __contains__(self, instruction: str) -> bool:
        if self.local:
            return self.path(instruction).is_file()
        path = self._remote(instruction, self._prints())
        self.fs.invalidate_cache(path)  # a listing read earlier would not show what others wrote since
        return self.fs.isfile(path)

    def list(self) -> list[str]:
        """The instructions stored for this model and these settings (complete files only; temporary
        files of crashed writers are ignored; entries of other models or settings sharing the folder
        are not this store's). Files that cannot be read are left out, logged, and kept in
        ``self.unreadable``; entries of an older format (never read: see the module docstring) are
        kept in ``self.older``, and logged in one line."""
        out = []
        self.unreadable: list[tuple[Path | str, str]] = []
        self.older: list[Path | str] = []
        prints = self._prints()
        for path in self._entries():
            try:
                meta = read_metadata(path) if self.local else self._remote_metadata(path)
            except GistError as e:  # a foreign or damaged file is reported, not fatal
                self.unreadable.append((path, str(e)))
                log.warning("%s", e)
                continue
            if meta["format"] != FORMAT:
                self.older.append(path)
                continue
            name = path.name if self.local else path.rsplit("/", 1)[-1]
            # an entry is this store's when this store would have named it so
            out += [text for text in json.loads(meta["instructions"]) if self._name(text, prints) == name]
        if self.older:
            log.warning("%s: %d entries of an older format are not used (their instructions are compressed "
                        "again when asked); delete them to free the space", self.folder, len(self.older))
        return out

    def _entries(self) -> list[Path | str]:
        if self.local:
            return sorted(self.folder.glob("*.safetensors"))
        self.fs.invalidate_cache(self._root)
        return [self.fs.unstrip_protocol(p) for p in sorted(self.fs.glob(f"{self._root}/*.safetensors"))]

    def _remote_metadata(self, url: str) -> dict[str, str]:
        with self.fs.open(url, "rb") as f:  # the header only, not the tensors
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            head += f.read(min(n, 100 * 2**20))
        return _metadata_of(url, head)

    def delete(self, instruction: str) -> bool:
        try:
            if self.local:
                self.path(instruction).unlink()
            else:
                self.fs.rm_file(self._remote(instruction, self._prints()))
            return True
        except FileNotFoundError:
            return False
