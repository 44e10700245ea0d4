"""Training steps per second of gist against pos_control on the tiny default, at equal shapes.

Both conditions see the same batches (same tokens, same padding); only the mask differs. Each
step times collation (where the masks are built), forward, backward and the optimiser step.

    python experiments/bench_train.py [--steps 60] [--batch_size 64]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch

from gist_lightning.cli import cli_main


def from_config(config: str, condition: str, batch_size: int | None):
    """The module and data that ``gist-lightning fit --config CONFIG`` builds, under ``condition``."""
    args = ["--config", config, "--model.condition", condition, "--trainer.logger", "false"]
    if batch_size is not None:
        args += ["--data.batch_size", str(batch_size)]
    with warnings.catch_warnings():  # the script's own command line is not LightningCLI's
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        cli = cli_main(args, run=False)
    cli.datamodule.connect(**cli.model.data_facts())
    return cli.model, cli.datamodule


def time_condition(condition: str, rows: list, config: str, batch_size: int, steps: int,
                   warmup: int) -> float:
    module, dm = from_config(config, condition, batch_size)
    collate = dm.collator(for_generation=False)
    torch.manual_seed(0)
    module.configure_model()
    module.model.train()
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    batches = [rows[i * batch_size:(i + 1) * batch_size] for i in range(steps + warmup)]
    with warnings.catch_warnings():  # training_step logs its loss; outside a Trainer that is a no-op
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
        for i, chunk in enumerate(batches):
            if i == warmup:
                start = time.perf_counter()
            batch = collate(chunk)
            module.training_step(batch, i).backward()
            opt.step()
            opt.zero_grad()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    _, dm = from_config(args.config, "gist", args.batch_size)
    batch_size = dm.hparams.batch_size
    dm.prepare_data()
    dm.setup("fit")
    rows = [dm.datasets["train"][i] for i in range(batch_size * (args.steps + args.warmup))]
    results = {"gist": [], "pos_control": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        for condition in results:
            results[condition].append(time_condition(condition, rows, args.config, batch_size, args.steps,
                                                     args.warmup))
    gist, pos = (max(results[c]) for c in ("gist", "pos_control"))
    print(f"tiny default ({args.config}), batch {batch_size}, {args.steps} steps, best of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"  pos_control: {pos:7.2f} steps/s")
    print(f"  gist:        {gist:7.2f} steps/s")
    print(f"  gist / pos_control = {gist / pos:.3f}  (goal: >= 0.95, the gist mask costs at most 5%)")


if __name__ == "__main__":
    main()
