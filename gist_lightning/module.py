"""The LightningModule: owns the gist-masked HF model, trains it, and validates by greedy
generation through the gist cache (the same code users call)."""

from __future__ import annotations

import lightning as L
import torch
from transformers import AutoConfig, get_scheduler

from . import caching, generation
from .backends import backend_named, backend_of, gist_forward
from .cache import GistCache
from .errors import ContextLengthError
from .evaluation.results import ValidationBatchOutput
from .families import FAMILIES, family_of, model_class
from .generation import positions_needed
from .masks import check_condition
from .splits import VALIDATION_SPLITS, metric_key
from .tokens import SUITE_TOKENIZER_NAME, add_special_tokens, fit_embeddings, gist_token_id, load_tokenizer

MASK_KEYS = ("self_mask", "encoder_mask", "cross_mask")


class GistLitModule(L.LightningModule):
    """Gist fine-tuning of an HF model. It owns the model, its tokenizer (with ``<GIST>``), k and the
    condition; the DataModule receives them from here (:meth:`data_facts`).

    Args:
        model_name_or_path: hub id or local folder for ``from_pretrained``; or None with ``model_config``.
        model_config: HF config fields for a model built from scratch (must hold ``model_type``).
        tokenizer: hub id or local folder; ``"suite"`` for the embedded suite's tokenizer. Default:
            ``model_name_or_path``, or ``"suite"`` for a model built from scratch.
        condition: ``gist``, ``pos_control`` or ``neg_control``.
        num_gist_tokens: k.
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
        tokenizer: str | None = None,
        condition: str = "gist",
        num_gist_tokens: int = 1,
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
        if num_gist_tokens < 1:
            raise ValueError(f"num_gist_tokens must be >= 1; got {num_gist_tokens}")
        check_condition(condition)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer or model_name_or_path or SUITE_TOKENIZER_NAME)
        # <GIST> (and <PAD> where missing) join the tokenizer now, so the data can tokenize before
        # the model exists; configure_model gives the new ids their embedding rows
        self._new_token_ids = add_special_tokens(self.tokenizer)
        self.hf_config = self._hf_config()
        self.model = None

    def _hf_config(self):
        h = self.hparams
        if h.model_name_or_path is not None:
            return AutoConfig.from_pretrained(h.model_name_or_path)
        fields, tok, added = dict(h.model_config), self.tokenizer, set(self._new_token_ids)
        # the model is built for the tokenizer as loaded, then grown by the tokens added above
        fields.setdefault("vocab_size", len(tok) - len(added))
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tok, key)
            fields.setdefault(key, None if value in added else value)
        config = AutoConfig.for_model(**fields)
        if config.is_encoder_decoder:
            config.decoder_start_token_id = tok.pad_token_id
        config._attn_implementation = h.attn_implementation
        return config

    @property
    def encoder_decoder(self) -> bool:
        return bool(self.hf_config.is_encoder_decoder)

    @property
    def gist_token_id(self) -> int:
        return gist_token_id(self.tokenizer)

    def data_facts(self) -> dict:
        """What a :class:`~gist_lightning.data.datamodule.GistDataModule` takes from the model."""
        h = self.hparams
        return {"tokenizer": self.tokenizer, "encoder_decoder": self.encoder_decoder,
                "num_gist_tokens": h.num_gist_tokens, "condition": h.condition, "context_length": self.context_length}

    @property
    def context_length(self) -> int | None:
        """Positions a prompt and its completion may span (None: no fixed limit, e.g. T5)."""
        family = FAMILIES.get(self.hf_config.model_type)  # an unknown family is refused when the model is built
        return backend_named(family.backend).context_length(self.hf_config) if family else None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        cls = model_class(self.hf_config)
        if h.model_name_or_path is not None:
            dtype = getattr(torch, h.dtype) if h.dtype else None
            model = cls.from_pretrained(h.model_name_or_path, attn_implementation=h.attn_implementation, dtype=dtype)
        else:
            model = cls.from_config(self.hf_config, attn_implementation=h.attn_implementation)
        fit_embeddings(model, self.tokenizer, self._new_token_ids)
        if model.config.is_encoder_decoder and model.config.decoder_start_token_id is None:
            model.config.decoder_start_token_id = self.tokenizer.pad_token_id
        family_of(model)  # a clear error for unsupported families / attention implementations
        if h.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model

    def setup(self, stage: str) -> None:
        # Build the model here, before Lightning enters the strategy's sharded context for
        # configure_model: under DeepSpeed ZeRO-3 that context (zero.Init) partitions parameters as
        # they are created, and transformers' weight init then fails on the empty shards (padding
        # row of the embedding). Every rank holds the whole model until the engine partitions it.
        self.configure_model()
        self._check_validation_fits()

    def _check_validation_fits(self) -> None:
        """Refuse, before any training step, validation prompts that leave no room for
        ``max_new_tokens`` in the model's positions (a refusal hours into a run loses the run)."""
        dm, context = getattr(self._trainer, "datamodule", None), self.context_length
        if dm is None or context is None or not hasattr(dm, "longest_prompt"):
            return
        for split in VALIDATION_SPLITS:
            if split in getattr(dm, "datasets", {}):
                longest = dm.longest_prompt(split)
                if positions_needed(longest, self.hparams.max_new_tokens) > context:
                    raise ContextLengthError(
                        f"{split}: the longest prompt ({longest} tokens) + model.max_new_tokens="
                        f"{self.hparams.max_new_tokens} exceeds the model's {context} positions; lower "
                        "model.max_new_tokens or the data limits")

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
    def generate_batch(self, batch) -> tuple[list[str], GistCache]:
        h, tok = self.hparams, self.tokenizer
        if backend_of(self.model).cannot_cache(h.condition):
            # e.g. the instruction of a bidirectional encoder under pos_control: feed the whole source
            cache = caching.empty_cache(self.model, batch["input_ids"].shape[0])
            cont, cont_mask = batch["input_ids"], batch["attention_mask"]
        else:
            cache = caching.compress_ids(self.model, batch["prefix_ids"], batch["prefix_mask"], self.gist_token_id,
                                         h.condition, h.num_gist_tokens)
            cont, cont_mask = batch["continuation_ids"], batch["continuation_mask"]
        ids = generation.generate_ids(self.model, cache, cont, cont_mask, h.max_new_tokens, tok.eos_token_id,
                                   tok.pad_token_id, sync_ranks=self._trainer is not None and self.trainer.world_size > 1)
        return generation.decode_new_tokens(tok, ids), cache

    def validation_step(self, batch, batch_idx, dataloader_idx=0) -> ValidationBatchOutput:
        split = VALIDATION_SPLITS[dataloader_idx]  # the DataModule's loaders come in this order
        bsz = batch["input_ids"].shape[0]
        self.log(metric_key(split, "loss"), self._loss(batch), batch_size=bsz, add_dataloader_idx=False,
                 sync_dist=True)
        preds, _ = self.generate_batch(batch)
        real = [not pad for pad in batch["is_padding"]]  # repeats that only keep ranks in step
        keep = lambda values: [v for v, r in zip(values, real) if r]  # noqa: E731
        return ValidationBatchOutput(split=split, x=keep(batch["x"]), y_pred=keep(preds), y_true=keep(batch["y_true"]),
                                     instruction_tokens=keep(batch["instruction_tokens"].tolist()))

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
