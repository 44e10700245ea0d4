"""Multi-process runs, tested as far as a CPU allows: 2-process DDP validation equals 1 process on a
model whose answers depend on the instruction; every DeepSpeed preset builds its strategy with the
JSON's ZeRO settings and the Trainer's values; the real DeepSpeed engine on 2 CPU processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ranks_errors

from gist_lightning.cli import cli_main
from gist_lightning.splits import QUALITY_METRICS, VALIDATION_SPLITS, metric_key

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "gist-lightning"


def last_metrics(log_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    out = {}
    for row in rows:
        out.update({k: float(v) for k, v in row.items() if v and k.endswith(QUALITY_METRICS)})
    return out


def validate(config: Path, export: Path, devices: int, name: str, tmp_path: Path) -> dict[str, float]:
    args = [str(BIN), "validate", "--config", str(config), "--model.model_config", "null",
            "--model.model_name_or_path", str(export), "--model.max_new_tokens", "12",
            "--data.eval_batch_size", "1", "--data.max_validation_records", "15",
            "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.logger.init_args.name", name]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, ranks_errors(proc.stderr)
    return last_metrics(tmp_path / "runs" / name / "version_0")


@pytest.mark.slow
def test_two_process_ddp_validation_matches_one_process(trained_export, run_config, tmp_path):
    """The trained fixture answers by instruction, so a rank that compressed the wrong way (another
    condition, another k, no instruction) would change the metrics."""
    config = run_config()
    one = validate(config, trained_export, 1, "one", tmp_path)
    two = validate(config, trained_export, 2, "two", tmp_path)
    assert set(one) == {metric_key(s, m) for s in VALIDATION_SPLITS for m in QUALITY_METRICS}
    assert one[metric_key("validation_seen", "rougeL")] > 40
    assert one == pytest.approx(two, abs=1e-6)
    # 15 records per split on 2 ranks: one rank gets a repeat, which must not be counted or written
    for name in ("one", "two"):
        for split in VALIDATION_SPLITS:
            [path] = (tmp_path / "runs" / name / "version_0" / "predictions").glob(f"*-{split}.csv")
            assert len(list(csv.DictReader(open(path)))) == 15


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_preset_builds_strategy_with_trainer_values(tmp_path, monkeypatch, stage):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    monkeypatch.chdir(ROOT)  # preset paths are relative to the repository root
    cli = cli_main(["--config", "configs/tiny.yaml",
                    "--config", f"configs/strategies/deepspeed-zero{stage}.yaml",
                    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
                    "--trainer.accumulate_grad_batches", "4", "--trainer.gradient_clip_val", "0.5",
                    "--data.batch_size", "8", "--data.train_size", "64", "--data.validation_size", "4",
                    "--data.cache_dir", str(tmp_path)], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    wanted = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert strategy.config["zero_optimization"] == wanted["zero_optimization"]
    # what fit does before it starts the engine (on CPU it stops at Lightning's CUDA check)
    cli.datamodule.prepare_data()
    cli.datamodule.connect(**cli.model.data_facts())
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
def test_two_process_zero_on_cpu_fits_validates_and_converts(tmp_path, tiny_models):
    """The real DeepSpeed engine, 2 CPU processes: fit + validation with generation, a ZeRO
    checkpoint, its conversion to an HF folder, and a reload that reproduces the trained model's
    logits (ZeRO-2, where rank 0 holds the full weights). ZeRO-3 (all ranks step together in
    generation) fits, validates, is killed, resumes and converts in tests/test_resume_strategies.py."""
    pytest.importorskip("deepspeed")
    import torch

    from gist_lightning.export import load_pretrained
    from gist_lightning.tokens import gist_token_id

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("deepspeed_cpu.py")
    proc = subprocess.run([sys.executable, str(script), "2", "2", str(tmp_path),  # ZeRO-2, 2 processes
                           json.dumps(tiny_models["llama"])],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, ranks_errors(proc.stderr)
    assert "validation_unseen" in (tmp_path / "rouge.txt").read_text()
    ckpt = tmp_path / "checkpoints" / "zero.ckpt"
    assert ckpt.is_dir()  # DeepSpeed writes a folder of shards
    assert not (tmp_path / "export").exists()  # sharded weights are converted, never exported as they are
    from gist_lightning.cli import main

    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    model, tok, settings = load_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert settings["num_gist_tokens"] == 1
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7, gist_token_id(tok), 8, 9]])
    want = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(model(input_ids=ids).logits.float(), want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_two_process_fsdp_fit_equals_ddp_and_its_checkpoint_exports(run_config, make_pair, tmp_path, tuning):
    """FSDP2 (ModelParallelStrategy, configs/strategies/fsdp-cpu.yaml) on 2 CPU processes trains the
    same weights as DDP on 2 processes and validates the same predictions (generation steps every
    rank together); its single-file checkpoint exports to an HF folder that gives DDP's logits."""
    import torch

    from gist_lightning.cli import main
    from gist_lightning.export import load_pretrained

    extra = []
    if tuning == "lora":  # adapters need a pretrained base: a tiny one saved as a local folder
        model, tok, _ = make_pair("llama")
        model.save_pretrained(tmp_path / "base")
        tok.save_pretrained(tmp_path / "base")
        extra = ["--model.model_config", "null", "--model.model_name_or_path", str(tmp_path / "base"),
                 "--model.peft.rank", "4", "--data.limits.max_length", "128",
                 "--data.human_limits.max_length", "160"]
    config = run_config(max_steps=4, val_check_interval=4)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for preset in ("ddp-cpu", "fsdp-cpu"):
        proc = subprocess.run([str(BIN), "fit", "--config", str(config), "--config",
                               str(ROOT / "configs" / "strategies" / f"{preset}.yaml"),
                               "--trainer.logger.init_args.name", preset, *extra],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, ranks_errors(proc.stderr)
        runs[preset] = (tmp_path / "runs" / preset / "version_0", proc.stdout)
    (ddp, _), (fsdp, out) = runs["ddp-cpu"], runs["fsdp-cpu"]
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for run in (ddp, fsdp))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for p in sorted((ddp / "predictions").glob("*.csv")):
        assert (fsdp / "predictions" / p.name).read_text() == p.read_text(), p.name
    # the sharded run leaves the export to the command it names
    assert "not exported under FSDP" in out and not (fsdp / "export").exists()
    [best] = (fsdp / "checkpoints").glob("best-step*.ckpt")
    main(["export", "--ckpt", str(best), "--out", str(tmp_path / "fsdp-export")])
    probe = None
    logits = []
    for folder in (ddp / "export", tmp_path / "fsdp-export"):
        model, tok, _ = load_pretrained(folder)
        probe = torch.tensor([[tok.bos_token_id, 5, 6, 7, 8, 9]]) if probe is None else probe
        logits.append(model(input_ids=probe).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
