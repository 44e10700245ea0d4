"""The training job: fit then validate, checkpoint and export round trips, exact mid-epoch resume,
and the model as the one owner of tokenizer, architecture, k and condition."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gist_lightning.cli import cli_main, default_callbacks
from gist_lightning.data import EmbeddedSuite
from gist_lightning.errors import GistError
from gist_lightning.evaluation.callbacks import ExportBest, RougeCallback
from gist_lightning.export import load_pretrained
from gist_lightning.module import GistLitModule
from gist_lightning.splits import VALIDATION_SPLITS, metric_key
from gist_lightning.tokens import GIST_TOKEN


def validate_metrics(module, datamodule, root):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=default_callbacks(), enable_checkpointing=True, default_root_dir=str(root))
    trainer.validate(module, datamodule=datamodule)
    return next(c for c in trainer.callbacks if isinstance(c, RougeCallback)).last


@torch.no_grad()
def probe_logits(model, tok):
    """Logits of one gist prompt (source + decoder start for encoder-decoders)."""
    ids = tok("Instruction: Reverse the list.\n" + GIST_TOKEN + "\nInput: cat dog owl",
              return_tensors="pt")["input_ids"]
    if model.config.is_encoder_decoder:
        start = torch.tensor([[model.config.decoder_start_token_id]])
        return model(input_ids=ids, decoder_input_ids=start).logits
    return model(input_ids=ids).logits


def test_the_model_owns_tokenizer_architecture_k_and_condition(tiny_models):
    llama = GistLitModule(model_config=tiny_models["llama"], num_gist_tokens=3, condition="neg_control")
    t5 = GistLitModule(model_config=tiny_models["t5"])
    facts = llama.data_facts()
    assert facts["tokenizer"] is llama.tokenizer and GIST_TOKEN in llama.tokenizer.get_vocab()
    assert ((facts["encoder_decoder"], facts["num_gist_tokens"], facts["condition"])
            == (False, 3, "neg_control"))
    assert t5.data_facts()["encoder_decoder"] is True  # read from the model's config, set nowhere else
    llama.configure_model()
    assert llama.model.get_input_embeddings().weight.shape[0] == len(llama.tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_fit_validate_reload_and_export(run_config, tiny_models, tmp_path, arch):
    cli = cli_main(["fit", "--config", str(run_config(tiny_models[arch]))])
    trainer = cli.trainer
    for split in VALIDATION_SPLITS:
        assert 0 <= float(trainer.callback_metrics[metric_key(split, "rougeL")]) <= 100
    predictions = sorted(p.name for p in (tmp_path / "runs" / "t" / "version_0" / "predictions").iterdir())
    assert "step000006-validation_seen.csv" in predictions and "step000012-compression.json" in predictions

    first = validate_metrics(cli.model, cli.datamodule, tmp_path / "v1")
    assert set(first) == set(VALIDATION_SPLITS)
    # a checkpoint reloaded in a fresh module gives the same metrics
    best = trainer.checkpoint_callback.best_model_path
    torch.load(best, weights_only=True)  # plain data only: loads without trusting pickled classes
    reloaded = GistLitModule.load_from_checkpoint(best)
    assert validate_metrics(reloaded, cli.datamodule, tmp_path / "v2") == first
    # the exported HF folder holds the best checkpoint's weights: equal logits through both loaders
    # (12 steps leave a T5 that answers "" to everything, so metrics alone would not tell)
    export = next(c for c in trainer.callbacks if isinstance(c, ExportBest)).path
    want = probe_logits(reloaded.model.eval(), reloaded.tokenizer)
    model, tok, settings = load_pretrained(export)
    assert settings == {"num_gist_tokens": 1, "condition": "gist", "gist_token": GIST_TOKEN,
                        "gist_token_id": reloaded.gist_token_id,
                        "source": {"checkpoint": Path(best).name,
                                   "global_step": torch.load(best)["global_step"]}}
    assert torch.allclose(probe_logits(model, tok), want, atol=1e-5)
    from_export = GistLitModule(model_name_or_path=str(export), num_gist_tokens=1, max_new_tokens=8)
    from_export.configure_model()
    assert torch.allclose(probe_logits(from_export.model.eval(), from_export.tokenizer), want, atol=1e-5)
    assert validate_metrics(from_export, cli.datamodule, tmp_path / "v3") == first


@pytest.mark.slow
def test_an_exported_model_validates_as_it_answers(trained_export, tmp_path):
    """The trained fixture through the whole validation path: a model that answers by instruction
    scores well above nothing, and the same folder validated twice gives the same metrics."""
    data = EmbeddedSuite(cache_dir=str(tmp_path / "cache"), train_size=64, validation_size=24,
                         max_validation_records=24, eval_batch_size=12)
    module = GistLitModule(model_name_or_path=str(trained_export), max_new_tokens=12)
    first = validate_metrics(module, data, tmp_path / "a")
    assert first["validation_seen"].rougeL > 40
    again = GistLitModule(model_name_or_path=str(trained_export), max_new_tokens=12)
    assert validate_metrics(again, data, tmp_path / "b") == first


class StepCounter(L.Callback):
    """Training batches run in this process (a resumed run runs only the rest)."""

    count = 0

    def on_train_batch_end(self, *args):
        self.count += 1


def _train(tmp_path, model_config, name, max_steps, callbacks=(), ckpt=None, packing=False):
    L.seed_everything(0)
    dm = EmbeddedSuite(cache_dir=str(tmp_path / "cache"), train_size=256, validation_size=8,
                       batch_size=4 if packing else 16, packing=packing, limits={"max_length": 128})
    module = GistLitModule(model_config=model_config, learning_rate=1e-2)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / name), callbacks=list(callbacks))
    steps = StepCounter()
    trainer.callbacks.append(steps)
    # the data takes tokenizer, k and condition from the module
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return trainer, module, steps.count


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_resume_from_a_mid_epoch_checkpoint_continues_the_same_run(tmp_path, tiny_models, packing):
    # 256 records / 16 = 16 batches per epoch (packed: about 14 rows of 128 tokens / 4 per batch);
    # a checkpoint at step 20 is in the middle of an epoch after the first
    llama = tiny_models["llama"]
    _, straight, _ = _train(tmp_path, llama, "a", max_steps=24, packing=packing)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=20, save_top_k=-1,
                            filename="mid-{step}")
    _train(tmp_path, llama, "b", max_steps=24, callbacks=[every], packing=packing)
    ckpt = tmp_path / "ckpts" / "mid-step=20.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] >= 1 and state["global_step"] == 20
    resumed_trainer, resumed, steps_run = _train(tmp_path, llama, "c", max_steps=24, ckpt=str(ckpt),
                                                 packing=packing)
    assert resumed_trainer.global_step == 24 and steps_run == 4
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_flex_attention_training_on_cpu_is_refused_with_the_reason(tmp_path, tiny_models):
    module = GistLitModule(model_config=tiny_models["llama"], attn_implementation="flex_attention")
    dm = EmbeddedSuite(cache_dir=str(tmp_path / "cache"), train_size=64, validation_size=8, batch_size=8,
                       limits={"max_length": 128}, human_limits={"max_length": 160})
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(GistError, match="no FlexAttention backward"):
        trainer.fit(module, datamodule=dm)


@pytest.mark.slow
def test_validation_under_flex_attention_gives_the_dense_metrics(trained_export, tmp_path):
    """The same exported model validated with BlockMasks (flex_attention) and with dense masks (sdpa):
    the same generations, so the same metrics."""
    data = EmbeddedSuite(cache_dir=str(tmp_path / "cache"), train_size=64, validation_size=24,
                         max_validation_records=24, eval_batch_size=12)
    dense = validate_metrics(GistLitModule(model_name_or_path=str(trained_export), max_new_tokens=12), data,
                             tmp_path / "dense")
    flex = GistLitModule(model_name_or_path=str(trained_export), max_new_tokens=12,
                         attn_implementation="flex_attention")
    assert validate_metrics(flex, data, tmp_path / "flex") == dense
    assert dense["validation_seen"].rougeL > 40
