"""The LightningModule: owns the gist-masked HF model, trains it, and validates by greedy
generation through the gist cache (the same code users call)."""

from __future__ import annotations

import lightning as L
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    get_scheduler,
)

from . import caching
from .data.alpaca_plus import VALIDATION_SPLITS
from .data.datamodule import load_tokenizer
from .families import family_of, gist_forward
from .masks import check_condition
from .tokens import add_gist_token

MASK_KEYS = ("self_mask", "encoder_mask", "cross_mask")


class GistLitModule(L.LightningModule):
    """Gist fine-tuning of an HF model.

    Args:
        model_name_or_path: hub id or local folder for ``from_pretrained``; or None with ``model_config``.
        model_config: HF config fields for a model built from scratch (must hold ``model_type``).
        tokenizer: hub id or local folder; ``"suite"`` for the embedded suite's tokenizer.
        condition: ``gist``, ``pos_control`` or ``neg_control``.
        num_gist_tokens: k.
        gist_token_id / vocab_size: linked from the DataModule; checked against the model's tokenizer.
        attn_implementation: ``sdpa`` or ``eager`` (the ones that take the gist mask).
        dtype: weights' dtype for ``from_pretrained`` (e.g. ``bfloat16``); None keeps the checkpoint's.
        learning_rate / weight_decay / warmup_ratio / scheduler: AdamW with a transformers schedule
            (``cosine``, ``constant_with_warmup``, ``linear``...).
        gradient_checkpointing: trade compute for memory.
        max_new_tokens: greedy generation budget during validation.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict | None = None,
        tokenizer: str = "suite",
        condition: str = "gist",
        num_gist_tokens: int = 1,
        gist_token_id: int | None = None,
        vocab_size: int | None = None,
        attn_implementation: str = "sdpa",
        dtype: str | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        scheduler: str = "cosine",
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 64,
    ):
        super().__init__()
        if (model_name_or_path is None) == (model_config is None):
            raise ValueError("give exactly one of model_name_or_path (pretrained) or model_config (from scratch)")
        if model_config is not None and "model_type" not in model_config:
            raise ValueError("model_config needs a 'model_type' (e.g. llama, t5)")
        check_condition(condition)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer, add_gist=False)
        self.model = None

    @property
    def gist_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<GIST>")

    @property
    def validation_names(self) -> tuple[str, ...]:
        return VALIDATION_SPLITS

    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        if h.model_name_or_path is not None:
            config = AutoConfig.from_pretrained(h.model_name_or_path)
            cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            dtype = getattr(torch, h.dtype) if h.dtype else None
            model = cls.from_pretrained(h.model_name_or_path, attn_implementation=h.attn_implementation, dtype=dtype)
        else:
            fields = dict(h.model_config)
            tok = self.tokenizer
            fields.setdefault("vocab_size", len(tok))
            for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
                fields.setdefault(key, getattr(tok, key))
            config = AutoConfig.for_model(**fields)
            if config.is_encoder_decoder:
                config.decoder_start_token_id = tok.pad_token_id
            config._attn_implementation = h.attn_implementation
            cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model = cls.from_config(config, attn_implementation=h.attn_implementation)
        gist_id = add_gist_token(self.tokenizer, model)
        if model.config.is_encoder_decoder and model.config.decoder_start_token_id is None:
            model.config.decoder_start_token_id = self.tokenizer.pad_token_id
        family_of(model)  # a clear error for unsupported families / attention implementations
        if h.gist_token_id is not None and h.gist_token_id != gist_id:
            raise ValueError(f"the data's <GIST> id {h.gist_token_id} differs from the model tokenizer's {gist_id}: "
                             "data.tokenizer and model.tokenizer must name the same tokenizer")
        if h.vocab_size is not None and h.vocab_size != len(self.tokenizer):
            raise ValueError(f"the data's vocabulary ({h.vocab_size}) differs from the model tokenizer's "
                             f"({len(self.tokenizer)}): data.tokenizer and model.tokenizer must match")
        if h.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm.hparams, "encoder_decoder", None) is not None:
            self.configure_model()
            if dm.hparams.encoder_decoder != self.model.config.is_encoder_decoder:
                raise ValueError(f"data.encoder_decoder={dm.hparams.encoder_decoder} but the model is "
                                 f"{'an encoder-decoder' if self.model.config.is_encoder_decoder else 'decoder-only'}")

    # -- training -----------------------------------------------------------------------------
    def _loss(self, batch) -> torch.Tensor:
        h = self.hparams
        return gist_forward(
            self.model, batch["input_ids"], batch["attention_mask"], self.gist_token_id, h.condition,
            labels=batch["labels"], gist_masks={k: batch[k] for k in MASK_KEYS if k in batch},
        ).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # -- validation: generation through the gist cache ----------------------------------------
    @torch.no_grad()
    def generate_batch(self, batch) -> tuple[list[str], caching.GistCache]:
        h, tok = self.hparams, self.tokenizer
        if self.model.config.is_encoder_decoder and h.condition == "pos_control":
            # the instruction of a bidirectional encoder cannot be cached: feed the whole source
            cache = caching.empty_cache(self.model, batch["input_ids"].shape[0])
            cont, cont_mask = batch["input_ids"], batch["attention_mask"]
        else:
            cache = caching.compress_ids(self.model, batch["prefix_ids"], batch["prefix_mask"], self.gist_token_id,
                                         h.condition, h.num_gist_tokens)
            cont, cont_mask = batch["continuation_ids"], batch["continuation_mask"]
        ids = caching.generate_ids(self.model, cache, cont, cont_mask, h.max_new_tokens, tok.eos_token_id,
                                   tok.pad_token_id, sync_ranks=self._trainer is not None and self.trainer.world_size > 1)
        return caching.decode_new_tokens(tok, ids), cache

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        split = self.validation_names[dataloader_idx]
        bsz = batch["input_ids"].shape[0]
        self.log(f"{split}/loss", self._loss(batch), batch_size=bsz, add_dataloader_idx=False, sync_dist=True)
        preds, _ = self.generate_batch(batch)
        real = [not pad for pad in batch["is_padding"]]  # repeats that only keep ranks in step
        keep = lambda values: [v for v, r in zip(values, real) if r]  # noqa: E731
        return {
            "split": split,
            "x": keep(batch["x"]),
            "y_pred": keep(preds),
            "y_true": keep(batch["y_true"]),
            "instruction_tokens": keep(batch["instruction_tokens"].tolist()),
        }

    test_step = validation_step

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=h.learning_rate,
        )
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(h.scheduler, optimizer, num_warmup_steps=int(h.warmup_ratio * total),
                                  num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
