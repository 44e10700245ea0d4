"""Does the 3-fact lookup form at all? The long-context bases' architecture (configs/tiny-long.yaml's
~0.9M LLaMA) in plain transformers + torch, no framework: a check of what the pilots found.

    python plain_lookup.py TASK --steps 3000 --lr 3e-4 [--queries 8] [--gap " is"] [--form sentence]
                                [--restate 1.0] [--weighting tokens|split]

TASK:
- ``mqar``: 8 pairs "k v" of one-token keys and values, then ``--queries`` keys, each value supervised
  (the Zoology benchmarks' multi-query associative recall; ``--gap`` puts tokens between key and value);
- ``recall``: LongRecall's 3-fact words records (``--words``: 10-25) in the framework's template, the
  answer supervised; ``--restate`` states facts twice and supervises every token (the context loss),
  ``--weighting`` how: ``tokens`` one mean over every supervised token (the answer is ~2 of ~60),
  ``split`` the framework's ``model.objectives.context_weight``: mean(answer) + mean(context);
  ``--form sentence`` writes the facts "the code of k is v." (the value two tokens after its key)
  instead of the generator's "k v."; ``--answer bare`` tokenizes the answer as the framework's
  template does ("Output:tiger": not the context's " tiger" token).

Prints, every 250 steps, the last batch's loss and the first answer token's accuracy (argmax) on 200
fresh examples (chance: 1/3 for recall, 1/8 for mqar's values among its pairs). AdamW (weight decay
0.01), batch 32, linear warmup over 5% of the steps then constant, gradient norm clipped at 1.0, one
torch thread.
"""

from __future__ import annotations

import argparse
import random
import re
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gist_lightning.data.long_recall import WORD_KEYS, WORD_VALUES, make_long_record
from gist_lightning.tokens import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("mqar", "recall"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--gap", default="")
    p.add_argument("--form", choices=("pair", "sentence"), default="pair")
    p.add_argument("--restate", type=float, default=0.0)
    p.add_argument("--weighting", choices=("tokens", "split"), default="tokens")
    p.add_argument("--answer", choices=("space", "bare"), default="space",
                   help="the answer's token: ' tiger' (the context's token) or 'tiger' (the template's "
                        "'Output:' + output, another token of the suite tokenizer)")
    p.add_argument("--words", type=int, nargs=2, default=(10, 25), metavar=("LOW", "HIGH"),
                   help="recall's context words (3 facts are 6 of them; the rest filler sentences)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    tok = load_tokenizer("suite")
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    rng = random.Random(args.seed)
    one = {w: tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in WORD_KEYS + WORD_VALUES}
    gap = tok(args.gap, add_special_tokens=False)["input_ids"] if args.gap else []

    def example() -> tuple[list[int], list[int], int]:
        """(tokens, labels aligned with them, index of the judged answer token)."""
        if args.task == "mqar":
            keys = rng.sample(WORD_KEYS, 8)
            values = {k: rng.choice(WORD_VALUES) for k in keys}
            ids = [t for k in keys for t in [one[k], *gap, one[values[k]]]]
            labels = [-100] * len(ids)
            judged = len(ids) + len(gap) + 1
            for k in (rng.choice(keys) for _ in range(args.queries)):
                ids += [one[k], *gap, one[values[k]]]
                labels += [-100] * (1 + len(gap)) + [one[values[k]]]
            return ids, labels, judged
        r = make_long_record("recall", rng.randint(*args.words), rng, 3, "words", restate=args.restate)
        context = r["instruction"]
        if args.form == "sentence":
            context = re.sub(r"(?:^|(?<=\. ))(\w+) (\w+)\.", r"the code of \1 is \2.", context)
        text = f"Instruction: {context}\nInput: {r['input']}\nOutput:"
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        lead = " " if args.answer == "space" else ""
        answer = tok(lead + r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = prompt + answer
        labels = ([-100] + ids[1:]) if args.restate else [-100] * len(prompt) + answer
        return ids, labels, len(prompt)

    def batch(n: int):
        rows = [example() for _ in range(n)]
        width = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((n, width), tok.pad_token_id or 0)
        labels = torch.full((n, width), -100)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, (t, lab, _) in enumerate(rows):
            ids[i, :len(t)], labels[i, :len(t)], mask[i, :len(t)] = torch.tensor(t), torch.tensor(lab), 1
        return ids, mask, labels, [j for _, _, j in rows]

    def loss_of(ids, mask, labels, judged):
        if args.weighting == "tokens":
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss
        logits, target = model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                             reduction="none")
        answer = torch.zeros_like(target, dtype=torch.bool)
        for i, j in enumerate(judged):
            answer[i, j - 1:] = True
        answer &= target != -100
        context = (target != -100) & ~answer
        return ce[answer].mean() + (ce[context].mean() if context.any() else 0)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(0.05 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    start = time.time()
    for step in range(args.steps):
        loss = loss_of(*batch(32))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 250 == 0 or step == args.steps - 1:
            model.eval()
            with torch.no_grad():
                ids, mask, _, judged = batch(200)
                logits = model(input_ids=ids, attention_mask=mask).logits
                right = sum(int(logits[i, j - 1].argmax() == ids[i, j]) for i, j in enumerate(judged))
            model.train()
            print(f"step {step} loss {loss.item():.3f} answer accuracy {right / 200:.2f} "
                  f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
