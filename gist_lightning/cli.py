"""``gist-lightning``: LightningCLI (fit / validate / test / predict) plus small commands.

    gist-lightning fit --config configs/tiny.yaml [--model.num_gist_tokens 5] [--print_config]
    gist-lightning score predictions.csv [more.csv ...]
    gist-lightning export --ckpt path/to.ckpt --out folder
    gist-lightning compress --model EXPORT --instruction "..." [--out cache.safetensors] [--input "..."]
    gist-lightning generate --model EXPORT --cache cache.safetensors --inputs inputs.txt [--batch_size 16]
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .data.datamodule import GistDataModule
from .errors import CorruptFileError, GistError, read_text
from .evaluation.callbacks import CompressionStats, ExportBest, PredictionWriter, RougeCallback, RunSummary
from .files import free_path
from .model_summary import use_model_summary_without_flops
from .module import GistLitModule
from .progress import use_step_progress_bar
from .resume import (
    SIGTERM_EXIT,
    BestCheckpoint,
    ResumableRun,
    clock_checkpoint,
    stopped_early_message,
    use_atomic_checkpoints,
)
from .splits import BEST_METRIC, BEST_MODE, EXACT_MATCH, ROUGE_L
from .tracking import TrackerUploads


def default_callbacks():
    return [
        RougeCallback(),
        PredictionWriter(),
        CompressionStats(),
        TrackerUploads(),  # predictions and compression files to TensorBoard / W&B / MLflow loggers
        # enable_version_counter=False: the clock checkpoint (GistCLI) writes the same last.ckpt
        BestCheckpoint(monitor=BEST_METRIC, mode=BEST_MODE, save_top_k=1, save_last=True,
                        filename="best-step{step}", auto_insert_metric_name=False,
                        enable_version_counter=False),
        ExportBest(),
        RunSummary(),
        ResumableRun(),
    ]


class SaveConfigUnlessResuming(SaveConfigCallback):
    """Refuses, as Lightning's does, to overwrite the config.yaml of a run folder, except that a run
    resumed into its own folder (``--ckpt_path``) writes ``config-resumed.yaml`` (``-1``, ``-2``...)
    beside it. A fit that fails (a refused resume, data it cannot read) or is interrupted (Ctrl-C,
    a SIGTERM during the sanity check) before its first optimizer step removes the config it wrote,
    so the same command can run again into the folder. (A SIGTERM before Lightning's handler is
    installed, in setup, kills the process outright: its config stays.)"""

    _written: Path | None = None
    _trained = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        saved_before = self.already_saved
        if self.config.get("ckpt_path") is not None:
            folder = Path(trainer.log_dir or trainer.default_root_dir)
            if (folder / self.config_filename).exists():
                self.config_filename = free_path(folder / "config-resumed.yaml").name
        super().setup(trainer, pl_module, stage)
        # (already_saved is broadcast: the same on every rank, which all make the collective log_dir)
        if stage == "fit" and self.save_to_log_dir and self.already_saved and not saved_before:
            log_dir = trainer.log_dir
            if trainer.is_global_zero:
                self._written = Path(log_dir) / self.config_filename

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if not trainer.fit_loop._should_accumulate():  # an optimizer step, not a micro-batch of one
            self._trained = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._written is not None and not self._trained:
            with contextlib.suppress(OSError):  # (never in place of the error that stopped the fit)
                self._written.unlink(missing_ok=True)


class GistCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_argument("--checkpoint_minutes", type=float, default=10.0,
                            help="write last.ckpt at least every this many minutes of training (0: only "
                            "at validation)")
        parser.add_argument("--checkpoint_every_n_steps", type=int | None, default=None,
                            help="write last.ckpt every this many steps instead")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        clock = clock_checkpoint(self._get(self.config_init, "checkpoint_minutes"),
                                 self._get(self.config_init, "checkpoint_every_n_steps"))
        if trainer.checkpoint_callback is not None:  # none when checkpointing is off
            trainer.callbacks.append(clock)
        use_atomic_checkpoints(trainer)
        use_step_progress_bar(trainer)
        use_model_summary_without_flops(trainer)
        return trainer

    def parse_arguments(self, parser, args) -> None:
        self.command_line = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning lays a checkpoint file's hyperparameters over the parsed config (command line
        included) when ``--ckpt_path`` names a file. A fit resumed so would silently drop what its
        command line changed (a rate, ``model.stage_schedule``), where ``--ckpt_path last`` keeps
        it: a fit takes its config as given, however its checkpoint is named (what cannot resume
        under it is refused by the module); validate / test / predict keep Lightning's rule."""
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            if subcommand != "fit":
                raise
            raise StoppedEarly(stopped_early_message(self.trainer, self.command_line)) from None


