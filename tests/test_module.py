"""The training job: fit then validate, reload round trips, exact mid-epoch resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from gist_lightning.cli import cli_main, default_callbacks
from gist_lightning.data.datamodule import GistDataModule
from gist_lightning.evaluation.callbacks import RougeCallback
from gist_lightning.module import GistLitModule

TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def tiny_config(tmp_path, model_config=None, **trainer):
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 12, "val_check_interval": 6,
                    "check_val_every_n_epoch": None, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "runs"),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "t"}}, **trainer},
        "model": {"model_config": model_config or TINY_MODEL, "learning_rate": 1e-2, "max_new_tokens": 8},
        "data": {"cache_dir": str(tmp_path / "cache"), "suite_train_size": 256, "suite_validation_size": 16,
                 "batch_size": 16, "eval_batch_size": 8, "max_validation_records": 16,
                 "encoder_decoder": (model_config or TINY_MODEL)["model_type"] == "t5"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def validate_metrics(module, datamodule, root):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=default_callbacks(), enable_checkpointing=True, default_root_dir=str(root))
    trainer.validate(module, datamodule=datamodule)
    rouge = next(c for c in trainer.callbacks if isinstance(c, RougeCallback))
    return rouge.last


@pytest.mark.slow
@pytest.mark.parametrize("model_config", [TINY_MODEL, {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64,
                                                         "num_layers": 2, "num_heads": 4}])
def test_fit_validate_reload_and_export(tmp_path, model_config):
    cli = cli_main(["fit", "--config", str(tiny_config(tmp_path, model_config))])
    trainer = cli.trainer
    for split in ("validation_seen", "validation_unseen", "validation_human"):
        assert 0 <= float(trainer.callback_metrics[f"{split}/rougeL"]) <= 100
        assert (trainer.log_dir is not None)
    predictions = sorted(p.name for p in (tmp_path / "runs" / "t" / "version_0" / "predictions").iterdir())
    assert "step000006-validation_seen.csv" in predictions and "step000012-compression.json" in predictions

    first = validate_metrics(cli.model, cli.datamodule, tmp_path / "v1")
    assert set(first) == {"validation_seen", "validation_unseen", "validation_human"}
    # a checkpoint reloaded in a fresh module gives the same metrics
    best = trainer.checkpoint_callback.best_model_path
    reloaded = GistLitModule.load_from_checkpoint(best)
    assert validate_metrics(reloaded, cli.datamodule, tmp_path / "v2") == first
    # so does the exported HF folder, loaded through from_pretrained
    export = next(c for c in trainer.callbacks if type(c).__name__ == "ExportBest").path
    from_export = GistLitModule(model_name_or_path=str(export), tokenizer=str(export),
                                num_gist_tokens=1, max_new_tokens=8)
    assert validate_metrics(from_export, cli.datamodule, tmp_path / "v3") == first


def _train(tmp_path, name, max_steps, callbacks=(), ckpt=None):
    L.seed_everything(0)
    dm = GistDataModule(cache_dir=str(tmp_path / "cache"), suite_train_size=256, suite_validation_size=8,
                        batch_size=16)
    module = GistLitModule(model_config=TINY_MODEL, learning_rate=1e-2)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / name), callbacks=list(callbacks))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return trainer, module


@pytest.mark.slow
def test_resume_from_a_mid_epoch_checkpoint_continues_the_same_run(tmp_path):
    # 256 records / 16 = 16 batches per epoch; a checkpoint at step 20 is in the middle of epoch 1
    _, straight = _train(tmp_path, "a", max_steps=24)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=20, save_top_k=-1,
                            filename="mid-{step}")
    _train(tmp_path, "b", max_steps=24, callbacks=[every])
    ckpt = tmp_path / "ckpts" / "mid-step=20.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 20
    resumed_trainer, resumed = _train(tmp_path, "c", max_steps=24, ckpt=str(ckpt))
    assert resumed_trainer.global_step == 24
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
