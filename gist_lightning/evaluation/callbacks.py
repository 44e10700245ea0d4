"""Callbacks that turn validation outputs into metrics, files and a summary.

Each consumes the :class:`~gist_lightning.evaluation.results.ValidationBatchOutput` that
``GistLitModule.validation_step`` returns for a batch, and keeps its per-split results as typed
objects (``results.py``) that the summary reads.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

from ..caching import cache_bytes_per_position
from ..export import read_settings
from ..files import atomic_dir, free_path, write_text_atomic
from ..splits import BEST_METRIC, EXACT_MATCH, QUALITY_METRICS, ROUGE_L, VALIDATION_SPLITS, metric_key
from .metrics import RougeL
from .results import ExportResult, SplitCompression, SplitScores, ValidationBatchOutput


def run_dir(trainer) -> Path:
    """The run's folder. ``trainer.log_dir`` is a collective call under DDP: every rank must call
    this, never rank 0 alone."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def predictions_dir(trainer) -> Path:
    """Where a run's prediction CSVs and compression statistics go (a collective call, see run_dir)."""
    return run_dir(trainer) / "predictions"


def result_path(trainer, path: Path) -> Path:
    """Where a validation result file of this step goes. During fit, the same step of the same run
    is the same validation: a run resumed after a crash redoes it and replaces what the crash left,
    so no file is lost or duplicated. Otherwise nothing is overwritten (``name-1.csv``...)."""
    return path if trainer.state.fn == "fit" else free_path(path)


def in_split_order(splits) -> list[str]:
    return sorted(splits, key=VALIDATION_SPLITS.index)


