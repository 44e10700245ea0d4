"""Encoder-decoders of the T5 kind (t5, mt5, umt5): the encoder has no KV cache, so a cache is the
hidden state entering every encoder block (and the final layer norm) at the kept positions. When
an input is encoded after a cache, those rows are put back in place at every block, so the
input's encoder states equal the full masked encoder's; the final rows are what decoder
cross-attention sees of the instruction. Relative position biases see the same distances as in
the full prompt: the input follows the kept gist positions directly in both."""

from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from .. import masks
from .base import Backend


class _EncoderStateHooks:
    """Record (or overwrite) the hidden states entering each encoder block and its final norm."""

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
        self.handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class T5Encoder(Backend):
    name = "t5_encoder"
    encoder_decoder = True
    seq_dim = 1  # hidden states are (B, L, d_model)

    def cannot_cache(self, condition):
        if condition == "pos_control":
            return ("pos_control cannot be cached for an encoder-decoder model: its bidirectional encoder "
                    "lets the instruction attend to the input, so the instruction's states depend on every "
                    "input (the paper has no instruction-caching figure for FLAN-T5 for the same reason)")
        return None

    def forward(self, model, input_ids, attention_mask, gist_token_id, condition, num_gist_tokens=None,
                segment_ids=None, **kwargs):
        # input_ids: the source (B, S); pass labels or decoder_input_ids for the target
        if segment_ids is not None:
            raise ValueError("packed rows are for decoder-only models; an encoder-decoder takes one source "
                             "per row")
        args = (input_ids, attention_mask, gist_token_id, condition, num_gist_tokens)
        encoder_outputs = model.get_encoder()(
            input_ids=input_ids,
            attention_mask=masks.to_additive(masks.encoder_attention_mask(*args), model.dtype)
        )
        return model(encoder_outputs=encoder_outputs, attention_mask=masks.cross_attention_mask(*args).long(),
                     **kwargs)

    def compress(self, model, prompt_ids, attention_mask, gist_token_id, condition, cols):
        enc_mask = masks.encoder_attention_mask(prompt_ids, attention_mask, gist_token_id, condition)
        with _EncoderStateHooks(model.get_encoder()) as hooks:
            model.get_encoder()(input_ids=prompt_ids, attention_mask=masks.to_additive(enc_mask, model.dtype))
        return [h[:, cols] for h in hooks.recorded]

    def empty_states(self, model, batch_size):
        shape = (batch_size, 0, model.config.d_model)
        return [torch.zeros(shape, dtype=model.dtype, device=model.device)
                for _ in range(len(model.get_encoder().block) + 1)]

    def _encode(self, model, cache, input_ids, attention_mask):
        """Encoder states of ``[cache | input]`` (input right-padded, right after the cache) and the
        cross-attention key mask (B, L+T)."""
        bsz, length = cache.valid.shape
        dummy = torch.full((bsz, length), model.config.pad_token_id or 0, dtype=torch.long,
                           device=input_ids.device)
        cont_rows = masks.prefix_attention_mask(cache.valid, attention_mask, causal=False)  # (B,1,T,L+T)
        keys = torch.cat([cache.valid, attention_mask.bool()], -1)  # (B, L+T)
        cache_rows = keys[:, None, None, :].expand(-1, 1, length, -1)
        full = torch.cat([cache_rows, cont_rows], dim=2)
        with _EncoderStateHooks(model.get_encoder(), replace=cache.states):
            out = model.get_encoder()(
                input_ids=torch.cat([dummy, input_ids], 1),
                attention_mask=masks.to_additive(full, model.dtype)
            )
        return out.last_hidden_state, keys

    def continuation(self, model, cache, input_ids, attention_mask, **kwargs):
        # input_ids: the rest of the source (B, T), right-padded; pass decoder_input_ids
        enc, cross = self._encode(model, cache, input_ids, attention_mask)
        return model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=cross.long(),
                     **kwargs)

    def start(self, model, cache, input_ids, attention_mask):
        enc, cross = self._encode(model, cache, input_ids, attention_mask)
        state = {"encoder_outputs": BaseModelOutput(last_hidden_state=enc), "cross": cross.long(),
                 "past": EncoderDecoderCache(DynamicCache(), DynamicCache())}
        first = torch.full((input_ids.shape[0],), model.config.decoder_start_token_id, dtype=torch.long,
                           device=input_ids.device)
        return self.step(model, state, first)

    def step(self, model, state, tokens):
        out = model(encoder_outputs=state["encoder_outputs"], attention_mask=state["cross"],
                    decoder_input_ids=tokens[:, None], cache=state["past"], use_cache=True)
        return out.logits[:, -1], {**state, "past": out.cache}

    def select_rows(self, state, rows):
        # merge stays None: rows started at different times are at different decoder positions,
        # and T5's decoder takes no position ids to align them
        state["past"].batch_select_indices(rows)
        enc = state["encoder_outputs"].last_hidden_state[rows]
        return {"encoder_outputs": BaseModelOutput(last_hidden_state=enc), "cross": state["cross"][rows],
                "past": state["past"]}

    def context_length(self, config):
        return None  # relative position buckets: no position table to run past

    def bytes_per_position(self, model):
        # the hidden state entering every encoder block and the final norm: (layers + 1) x d_model
        config = model.config
        return (config.num_layers + 1) * config.d_model * torch.tensor([], dtype=model.dtype).element_size()

    def named_tensors(self, states):
        return {f"state.{i}": t for i, t in enumerate(states)}

    def states_from(self, tensors):
        return [tensors[f"state.{i}"] for i in range(sum(name.startswith("state.") for name in tensors))]
