"""Callbacks that turn validation outputs into metrics, files and a summary.

Each consumes what ``GistLitModule.validation_step`` returns for a batch: ``split``, ``x``,
``y_pred``, ``y_true``, ``instruction_tokens``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from ..caching import cache_bytes_per_position
from ..export import export_pretrained
from .metrics import RougeL

SPLIT_ORDER = ("validation_seen", "validation_unseen", "validation_human")


def run_dir(trainer) -> Path:
    """The run's folder. ``trainer.log_dir`` is a collective call under DDP: every rank must call
    this, never rank 0 alone."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def free_path(path: Path) -> Path:
    """``path``, or ``name-1.ext``, ``name-2.ext``... if it exists: nothing is overwritten."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path = free_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def gather_lists(rows: list) -> list:
    """All ranks' rows, in rank order (a no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rows)
    return [r for part in out for r in part]


class RougeCallback(L.Callback):
    """ROUGE-L and exact match per split (``validation_seen/rougeL``...), synced across processes."""

    def __init__(self):
        self.metrics: dict[str, RougeL] = {}
        self.last: dict[str, dict[str, float]] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        metric = self.metrics.get(outputs["split"])
        if metric is None:
            metric = self.metrics[outputs["split"]] = RougeL().to(pl_module.device)
        metric.update(outputs["y_pred"], outputs["y_true"])

    def on_validation_epoch_end(self, trainer, pl_module):
        for split in sorted(self.metrics, key=SPLIT_ORDER.index):
            values = self.metrics[split].compute()
            self.metrics[split].reset()
            if trainer.sanity_checking:
                continue
            self.last[split] = {k: float(v) for k, v in values.items()}
            for name in ("rougeL", "exact_match"):
                pl_module.log(f"{split}/{name}", values[name].float(), add_dataloader_idx=False, sync_dist=False,
                              prog_bar=name == "rougeL" and split == "validation_unseen")

    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


class PredictionWriter(L.Callback):
    """One CSV per split and validation run, columns ``x, y_pred, y_true``, under ``<run>/predictions``."""

    def __init__(self):
        self.rows: dict[str, list] = {}
        self.written: list[Path] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.rows.setdefault(outputs["split"], []).extend(zip(outputs["x"], outputs["y_pred"], outputs["y_true"]))

    def on_validation_epoch_end(self, trainer, pl_module):
        rows, self.rows = self.rows, {}
        folder = run_dir(trainer) / "predictions"
        for split in sorted(rows, key=SPLIT_ORDER.index):
            all_rows = gather_lists(rows[split])
            if not trainer.is_global_zero:
                continue
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(["x", "y_pred", "y_true"])
            writer.writerows(all_rows)
            path = folder / f"step{trainer.global_step:06d}-{split}.csv"
            self.written.append(write_atomic(path, buf.getvalue()))

    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