class StoppedEarly(SystemExit):
    """A fit that a SIGTERM stopped: exits with 143 after one line that says how to resume."""

    def __init__(self, message: str):
        super().__init__(SIGTERM_EXIT)
        self.message = message


def cli_main(args=None, run: bool = True, cli_class: type[LightningCLI] | None = None) -> LightningCLI:
    """The training CLI. The model owns the tokenizer, k and the condition (``--model.*``); the data
    source is a ``GistDataModule`` subclass chosen by ``class_path`` (``EmbeddedSuite``,
    ``AlpacaPlus``) and receives them from the model."""
    # Lightning 2.6 on torch 2.13: a deprecation inside Lightning, nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    return (cli_class or GistCLI)(
        GistLitModule,
        GistDataModule,
        subclass_mode_data=True,
        save_config_callback=SaveConfigUnlessResuming,
        trainer_defaults={"callbacks": default_callbacks()},
        save_config_kwargs={"overwrite": False},
        args=args,
        run=run,
    )


def score_main(argv: list[str]) -> None:
    from .evaluation.metrics import score_csv

    parser = ArgumentParser(prog="gist-lightning score", description="ROUGE-L (x100) and exact match of "
                            "predictions CSVs with y_pred and y_true columns, as the authors released them.")
    parser.add_argument("files", nargs="+", help="CSV files")
    cfg = parser.parse_args(argv)
    for path in cfg.files:
        s = score_csv(path)
        print(f"{path}: {ROUGE_L}={s[ROUGE_L]:.2f} {EXACT_MATCH}={s[EXACT_MATCH]:.2f} records={s['count']}")


def export_main(argv: list[str]) -> None:
    import tempfile
    import zipfile

    import torch


    parser = ArgumentParser(prog="gist-lightning export", description="Turn a Lightning checkpoint (a .ckpt "
                            "file, or the folder a DeepSpeed ZeRO run saves) into an HF folder: model, "
                            "tokenizer with <GIST>, gist_config.json.")
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file or DeepSpeed checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder (must not hold an export already)")
    parser.add_argument("--dtype", default="float32",
                        help="weights' dtype in the export: float32 or bfloat16")
    parser.add_argument("--form", default="merged", choices=GistLitModule.EXPORT_FORMS,
                        help="for a model.peft run: merged (adapters folded into the base: a plain HF "
                        "folder) or adapter (PEFT's adapter files and token rows, loaded onto the base named "
                        "inside)")
    cfg = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = cfg.ckpt
        if Path(ckpt).is_dir():  # ZeRO shards -> one fp32 Lightning checkpoint
            from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

            ckpt = str(Path(tmp) / "consolidated.ckpt")
            convert_zero_checkpoint_to_fp32_state_dict(cfg.ckpt, ckpt)
        if not Path(ckpt).exists():
            raise FileNotFoundError(f"{ckpt}: no such checkpoint")
        if not zipfile.is_zipfile(ckpt):  # torch.save writes a zip archive; a truncated one has no directory
            raise CorruptFileError(f"{ckpt}: not a readable Lightning checkpoint (not a torch zip archive: "
                                   "truncated, corrupt or another kind of file)")
        module = GistLitModule.load_from_checkpoint(ckpt, map_location="cpu")
    # 4-bit weights cannot be cast; their adapters stay as trained
    if not (module.peft and module.peft.quantize):
        module.model.to(getattr(torch, cfg.dtype))
    out = module.export(cfg.out, form=cfg.form)
    form = f", {cfg.form}" if module.peft_model is not None else ""
    print(f"exported {cfg.ckpt} -> {out} ({cfg.dtype}{form})")