def gather_lists(rows: list) -> list:
    """All ranks' rows, in rank order (a no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rows)
    return [r for part in out for r in part]


class RougeCallback(L.Callback):
    """ROUGE-L and exact match per split (``validation_seen/rougeL``...), synced across processes.
    The last validation's scores (``last``, at ``step``) travel in checkpoints, so the summary of a
    run resumed after its last validation still shows them."""

    def __init__(self):
        self.metrics: dict[str, RougeL] = {}
        self.last: dict[str, SplitScores] = {}
        self.step: int | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "last": {split: asdict(s) for split, s in self.last.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = state_dict.get("step")
        self.last = {split: SplitScores(**s) for split, s in state_dict.get("last", {}).items()}

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.state.fn != "fit":  # a validate/test run reports its own scores, not a checkpoint's
            self.last, self.step = {}, None

    def on_validation_batch_end(self, trainer, pl_module, outputs: ValidationBatchOutput, batch, batch_idx,
                                dataloader_idx=0):
        metric = self.metrics.get(outputs.split)
        if metric is None:
            metric = self.metrics[outputs.split] = RougeL().to(pl_module.device)
        metric.update(outputs.y_pred, outputs.y_true)

    def on_validation_epoch_end(self, trainer, pl_module):
        for split in in_split_order(self.metrics):
            values = self.metrics[split].compute()
            self.metrics[split].reset()
            if trainer.sanity_checking:
                continue
            self.last[split] = SplitScores(rougeL=float(values[ROUGE_L]),
                                           exact_match=float(values[EXACT_MATCH]), count=int(values["count"]))
            self.step = trainer.global_step
            for name in QUALITY_METRICS:
                pl_module.log(metric_key(split, name), values[name].float(), add_dataloader_idx=False,
                              sync_dist=False, prog_bar=metric_key(split, name) == BEST_METRIC)

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


class PredictionWriter(L.Callback):
    """One CSV per split and validation run, columns ``x, y_pred, y_true``, under ``<run>/predictions``."""

    def __init__(self):
        self.rows: dict[str, list] = {}
        self.written: list[Path] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs: ValidationBatchOutput, batch, batch_idx,
                                dataloader_idx=0):
        if not trainer.sanity_checking:
            self.rows.setdefault(outputs.split, []).extend(zip(outputs.x, outputs.y_pred, outputs.y_true))

    def on_validation_epoch_end(self, trainer, pl_module):
        rows, self.rows = self.rows, {}
        folder = predictions_dir(trainer)
        for split in in_split_order(rows):
            all_rows = gather_lists(rows[split])
            if not trainer.is_global_zero:
                continue
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(["x", "y_pred", "y_true"])
            writer.writerows(all_rows)
            path = folder / f"step{trainer.global_step:06d}-{split}.csv"
            self.written.append(write_text_atomic(result_path(trainer, path), buf.getvalue()))

    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


class CompressionStats(L.Callback):
    """Per split, a :class:`SplitCompression`: instruction tokens (mean, p50, p90), k, the positions
    the cache holds (counted in each validation batch's cache, so a long context's segments and its
    layout count), the compression ratio, cache bytes per prompt for instruction caching vs gist
    caching, and the prefill FLOPs gist caching saves per call against feeding the whole gist prompt."""

    def __init__(self):
        self.tokens: dict[str, list[tuple[int, int]]] = {}
        self.last: dict[str, SplitCompression] = {}

    def state_dict(self) -> dict:
        return {"last": {split: asdict(s) for split, s in self.last.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        # a checkpoint of an earlier version has no cached_positions_mean: its caches held k positions
        self.last = {split: SplitCompression(**{"cached_positions_mean": float(s["num_gist_tokens"]), **s})
                     for split, s in state_dict.get("last", {}).items()}

    def on_validation_batch_end(self, trainer, pl_module, outputs: ValidationBatchOutput, batch, batch_idx,
                                dataloader_idx=0):
        if not trainer.sanity_checking:
            self.tokens.setdefault(outputs.split, []).extend(zip(outputs.instruction_tokens,
                                                                 outputs.cached_positions))

    def on_validation_epoch_end(self, trainer, pl_module):
        tokens, self.tokens = self.tokens, {}
        if not tokens:
            return
        model, k = pl_module.model, pl_module.hparams.num_gist_tokens
        per_position = cache_bytes_per_position(model)
        # matmul FLOPs per token of the non-embedding weights (attention's quadratic part left out)
        n_params = sum(p.numel() for n, p in model.named_parameters()
                       if "embed" not in n and "shared" not in n)
        stats = {}
        for split in in_split_order(tokens):
            t, cached = np.array(gather_lists(tokens[split]), dtype=float).reshape(-1, 2).T
            held = float(cached.mean())
            stats[split] = SplitCompression(
                records=int(t.size),
                instruction_tokens_mean=float(t.mean()),
                instruction_tokens_p50=float(np.percentile(t, 50)),
                instruction_tokens_p90=float(np.percentile(t, 90)),
                num_gist_tokens=k,
                cached_positions_mean=held,
                compression_ratio=float(t.mean() / held) if held else math.inf,
                instruction_cache_bytes=float(t.mean() * per_position),
                gist_cache_bytes=float(held * per_position),
                prefill_flops_saved=float(2 * n_params * (t.mean() + held)),
            )
            for name in ("compression_ratio", "instruction_tokens_mean", "gist_cache_bytes"):
                pl_module.log(metric_key(split, name),
                              torch.tensor(getattr(stats[split], name), dtype=torch.float32),
                              add_dataloader_idx=False, rank_zero_only=True)
        self.last = stats
        folder = predictions_dir(trainer)
        if trainer.is_global_zero:
            path = folder / f"step{trainer.global_step:06d}-compression.json"
            text = json.dumps({split: asdict(s) for split, s in stats.items()}, indent=1) + "\n"
            write_text_atomic(result_path(trainer, path), text)

    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


class ExportBest(L.Callback):
    """At the end of fit, load the best checkpoint (by the checkpoint callback's monitor, e.g.
    ``validation_unseen/rougeL``) and export it as an HF folder ``<run>/export``: the whole model,
    or for a model.peft run ``form`` (default ``adapter``: small, and it leaves the run's model as it
    is; ``gist-lightning export --form merged`` folds it into the base later).

    The folder is written beside its place and renamed into it, so ``export/`` is whole or absent.
    A resumed run whose export was cut short writes it again in the same place; an export of the
    same checkpoint is replaced; any other export already there is kept, and this one goes to
    ``export-1`` with a line saying so. The settings file records the checkpoint and step."""

    def __init__(self, dirname: str = "export", form: str = "adapter"):
        self.dirname = dirname
        self.form = form
        self.result: ExportResult | None = None

    @property
    def path(self) -> Path | None:
        return self.result.path if self.result else None

    def on_fit_end(self, trainer, pl_module):
        callback = trainer.checkpoint_callback
        ckpt = getattr(callback, "best_model_path", "") if callback else ""
        sharded = {DeepSpeedStrategy: "DeepSpeed", ModelParallelStrategy: "FSDP"}
        name = next((n for cls, n in sharded.items() if isinstance(trainer.strategy, cls)), None)
        if name or (ckpt and Path(ckpt).is_dir()):
            # the weights are sharded across ranks: the saved checkpoint holds them whole (or converts)
            self.result = ExportResult(path=None, source=ckpt,
                                       skipped=f"not exported under {name or 'DeepSpeed'}; "
                                       f"run: gist-lightning export --ckpt {ckpt} --out <folder>")
            return
        notes = []
        if ckpt and Path(ckpt).is_file():
            checkpoint = torch.load(ckpt, map_location=pl_module.device, weights_only=False)
            pl_module.load_state_dict(checkpoint["state_dict"])
            source = {"checkpoint": Path(ckpt).name, "global_step": int(checkpoint.get("global_step", -1))}
            described = ckpt
        else:
            source = {"checkpoint": None, "global_step": int(trainer.global_step)}
            described = f"last weights, step {trainer.global_step}"
            if callback is not None and callback.monitor:
                notes.append(f"no validation logged {callback.monitor}, so no best checkpoint was chosen: "
                             f"the export holds the last weights (step {trainer.global_step})")
        path, folder = None, run_dir(trainer) / self.dirname  # run_dir: every rank calls it
        if trainer.is_global_zero:
            target, replace, note = self._target(folder, source)
            notes += [note] if note else []
            form = self.form if pl_module.peft_model is not None else "merged"
            with atomic_dir(target, replace=replace) as tmp:
                pl_module.export(tmp, form=form, source=source)
            path = target
        self.result = ExportResult(path=path, source=described, notes=tuple(notes))

    @staticmethod
    def _target(folder: Path, source: dict) -> tuple[Path, bool, str | None]:
        """(where to export, whether that replaces what is there, a line saying what happened)."""
        if not folder.exists():
            return folder, False, None
        settings = read_settings(folder)
        if settings is None:
            return folder, True, f"replaced {folder}, an incomplete export (cut short by a kill)"
        if settings.get("source") == source:
            return folder, True, f"replaced {folder}, an earlier export of the same checkpoint"
        other = free_path(folder)
        return other, False, (f"{folder} holds another export (of "
                              f"{settings.get('source') or 'unrecorded weights'}); kept it, this one is "
                              f"{other}")


class RunSummary(L.Callback):
    """Print what a researcher wants at the end of a run: per-split ROUGE-L / exact match,
    compression statistics, and where predictions and the exported model are."""

    def on_fit_end(self, trainer, pl_module):
        self.print_summary(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.print_summary(trainer, pl_module)

    @staticmethod
    def print_summary(trainer, pl_module):
        if not trainer.is_global_zero:
            return
        def find(cls):
            return next((c for c in trainer.callbacks if isinstance(c, cls)), None)

        rouge, comp = find(RougeCallback), find(CompressionStats)
        h = pl_module.hparams
        step = rouge.step if rouge and rouge.step is not None else trainer.global_step
        lines = [f"\n== {h.condition}, k={h.num_gist_tokens} (step {trainer.global_step}) =="]
        if rouge and rouge.last and step != trainer.global_step:
            lines.append(f"(the last validation ran at step {step})")
        elif trainer.state.fn == "fit" and not (rouge and rouge.last):
            lines.append("no validation ran in this run: no scores to report")
        lines.append(f"{'split':<20}{'ROUGE-L':>9}{'exact':>8}{'records':>9}{'instr tok':>11}{'ratio':>7}"
                     f"{'instr cache':>13}{'gist cache':>12}")
        for split in VALIDATION_SPLITS:
            r = rouge.last.get(split) if rouge else None
            c = comp.last.get(split) if comp else None
            if r is None:
                continue
            line = f"{split:<20}{r.rougeL:>9.1f}{r.exact_match:>8.1f}{r.count:>9}"
            if c:
                line += (f"{c.instruction_tokens_mean:>11.1f}{c.compression_ratio:>7.1f}"
                         f"{c.instruction_cache_bytes / 1024:>11.1f}KB{c.gist_cache_bytes / 1024:>10.1f}KB")
            lines.append(line)
        ckpt = trainer.checkpoint_callback
        if trainer.state.fn == "fit" and ckpt is not None and ckpt.best_model_score is not None:
            lines.append(f"best {ckpt.monitor} = {float(ckpt.best_model_score):.1f} "
                         f"({Path(ckpt.best_model_path).name})")
        writer, export = find(PredictionWriter), find(ExportBest)
        if writer and writer.written:
            lines.append(f"predictions: {writer.written[-1].parent}/")
        done = export.result if export else None
        if done and done.skipped:
            lines.append(done.skipped)
        if done and done.path:
            lines.append(f"exported model ({done.source}): {done.path}")
            lines += [f"  note: {note}" for note in done.notes]
            lines.append("  load it: model, tokenizer, settings = "
                         f"gist_lightning.export.load_pretrained('{done.path}')")
        print("\n".join(lines), flush=True)
