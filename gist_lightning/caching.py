"""Exact gist caching: compress an instruction once, then generate from the cache, batched.

``compress`` runs ``Instruction: t`` + gist tokens through the model under the condition's mask
and keeps, for every layer, only the positions a later token may see (the k gist positions for
``gist``; the whole prompt for ``pos_control``, which is instruction caching; nothing for
``neg_control``). Which positions that is comes from :func:`masks.continuation_visibility`.

- Decoder-only: per layer the keys/values at those positions, their position ids, and the
  position id the next token continues from (later tokens keep the positions they had in the
  full prompt, so the cached result equals the masked full forward).
- T5: the encoder has no cache; we keep the hidden state entering every encoder block (and the
  final layer norm) at those positions, and when the input is encoded those rows are put back
  in place at every block, so the input's encoder states equal the full masked encoder's; the
  final rows are what decoder cross-attention sees of the instruction.

Rows of a batch may have instructions of different lengths: a cache is left-padded to its
longest row with a validity mask, and every row carries its own position offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from . import masks
from .families import family_of, gist_forward, self_attention_masks
from .padding import pad_batch
from .templates import encode_continuation, encode_prefix
from .tokens import gist_token_id as find_gist_token_id


@dataclass
class GistCache:
    """Compressed prompts of a batch.

    ``states``: decoder-only, one ``(keys, values)`` pair per layer, each (B, H_kv, L, D);
    T5, one (B, L, d_model) tensor per encoder block plus one for the final layer norm.
    ``valid`` (B, L) marks real entries (left padding when rows kept different numbers).
    """

    states: list
    valid: torch.Tensor
    positions: torch.Tensor  # (B, L) position ids of the kept entries (decoder-only)
    next_position: torch.Tensor  # (B,) position id of the first token after the prompt
    num_gist_tokens: int
    condition: str
    encoder_decoder: bool
    meta: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        if self.encoder_decoder:
            return list(self.states)
        return [t for kv in self.states for t in kv]

    def nbytes(self) -> int:
        """Bytes held per cached prompt: valid entries only, averaged over the rows."""
        if not self.length:
            return 0
        rows_x_len = self.batch_size * self.length
        per_entry = sum(t.numel() // rows_x_len * t.element_size() for t in self.tensors())
        return int(per_entry * self.valid.sum().item() / self.batch_size)

    def _map(self, fn_states, fn_rows) -> GistCache:
        states = (
            [fn_states(t) for t in self.states]
            if self.encoder_decoder
            else [(fn_states(k), fn_states(v)) for k, v in self.states]
        )
        return GistCache(
            states=states,
            valid=fn_rows(self.valid),
            positions=fn_rows(self.positions),
            next_position=fn_rows(self.next_position),
            num_gist_tokens=self.num_gist_tokens,
            condition=self.condition,
            encoder_decoder=self.encoder_decoder,
            meta=dict(self.meta),
        )

    def select(self, rows: torch.Tensor | list[int]) -> GistCache:
        """Rows ``rows`` of the batch, in that order (repeat a row to reuse one instruction)."""
        rows = torch.as_tensor(rows, device=self.valid.device, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, rows), lambda t: t.index_select(0, rows))

    def to(self, device=None, dtype=None) -> GistCache:
        return self._map(lambda t: t.to(device=device, dtype=dtype), lambda t: t.to(device=device))

    @staticmethod
    def concat(caches: list[GistCache]) -> GistCache:
        """Stack the rows of several caches into one batch (left-padding the shorter ones)."""
        first = caches[0]
        for c in caches[1:]:
            if (c.num_gist_tokens, c.condition, c.encoder_decoder) != (
                first.num_gist_tokens,
                first.condition,
                first.encoder_decoder,
            ):
                raise ValueError("cannot concatenate caches made with different k, condition or architecture")
        length = max(c.length for c in caches)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        seq_dim = 1 if first.encoder_decoder else 2
        if first.encoder_decoder:
            states = [torch.cat([pad(c.states[i], 1) for c in caches]) for i in range(len(first.states))]
        else:
            states = [
                (
                    torch.cat([pad(c.states[i][0], seq_dim) for c in caches]),
                    torch.cat([pad(c.states[i][1], seq_dim) for c in caches]),
                )
                for i in range(len(first.states))
            ]
        return GistCache(
            states=states,
            valid=torch.cat([pad(c.valid, 1) for c in caches]),
            positions=torch.cat([pad(c.positions, 1) for c in caches]),
            next_position=torch.cat([c.next_position for c in caches]),
            num_gist_tokens=first.num_gist_tokens,
            condition=first.condition,
            encoder_decoder=first.encoder_decoder,
            meta=dict(first.meta),
        )


def cache_bytes_per_position(model) -> int:
    """Bytes a cache holds per kept prompt position, from the model's shape and dtype.

    Decoder-only: keys and values of every layer (2 x layers x KV heads x head size). T5: the
    hidden state entering every encoder block and the final norm ((layers + 1) x d_model).
    """
    config = model.config
    size = torch.tensor([], dtype=model.dtype).element_size()
    if config.is_encoder_decoder:
        return (config.num_layers + 1) * config.d_model * size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * size


def _kept_columns(visible: torch.Tensor) -> int:
    """Number of trailing columns to keep; the visible set of a left-padded prompt is a suffix."""
    length = int(visible.sum(-1).max().item()) if visible.numel() else 0
    if visible[:, : visible.shape[1] - length].any():
        raise RuntimeError("the positions visible after the gist span are not a suffix of the prompt")
    return length


class _EncoderStateHooks:
    """Record (or overwrite) the hidden states entering each T5 encoder block and its final norm."""

    def __init__(self, encoder, replace: list[torch.Tensor] | None = None):
        self.modules = [*encoder.block, encoder.final_layer_norm]
        self.replace = replace
        self.recorded: list[torch.Tensor] = []
        self.handles = []

    def _hook(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.replace is None:
                self.recorded.append(hidden)
                return None
            prefix = self.replace[index]
            hidden = torch.cat([prefix.to(hidden.dtype), hidden[:, prefix.shape[1] :]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def compress_ids(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gist_token_id: int,
    condition: str = "gist",
    num_gist_tokens: int | None = None,
) -> GistCache:
    """Compress left-padded ``[specials] Instruction: t\\n G..G`` rows (B, P) into a :class:`GistCache`."""
    family = family_of(model)
    if family.encoder_decoder and condition == "pos_control":
        raise ValueError(
            "pos_control cannot be cached for an encoder-decoder model: its bidirectional encoder lets the "
            "instruction attend to the input, so the instruction's states depend on every input "
            "(the paper has no instruction-caching figure for FLAN-T5 for the same reason)"
        )
    first, last = masks.gist_span(prompt_ids, gist_token_id, num_gist_tokens)
    if (last != prompt_ids.shape[1] - 1).any():
        raise ValueError("every prompt row must end with its gist span (left padding, nothing after the gists)")
    k = int((last - first + 1)[0].item())
    visible = masks.continuation_visibility(prompt_ids, attention_mask, gist_token_id, condition)
    keep = _kept_columns(visible)
    cols = slice(prompt_ids.shape[1] - keep, prompt_ids.shape[1])
    positions = masks.padding_position_ids(attention_mask)
    if family.encoder_decoder:
        enc_mask = masks.encoder_attention_mask(prompt_ids, attention_mask, gist_token_id, condition)
        encoder = model.get_encoder()
        with _EncoderStateHooks(encoder) as hooks:
            encoder(input_ids=prompt_ids, attention_mask=masks.to_additive(enc_mask, model.dtype))
        states = [h[:, cols] for h in hooks.recorded]
    else:
        out = gist_forward(model, prompt_ids, attention_mask, gist_token_id, condition, use_cache=True, cache=DynamicCache())
        states = [(layer.keys[:, :, cols], layer.values[:, :, cols]) for layer in out.cache.layers]
    return GistCache(
        states=states,
        valid=visible[:, cols],
        positions=positions[:, cols],
        next_position=attention_mask.long().sum(-1),
        num_gist_tokens=k,
        condition=condition,
        encoder_decoder=family.encoder_decoder,
    )


def empty_cache(model, batch_size: int, condition: str = "pos_control") -> GistCache:
    """A cache that holds nothing: feeding a whole prompt after it is the uncached forward.

    Exact for ``pos_control`` (nothing to mask beyond causality and padding), which is how an
    encoder-decoder generates under ``pos_control``, whose instruction cannot be cached.
    """
    family = family_of(model)
    device, dtype = model.device, model.dtype
    rows = torch.zeros((batch_size, 0), dtype=torch.long, device=device)
    if family.encoder_decoder:
        encoder = model.get_encoder()
        states = [torch.zeros((batch_size, 0, model.config.d_model), dtype=dtype, device=device)
                  for _ in range(len(encoder.block) + 1)]
    else:
        states = None  # DynamicCache starts empty; see continuation_logits
    return GistCache(states=states or [], valid=rows.bool(), positions=rows, next_position=rows.sum(-1),
                     num_gist_tokens=0, condition=condition, encoder_decoder=family.encoder_decoder)


def compress(model, tokenizer, instructions: list[str], num_gist_tokens: int, condition: str = "gist") -> GistCache:
    """Compress a batch of instructions (one cache row each)."""
    gist_id = find_gist_token_id(tokenizer)
    rows = [encode_prefix(tokenizer, t, num_gist_tokens, gist_id) for t in instructions]
    ids, mask = pad_batch(rows, tokenizer.pad_token_id, "left")
    device = model.device
    return compress_ids(model, ids.to(device), mask.to(device), gist_id, condition, num_gist_tokens)


def _encode_with_cache(model, cache: GistCache, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """T5: encoder states of ``[cache | input]`` (input right-padded, right after the cache)."""
    bsz, length = cache.valid.shape
    dummy = torch.full((bsz, length), model.config.pad_token_id or 0, dtype=torch.long, device=input_ids.device)
    cont_rows = masks.prefix_attention_mask(cache.valid, attention_mask, causal=False)  # (B,1,T,L+T)
    cache_rows = torch.cat([cache.valid, attention_mask.bool()], -1)[:, None, None, :].expand(-1, 1, length, -1)
    full = torch.cat([cache_rows, cont_rows], dim=2)
    with _EncoderStateHooks(model.get_encoder(), replace=cache.states):
        out = model.get_encoder()(
            input_ids=torch.cat([dummy, input_ids], 1), attention_mask=masks.to_additive(full, model.dtype)
        )
    cross = torch.cat([cache.valid, attention_mask.bool()], -1)
    return out.last_hidden_state, cross


@torch.no_grad()
def continuation_logits(model, cache: GistCache, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """One forward of what follows the gist span, from the cache.

    Decoder-only: ``input_ids`` (B, T), left-padded, returns the model output (logits (B, T, V)).
    T5: ``input_ids`` is the rest of the source (right-padded); pass ``decoder_input_ids``.
    """
    if cache.encoder_decoder:
        enc, cross = _encode_with_cache(model, cache, input_ids, attention_mask)
        return model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=cross.long(), **kwargs)
    positions = masks.padding_position_ids(attention_mask, cache.next_position)
    allowed = masks.prefix_attention_mask(cache.valid, attention_mask)
    key_positions = torch.cat([cache.positions, positions], -1)
    past = DynamicCache(ddp_cache_data=[(k, v) for k, v in cache.states]) if cache.states else DynamicCache()
    return model(
        input_ids=input_ids,
        attention_mask=self_attention_masks(model, allowed, positions, key_positions),
        position_ids=positions,
        cache=past,
        use_cache=True,
        **kwargs,
    )


@torch.no_grad()
def generate_ids(
    model,
    cache: GistCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    sync_ranks: bool = False,
) -> torch.Tensor:
    """Greedy decoding from a cache, batched: (B, N) new tokens, ``pad_token_id`` after EOS.

    Decoder-only ``input_ids`` are left-padded, T5 ``input_ids`` right-padded (see
    :func:`continuation_logits`). With ``sync_ranks`` every process keeps stepping until all
    processes are done (ZeRO-3 gathers parameters inside each forward, so no rank may stop early).
    """
    bsz = input_ids.shape[0]
    device = input_ids.device
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    tokens = []

    def all_done() -> bool:
        flag = done.all()
        if sync_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = flag.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag)

    if cache.encoder_decoder:
        enc, cross = _encode_with_cache(model, cache, input_ids, attention_mask)
        enc_out = BaseModelOutput(last_hidden_state=enc)
        past = EncoderDecoderCache(DynamicCache(), DynamicCache())
        step_ids = torch.full((bsz, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            out = model(
                encoder_outputs=enc_out, attention_mask=cross.long(), decoder_input_ids=step_ids, cache=past, use_cache=True
            )
            past = out.cache
            nxt = torch.where(done, pad_token_id, out.logits[:, -1].argmax(-1))
            tokens.append(nxt)
            done |= nxt == eos_token_id
            if all_done():
                break
            step_ids = nxt[:, None]
        return torch.stack(tokens, 1) if tokens else input_ids.new_zeros((bsz, 0))

    out = continuation_logits(model, cache, input_ids, attention_mask)
    past = out.cache
    key_valid = torch.cat([cache.valid, attention_mask.bool()], -1)
    key_positions = torch.cat([cache.positions, masks.padding_position_ids(attention_mask, cache.next_position)], -1)
    position = cache.next_position + attention_mask.long().sum(-1)  # (B,) next position id
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        nxt = torch.where(done, pad_token_id, logits.argmax(-1))
        tokens.append(nxt)
        done |= nxt == eos_token_id
        if step == max_new_tokens - 1 or all_done():
            break
        key_valid = torch.cat([key_valid, torch.ones_like(key_valid[:, :1])], -1)
        key_positions = torch.cat([key_positions, position[:, None]], -1)
        allowed = key_valid[:, None, None, :]
        out = model(
            input_ids=nxt[:, None],
            attention_mask=self_attention_masks(model, allowed, position[:, None], key_positions),
            position_ids=position[:, None],
            cache=past,
            use_cache=True,
        )
        past = out.cache
        logits = out.logits[:, -1]
        position = position + 1
    return torch.stack(tokens, 1)


def generate(
    model, tokenizer, cache: GistCache, inputs: list[str], max_new_tokens: int = 64, skip_special_tokens: bool = True
) -> list[str]:
    """Greedy completions for ``inputs``, row i continuing cache row i (``cache.select`` to reuse one)."""
    if len(inputs) != cache.batch_size:
        raise ValueError(f"{len(inputs)} inputs for a cache of {cache.batch_size} rows; use cache.select to reuse rows")
    rows = [encode_continuation(tokenizer, x, cache.encoder_decoder) for x in inputs]
    ids, mask = pad_batch(rows, tokenizer.pad_token_id, "right" if cache.encoder_decoder else "left")
    device = model.device
    out = generate_ids(
        model, cache.to(device), ids.to(device), mask.to(device), max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    return decode_new_tokens(tokenizer, out, skip_special_tokens)


def decode_new_tokens(tokenizer, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
    """Text of each row of generated ids, cut at the first EOS and stripped."""
    eos = tokenizer.eos_token_id
    return [
        tokenizer.decode(r[: r.index(eos)] if eos in r else r, skip_special_tokens=skip_special_tokens).strip()
        for r in ids.tolist()
    ]