def _load_model(path: str, dtype: str | None, device: str):
    import torch

    from .export import load_pretrained

    model, tokenizer, settings = load_pretrained(path, dtype=getattr(torch, dtype) if dtype else None)
    return model.to(device), tokenizer, settings


def _add_answer_args(parser) -> None:
    """Arguments of the commands that answer inputs from a cache."""
    parser.add_argument("--input", action="append", default=[],
                        help="an input to answer from the cache (repeatable)")
    parser.add_argument("--inputs", default=None, help="a text file of inputs, one per line")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--on_overflow", default="error", choices=["error", "truncate_input"],
                        help="an input that does not fit the model's positions: refuse (default) or drop its "
                        "last words")


def _answer(model, tokenizer, cache, cfg) -> int:
    """Print ``input<TAB>output`` for every input of ``--input``/``--inputs``; return how many."""
    inputs = cfg.input + (_read_lines(cfg.inputs) if cfg.inputs else [])
    for x, y in zip(inputs, _generate_batched(model, tokenizer, cache, inputs, cfg.batch_size,
                                              cfg.max_new_tokens, cfg.on_overflow)):
        print(f"{x}\t{y}")
    return len(inputs)


def _generate_batched(model, tokenizer, cache, inputs: list[str], batch_size: int, max_new_tokens: int,
                      on_overflow: str = "error"):
    """Outputs for ``inputs``, all continuing cache row 0, ``batch_size`` rows at a time."""
    from .generation import generate

    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        outputs += generate(model, tokenizer, cache.select([0] * len(chunk)), chunk, max_new_tokens,
                            on_overflow=on_overflow)
    return outputs


def compress_main(argv: list[str]) -> None:
    from .caching import cache_bytes_per_position

    parser = ArgumentParser(prog="gist-lightning compress", description="Compress an instruction (or, for a "
                            "model trained with model.segments, a long context read from a file) into a gist "
                            "cache file with an exported model; with --input, also answer inputs from it.")
    parser.add_argument("--model", required=True,
                        help="exported model folder (gist-lightning export, or a run's export/)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--instruction", help="the instruction to compress")
    what.add_argument("--context", help="a text file (a document, a long system prompt) to compress segment "
                      "by segment; the model must have been trained with model.segments")
    parser.add_argument("--out", default=None,
                        help="cache file to write (.safetensors); refuses to overwrite")
    _add_answer_args(parser)
    cfg = parser.parse_args(argv)
    if cfg.out and Path(cfg.out).exists():  # before any work: nothing the user had is overwritten
        raise FileExistsError(f"{cfg.out} exists; refusing to overwrite it")
    model, tokenizer, settings = _load_model(cfg.model, cfg.dtype, cfg.device)
    if cfg.context is not None:
        cache, text, n_tokens, what = _compress_context_file(model, tokenizer, settings, cfg.context)
    else:
        cache, text, n_tokens, what = _compress_instruction(model, tokenizer, settings, cfg.instruction)
    per_position = cache_bytes_per_position(model)
    print(f"{what}: {n_tokens} tokens -> {cache.length} cached position(s): compression factor "
          f"{n_tokens / max(cache.length, 1):.1f}x; cache {cache.nbytes() / 1024:.1f} KiB (caching the text "
          f"itself would hold {n_tokens * per_position / 1024:.1f} KiB)")
    if cfg.out:
        from .prompt_cache import save_cache

        save_cache(cache, cfg.out, model, tokenizer, [text])
        print(f"wrote {cfg.out}")
    _answer(model, tokenizer, cache, cfg)


