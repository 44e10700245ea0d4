"""The LightningModule: owns the gist-masked HF model, trains it, and validates by greedy
generation through the gist cache (the same code users call)."""

from __future__ import annotations

import copy
import random
from dataclasses import asdict, replace

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoConfig, get_scheduler

from . import adapters, caching, generation, long_context, masks, schedule
from .adapters import PeftSettings
from .backends import backend_named, backend_of, gist_forward
from .cache import GistCache
from .data.datamodule import GistDataModule
from .errors import ContextLengthError, CorruptFileError, GistError
from .evaluation.results import ValidationBatchOutput
from .families import FAMILIES, LOAD_OPTIONS, family_of, model_class
from .generation import positions_needed
from .long_context import SegmentSettings
from .masks import check_condition
from .objectives import (
    Objectives,
    autoencode_loss,
    build_autoencoder,
    context_labels,
    distill_loss,
    importance_spread,
    importance_weights,
    load_teacher,
    weighted_lm_loss,
)
from .splits import VALIDATION_SPLITS, metric_key
from .tokens import SUITE_TOKENIZER_NAME, add_special_tokens, fit_embeddings, gist_token_id, load_tokenizer

STATISTICS = ("importance_spread",)  # what _losses returns beside the loss terms: logged, never trained


def shard_with_fsdp2(model, device_mesh) -> None:
    """Shard ``model`` in place with FSDP2 over the mesh's data-parallel dimension: each block HF
    keeps whole (``_no_split_modules``: the decoder layers) is one unit, the rest (embeddings, head,
    final norm) the root's. Every rank then runs every forward (generation included) together."""
    from torch.distributed.fsdp import fully_shard

    mesh = (device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ())
            else device_mesh)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise GistError(f"{type(model).__name__} names no blocks to shard (_no_split_modules); FSDP cannot "
                        "split it into units")
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


