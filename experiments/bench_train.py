"""Training steps per second of gist against pos_control on the tiny default, at equal shapes.

Both conditions see the same batches (same tokens, same padding); only the mask differs. Each
step times collation (where the masks are built), forward, backward and the optimiser step.

    python experiments/bench_train.py [--steps 60] [--batch_size 64]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import yaml

from gist_lightning.data import EmbeddedSuite
from gist_lightning.module import GistLitModule


def time_condition(condition: str, rows: list, config: dict, batch_size: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    module = GistLitModule(model_config=config["model"]["model_config"], condition=condition)
    dm = EmbeddedSuite(cache_dir=".cache/gist_lightning", batch_size=batch_size)
    dm.connect(**module.data_facts())
    collate = dm.collator(for_generation=False)
    module.configure_model()
    module.model.train()
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    batches = [rows[i * batch_size:(i + 1) * batch_size] for i in range(steps + warmup)]
    for i, chunk in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        batch = collate(chunk)
        module._loss(batch).backward()
        opt.step()
        opt.zero_grad()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    config = yaml.safe_load(open(args.config))
    batch_size = args.batch_size or config["data"]["init_args"]["batch_size"]
    dm = EmbeddedSuite(cache_dir=".cache/gist_lightning", batch_size=batch_size)
    dm.connect(**GistLitModule(model_config=config["model"]["model_config"]).data_facts())
    dm.prepare_data()
    dm.setup("fit")
    rows = [dm.datasets["train"][i] for i in range(batch_size * (args.steps + args.warmup))]
    results = {"gist": [], "pos_control": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for condition in results:
            results[condition].append(time_condition(condition, rows, config, batch_size, args.steps, args.warmup))
    gist, pos = (max(results[c]) for c in ("gist", "pos_control"))
    print(f"tiny default ({args.config}), batch {batch_size}, {args.steps} steps, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"  pos_control: {pos:7.2f} steps/s")
    print(f"  gist:        {gist:7.2f} steps/s")
    print(f"  gist / pos_control = {gist / pos:.3f}  (goal: >= 0.95, the gist mask costs at most 5%)")


if __name__ == "__main__":
    main()