def _compress_instruction(model, tokenizer, settings: dict, instruction: str):
    """(cache, text, tokens, description) of a short instruction, with the model's k gists."""
    from .caching import compress
    from .templates import encode_prefix
    from .tokens import gist_token_id

    if settings.get("segments"):
        raise ValueError("this model gists long contexts segment by segment (model.segments): pass the text "
                         "as --context FILE instead of --instruction")
    k, condition = settings["num_gist_tokens"], settings["condition"]
    cache = compress(model, tokenizer, [instruction], k, condition)
    n_instr = len(encode_prefix(tokenizer, instruction, k, gist_token_id(tokenizer))) - k
    return cache, instruction, n_instr, f"instruction ({condition}, k={k})"


def _compress_context_file(model, tokenizer, settings: dict, path: str):
    """(cache, text, tokens, description) of a long context read from ``path``, segment by segment."""
    from .long_context import SegmentSettings, compress_context
    from .tokens import encode_text

    if not settings.get("segments"):
        raise ValueError(f"--context {path}: this model was trained on short instructions (no "
                         "model.segments); compress a long context with a model trained with "
                         "model.segments, or pass --instruction")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--context {path}: no such file")
    text = read_text(path).strip()
    if not text:
        raise ValueError(f"--context {path}: the file is empty")
    segments = SegmentSettings(**settings["segments"])
    cache = compress_context(model, tokenizer, [text], segments, settings["condition"])
    n_tokens = len(encode_text(tokenizer, text))
    return cache, text, n_tokens, (f"context {path} ({settings['condition']}, segments of "
                                   f"{segments.segment_tokens} tokens + {segments.gists_per_segment} "
                                   f"{segments.placement} gists)")


def generate_main(argv: list[str]) -> None:
    from .prompt_cache import load_cache

    parser = ArgumentParser(prog="gist-lightning generate",
                            description="Answer inputs from a gist cache file, batched.")
    parser.add_argument("--model", required=True, help="the exported model folder the cache was made with")
    parser.add_argument("--cache", required=True, help="cache file written by gist-lightning compress")
    _add_answer_args(parser)
    cfg = parser.parse_args(argv)
    model, tokenizer, settings = _load_model(cfg.model, cfg.dtype, cfg.device)
    cache = load_cache(cfg.cache, model, tokenizer, settings["num_gist_tokens"],
                       segments=settings.get("segments"))
    if not _answer(model, tokenizer, cache, cfg):
        raise ValueError("no inputs: pass --input TEXT or --inputs FILE")


def _read_lines(path: str) -> list[str]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such inputs file")
    return [line for line in read_text(path).splitlines() if line.strip()]


def serve_main(argv: list[str]) -> None:
    from .serving.server import serve_main as run

    run(argv)


def judge_main(argv: list[str]) -> None:
    from .evaluation.judge import judge_main as run

    run(argv)


def clean_main(argv: list[str]) -> None:
    from .files import find_strays, remove_strays_at

    parser = ArgumentParser(prog="gist-lightning clean", description="Remove the temporary files and "
                            "folders that killed writes left in run folders (a kill inside a checkpoint "
                            "write or an export). A resumed fit removes its own; this is for runs never "
                            "resumed. Temporaries of writers still alive, or of another host, are kept.")
    parser.add_argument("folders", nargs="+", help="run folders (searched recursively)")
    parser.add_argument("--dry_run", action="store_true", help="list them, remove nothing")
    cfg = parser.parse_args(argv)
    for folder in cfg.folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
    strays = [stray for folder in cfg.folders for stray in find_strays(folder)]
    for stray in strays:
        if cfg.dry_run or remove_strays_at(stray):
            print(("would remove " if cfg.dry_run else "removed ") + str(stray))
    if not strays:
        print("nothing to remove")


