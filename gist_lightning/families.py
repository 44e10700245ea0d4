"""Supported HF model families and the masked forward pass, through each model's public
interface (4D masks, position ids, caches, encoder outputs). No modeling code is copied.

Where families differ:
- LLaMA, GPT-NeoX: one 4D mask for every layer.
- Mistral: every layer uses the sliding window of ``config.sliding_window``; the window is
  applied to our 4D mask by position id (a custom 4D mask bypasses the model's own window).
- Qwen2: some layers may slide (``config.layer_types``); the model takes one mask per layer type.
- T5: encoder self-attention gets the bidirectional rule, decoder cross-attention a key mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from . import masks

SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class Family:
    model_type: str
    encoder_decoder: bool = False
    # how sliding-window attention is configured: "none", "all_layers" (Mistral), "layer_types" (Qwen2)
    sliding: str = "none"


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama"),
        Family("mistral", sliding="all_layers"),
        Family("qwen2", sliding="layer_types"),
        Family("gpt_neox"),
        Family("t5", encoder_decoder=True),
    )
}


def model_class(config):
    """The transformers auto class that builds or loads a model of ``config``: the one place the
    seq2seq-or-causal choice is made."""
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def family_of(model) -> Family:
    """The model's family; a clear error for families and attention implementations we do not support."""
    config = model.config
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(
            f"model type {config.model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}"
        )
    impl = config._attn_implementation
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {impl!r} cannot take the gist mask (an arbitrary 4D mask); "
            f"load the model with attn_implementation in {SUPPORTED_ATTENTION}"
        )
    if family.sliding == "layer_types":
        unknown = set(config.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"layer types {sorted(unknown)} are not supported for gisting")
    return family


def self_attention_masks(model, allowed: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor):
    """Turn a boolean (B, 1, T, S) mask into what the decoder takes: one additive mask, or one per
    layer type, with the sliding window applied where the model has one."""
    family = family_of(model)
    config = model.config
    dtype = model.dtype
    window = getattr(config, "sliding_window", None)
    if family.sliding == "all_layers" and window is not None:
        allowed = allowed & masks.sliding_window_mask(query_positions, key_positions, window)
    if family.sliding == "layer_types" and "sliding_attention" in config.layer_types:
        windowed = allowed & masks.sliding_window_mask(query_positions, key_positions, window)
        return {
            "full_attention": masks.to_additive(allowed, dtype),
            "sliding_attention": masks.to_additive(windowed, dtype),
        }
    return masks.to_additive(allowed, dtype)


def gist_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gist_token_id: int,
    condition: str,
    labels: torch.Tensor | None = None,
    decoder_input_ids: torch.Tensor | None = None,
    decoder_attention_mask: torch.Tensor | None = None,
    num_gist_tokens: int | None = None,
    gist_masks: dict[str, torch.Tensor] | None = None,
    **kwargs,
):
    """The masked full-prompt forward pass (training, and the reference the cache must equal).

    Decoder-only: ``input_ids`` is prompt + completion, any padding side; position ids skip
    padding. Encoder-decoder: ``input_ids`` is the source; pass ``labels`` or ``decoder_input_ids``.
    ``gist_masks`` are the boolean masks of :func:`masks.gist_masks` when the collator made them.
    """
    family = family_of(model)
    if gist_masks is None:
        gist_masks = masks.gist_masks(
            input_ids, attention_mask, gist_token_id, condition, family.encoder_decoder, num_gist_tokens
        )
    if family.encoder_decoder:
        encoder_outputs = model.get_encoder()(
            input_ids=input_ids, attention_mask=masks.to_additive(gist_masks["encoder_mask"], model.dtype)
        )
        return model(
            encoder_outputs=encoder_outputs,
            attention_mask=gist_masks["cross_mask"].long(),
            labels=labels,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            **kwargs,
        )
    positions = masks.padding_position_ids(attention_mask)
    return model(
        input_ids=input_ids,
        attention_mask=self_attention_masks(model, gist_masks["self_mask"], positions, positions),
        position_ids=positions,
        labels=labels,
        **kwargs,
    )
