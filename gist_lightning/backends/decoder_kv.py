"""Decoder-only models: a cache is every layer's keys/values at the kept prompt positions, with
their position ids; later tokens continue from the position they had in the full prompt, so the
cached result equals the masked full forward."""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from .. import masks
from ..families import FAMILIES, self_attention_block_masks, self_attention_masks
from .base import Backend


def _flex(model) -> bool:
    return model.config._attn_implementation == "flex_attention"


def static_shapes_on_cpu(device):
    """Inductor's CPU FlexAttention kernel fails to compile once a second sequence length makes it
    dynamic (torch 2.13: "cur_kvSplitSize0 was not declared"): on CPU, compile per shape instead."""
    if torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64)


@contextlib.contextmanager
def dense_attention(model):
    """The new tokens after a cache see a small (T, L+T) mask: under flex_attention they run with
    the family's dense implementation (every layer reads the shared config at call time), which
    saves building BlockMasks at every decoding step (and inductor's CPU FlexAttention kernel failed
    to compile the decoding masks here, torch 2.13)."""
    if not _flex(model):
        yield
        return
    model.config._attn_implementation = FAMILIES[model.config.model_type].preferred_attention
    try:
        yield
    finally:
        model.config._attn_implementation = "flex_attention"


class _GrowingLayer(DynamicLayer):
    """A layer's keys/values in buffers with room to grow: a decoding step writes its column in place
    where ``DynamicLayer`` concatenates, i.e. copies the whole cache, at every step. With a few
    hundred cached positions that copy cost a 100M model as much as its forward on a CPU (measured:
    +37% tokens/s at batch 8, +130% at batch 32 without it). ``keys``/``values`` are views of the
    filled columns; whatever replaces them (rows leaving, batches merging) gets a new buffer at the
    next update, so copies happen at admissions and departures, not per token."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = (self.keys.shape[-2] if self.keys.dim() == 4 else 0), key_states.shape[-2]
        buffer = getattr(self, "_buffer", None)
        if (buffer is None or self.keys.data_ptr() != buffer[0].data_ptr()
                or self.keys.shape[0] != buffer[0].shape[0] or n + t > buffer[0].shape[-2]):
            size = n + t + max(64, (n + t) // 4)  # room grows with the cache: amortised O(1) copies per token
            buffer = tuple(x.new_empty((*x.shape[:2], size, x.shape[-1])) for x in (key_states, value_states))
            if n:
                buffer[0][:, :, :n], buffer[1][:, :, :n] = self.keys, self.values
            self._buffer = buffer
        buffer[0][:, :, n:n + t], buffer[1][:, :, n:n + t] = key_states, value_states
        self.keys, self.values = buffer[0][:, :, :n + t], buffer[1][:, :, :n + t]
        return self.keys, self.values


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two at or above ``n`` (and ``smallest``): the batch sizes and capacities static
    decoding pads to, so that a compiled step sees a few shapes, not one per request."""
    return max(smallest, 1 << max(0, int(n) - 1).bit_length())


def static_cache(states, batch: int, capacity: int) -> Cache:
    """A cache of fixed-size buffers (``batch`` rows x ``capacity`` columns per layer) holding
    ``states`` [(keys, values) per layer, (B <= batch, H, n, D)] in their first rows and columns;
    a step writes its column in place (HF's ``StaticLayer``: static addresses, compilable). Every
    layer keeps ``capacity`` columns, sliding ones too: the masks slide by position."""
    layers = []
    for keys, values in states:
        layer = StaticLayer(max_cache_len=capacity)
        layer.lazy_initialization(keys.new_empty((batch, *keys.shape[1:])),
                                  values.new_empty((batch, *values.shape[1:])))
        b, n = keys.shape[0], keys.shape[2]
        layer.keys[:b, :, :n], layer.values[:b, :, :n] = keys, values
        layer.cumulative_length.fill_(n)
        layers.append(layer)
    return Cache(layers=layers)