class CompressionStats(L.Callback):
    """Per split: instruction tokens (mean, p50, p90), k, compression ratio, cache bytes per prompt
    for instruction caching vs gist caching, and the prefill FLOPs gist caching saves per call
    against feeding the whole gist prompt (2 x non-embedding parameters x (instruction + k) tokens;
    attention's quadratic part is left out, so this is a lower bound)."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.last: dict[str, dict] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.tokens.setdefault(outputs["split"], []).extend(outputs["instruction_tokens"])

    def on_validation_epoch_end(self, trainer, pl_module):
        tokens, self.tokens = self.tokens, {}
        if not tokens:
            return
        model, k = pl_module.model, pl_module.hparams.num_gist_tokens
        per_position = cache_bytes_per_position(model)
        # matmul FLOPs per token of the non-embedding weights (attention's quadratic part left out)
        n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "shared" not in n)
        stats = {}
        for split in sorted(tokens, key=SPLIT_ORDER.index):
            t = np.array(gather_lists(tokens[split]), dtype=float)
            stats[split] = {
                "records": int(t.size),
                "instruction_tokens_mean": float(t.mean()),
                "instruction_tokens_p50": float(np.percentile(t, 50)),
                "instruction_tokens_p90": float(np.percentile(t, 90)),
                "num_gist_tokens": k,
                "compression_ratio": float(t.mean() / k),
                "instruction_cache_bytes": float(t.mean() * per_position),
                "gist_cache_bytes": float(k * per_position),
                "prefill_flops_saved": float(2 * n_params * (t.mean() + k)),
            }
            for name in ("compression_ratio", "instruction_tokens_mean", "gist_cache_bytes"):
                pl_module.log(f"{split}/{name}", torch.tensor(stats[split][name], dtype=torch.float32),
                              add_dataloader_idx=False, rank_zero_only=True)
        self.last = stats
        folder = run_dir(trainer) / "predictions"
        if trainer.is_global_zero:
            path = folder / f"step{trainer.global_step:06d}-compression.json"
            write_atomic(path, json.dumps(stats, indent=1) + "\n")

    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end


class ExportBest(L.Callback):
    """At the end of fit, load the best checkpoint (by the checkpoint callback's monitor, e.g.
    ``validation_unseen/rougeL``) and export it as an HF folder ``<run>/export``."""

    def __init__(self, dirname: str = "export"):
        self.dirname = dirname
        self.path: Path | None = None
        self.source = "last weights"

    def on_fit_end(self, trainer, pl_module):
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if type(trainer.strategy).__name__.startswith("DeepSpeed") or (ckpt and Path(ckpt).is_dir()):
            # ZeRO shards the weights across ranks: convert the saved checkpoint instead
            self.source = f"not exported under DeepSpeed; run: gist-lightning export --ckpt {ckpt} --out <folder>"
            return
        if ckpt and Path(ckpt).is_file():
            state = torch.load(ckpt, map_location=pl_module.device, weights_only=False)["state_dict"]
            pl_module.load_state_dict(state)
            self.source = ckpt
        folder = run_dir(trainer) / self.dirname
        if trainer.is_global_zero:
            h = pl_module.hparams
            self.path = export_pretrained(pl_module.model, pl_module.tokenizer, free_path(folder),
                                          h.num_gist_tokens, h.condition)


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
        cbs = {type(c).__name__: c for c in trainer.callbacks}
        rouge, comp = cbs.get("RougeCallback"), cbs.get("CompressionStats")
        h = pl_module.hparams
        lines = [f"\n== {h.condition}, k={h.num_gist_tokens} (step {trainer.global_step}) =="]
        lines.append(f"{'split':<20}{'ROUGE-L':>9}{'exact':>8}{'records':>9}{'instr tok':>11}{'ratio':>7}"
                     f"{'instr cache':>13}{'gist cache':>12}")
        for split in SPLIT_ORDER:
            r = rouge.last.get(split) if rouge else None
            c = comp.last.get(split) if comp else None
            if r is None:
                continue
            line = f"{split:<20}{r['rougeL']:>9.1f}{r['exact_match']:>8.1f}{int(r['count']):>9}"
            if c:
                line += (f"{c['instruction_tokens_mean']:>11.1f}{c['compression_ratio']:>7.1f}"
                         f"{c['instruction_cache_bytes'] / 1024:>11.1f}KB{c['gist_cache_bytes'] / 1024:>10.1f}KB")
            lines.append(line)
        ckpt = trainer.checkpoint_callback
        if trainer.state.fn == "fit" and ckpt is not None and ckpt.best_model_score is not None:
            lines.append(f"best {ckpt.monitor} = {float(ckpt.best_model_score):.1f} ({Path(ckpt.best_model_path).name})")
        writer, export = cbs.get("PredictionWriter"), cbs.get("ExportBest")
        if writer and writer.written:
            lines.append(f"predictions: {writer.written[-1].parent}/")
        if export and export.path is None and export.source.startswith("not exported"):
            lines.append(export.source)
        if export and export.path:
            lines.append(f"exported model ({export.source}): {export.path}")
            lines.append(f"  load it: model, tokenizer, settings = gist_lightning.export.load_pretrained('{export.path}')")
        print("\n".join(lines), flush=True)
