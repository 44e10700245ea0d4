"""Multi-GPU presets, tested as far as a CPU allows: every DeepSpeed preset builds its strategy and
the DeepSpeed config it hands to the engine holds the JSON's ZeRO settings and the Trainer's values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gist_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_preset_builds_strategy_with_trainer_values(tmp_path, monkeypatch, stage):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    monkeypatch.chdir(ROOT)  # preset paths are relative to the repository root
    cli = cli_main(["--config", "configs/tiny.yaml", "--config", f"configs/strategies/deepspeed-zero{stage}.yaml",
                    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
                    "--trainer.accumulate_grad_batches", "4", "--trainer.gradient_clip_val", "0.5",
                    "--data.batch_size", "8", "--data.suite_train_size", "64", "--data.suite_validation_size", "4",
                    "--data.cache_dir", str(tmp_path)], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    wanted = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert strategy.config["zero_optimization"] == wanted["zero_optimization"]
    # what fit does before it starts the engine (on CPU it stops at Lightning's CUDA check)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    cli.trainer._data_connector.attach_data(cli.model, datamodule=cli.datamodule)
    strategy.connect(cli.model)
    cli.model.trainer = cli.trainer
    strategy._format_config()
    assert strategy.config["gradient_accumulation_steps"] == 4
    assert strategy.config["train_micro_batch_size_per_gpu"] == 8
    assert strategy.config["gradient_clipping"] == 0.5
    assert strategy.config["bf16"] == {"enabled": True}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_on_cpu_fits_validates_and_converts(tmp_path, stage):
    """The real DeepSpeed engine, 2 CPU processes: fit + validation with generation (ZeRO-3: all ranks
    step together), a ZeRO checkpoint, its conversion to an HF folder, and a reload that
    reproduces the trained model's logits (ZeRO-2, where rank 0 holds the full weights)."""
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    import torch

    from gist_lightning.export import load_pretrained

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("deepspeed_cpu.py")
    proc = subprocess.run([sys.executable, str(script), str(stage), "2", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation_unseen" in (tmp_path / "rouge.txt").read_text()
    ckpt = tmp_path / "checkpoints" / "zero.ckpt"
    assert ckpt.is_dir()  # DeepSpeed writes a folder of shards
    assert not (tmp_path / "export").exists()  # sharded weights are converted, never exported as they are
    from gist_lightning.cli import main

    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    model, tok, settings = load_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert settings["num_gist_tokens"] == 1
    if stage == 2:
        ids = torch.tensor([[tok.bos_token_id, 5, 6, 7, tok.convert_tokens_to_ids("<GIST>"), 8, 9]])
        want = torch.load(tmp_path / "logits.pt")
        assert torch.allclose(model(input_ids=ids).logits.float(), want, atol=1e-5)
