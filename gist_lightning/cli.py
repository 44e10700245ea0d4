"""``gist-lightning``: LightningCLI (fit / validate / test / predict) plus small commands.

    gist-lightning fit --config configs/tiny.yaml [--data.num_gist_tokens 5] [--print_config]
    gist-lightning score predictions.csv [more.csv ...]
    gist-lightning export --ckpt path/to.ckpt --out folder
"""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .data.datamodule import GistDataModule
from .evaluation.callbacks import CompressionStats, ExportBest, PredictionWriter, RougeCallback, RunSummary
from .module import GistLitModule

BEST_METRIC = "validation_unseen/rougeL"


class GistCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # k, the condition and the tokenizer are set once, on the data, and reach the model from there
        parser.link_arguments("data.num_gist_tokens", "model.num_gist_tokens")
        parser.link_arguments("data.condition", "model.condition")
        parser.link_arguments("data.tokenizer", "model.tokenizer")
        parser.link_arguments("data.gist_token_id", "model.gist_token_id", apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def default_callbacks():
    return [
        RougeCallback(),
        PredictionWriter(),
        CompressionStats(),
        ModelCheckpoint(monitor=BEST_METRIC, mode="max", save_top_k=1, save_last=True,
                        filename="best-step{step}", auto_insert_metric_name=False),
        ExportBest(),
        RunSummary(),
    ]


def cli_main(args=None, run: bool = True) -> GistCLI:
    return GistCLI(
        GistLitModule,
        GistDataModule,
        trainer_defaults={"callbacks": default_callbacks()},
        save_config_kwargs={"overwrite": False},
        args=args,
        run=run,
    )


def score_main(argv: list[str]) -> None:
    from .evaluation.metrics import score_csv

    parser = ArgumentParser(prog="gist-lightning score", description="ROUGE-L (x100) and exact match of predictions CSVs "
                            "with y_pred and y_true columns, as the authors released them.")
    parser.add_argument("files", nargs="+", help="CSV files")
    cfg = parser.parse_args(argv)
    for path in cfg.files:
        s = score_csv(path)
        print(f"{path}: rougeL={s['rougeL']:.2f} exact_match={s['exact_match']:.2f} records={s['count']}")


def export_main(argv: list[str]) -> None:
    from .export import export_pretrained

    parser = ArgumentParser(prog="gist-lightning export", description="Turn a Lightning checkpoint into an HF folder "
                            "(model, tokenizer with <GIST>, gist_config.json).")
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file")
    parser.add_argument("--out", required=True, help="output folder (must not hold an export already)")
    cfg = parser.parse_args(argv)
    module = GistLitModule.load_from_checkpoint(cfg.ckpt, map_location="cpu")
    h = module.hparams
    out = export_pretrained(module.model, module.tokenizer, cfg.out, h.num_gist_tokens, h.condition)
    print(f"exported {cfg.ckpt} -> {out}")


COMMANDS = {"score": score_main, "export": export_main}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in COMMANDS:
        COMMANDS[args[0]](args[1:])
        return
    cli_main(argv)  # None: LightningCLI reads sys.argv itself (DDP launchers re-run the command line)


if __name__ == "__main__":
    main()
