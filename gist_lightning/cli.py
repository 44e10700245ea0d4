"""``gist-lightning``: LightningCLI (fit / validate / test / predict) plus small commands.

    gist-lightning fit --config configs/tiny.yaml [--model.num_gist_tokens 5] [--print_config]
    gist-lightning score predictions.csv [more.csv ...]
    gist-lightning export --ckpt path/to.ckpt --out folder
    gist-lightning compress --model EXPORT --instruction "..." [--out cache.safetensors] [--input "..."]
    gist-lightning generate --model EXPORT --cache cache.safetensors --inputs inputs.txt [--batch_size 16]
"""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .data.datamodule import GistDataModule
from .evaluation.callbacks import CompressionStats, ExportBest, PredictionWriter, RougeCallback, RunSummary
from .module import GistLitModule
from .splits import BEST_METRIC, BEST_MODE, EXACT_MATCH, ROUGE_L


def default_callbacks():
    return [
        RougeCallback(),
        PredictionWriter(),
        CompressionStats(),
        ModelCheckpoint(monitor=BEST_METRIC, mode=BEST_MODE, save_top_k=1, save_last=True,
                        filename="best-step{step}", auto_insert_metric_name=False),
        ExportBest(),
        RunSummary(),
    ]


def cli_main(args=None, run: bool = True) -> LightningCLI:
    """The training CLI. The model owns the tokenizer, k and the condition (``--model.*``); the data
    source is a ``GistDataModule`` subclass chosen by ``class_path`` (``EmbeddedSuite``,
    ``AlpacaPlus``) and receives them from the model."""
    return LightningCLI(
        GistLitModule,
        GistDataModule,
        subclass_mode_data=True,
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
        print(f"{path}: {ROUGE_L}={s[ROUGE_L]:.2f} {EXACT_MATCH}={s[EXACT_MATCH]:.2f} records={s['count']}")


def export_main(argv: list[str]) -> None:
    import tempfile

    import torch

    from .export import export_pretrained

    parser = ArgumentParser(prog="gist-lightning export", description="Turn a Lightning checkpoint (a .ckpt file, or "
                            "the folder a DeepSpeed ZeRO run saves) into an HF folder: model, tokenizer with <GIST>, "
                            "gist_config.json.")
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file or DeepSpeed checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder (must not hold an export already)")
    parser.add_argument("--dtype", default="float32", help="weights' dtype in the export: float32 or bfloat16")
    cfg = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = cfg.ckpt
        if Path(ckpt).is_dir():  # ZeRO shards -> one fp32 Lightning checkpoint
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

            ckpt = str(Path(tmp) / "consolidated.ckpt")
            convert_zero_checkpoint_to_fp32_state_dict(cfg.ckpt, ckpt)
        module = GistLitModule.load_from_checkpoint(ckpt, map_location="cpu")
    h = module.hparams
    model = module.model.to(getattr(torch, cfg.dtype))
    out = export_pretrained(model, module.tokenizer, cfg.out, h.num_gist_tokens, h.condition)
    print(f"exported {cfg.ckpt} -> {out} ({cfg.dtype})")


def _load_model(path: str, dtype: str | None, device: str):
    import torch

    from .export import load_pretrained

    model, tokenizer, settings = load_pretrained(path, dtype=getattr(torch, dtype) if dtype else None)
    return model.to(device), tokenizer, settings


def _add_answer_args(parser) -> None:
    """Arguments of the commands that answer inputs from a cache."""
    parser.add_argument("--input", action="append", default=[], help="an input to answer from the cache (repeatable)")
    parser.add_argument("--inputs", default=None, help="a text file of inputs, one per line")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu")


def _answer(model, tokenizer, cache, cfg) -> int:
    """Print ``input<TAB>output`` for every input of ``--input``/``--inputs``; return how many."""
    inputs = cfg.input + (_read_lines(cfg.inputs) if cfg.inputs else [])
    for x, y in zip(inputs, _generate_batched(model, tokenizer, cache, inputs, cfg.batch_size, cfg.max_new_tokens)):
        print(f"{x}\t{y}")
    return len(inputs)


def _generate_batched(model, tokenizer, cache, inputs: list[str], batch_size: int, max_new_tokens: int):
    """Outputs for ``inputs``, all continuing cache row 0, ``batch_size`` rows at a time."""
    from .generation import generate

    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        outputs += generate(model, tokenizer, cache.select([0] * len(chunk)), chunk, max_new_tokens)
    return outputs


def compress_main(argv: list[str]) -> None:
    from .caching import cache_bytes_per_position, compress
    from .prompt_cache import save_cache
    from .templates import encode_prefix
    from .tokens import gist_token_id

    parser = ArgumentParser(prog="gist-lightning compress", description="Compress an instruction into a gist cache "
                            "file with an exported model; with --input, also answer inputs from it.")
    parser.add_argument("--model", required=True, help="exported model folder (gist-lightning export, or a run's export/)")
    parser.add_argument("--instruction", required=True, help="the instruction to compress")
    parser.add_argument("--out", default=None, help="cache file to write (.safetensors); refuses to overwrite")
    _add_answer_args(parser)
    cfg = parser.parse_args(argv)
    model, tokenizer, settings = _load_model(cfg.model, cfg.dtype, cfg.device)
    k, condition = settings["num_gist_tokens"], settings["condition"]
    cache = compress(model, tokenizer, [cfg.instruction], k, condition)
    n_instr = len(encode_prefix(tokenizer, cfg.instruction, k, gist_token_id(tokenizer))) - k
    per_position = cache_bytes_per_position(model)
    print(f"instruction: {n_instr} tokens -> {cache.length} cached position(s) ({condition}, k={k}): "
          f"compression factor {n_instr / max(cache.length, 1):.1f}x; cache {cache.nbytes() / 1024:.1f} KiB "
          f"(instruction caching would hold {n_instr * per_position / 1024:.1f} KiB)")
    if cfg.out:
        if Path(cfg.out).exists():
            raise SystemExit(f"{cfg.out} exists; refusing to overwrite it")
        save_cache(cache, cfg.out, model, tokenizer, [cfg.instruction])
        print(f"wrote {cfg.out}")
    _answer(model, tokenizer, cache, cfg)


def generate_main(argv: list[str]) -> None:
    from .prompt_cache import load_cache

    parser = ArgumentParser(prog="gist-lightning generate", description="Answer inputs from a gist cache file, batched.")
    parser.add_argument("--model", required=True, help="the exported model folder the cache was made with")
    parser.add_argument("--cache", required=True, help="cache file written by gist-lightning compress")
    _add_answer_args(parser)
    cfg = parser.parse_args(argv)
    model, tokenizer, settings = _load_model(cfg.model, cfg.dtype, cfg.device)
    cache = load_cache(cfg.cache, model, tokenizer, settings["num_gist_tokens"])
    if not _answer(model, tokenizer, cache, cfg):
        raise SystemExit("no inputs: pass --input TEXT or --inputs FILE")


def _read_lines(path: str) -> list[str]:
    return [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]


COMMANDS = {"score": score_main, "export": export_main, "compress": compress_main, "generate": generate_main}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in COMMANDS:
        COMMANDS[args[0]](args[1:])
        return
    cli_main(argv)  # None: LightningCLI reads sys.argv itself (DDP launchers re-run the command line)


if __name__ == "__main__":
    main()