def sweep_main(argv: list[str]) -> None:
    from .sweeps.engine import main as run

    sys.exit(run(argv))


COMMANDS = {"score": score_main, "export": export_main, "compress": compress_main, "generate": generate_main,
            "serve": serve_main, "judge": judge_main, "clean": clean_main,
            "sweep": sweep_main}
LIGHTNING_COMMANDS = {
    "fit": "train (and validate) a gist model: gist-lightning fit --config configs/tiny.yaml",
    "validate": "validate a model or checkpoint on the validation splits (ROUGE-L, compression)",
    "test": "the same on the test loaders",
    "predict": "the same, predictions only",
}
HELP = {
    "score": "ROUGE-L and exact match of predictions CSVs (columns y_pred, y_true)",
    "export": ("a Lightning checkpoint (or DeepSpeed checkpoint folder) -> an HF folder with the gist "
               "settings"),
    "compress": "compress an instruction (or a long context, --context FILE) into a gist cache file",
    "generate": "answer inputs from a gist cache file, batched",
    "judge": "pairwise comparison of two prediction CSVs by a judge model at any OpenAI-compatible endpoint",
    "serve": "an OpenAI-compatible server of an exported model: instructions compressed once, caches reused",
    "sweep": "a grid of fits (any config keys x seeds), N at once here or as SLURM job arrays; resumable",
    "clean": "remove the temporaries that killed writes left in run folders (of dead writers only)",
}
DEBUG_ENV = "GIST_LIGHTNING_DEBUG"
# failures that are the input's, not the program's: printed as one line (tracebacks with --debug)
EXPECTED = (GistError, ValueError, OSError, KeyError)


def _setting_error(text: str) -> str:
    """An optional dataclass setting (``model.segments``: ``SegmentSettings | None``) that fails its
    own check reaches here as jsonargparse's error listing each subtype's; the setting's own message
    is the one that is not ``None``'s."""
    if not text.startswith("Does not validate against any of the Union subtypes"):
        return text
    errors = [line.strip()[2:] for line in text.splitlines() if line.startswith("  - ")]
    own = [e for e in errors if not e.startswith("Expected a <class 'NoneType'>")]
    return own[0] if len(own) == 1 else text


def print_help(file=sys.stdout) -> None:
    lines = ["usage: gist-lightning COMMAND [options]      (gist-lightning COMMAND --help: its options)", "",
             "training and evaluation (LightningCLI):"]
    lines += [f"  {name:<10}{text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "gist caches, results and models:"]
    lines += [f"  {name:<10}{text}" for name, text in HELP.items()]
    lines += ["", f"--debug (or {DEBUG_ENV}=1) shows the traceback of a failure instead of one line."]
    print("\n".join(lines), file=file)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if "--debug" in args:
        args.remove("--debug")
        os.environ[DEBUG_ENV] = "1"  # processes that DDP launches re-read the command line, not --debug
        if argv is None:
            sys.argv.remove("--debug")  # LightningCLI (and DDP launchers) read sys.argv themselves
    if not args or args[0] in ("-h", "--help"):
        print_help(sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    if args[0] not in COMMANDS and args[0] not in LIGHTNING_COMMANDS and not args[0].startswith("-"):
        print_help(sys.stderr)
        print(f"gist-lightning: error: unknown command {args[0]!r}", file=sys.stderr)
        sys.exit(2)
    try:
        if args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            cli_main(args if argv is not None else None)  # None: LightningCLI reads sys.argv itself
    except StoppedEarly as e:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank == 0:  # one line, not one per process
            print(f"gist-lightning: {e.message}", file=sys.stderr, flush=True)
        raise
    except EXPECTED as e:
        if debug:
            raise
        message = " ".join(_setting_error(str(e)).split()) or type(e).__name__
        if not isinstance(e, GistError):
            message = f"{message} ({type(e).__name__})"
        print(f"gist-lightning: error: {message}  [--debug shows the traceback]", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
