"""The supported HF model families, as data: one :class:`Family` entry per ``model_type`` says
which backend runs it (decoder-only KV caches or encoder states), how its layers read the gist
mask, and which attention implementations honour an arbitrary mask. Everything reaches the
models through their public interfaces (4D masks, position ids, caches, encoder outputs); no
modeling code is copied.

How the mask reaches the layers (``Family.layers``):
- ``uniform``: one 4D mask for every layer.
- ``uniform_window``: one 4D mask; when ``config.sliding_window`` is set every layer slides, so
  the window is applied to our mask by position id (a custom 4D mask bypasses the model's own).
- ``layer_types``: one mask per layer type (``config.layer_types``: ``full_attention`` /
  ``sliding_attention``), passed as a dict, the windowed one cut by position id.

Positions (partial rotary, layers without RoPE, rope scaling, a local RoPE base on sliding
layers) need nothing from us: the model reads them off the position ids we pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from . import masks

MASKED_ATTENTION = ("eager", "sdpa", "flex_attention")
LAYER_MODES = ("uniform", "uniform_window", "layer_types")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Family:
    model_type: str
    differs: str  # what is particular about it, for the README's family table
    backend: str = "decoder_kv"  # gist_lightning.backends: "decoder_kv" or "t5_encoder"
    layers: str = "uniform"  # how the mask reaches the layers (see the module docstring)
    attention: tuple[str, ...] = MASKED_ATTENTION  # implementations that honour our mask here
    attention_why: str = ""  # why the others of MASKED_ATTENTION are refused
    moe: bool = False  # fused expert weights and a router (what LoRA may adapt: gist_lightning.adapters)

    @property
    def preferred_attention(self) -> str:
        """sdpa where the family takes the gist mask under it, else eager."""
        return "sdpa" if "sdpa" in self.attention else "eager"

    def __post_init__(self):
        if self.layers not in LAYER_MODES:
            raise ValueError(f"{self.model_type}: layers must be one of {LAYER_MODES}; got {self.layers!r}")


_T5 = "bidirectional encoder: encoder rule + cross-attention key mask; encoder states cached"
_T5_ATTENTION = dict(attention=("eager", "sdpa"),
                     attention_why="transformers has no FlexAttention path for T5 "
                     "models (relative position bias)")
FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "GQA; Llama 3.x rope scaling; SmolLM2 and TinyLlama are this architecture"),
        Family("mistral", "sliding window on every layer", layers="uniform_window"),
        Family("mixtral", "mixture of experts; sliding window on every layer when set",
               layers="uniform_window", moe=True),
        Family("qwen2", "sliding window on the layers config.layer_types names", layers="layer_types"),
        Family("qwen3", "q/k norm; sliding window on the layers config.layer_types names",
               layers="layer_types"),
        Family("qwen3_moe", "mixture of experts, q/k norm; sliding window on every layer when set",
               layers="uniform_window", moe=True),
        Family("gemma2", "alternating sliding / full layers; attention logit soft-capping",
               layers="layer_types", attention=("eager", "flex_attention"),
               attention_why="attention logit soft-capping is computed by eager and flex attention only"),
        Family("gemma3_text", "sliding / full layers by pattern, another RoPE base on sliding layers",
               layers="layer_types"),
        Family("phi3", "partial rotary; sliding window on every layer when set", layers="uniform_window"),
        Family("olmo2", "q/k norm, norms after attention and MLP"),
        Family("smollm3", "layers without RoPE (no_rope_layers); sliding layers by config.layer_types",
               layers="layer_types"),
        Family("granite", "embedding, residual, attention and logit multipliers"),
        Family("gpt_neox", "partial rotary, parallel residual"),
        Family("t5", _T5, backend="t5_encoder", **_T5_ATTENTION),
        Family("mt5", _T5 + "; multilingual vocabulary", backend="t5_encoder", **_T5_ATTENTION),
        Family("umt5", _T5 + "; a relative position bias in every layer", backend="t5_encoder",
               **_T5_ATTENTION),
    )
}

# families that cannot take an arbitrary mask, and why
_CHUNKED = ("chunked local attention: its layers see only their own chunk of the sequence, a third "
            "mask type that the gist rule has not been written for")
REFUSED = {"llama4": _CHUNKED, "llama4_text": _CHUNKED}
# attention implementations that drop an arbitrary 4D mask
REFUSED_ATTENTION = {
    "flash_attention_2": "FlashAttention kernels take a padding mask only and drop an arbitrary 4D mask",
    "flash_attention_3": "FlashAttention kernels take a padding mask only and drop an arbitrary 4D mask",
    "paged_attention": "paged attention builds its own masks",
}


def model_class(config):
    """The transformers auto class that builds or loads a model of ``config``: the one place the
    seq2seq-or-causal choice is made."""
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


# Every ``from_pretrained`` of a model passes these. transformers (5.25) turns hub kernels on by
# default: on a GPU, ``from_pretrained`` and every ``train()`` / ``eval()`` afterwards swap layers
# (RoPE, RMSNorm, activations) for kernels downloaded from the Hub at run time. Without internet
# that ends a fit at its first validation (seen on an H200: "Kernel repository
# 'kernels-community/rotary' could not verify publisher trust status"), and with it the layers
# that run are not the ones the exactness tests check.
LOAD_OPTIONS = {"use_kernels": False}


def family_of(model_or_config) -> Family:
    """The family of a model (or config); a clear error for families, attention implementations
    and layer types we do not support."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config.model_type
    if model_type in REFUSED:
        raise ValueError(f"model type {model_type!r} cannot be gist-tuned: {REFUSED[model_type]}")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"model type {model_type!r} is not supported; supported families: "
                         f"{', '.join(sorted(FAMILIES))}")
    impl = config._attn_implementation
    if impl not in family.attention:
        why = REFUSED_ATTENTION.get(impl) or family.attention_why or "it cannot take an arbitrary 4D mask"
        raise ValueError(f"{model_type}: attention implementation {impl!r} cannot take the gist mask "
                         f"({why}); load the model with attn_implementation in {family.attention}")
    if family.layers == "layer_types":
        unknown = set(config.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise ValueError(f"{model_type}: layer types {sorted(unknown)} are not supported for gisting")
    return family


def per_layer_masks(model, build):
    """What the decoder layers take: ``build(window)`` is the mask of layers that slide over
    ``window`` positions (None: full attention); one mask for all layers, or one per layer type."""
    family = family_of(model)
    config = model.config
    window = getattr(config, "sliding_window", None)
    if family.layers == "uniform_window" and window is not None:
        return build(window)
    if family.layers == "layer_types" and "sliding_attention" in config.layer_types:
        return {"full_attention": build(None), "sliding_attention": build(window)}
    return build(None)


def self_attention_masks(model, allowed: torch.Tensor, query_positions: torch.Tensor,
                         key_positions: torch.Tensor):
    """A boolean (B, 1, T, S) mask as the decoder layers take it: additive, with the sliding window
    (by position id) where the layers slide."""
    def build(window):
        windowed = allowed if window is None else allowed & masks.sliding_window_mask(query_positions,
                                                                                      key_positions, window)
        return masks.to_additive(windowed, model.dtype)

    return per_layer_masks(model, build)


def self_attention_block_masks(model, mask_mod_for, batch: int, query_len: int, key_len: int, device):
    """A rule as FlexAttention BlockMasks (memory per block, not per (query, key) pair):
    ``mask_mod_for(window)`` is the ``mask_mod`` of layers that slide over ``window`` positions
    (None: full attention), e.g. :func:`masks.decoder_mask_mod` or :func:`masks.prefix_mask_mod`."""
    from torch.nn.attention.flex_attention import create_block_mask

    def build(window):
        return create_block_mask(mask_mod_for(window), batch, None, query_len, key_len, device=device,
                                 _compile=torch.device(device).type == "cuda")

    return per_layer_masks(model, build)


def family_table() -> str:
    """The README's family table, from the registry."""
    rows = ["| family (`model_type`) | what differs | mask per layer | attention | backend |",
            "|---|---|---|---|---|"]
    for f in FAMILIES.values():
        rows.append(f"| `{f.model_type}` | {f.differs} | {f.layers} | {', '.join(f.attention)} | {f.backend} "
                    "|")
    return "\n".join(rows)
