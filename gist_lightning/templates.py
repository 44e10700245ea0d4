"""Prompt templates of the paper, tokenized piece by piece around the gist span.

Decoder-only: ``Instruction: {instruction}\\n{gists}\\nInput: {input}\\nOutput:`` (the
``\\nInput: {input}`` part is dropped when the input is empty), completion ``{output}`` + EOS.
Encoder-decoder: source ``Instruction: {instruction}\\n{gists}\\nInput: {input}``, target
``{output}`` + EOS.

The part before the gist tokens is what :mod:`gist_lightning.caching` compresses, the part after
is what it feeds later; training, evaluation and caching all tokenize through this module, so
the ids of a cached prompt are the ids the model was trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .tokens import GIST_TOKEN, encode_text, special_frame


def instruction_text(instruction: str) -> str:
    return f"Instruction: {instruction}\n"


def continuation_text(input: str, encoder_decoder: bool) -> str:
    if encoder_decoder:
        return f"\nInput: {input}"
    return f"\nInput: {input}\nOutput:" if input else "\nOutput:"


def prompt_text(instruction: str, input: str, num_gist_tokens: int, encoder_decoder: bool,
                gist_token: str = GIST_TOKEN) -> str:
    """The prompt as one string (for display and CSVs; never re-tokenized)."""
    return (instruction_text(instruction) + gist_token * num_gist_tokens
            + continuation_text(input, encoder_decoder))


def without_gists(prompt: str, gist_token: str = GIST_TOKEN) -> str:
    """A prompt's text without its gist tokens (and the line they stood on), so that prompts of runs
    with different k, or of conditions, compare equal."""
    return re.sub("\n(?:" + re.escape(gist_token) + ")+(?=\n|$)", "", prompt).replace(gist_token, "")


@dataclass
class EncodedExample:
    """Token ids of one example, in pieces. ``prompt = prefix + gists + suffix``."""

    prefix: list[int]  # specials + "Instruction: t\n"   (what a gist cache compresses)
    gists: list[int]  # k copies of the gist token
    suffix: list[int]  # "\nInput: x\nOutput:" (+ trailing specials for encoder-decoders)
    target: list[int]  # output + EOS (empty when no output is given)

    @property
    def prompt(self) -> list[int]:
        return self.prefix + self.gists + self.suffix


def encode_prefix(tokenizer, instruction: str, num_gist_tokens: int, gist_token_id: int) -> list[int]:
    """``[specials] Instruction: t\\n G..G``: the part a gist cache compresses."""
    if num_gist_tokens < 1:
        raise ValueError(f"num_gist_tokens must be >= 1; got {num_gist_tokens}")
    before, _ = special_frame(tokenizer)
    return before + encode_text(tokenizer, instruction_text(instruction)) + [gist_token_id] * num_gist_tokens


def encode_continuation(tokenizer, input: str, encoder_decoder: bool) -> list[int]:
    """What follows the gist span in the prompt (for encoder-decoders, with the closing specials)."""
    ids = encode_text(tokenizer, continuation_text(input, encoder_decoder))
    if encoder_decoder:
        _, after = special_frame(tokenizer)
        ids = ids + after
    return ids


def encode_target(tokenizer, output: str) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; targets end with EOS")
    return encode_text(tokenizer, output) + [tokenizer.eos_token_id]


def encode_example(
    tokenizer,
    instruction: str,
    input: str,
    output: str | None,
    num_gist_tokens: int,
    gist_token_id: int,
    encoder_decoder: bool,
) -> EncodedExample:
    prefix = encode_prefix(tokenizer, instruction, num_gist_tokens, gist_token_id)
    return EncodedExample(
        prefix=prefix[:-num_gist_tokens],
        gists=prefix[-num_gist_tokens:],
        suffix=encode_continuation(tokenizer, input, encoder_decoder),
        target=encode_target(tokenizer, output) if output is not None else [],
    )
