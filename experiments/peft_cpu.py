"""Giving a trained model gist ability three ways, on CPU: full fine-tuning, LoRA + the gist row,
and the gist row alone, against pos_control and neg_control fine-tuned from the same base.

1. Pretrain the tiny default model (configs/tiny.yaml) on the embedded suite under pos_control:
   instruction following with the whole prompt visible (<GIST> is in the prompt but hides
   nothing). This is the "base model" a user would start from.
2. From that base, for each seed, fine-tune for the same number of steps:
   - pos_control, full fine-tuning (upper bound: nothing compressed)
   - neg_control, full fine-tuning (lower bound: the instruction is hidden and not compressed)
   - gist, full fine-tuning
   - gist, LoRA (rank 16, every linear layer) + the <GIST> rows (model.peft.rank: 16)
   - gist, the <GIST> rows alone (model.peft.rank: 0)
   and validate on seen / unseen / human (ROUGE-L, exact match), with trainable parameters,
   checkpoint size (weights + AdamW state of what trains) and the median training step time.

    python experiments/peft_cpu.py --out experiments/results/peft-cpu [--seeds 0 1] \
        [--pretrain_steps 5000] [--steps 2000]

Finished runs are kept in <out>/runs.jsonl; running again skips them (and the base once trained).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

from gist_lightning.adapters import parameter_counts
from gist_lightning.data.datamodule import GistDataModule
from gist_lightning.evaluation.callbacks import RougeCallback
from gist_lightning.evaluation.stats import format_mean_sd
from gist_lightning.machine import describe_machine
from gist_lightning.module import GistLitModule
from gist_lightning.splits import SHORT, VALIDATION_SPLITS

# name: (condition, peft settings or None, learning rate)
ARMS = {
    "pos_control (full)": ("pos_control", None, 1e-3),
    "neg_control (full)": ("neg_control", None, 1e-3),
    "gist (full)": ("gist", None, 1e-3),
    "gist (LoRA r16 + gist row)": ("gist", {"rank": 16, "alpha": 32, "dropout": 0.05}, 5e-3),
    "gist (gist row only)": ("gist", {"rank": 0}, 1e-2),
}


class StepTimer(L.Callback):
    """Wall time of each training step (forward, backward, optimiser), validation excluded."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, *args):
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self._start)


SUITE_OVERRIDES: list[str] = []  # --max_validation_records (a quick check of the script)


def from_config(config: str, overrides: list[str], callbacks: list) -> LightningCLI:
    """The module, data and trainer that ``gist-lightning fit --config CONFIG OVERRIDES`` builds,
    with this experiment's callbacks instead of a run's (no logger, checkpoints or exports)."""
    args = ["--config", config, "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_model_summary", "false", *overrides, *SUITE_OVERRIDES]
    with warnings.catch_warnings():  # the script's own command line is not LightningCLI's
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        return LightningCLI(GistLitModule, GistDataModule, subclass_mode_data=True, save_config_callback=None,
                            trainer_defaults={"callbacks": callbacks}, args=args, run=False)


def pretrain(config: str, work: Path, steps: int) -> Path:
    base = work / "base"
    if (base / "gist_config.json").is_file():
        print(f"base model: {base} (already trained)")
        return base
    cli = from_config(config, ["--seed_everything", "0", "--model.condition", "pos_control",
                               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "null",
                               "--trainer.limit_val_batches", "0",
                               "--trainer.default_root_dir", str(work / "pretrain"),
                               "--data.seed", "0", "--data.cache_dir", str(work / "cache")], [])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model.export(base)