def static_step(model, past, tokens, position, key_valid, key_positions):
    """One decoding step over static buffers: every shape is fixed by (batch, capacity), so it runs
    through ``torch.compile`` without graph breaks (tests/test_static_decoding.py). The new column
    is the buffers' write index; returns (logits (B, V), key_valid, key_positions)."""
    column = past.layers[0].cumulative_length.view(1)
    key_valid = key_valid.index_fill(1, column, True)
    key_positions = key_positions.index_copy(1, column, position[:, None])
    mask = self_attention_masks(model, key_valid[:, None, None, :], position[:, None], key_positions)
    out = model(input_ids=tokens[:, None], position_ids=position[:, None], cache=past, use_cache=True,
                attention_mask=mask)
    return out.logits[:, -1], key_valid, key_positions


_COMPILED: dict[str, object] = {}


def compiled_step(device) -> object:
    """:func:`static_step` through ``torch.compile``: CUDA graphs (``reduce-overhead``) on a GPU,
    the default mode elsewhere; one compiled function per mode (dynamo keeps a graph per shape)."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    if mode not in _COMPILED:
        step = torch.compile(static_step, mode=mode, dynamic=False, fullgraph=True)
        _COMPILED[mode] = graph_replays(step) if mode == "reduce-overhead" else step
    return _COMPILED[mode]


def graph_replays(step):
    """``step`` (compiled with CUDA graphs) as a function whose outputs stay valid: a replay writes
    its outputs into the graph's own buffers, so the state a step returns (``key_valid``,
    ``key_positions``: the next step's inputs) and its logits would be overwritten by the next
    replay of that graph or of another shape's (on an H200: "accessing tensor output of CUDAGraphs
    that has been overwritten by a subsequent run"). Each call starts a new graph step and returns
    copies, (B, V) and two (B, capacity) tensors: small beside the step itself. The step mark is
    process-wide: a caller's own CUDA-graph outputs held across a compiled decoding are invalidated
    too."""

    def replay(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(out.clone() for out in step(*args))

    return replay


def _kv_cache(states=()) -> DynamicCache:
    """A DynamicCache of growing layers holding ``states`` [(keys, values) per layer] (none: it fills at
    the forward)."""
    past = DynamicCache()
    past.layer_class_to_replicate = _GrowingLayer
    for keys, values in states:
        past.layers.append(_GrowingLayer())
        past.layers[-1].update(keys, values)
    return past


class DecoderKV(Backend):
    name = "decoder_kv"
    encoder_decoder = False
    seq_dim = 2  # keys/values are (B, KV heads, L, head size)

    def forward(self, model, input_ids, attention_mask, gist_token_id, condition, num_gist_tokens=None,
                segment_ids=None, **kwargs):
        # input_ids: prompt + completion (B, S), either padding side, or packed rows of several
        # examples (segment_ids); positions skip padding and restart in every example
        if segment_ids is None:
            positions = masks.padding_position_ids(attention_mask)
        else:
            positions = masks.segment_position_ids(segment_ids)
        if _flex(model):
            segments = masks.decoder_segments(input_ids, attention_mask, segment_ids)
            first, last = masks.segment_gist_spans(input_ids, segments, gist_token_id, num_gist_tokens)
            bsz, seq_len = input_ids.shape
            mask = self_attention_block_masks(
                model, lambda w: masks.decoder_mask_mod(segments, first, last, condition, positions, w),
                bsz, seq_len, seq_len, input_ids.device)
            shapes = static_shapes_on_cpu(input_ids.device)
        else:
            allowed = masks.decoder_attention_mask(input_ids, attention_mask, gist_token_id, condition,
                                                   num_gist_tokens, segment_ids)
            mask = self_attention_masks(model, allowed, positions, positions)
            shapes = contextlib.nullcontext()
        with shapes:
            return model(input_ids=input_ids, position_ids=positions, attention_mask=mask, **kwargs)

    def compress(self, model, prompt_ids, attention_mask, gist_token_id, condition, cols):
        out = self.forward(model, prompt_ids, attention_mask, gist_token_id, condition, use_cache=True,
                           cache=DynamicCache())
        return [(layer.keys[:, :, cols], layer.values[:, :, cols]) for layer in out.cache.layers]

    def empty_states(self, model, batch_size):
        return []  # a DynamicCache starts empty (see continuation)

    def continuation(self, model, cache, input_ids, attention_mask, **kwargs):
        # input_ids (B, T), left-padded; new tokens see every valid cache entry and, causally, each other
        positions = masks.padding_position_ids(attention_mask, cache.next_position)
        key_positions = torch.cat([cache.positions, positions], -1)
        past = _kv_cache(cache.states)
        allowed = masks.prefix_attention_mask(cache.valid, attention_mask)  # (B, 1, T, L+T)
        with dense_attention(model):
            return model(input_ids=input_ids, position_ids=positions, cache=past, use_cache=True,
                         attention_mask=self_attention_masks(model, allowed, positions, key_positions),
                         **kwargs)

    def start(self, model, cache, input_ids, attention_mask):
        out = self.continuation(model, cache, input_ids, attention_mask)
        state = {
            "past": out.cache,
            "key_valid": torch.cat([cache.valid, attention_mask.bool()], -1),  # (B, L+T) keys seen so far
            "key_positions": torch.cat(
                [cache.positions, masks.padding_position_ids(attention_mask, cache.next_position)], -1),
            # (B,) the next token's position id
            "position": cache.next_position + attention_mask.long().sum(-1),
        }
        return out.logits[:, -1], state

    can_compile = True

    def start_static(self, model, cache, input_ids, attention_mask, max_new_tokens: int):
        """:meth:`start` into static buffers: the batch padded to a power of two with rows that see
        only themselves, room for ``max_new_tokens`` in a capacity rounded up to a power of two."""
        out = self.continuation(model, cache, input_ids, attention_mask)
        n, rows = out.cache.layers[0].keys.shape[2], input_ids.shape[0]
        batch, capacity = bucket(rows), bucket(n + max_new_tokens, 64)
        past = static_cache([(layer.keys, layer.values) for layer in out.cache.layers], batch, capacity)
        key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=input_ids.device)
        key_positions = torch.zeros(batch, capacity, dtype=torch.long, device=input_ids.device)
        key_valid[:rows, :n] = torch.cat([cache.valid, attention_mask.bool()], -1)
        key_positions[:rows, :n] = torch.cat(
            [cache.positions, masks.padding_position_ids(attention_mask, cache.next_position)], -1)
        position = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        position[:rows] = cache.next_position + attention_mask.long().sum(-1)
        state = {"static": past, "key_valid": key_valid, "key_positions": key_positions, "position": position,
                 "rows": rows}
        return out.logits[:, -1], state

    def step_static(self, model, state, tokens, compiled: bool):
        """One step of :meth:`start_static`'s state, through the compiled function when ``compiled``."""
        rows, batch = state["rows"], state["position"].shape[0]
        if state["static"].layers[0].cumulative_length >= state["key_valid"].shape[1]:
            raise RuntimeError(f"the static cache's {state['key_valid'].shape[1]} columns are full")
        fed = tokens.new_zeros(batch)
        fed[:rows] = tokens
        step = compiled_step(tokens.device) if compiled else static_step
        with dense_attention(model):
            logits, key_valid, key_positions = step(model, state["static"], fed, state["position"],
                                                    state["key_valid"], state["key_positions"])
        state = {**state, "key_valid": key_valid, "key_positions": key_positions,
                 "position": state["position"] + 1}
        return logits[:rows], state

    def restack_static(self, parts: list[tuple[dict, list[int]]], room: int) -> dict:
        """Static states of the rows ``parts`` [(state, row indices)] in that order, in new buffers:
        the batch padded to a power of two, the write columns aligned (a state written to fewer
        columns is shifted right: its keys keep their positions, so the answers do not change), and a
        capacity with ``room`` more columns, rounded up to a power of two. Rows leaving (one part)
        and batches merging (several) both come here; the copies happen then, not per token."""
        ends = [int(state["static"].layers[0].cumulative_length) for state, _ in parts]
        end, n_rows = max(ends), sum(len(rows) for _, rows in parts)
        batch, capacity = bucket(n_rows), bucket(end + room, 64)
        template = parts[0][0]
        device = template["key_valid"].device
        layers = []
        for ref in template["static"].layers:
            layer = StaticLayer(max_cache_len=capacity)
            k, v = ref.keys, ref.values
            layer.lazy_initialization(k.new_empty((batch, k.shape[1], 1, k.shape[3])),
                                      v.new_empty((batch, v.shape[1], 1, v.shape[3])))
            layer.keys.zero_()
            layer.values.zero_()
            layers.append(layer)
        key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        key_positions = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        position = torch.zeros(batch, dtype=torch.long, device=device)
        row = 0
        for (state, rows), n in zip(parts, ends):
            index = torch.tensor(rows, dtype=torch.long, device=device)
            into, cols = slice(row, row + len(rows)), slice(end - n, end)
            for layer, src in zip(layers, state["static"].layers):
                layer.keys[into, :, cols] = src.keys[index, :, :n]
                layer.values[into, :, cols] = src.values[index, :, :n]
            key_valid[into, cols] = state["key_valid"][index, :n]
            key_positions[into, cols] = state["key_positions"][index, :n]
            position[into] = state["position"][index]
            row += len(rows)
        for layer in layers:
            layer.cumulative_length.fill_(end)
        return {"static": Cache(layers=layers), "key_valid": key_valid, "key_positions": key_positions,
                "position": position, "rows": n_rows}

    def step(self, model, state, tokens):
        key_valid = torch.cat([state["key_valid"], torch.ones_like(state["key_valid"][:, :1])], -1)
        position = state["position"]
        key_positions = torch.cat([state["key_positions"], position[:, None]], -1)
        with dense_attention(model):
            mask = self_attention_masks(model, key_valid[:, None, None, :], position[:, None], key_positions)
            out = model(input_ids=tokens[:, None], position_ids=position[:, None], cache=state["past"],
                        use_cache=True, attention_mask=mask)
        state = {"past": out.cache, "key_valid": key_valid, "key_positions": key_positions,
                 "position": position + 1}
        return out.logits[:, -1], state

    def select_rows(self, state, rows):
        past = state["past"]
        past.batch_select_indices(rows)
        key_valid = state["key_valid"][rows]
        # columns no remaining row can see (padding of rows that left) are dropped
        used = key_valid.any(0).nonzero()
        start = int(used[0]) if len(used) else key_valid.shape[1]
        if start:
            for layer in past.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        return {"past": past, "key_valid": key_valid[:, start:],
                "key_positions": state["key_positions"][rows, start:], "position": state["position"][rows]}

    def merge(self, states):
        # rows of different lengths: left-pad every key axis to the longest (padding is never valid)
        width = max(s["key_valid"].shape[1] for s in states)

        def pad(t, dim):
            shape = list(t.shape)
            shape[dim] = width - t.shape[dim]
            return torch.cat([t.new_zeros(shape), t], dim) if shape[dim] else t

        layers = [(torch.cat([pad(s["past"].layers[i].keys, 2) for s in states]),
                   torch.cat([pad(s["past"].layers[i].values, 2) for s in states]))
                  for i in range(len(states[0]["past"].layers))]
        return {"past": _kv_cache(layers),
                "key_valid": torch.cat([pad(s["key_valid"], 1) for s in states]),
                "key_positions": torch.cat([pad(s["key_positions"], 1) for s in states]),
                "position": torch.cat([s["position"] for s in states])}

    def context_length(self, config):
        return getattr(config, "max_position_embeddings", None)

    def bytes_per_position(self, model):
        # keys and values of every layer: 2 x layers x KV heads x head size
        config = model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        itemsize = torch.tensor([], dtype=model.dtype).element_size()
        return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize

    def named_tensors(self, states):
        out = {}
        for i, (k, v) in enumerate(states):
            out[f"layer.{i}.key"], out[f"layer.{i}.value"] = k, v
        return out

    def states_from(self, tensors):
        n_layers = sum(name.endswith(".key") for name in tensors)
        return [(tensors[f"layer.{i}.key"], tensors[f"layer.{i}.value"]) for i in range(n_layers)]
