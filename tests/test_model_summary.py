"""The model summary ``gist-lightning fit`` prints: parameters and modules as Lightning counts them,
FLOPs only where Lightning counted some."""

from __future__ import annotations

import re

import lightning as L
import torch
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.demos.boring_classes import BoringModel

from gist_lightning.model_summary import ModelSummaryWithoutFlops, use_model_summary_without_flops


def summary_of(module, tmp_path, capsys) -> str:
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    use_model_summary_without_flops(trainer)
    summaries = [type(c) for c in trainer.callbacks if isinstance(c, RichModelSummary)]
    assert summaries == [ModelSummaryWithoutFlops]
    capsys.readouterr()
    trainer.fit(module)
    return capsys.readouterr().out


def test_a_module_without_an_example_input_prints_no_flops(tmp_path, capsys):
    module = BoringModel()
    assert module.example_input_array is None  # as a gist module: Lightning counts no FLOPs
    out = summary_of(module, tmp_path, capsys)
    assert "flops" not in out.lower(), out
    assert re.search(r"Total params: 66 ", out) and "BoringModel" not in out and "Linear" in out, out


def test_flops_that_lightning_counted_are_printed(tmp_path, capsys):
    module = BoringModel()
    module.example_input_array = torch.randn(4, 32)
    out = summary_of(module, tmp_path, capsys)
    # a 32 -> 2 linear layer on 4 rows: 2 x 4 x 32 x 2 multiply-adds
    assert re.search(r"Total FLOPs: 512\b", out), out