def run_arm(name: str, config: str, base: Path, seed: int, steps: int, work: Path) -> dict:
    condition, peft, lr = ARMS[name]
    rouge, timer = RougeCallback(), StepTimer()
    # a fine-tuning of the base: the config's model shape and tokenizer give way to the base's
    cli = from_config(config, ["--seed_everything", str(seed), "--model.model_config", "null",
                               "--model.tokenizer", "null", "--model.model_name_or_path", str(base),
                               "--model.condition", condition, "--model.num_gist_tokens", "1",
                               "--model.peft", json.dumps(peft), "--model.learning_rate", str(lr),
                               "--model.weight_decay", "0.0", "--model.warmup_ratio", "0.03",
                               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                               "--trainer.default_root_dir", str(work / "arms"),
                               "--data.seed", str(seed), "--data.cache_dir", str(work / "cache")],
                      [rouge, timer])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "run.ckpt"
        cli.trainer.save_checkpoint(ckpt)
        ckpt_bytes = ckpt.stat().st_size
    trainable, total = parameter_counts(cli.model.model)
    row = {"arm": name, "seed": seed, "condition": condition, "peft": peft, "learning_rate": lr,
           "steps": steps, "trainable_params": trainable, "total_params": total,
           "checkpoint_bytes": ckpt_bytes, "step_ms_median": 1000 * statistics.median(timer.times[10:])}
    for split, s in rouge.last.items():
        row[f"{SHORT[split]}_rougeL"], row[f"{SHORT[split]}_em"] = s.rougeL, s.exact_match
    return row


def base_row(config: str, base: Path, work: Path) -> dict:
    """The base itself, validated under pos_control: where every arm starts from."""
    rouge = RougeCallback()
    cli = from_config(config, ["--model.model_config", "null", "--model.tokenizer", "null",
                               "--model.model_name_or_path", str(base), "--model.condition", "pos_control",
                               "--trainer.default_root_dir", str(work / "base-validate"),
                               "--data.seed", "0", "--data.cache_dir", str(work / "cache")], [rouge])
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    row = {"arm": "base (pos_control pretrain, no fine-tuning)", "seed": 0}
    for split, s in rouge.last.items():
        row[f"{SHORT[split]}_rougeL"], row[f"{SHORT[split]}_em"] = s.rougeL, s.exact_match
    return row


def table(rows: list[dict]) -> str:
    splits = [SHORT[s] for s in VALIDATION_SPLITS]
    head = ["arm", "seeds"] + [f"{s} ROUGE-L" for s in splits] + [f"{s} EM" for s in splits]
    head += ["trainable params", "checkpoint", "step ms (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = list(dict.fromkeys(r["arm"] for r in rows))
    for name in names:
        rs = [r for r in rows if r["arm"] == name]
        cells = [name, ",".join(str(r["seed"]) for r in rs)]
        cells += [format_mean_sd([r[f"{s}_rougeL"] for r in rs]) for s in splits]
        cells += [format_mean_sd([r[f"{s}_em"] for r in rs]) for s in splits]
        if "trainable_params" in rs[0]:
            r = rs[0]
            cells += [f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.2f}%)",
                      f"{r['checkpoint_bytes'] / 1e6:.2f} MB",
                      format_mean_sd([x["step_ms_median"] for x in rs])]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--out", default="experiments/results/peft-cpu")
    parser.add_argument("--work", default="runs/peft-cpu", help="base model, data cache and run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pretrain_steps", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--max_validation_records", type=int, default=None, help="per split (default: all)")
    args = parser.parse_args()
    if args.max_validation_records:
        SUITE_OVERRIDES.extend(["--data.max_validation_records", str(args.max_validation_records)])
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    config = args.config
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    base = pretrain(config, work, args.pretrain_steps)
    done_path = out / "runs.jsonl"
    rows = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.exists() else []
    if not any(r["arm"].startswith("base") for r in rows):
        rows.append(base_row(config, base, work))
        done_path.open("a").write(json.dumps(rows[-1]) + "\n")
    for seed in args.seeds:
        for name in ARMS:
            if any(r["arm"] == name and r["seed"] == seed and r.get("steps") == args.steps for r in rows):
                continue
            print(f"== {name}, seed {seed}")
            rows.append(run_arm(name, config, base, seed, args.steps, work))
            with done_path.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    ordered = ([r for r in rows if r["arm"].startswith("base")]
               + [r for n in ARMS for r in rows if r["arm"] == n])
    text = table(ordered)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "machine.txt").write_text(describe_machine() + "\n")


if __name__ == "__main__":
    main()
