"""Tiny tokenizers and models of every supported family, built from configs (no download)."""

from __future__ import annotations

import functools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    T5Config,
)

from gist_lightning import add_gist_token

CORPUS = [
    "Instruction: reverse the list of words",
    "Input: apple banana cherry dog egg fig grape",
    "Output: the quick brown fox jumps over the lazy dog",
    "Write a haiku about autumn leaves and rain. Translate this sentence into French.",
    "count the words, sort them, put cat first, remove every dog < > / GIST PAD",
] * 4

DECODER_FAMILIES = ["llama", "mistral", "qwen2", "gpt_neox"]
ALL_FAMILIES = DECODER_FAMILIES + ["t5"]


def build_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer framed like LLaMA (BOS before), T5 (EOS after) or GPT-NeoX (none),
    without a pad token (add_gist_token must supply one)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if style == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    elif style == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_config(family: str, vocab_size: int, attn: str = "sdpa", **overrides):
    common = dict(vocab_size=vocab_size, attn_implementation=attn)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
    elif family == "mistral":
        cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, sliding_window=8, max_position_embeddings=256, **common)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                          max_position_embeddings=256, **common)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            rotary_pct=0.25, max_position_embeddings=256, **common)
    elif family == "t5":
        cfg = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=20,
                       decoder_start_token_id=0, **common)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@functools.cache
def _tokenizer_state(style: str):
    return build_tokenizer(style)


def make_pair(family: str, attn: str = "sdpa", seed: int = 0, **overrides):
    """(model, tokenizer, gist_id) for a family: fresh random weights, gist token added, eval mode."""
    style = {"llama": "llama", "mistral": "llama", "qwen2": "neox", "gpt_neox": "neox", "t5": "t5"}[family]
    tokenizer = build_tokenizer(style)
    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tokenizer), attn, **overrides)
    if family == "t5":
        cfg.pad_token_id = tokenizer.eos_token_id  # replaced by add_gist_token's new pad id
        cfg.eos_token_id = tokenizer.eos_token_id
        model = AutoModelForSeq2SeqLM.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    gist_id = add_gist_token(tokenizer, model)
    if family == "t5":
        model.config.decoder_start_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer, gist_id


@pytest.fixture(params=ALL_FAMILIES)
def family(request):
    return request.param