class GistLitModule(L.LightningModule):
    """Gist fine-tuning of an HF model. It owns the model, its tokenizer (with ``<GIST>``), k and the
    condition; in a Trainer it connects the :class:`~gist_lightning.data.GistDataModule` to them from
    its ``setup`` (:meth:`data_facts`). Training computes the loss under the gist mask; validation
    answers every record from a gist cache (what deployment does) and logs ROUGE-L and exact match.

    Example::

        import lightning as L
        from gist_lightning.data import EmbeddedSuite
        from gist_lightning.module import GistLitModule

        module = GistLitModule(model_config={"model_type": "llama", "hidden_size": 128,
                                             "num_hidden_layers": 4, "num_attention_heads": 4},
                               num_gist_tokens=1)
        L.Trainer(max_steps=100, accelerator="cpu").fit(module, datamodule=EmbeddedSuite())
        module.export("my-gist-model")  # an HF folder: gist_lightning.export.load_pretrained reads it

    Args:
        model_name_or_path: hub id or local folder for ``from_pretrained``; or None with ``model_config``.
        model_config: HF config fields for a model built from scratch (must hold ``model_type``).
        tokenizer: hub id or local folder; ``"suite"`` for the embedded suite's tokenizer. Default:
            ``model_name_or_path``, or ``"suite"`` for a model built from scratch.
        condition: ``gist``, ``pos_control`` or ``neg_control``.
        num_gist_tokens: k.
        attn_implementation: ``sdpa``, ``eager`` or ``flex_attention`` (the family registry says which
            of them a family takes the gist mask under; flex builds BlockMasks, O(S) mask memory).
        dtype: weights' dtype for ``from_pretrained`` (e.g. ``bfloat16``); None keeps the checkpoint's.
        learning_rate / weight_decay / warmup_ratio / scheduler: AdamW with a transformers schedule
            (``cosine``, ``constant_with_warmup``, ``linear``...).
        stage_schedule: a fit that resumes a checkpoint with a larger ``trainer.max_steps`` (the next
            stage of a curriculum) runs a schedule of its own, over its own steps and up to its own
            ``learning_rate`` (:mod:`gist_lightning.schedule`); off, a run has one schedule.
        gradient_checkpointing: trade compute for memory.
        max_new_tokens: greedy generation budget during validation.
        peft: parameter-efficient tuning (:class:`~gist_lightning.adapters.PeftSettings`: LoRA rank,
            alpha, dropout, target modules, 4-bit base); None trains every weight. Needs a pretrained
            base (``model_name_or_path``); checkpoints then hold only what trains.
        segments: gist long contexts segment by segment
            (:class:`~gist_lightning.long_context.SegmentSettings`; decoder-only, with a data source
            of long contexts such as ``LongRecall``); ``num_gist_tokens`` must equal its
            ``gists_per_segment``. None: the instruction is one segment (the paper's gisting).
        objectives: what the loss adds to next-token prediction
            (:class:`~gist_lightning.objectives.Objectives`: distillation from a frozen teacher,
            segment-wise token importance, fine-grained autoencoding), each off by default.
        compile_decoding: validation decodes in static key/value buffers through ``torch.compile``
            (CUDA graphs on a GPU; see :func:`gist_lightning.generate`); answers unchanged.
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
        stage_schedule: bool = False,
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 64,
        peft: PeftSettings | None = None,
        segments: SegmentSettings | None = None,
        objectives: Objectives | None = None,
        compile_decoding: bool = False,
    ):
        super().__init__()
        if (model_name_or_path is None) == (model_config is None):
            raise ValueError("give exactly one of model_name_or_path (pretrained) or model_config (from "
                             "scratch)")
        if model_config is not None and "model_type" not in model_config:
            raise ValueError("model_config needs a 'model_type' (e.g. llama, t5)")
        if num_gist_tokens < 1:
            raise ValueError(f"num_gist_tokens must be >= 1; got {num_gist_tokens}")
        check_condition(condition)
        # the CLI may hand the dataclass over as a mapping; hparams keep plain data (weights_only loads)
        self.peft = peft if peft is None or isinstance(peft, PeftSettings) else PeftSettings(**peft)
        if self.peft is not None and model_name_or_path is None:
            raise ValueError("model.peft trains adapters on a pretrained base: give model.model_name_or_path "
                             "(a hub id or a folder, e.g. an export of a model trained from scratch)")
        self.segments = (segments if segments is None or isinstance(segments, SegmentSettings)
                         else SegmentSettings(**segments))
        if self.segments is not None and self.segments.gists_per_segment != num_gist_tokens:
            raise ValueError(f"model.num_gist_tokens ({num_gist_tokens}) must equal "
                             f"model.segments.gists_per_segment ({self.segments.gists_per_segment})")
        self.objectives = (objectives if objectives is None or isinstance(objectives, Objectives)
                           else Objectives(**objectives))
        if self.objectives is not None and self.objectives.autoencode_weight and self.segments is None:
            raise ValueError("model.objectives.autoencode_weight reconstructs each segment's gist units: it "
                             "needs model.segments")
        self.save_hyperparameters(ignore=["peft", "segments", "objectives"])
        self.save_hyperparameters({**self.hparams, "peft": asdict(self.peft) if self.peft else None,
                                   "segments": asdict(self.segments) if self.segments else None,
                                   "objectives": asdict(self.objectives) if self.objectives else None})
        self.tokenizer = load_tokenizer(tokenizer or model_name_or_path or SUITE_TOKENIZER_NAME)
        # <GIST> (and <PAD> where missing) join the tokenizer now, so the data can tokenize before
        # the model exists; configure_model gives the new ids their embedding rows
        self._new_token_ids = add_special_tokens(self.tokenizer)
        self.hf_config = self._hf_config()
        if self.objectives is not None and self.objectives.context_weight and self.encoder_decoder:
            raise ValueError("model.objectives.context_weight predicts the prompt's tokens with a "
                             "decoder-only model's logits; an encoder-decoder model reads its prompt in the "
                             "encoder: set it to 0")
        self.model = None
        self.peft_model = None  # PEFT's wrapper around self.model when model.peft is set
        self.autoencoder = None  # objectives.autoencode_weight: trained and checkpointed, never exported
        self._teacher: list = []  # objectives' frozen teacher, kept out of parameters and checkpoints
        self._importance_checked = False  # whether the first training batch's importance spread was looked at
        self._schedule_start, self._new_stage = 0, False  # model.stage_schedule: this stage's first step
        self._stage_factor: tuple | None = None  # ((start, total), its factor function)

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
                "num_gist_tokens": h.num_gist_tokens, "condition": h.condition,
                "context_length": self.context_length, "segments": self.segments}

    @property
    def context_length(self) -> int | None:
        """Positions a prompt and its completion may span (None: no fixed limit, e.g. T5)."""
        # an unknown family is refused when the model is built
        family = FAMILIES.get(self.hf_config.model_type)
        return backend_named(family.backend).context_length(self.hf_config) if family else None

    def configure_model(self) -> None:
        """Build the HF model once: load or create it, fit the embeddings to the tokenizer, check the
        family, then the training wrappers (k-bit preparation, checkpointing, adapters, FSDP2)."""
        if self.model is not None:
            return
        model = self._build_model()
        fit_embeddings(model, self.tokenizer, self._new_token_ids)
        family_of(model)  # a clear error for unsupported families / attention implementations
        model = self._prepare_for_training(model)
        if self.device_mesh is not None:  # ModelParallelStrategy (configs/strategies/fsdp.yaml)
            shard_with_fsdp2(model, self.device_mesh)
        # from_pretrained returns a model in eval mode, and Lightning keeps a submodule's mode: train
        # with the model's dropout on (Lightning switches to eval for validation and back)
        self.model = model.train()
        if self.objectives is not None and self.objectives.autoencode_weight:
            self.autoencoder = build_autoencoder(self.hf_config).to(model.dtype).train()

    def _build_model(self):
        """The HF model: ``model_name_or_path``'s weights (4-bit under QLoRA), or random weights of
        ``model_config``."""
        h = self.hparams
        cls = model_class(self.hf_config)
        if h.model_name_or_path is None:
            return cls.from_config(self.hf_config, attn_implementation=h.attn_implementation)
        dtype = getattr(torch, h.dtype) if h.dtype else None
        extra = {}
        if self.peft is not None and self.peft.quantize:
            adapters.check_quantization_possible(self.peft)
            extra["quantization_config"] = adapters.quantization_config(self.peft, dtype)
        return cls.from_pretrained(h.model_name_or_path, attn_implementation=h.attn_implementation,
                                   dtype=dtype, **LOAD_OPTIONS, **extra)

    def _prepare_for_training(self, model):
        """k-bit preparation (QLoRA), gradient checkpointing and the LoRA adapters, as configured."""
        if self.peft is not None and self.peft.quantize:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.peft is not None:
            # the adapters go into the model in place; the wrapper is kept out of the module tree
            # (object.__setattr__) so that the weights are registered once, under self.model
            object.__setattr__(self, "peft_model",
                               adapters.apply_peft(model, self.peft, self.trained_token_ids))
            trainable, total = adapters.parameter_counts(model)
            rank_zero_info(f"model.peft: training {trainable:,} of {total:,} parameters "
                           f"({100 * trainable / total:.3f}%): rank-{self.peft.rank} adapters and the rows "
                           f"of tokens {self.trained_token_ids}")
        return model

    @property
    def trained_token_ids(self) -> list[int]:
        """The embedding rows that train under model.peft: the tokens added here, and <GIST> always
        (a base exported by gist-lightning has it already)."""
        return sorted(set(self._new_token_ids) | {self.gist_token_id})

    # -- export -----------------------------------------------------------------------------------
    EXPORT_FORMS = ("merged", "adapter")

    def export(self, out_dir, form: str = "merged", overwrite: bool = False, source: dict | None = None):
        """Write the model as an HF folder with the gist settings. Under model.peft, ``merged`` folds
        the adapters and token rows into a copy of the base (a plain HF folder; the run's model is
        left as it is) and ``adapter`` writes PEFT's adapter files naming the base. ``source``
        (where the weights come from) is recorded in the settings file."""
        from .export import export_adapter, export_pretrained

        if form not in self.EXPORT_FORMS:
            raise ValueError(f"export form must be one of {self.EXPORT_FORMS}; got {form!r}")
        h = self.hparams
        if self.peft_model is None:
            if form == "adapter":
                raise GistError("an adapter export needs a model.peft run; this one trained every weight")
            return export_pretrained(self.model, self.tokenizer, out_dir, h.num_gist_tokens, h.condition,
                                     overwrite, source, h.segments, h.get("objectives"))
        if form == "adapter":
            return export_adapter(self.peft_model, self.tokenizer, out_dir, h.num_gist_tokens, h.condition,
                                  h.model_name_or_path, self._new_token_ids, overwrite, source, h.segments,
                                  h.get("objectives"))
        if self.peft.quantize:
            raise GistError("a 4-bit base cannot be merged exactly; export form 'adapter' and load it on the "
                            "full-precision base")
        merged = copy.deepcopy(self.peft_model).merge_and_unload()
        return export_pretrained(merged, self.tokenizer, out_dir, h.num_gist_tokens, h.condition, overwrite,
                                 source, h.segments, h.get("objectives"))

    # -- checkpoints hold only what trains under model.peft -----------------------------------
    def trainable_names(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the random state, so that a resumed run draws the same dropout masks (exact on one device)
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state()  # this process's device
        if self.peft is not None:
            keep = self.trainable_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if self._trainer is not None:
            h = self.hparams
            checkpoint[schedule.RECORD] = schedule.record(self._schedule_start, self.trainer, h.learning_rate,
                                                          h.stage_schedule)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        # applied at the first training batch of a resumed fit (creating the data iterator draws from
        # the random state); only rank 0's state is saved, so with several processes it is not restored
        self._resumed_rng = checkpoint.get("rng_states") if fitting and self.trainer.world_size == 1 else None
        if fitting:  # which stage's schedule this fit runs (model.stage_schedule), or refused
            h = self.hparams
            self._schedule_start, self._new_stage = schedule.resumed_stage(
                checkpoint, self.trainer, h.learning_rate, h.stage_schedule)

    def on_train_start(self) -> None:
        # (the checkpoint's optimizer and scheduler are restored by now)
        new_stage, self._new_stage = self._new_stage, False
        if self.trainer.ckpt_path is not None:
            for config in self.trainer.lr_scheduler_configs:
                schedule.resume(config.scheduler, self.hparams.learning_rate if new_stage else None)
        if new_stage:
            h, end = self.hparams, int(self.trainer.estimated_stepping_batches)
            rank_zero_info(f"model.stage_schedule: a new stage from step {self._schedule_start} to {end}, "
                           f"its own {h.scheduler} schedule up to {h.learning_rate:g}")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        states, self._resumed_rng = getattr(self, "_resumed_rng", None), None
        if states is not None:
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])
            if "cuda" in states and torch.cuda.is_available() and states["cuda"].dim() == 1:
                torch.cuda.set_rng_state(states["cuda"])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Under model.peft a checkpoint holds the trainable tensors only: the frozen base comes from
        ``model_name_or_path`` (already loaded), and every trainable tensor must be in the file."""
        if self.peft is not None and self.model is not None:
            missing = sorted(self.trainable_names() - set(state_dict))
            if missing:
                raise CorruptFileError(f"the checkpoint lacks {len(missing)} trainable tensors of this "
                                       f"model.peft run (first: {missing[0]}); was it saved with other peft "
                                       "settings?")
            full = self.state_dict()
            full.update(state_dict)
            state_dict = full
            if self.peft.quantize:  # bitsandbytes keeps quantization state beside its weights: check by hand
                result = super().load_state_dict(state_dict, strict=False, assign=assign)
                if strict and result.unexpected_keys:
                    raise CorruptFileError(f"the checkpoint holds tensors this model has not: "
                                           f"{result.unexpected_keys[:3]}")
                return result
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def setup(self, stage: str) -> None:
        """Build the model, connect the data, and refuse what cannot run before any step does."""
        # Build the model here, before Lightning enters the strategy's sharded context for
        # configure_model: under DeepSpeed ZeRO-3 that context (zero.Init) partitions parameters as
        # they are created, and transformers' weight init then fails on the empty shards (padding
        # row of the embedding). Every rank holds the whole model until the engine partitions it.
        self.configure_model()
        self._schedule_start, self._new_stage = 0, False  # (a resumed fit's checkpoint says otherwise)
        self._check_runnable(stage)
        if stage == "fit" and self.objectives is not None and self.objectives.needs_teacher:
            self.teacher()  # loaded and checked (vocabulary) before any step
        self._connect_data(stage)
        self._check_validation_fits()

    def _check_runnable(self, stage: str) -> None:
        """Refuse settings that cannot run together, with what to change."""
        if self.segments is not None and self.encoder_decoder:
            raise GistError("model.segments gists long contexts segment by segment in a decoder; a T5-style "
                            "encoder reads its whole source at once: drop model.segments or use a "
                            "decoder-only model")
        if (stage == "fit" and self.hparams.attn_implementation == "flex_attention"
                and self._trainer is not None and self.trainer.strategy.root_device.type == "cpu"):
            raise GistError("attn_implementation=flex_attention cannot train on a CPU: torch has no "
                            "FlexAttention backward there. Train with sdpa on CPU (validation and compress "
                            "under flex_attention do run on CPU), or on a GPU")
        if (self.peft is not None and self._trainer is not None
                and isinstance(self.trainer.strategy, DeepSpeedStrategy)):
            raise GistError("model.peft runs on one GPU, with DDP or with FSDP; DeepSpeed would shard and "
                            "save the frozen base too: use configs/strategies/fsdp.yaml or ddp.yaml instead")

    def _datamodule(self) -> GistDataModule | None:
        """The Trainer's DataModule when it is one of ours (None: dataloaders given directly)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return dm if isinstance(dm, GistDataModule) else None

    def _connect_data(self, stage: str) -> None:
        """The one place the data learns the model's facts (tokenizer, k, condition, positions,
        segments): connect the Trainer's DataModule, then load the splits ``stage`` needs."""
        if (dm := self._datamodule()) is not None:
            dm.connect(**self.data_facts())
            dm.load(stage)

    def _check_validation_fits(self) -> None:
        """Refuse, before any training step, validation prompts that leave no room for
        ``max_new_tokens`` in the model's positions (a refusal hours into a run loses the run)."""
        dm, context = self._datamodule(), self.context_length
        if dm is None or context is None:
            return
        for split in VALIDATION_SPLITS:
            if split in dm.datasets:
                longest = dm.longest_prompt(split)
                if positions_needed(longest, self.hparams.max_new_tokens) > context:
                    raise ContextLengthError(
                        f"{split}: the longest prompt ({longest} tokens) + model.max_new_tokens="
                        f"{self.hparams.max_new_tokens} exceeds the model's {context} positions; lower "
                        "model.max_new_tokens or the data limits")

    # -- training -----------------------------------------------------------------------------
    def _forward(self, model, batch, condition: str, **kwargs):
        """The masked forward of ``model`` over a batch under ``condition`` (the student's rule, or a
        teacher's full / segment-alone view of the same tokens)."""
        h = self.hparams
        if self.segments is not None:
            return long_context.masked_forward(model, batch["input_ids"], batch["attention_mask"],
                                               self.gist_token_id, self._batch_segments(batch), condition,
                                               segment_ids=batch.get("segment_ids"), **kwargs)
        return gist_forward(model, batch["input_ids"], batch["attention_mask"], self.gist_token_id, condition,
                            num_gist_tokens=h.num_gist_tokens, segment_ids=batch.get("segment_ids"), **kwargs)

    def _batch_segments(self, batch) -> SegmentSettings:
        """The segment settings of a batch: a training batch may carry its drawn ratio
        (``segments.train_ratios``)."""
        return replace(self.segments, gists_per_segment=batch.get("gists_per_segment",
                                                                  self.segments.gists_per_segment))

    def _loss(self, batch) -> torch.Tensor:
        return self._losses(batch)["loss"]

    def _losses(self, batch) -> dict[str, torch.Tensor]:
        """``loss`` (what trains) and, with objectives, its terms (``lm``, ``distill``, ``autoencode``,
        ``context``) and ``STATISTICS`` (``importance_spread``: the mean |weight - 1| over the loss
        tokens, logged to see whether the importance weights do anything)."""
        h, o = self.hparams, self.objectives
        if o is None or not o.active:
            return {"loss": self._forward(self.model, batch, h.condition, labels=batch["labels"]).loss}
        labels = batch["labels"]
        out = self._forward(self.model, batch, h.condition, use_cache=bool(o.autoencode_weight))
        terms, weights = {}, None
        if o.needs_teacher:
            teacher = self.teacher()
            with torch.no_grad():
                full = self._forward(teacher, batch, "pos_control").logits
                if o.importance_weight:
                    alone = self._forward(teacher, batch, "neg_control").logits
                    weights = importance_weights(full, alone, labels, o.importance_cap)
                    terms["importance_spread"] = importance_spread(weights, labels)
        terms["lm"] = weighted_lm_loss(out.logits, labels, weights, o.importance_weight)
        loss = terms["lm"]
        if o.distill_weight:
            terms["distill"] = distill_loss(out.logits, full, labels, o.distill_temperature)
            loss = loss + o.distill_weight * terms["distill"]
        if o.context_weight:
            ctx = context_labels(batch["input_ids"], batch["attention_mask"], labels, self.gist_token_id,
                                 batch.get("segment_ids"))
            terms["context"] = weighted_lm_loss(out.logits, ctx, None, 0.0)
            loss = loss + o.context_weight * terms["context"]
        if o.autoencode_weight:
            ids, seg = batch["input_ids"], batch.get("segment_ids")
            positions = long_context.prompt_positions(ids, batch["attention_mask"], self.gist_token_id,
                                                      self._batch_segments(batch), seg)
            examples = masks.decoder_segments(ids, batch["attention_mask"], seg)
            terms["autoencode"] = autoencode_loss(self.autoencoder, out.cache, ids, examples, positions,
                                                  self.gist_token_id)
            loss = loss + o.autoencode_weight * terms["autoencode"]
        return {"loss": loss, **terms}

    def teacher(self):
        """The objectives' frozen teacher, loaded on first use (once), on this module's device."""
        if not self._teacher:
            self._teacher.append(load_teacher(self.objectives, self.tokenizer, self.model.dtype))
        if self._teacher[0].device != self.device:
            self._teacher[0].to(self.device)
        return self._teacher[0]

    def training_step(self, batch, batch_idx):
        losses = self._losses(batch)
        bsz = batch["input_ids"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bsz)
        for name, value in losses.items():
            if name != "loss":
                key = f"train/{name}" if name in STATISTICS else f"train/{name}_loss"
                self.log(key, value, batch_size=bsz)
        if "importance_spread" in losses and not self._importance_checked:
            self._importance_checked = True
            if float(losses["importance_spread"]) < 1e-6:
                rank_zero_warn(  # (once a fit: each curriculum stage and each resumed fit looks again)
                    "model.objectives.importance_weight changes nothing: the importance weights of the first "
                    "training batch are uniform (every loss token's gain from the context reached "
                    f"model.objectives.importance_cap ({self.objectives.importance_cap}): raise it; or each "
                    "row has one loss token); train/importance_spread logs how far they are from uniform"
                )
        return losses["loss"]

    # -- validation: generation through the gist cache ----------------------------------------
    @torch.no_grad()
    def generate_batch(self, batch) -> tuple[list[str], GistCache]:
        h, tok = self.hparams, self.tokenizer
        if backend_of(self.model).cannot_cache(h.condition):
            # e.g. the instruction of a bidirectional encoder under pos_control: feed the whole source
            cache = caching.empty_cache(self.model, batch["input_ids"].shape[0])
            cont, cont_mask = batch["input_ids"], batch["attention_mask"]
        elif self.segments is not None:  # the prompt's long context, one segment at a time
            rows = [r[m.bool()].tolist() for r, m in zip(batch["prefix_ids"], batch["prefix_mask"])]
            cache = long_context.compress_context_ids(self.model, rows, self.gist_token_id, tok.pad_token_id,
                                                      self.segments, h.condition)
            cont, cont_mask = batch["continuation_ids"], batch["continuation_mask"]
        else:
            cache = caching.compress_ids(self.model, batch["prefix_ids"], batch["prefix_mask"],
                                         self.gist_token_id, h.condition, h.num_gist_tokens)
            cont, cont_mask = batch["continuation_ids"], batch["continuation_mask"]
        ids = generation.generate_ids(self.model, cache, cont, cont_mask, h.max_new_tokens, tok.eos_token_id,
                                      tok.pad_token_id,
                                      sync_ranks=self._trainer is not None and self.trainer.world_size > 1,
                                      compile=h.get("compile_decoding", False))
        return generation.decode_new_tokens(tok, ids), cache

    def validation_step(self, batch, batch_idx, dataloader_idx=0) -> ValidationBatchOutput:
        split = VALIDATION_SPLITS[dataloader_idx]  # the DataModule's loaders come in this order
        bsz = batch["input_ids"].shape[0]
        self.log(metric_key(split, "loss"), self._loss(batch), batch_size=bsz, add_dataloader_idx=False,
                 sync_dist=True)
        preds, cache = self.generate_batch(batch)
        real = [not pad for pad in batch["is_padding"]]  # repeats that only keep ranks in step
        keep = lambda values: [v for v, r in zip(values, real) if r]  # noqa: E731
        instruction = batch["instruction_tokens"]
        if self.segments is not None:  # a long context's own tokens: its prompt to the last gist, less gists
            instruction = ((batch["prefix_ids"] != self.gist_token_id) & batch["prefix_mask"].bool()).sum(-1)
        if backend_of(self.model).cannot_cache(self.hparams.condition):
            cached = instruction  # the whole source is fed again: nothing compressed
        else:  # what each row's cache holds: counted there, whatever the layout
            cached = cache.valid.sum(-1)
        return ValidationBatchOutput(split=split, x=keep(batch["x"]), y_pred=keep(preds),
                                     y_true=keep(batch["y_true"]),
                                     instruction_tokens=keep(instruction.tolist()),
                                     cached_positions=keep(cached.tolist()))

    test_step = validation_step

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        h = self.hparams
        decay, no_decay = [], []
        trained = list(self.model.named_parameters())
        if self.autoencoder is not None:
            trained += [(f"autoencoder.{n}", p) for n, p in self.autoencoder.named_parameters()]
        for name, p in trained:
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=h.learning_rate,
        )
        if h.stage_schedule:  # (the stage is known only once the checkpoint is read: looked up per step)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self._stage_rate(step))
        else:
            total = int(self.trainer.estimated_stepping_batches)
            scheduler = get_scheduler(h.scheduler, optimizer, num_warmup_steps=int(h.warmup_ratio * total),
                                      num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _stage_rate(self, step: int) -> float:
        """model.stage_schedule's factor of the peak rate at ``step`` (the scheduler's count of
        optimizer steps, the run's global step): this stage's schedule."""
        key = (self._schedule_start, int(self.trainer.estimated_stepping_batches))
        if self._stage_factor is None or self._stage_factor[0] != key:
            h = self.hparams
            factor = schedule.stage_factor(h.scheduler, h.warmup_ratio, *key, h.learning_rate)
            self._stage_factor = key, factor
        return self._stage_factor[1](step)
