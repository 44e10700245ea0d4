"""`make demo`: compress instructions with a tiny random model and generate from the caches,
checking each cached answer against the masked full-prompt forward."""

from __future__ import annotations

import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from . import add_gist_token, compress, generate


def main() -> None:
    words = "reverse sort count copy the list of words apple banana cherry dog egg fig".split()
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "Instruction", "Input", "Output", ":", "\n", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    ).eval()
    add_gist_token(tok, model)
    instructions = ["reverse the list of words", "sort the list", "count the words"]
    inputs = ["apple banana cherry", "dog egg fig apple", "banana"]
    t0 = time.perf_counter()
    cache = compress(model, tok, instructions, num_gist_tokens=1)
    outs = generate(model, tok, cache, inputs, max_new_tokens=8)
    print(f"compressed {len(instructions)} instructions into {cache.length} cached position(s) each "
          f"({cache.nbytes()} bytes per prompt), generated in {time.perf_counter() - t0:.2f}s (random weights):")
    for t, x, y in zip(instructions, inputs, outs):
        print(f"  {t!r} + {x!r} -> {y!r}")


if __name__ == "__main__":
    main()
