"""Parameter-efficient gist tuning with the ``peft`` library: LoRA adapters (optionally on a 4-bit
base, QLoRA) plus the embedding rows of the tokens this project adds (``<GIST>``, and ``<PAD>``
where the tokenizer had none), input and output rows, through PEFT's trainable tokens. Every
other base weight stays frozen, so a checkpoint needs only what trains.

The adapters are injected into the HF model in place: the module keeps calling the same HF model
(caching, generation and the gist masks are unchanged) and holds PEFT's wrapper beside it for
saving and merging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn

from .errors import GistError
from .families import family_of

QUANTIZE = ("nf4", "fp4")
MOE_ROUTERS = ("gate",)  # module names of the routers in the MoE families of the registry
MOE_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")  # their fused expert weights


@dataclass
class PeftSettings:
    """What trains in a parameter-efficient run (``model.peft`` in a config).

    Args:
        rank: LoRA rank r; ``0`` trains no adapters, only the added token rows (the "gist row alone").
        alpha: LoRA alpha (the update is scaled by alpha / rank).
        dropout: dropout on the adapters' input.
        target_modules: module names (or ``all-linear``) that get adapters; None: the family's
            default (every linear layer but the output head, MoE routers excluded).
        quantize: ``nf4`` or ``fp4`` to load the base in 4 bits (QLoRA, bitsandbytes, CUDA only).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    quantize: str | None = None

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"model.peft.rank must be >= 0 (0: the token rows alone); got {self.rank}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"model.peft.quantize must be one of {QUANTIZE} or null; got {self.quantize!r}")


def check_quantization_possible(settings: PeftSettings) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU: say so before anything is loaded."""
    if settings.quantize is None:
        return
    if not torch.cuda.is_available():
        raise GistError(f"model.peft.quantize={settings.quantize!r} (QLoRA) needs a CUDA GPU: bitsandbytes "
                        "4-bit weights do not run on this machine; set model.peft.quantize: null to train "
                        "LoRA on a full-precision base")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise GistError("model.peft.quantize needs bitsandbytes: "
                        "pip install 'gist-lightning[qlora]'") from None


def quantization_config(settings: PeftSettings, compute_dtype: torch.dtype | None):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.quantize,
                              bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def token_row_targets(model, token_ids: list[int]) -> dict[str, list[int]]:
    """PEFT's ``trainable_token_indices``: the rows ``token_ids`` of the input embedding, and of
    the output layer where it is not tied to the input."""
    names = {m: n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {names[inp]: list(token_ids)}
    if out is not None and out.weight is not inp.weight:
        targets[names[out]] = list(token_ids)
    return targets


def apply_peft(model, settings: PeftSettings, token_ids: list[int]):
    """Inject adapters (rank > 0) and trainable token rows into ``model`` in place; freeze the
    rest. Returns PEFT's wrapper (for ``save_pretrained`` / ``merge_and_unload``)."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    family = family_of(model)
    targets = token_row_targets(model, token_ids)
    if settings.rank == 0:
        config = TrainableTokensConfig(target_modules=list(targets), token_indices=list(token_ids))
    else:
        dropout, modules, parameters = settings.dropout, settings.target_modules or "all-linear", None
        if family.moe and settings.target_modules is None:
            # PEFT's all-linear adapts the routers' weights too (as parameters); MoE routers keep
            # their pretrained routing: every linear layer but the head and routers, and the experts
            head = model.get_output_embeddings()
            modules = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and m is not head
                              and name.rsplit(".", 1)[-1] not in MOE_ROUTERS})
            parameters = list(MOE_EXPERT_PARAMETERS)
            if dropout:  # dropout on the input cannot be applied to weights adapted as parameters
                rank_zero_warn(f"{family.model_type}: LoRA on fused expert weights takes no dropout; "
                               f"model.peft.dropout={dropout} -> 0 (or name model.peft.target_modules "
                               "without the experts)")
                dropout = 0.0
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=dropout,
                            target_modules=modules, target_parameters=parameters,
                            trainable_token_indices=targets,
                            task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM")
    return get_peft_model(model, config)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
