"""Training objectives beside the language-model loss (the successors' recipes), each off by default.

- **distillation** (KV-Distill): KL between a frozen teacher's next-token distributions with the
  whole context visible (``pos_control``) and the gist model's, on the tokens the loss is taken on;
- **segment-wise token importance** (Deng et al., ACL 2025): each loss token is weighted by how
  much more likely the teacher finds it given the whole context than given its own segment alone
  (``neg_control``: what follows the context sees none of it), capped at ``importance_cap``,
  softmax-normalised over a row's loss tokens (mean weight 1), mixed with the plain loss by
  ``importance_weight``;
- **context language modelling** (UniGist, Activation Beacon: next-token loss over the whole
  sequence in one masked pass): next-token prediction of the prompt's own raw tokens (the
  context and the question; gist and padding tokens are never targets, nor an example's first
  token in a packed row), under the condition's mask, so a gist model learns to predict the
  context from what it compressed so far and a full-attention base learns to read (copy) it;
- **fine-grained autoencoding** (Deng et al.): a one-layer decoder of the student's family, with its
  own parameters (trained, checkpointed, never exported nor cached), reconstructs the raw tokens of
  each gist unit (those between a run of gists and the previous run) from that unit's gist
  keys/values alone (the student's last layer), teacher-forced.

The teacher (e.g. the full-attention base the gist model is fine-tuned from) is loaded once, frozen,
in eval mode, in the student's dtype, and is kept out of the module's parameters and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .families import model_class, self_attention_masks


@dataclass(frozen=True)
class Objectives:
    """``model.objectives``: what the loss adds to next-token prediction (see the module docstring).

    Args:
        teacher: a frozen teacher: an export folder (``gist-lightning export``, a run's ``export/``)
            with the student's tokenizer; needed by distillation and importance.
        distill_weight: weight of the KL term (0: off).
        distill_temperature: softmax temperature of both distributions (the term is scaled by its
            square, as usual).
        importance_weight: 0 (off) to 1 (the loss tokens weighted by importance alone).
        importance_cap: the most a token's log-likelihood gain from the context counts.
        autoencode_weight: weight of the autoencoding loss (0: off); needs ``model.segments``.
        context_weight: weight of the context language-modelling loss (0: off).
    """

    teacher: str | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    importance_weight: float = 0.0
    importance_cap: float = 2.0
    autoencode_weight: float = 0.0
    context_weight: float = 0.0

    def __post_init__(self):
        for name in ("distill_weight", "importance_weight", "autoencode_weight", "context_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.objectives.{name} must be >= 0; got {getattr(self, name)}")
        if self.importance_weight > 1:
            raise ValueError(f"model.objectives.importance_weight mixes the plain and the weighted loss: "
                             f"0 to 1; got {self.importance_weight}")
        if self.distill_temperature <= 0:
            raise ValueError("model.objectives.distill_temperature must be > 0; got "
                             f"{self.distill_temperature}")
        if self.needs_teacher and not self.teacher:
            used = "distill_weight" if self.distill_weight else "importance_weight"
            raise ValueError(f"model.objectives.{used} needs a teacher: set model.objectives.teacher (e.g. "
                             "the full-attention base's export)")
        if self.teacher and not self.needs_teacher:
            raise ValueError("model.objectives.teacher is set but no objective uses it: set distill_weight "
                             "or importance_weight, or drop the teacher")

    @property
    def needs_teacher(self) -> bool:
        return bool(self.distill_weight or self.importance_weight)

    @property
    def active(self) -> bool:
        return self.needs_teacher or bool(self.autoencode_weight or self.context_weight)


def load_teacher(objectives: Objectives, student_tokenizer, dtype: torch.dtype):
    """The teacher: loaded once, frozen, eval mode, in ``dtype``; refused unless its tokenizer is
    the student's (same vocabulary and ``<GIST>`` id), before training starts."""
    from .export import load_pretrained

    model, tok, _ = load_pretrained(objectives.teacher, dtype=dtype)
    mine, theirs = student_tokenizer.get_vocab(), tok.get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise ValueError(f"model.objectives.teacher ({objectives.teacher}): its tokenizer differs from the "
                         f"student's ({len(theirs)} vs {len(mine)} tokens; e.g. {differ}): a teacher must "
                         "share the student's vocabulary")
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(mine):
        raise ValueError(f"model.objectives.teacher ({objectives.teacher}): {rows} embedding rows for a "
                         f"vocabulary of {len(mine)}")
    model.requires_grad_(False)
    return model.eval()


def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, S-1): whether position i predicts a loss token (token i+1's label is not -100)."""
    return labels[:, 1:] != -100


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (B, S-1, V), targets (B, S-1), loss mask (B, S-1)): position i predicts token i+1."""
    targets = labels[:, 1:]
    mask = loss_mask(labels)
    return logits[:, :-1].float(), targets.masked_fill(~mask, 0), mask


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (B, S-1) and its mask."""
    logits, targets, mask = shifted(logits, labels)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ce * mask, mask


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(target) of each loss token (B, S-1), 0 elsewhere."""
    logits, targets, mask = shifted(logits, labels)
    return logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0] * mask


def importance_weights(full_logits: torch.Tensor, alone_logits: torch.Tensor, labels: torch.Tensor,
                       cap: float) -> torch.Tensor:
    """Deng et al.'s segment-wise token importance: ``min(log p(x | whole context) - log p(x | its
    segment alone), cap)`` from the teacher, softmax-normalised over each row's loss tokens and
    scaled so they average 1 (B, S-1; 0 off the loss tokens)."""
    _, _, mask = shifted(full_logits, labels)
    gain = (token_log_probs(full_logits, labels) - token_log_probs(alone_logits, labels)).clamp(max=cap)
    weights = gain.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return weights * mask.sum(-1, keepdim=True)


def importance_spread(weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How far :func:`importance_weights` are from uniform: the mean |weight - 1| over the loss
    tokens (0: the objective changes nothing, as when every loss token's gain reaches the cap)."""
    return (weights - 1).abs()[loss_mask(labels)].mean()


def context_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   gist_token_id: int, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Labels (B, S) of the prompt's raw tokens for next-token prediction: every real token that is
    neither a loss token of ``labels`` (the answer), a gist, nor the first token of an example (of a
    row, or of a packed row's ``segment_ids``); -100 elsewhere."""
    real = attention_mask.bool()
    keep = real & (labels == -100) & (input_ids != gist_token_id)
    first = real & (real.long().cumsum(-1) == 1)  # a row's first real token (rows may be left-padded)
    if segment_ids is not None:
        first[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
    return input_ids.masked_fill(~keep | first, -100)


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                     mix: float) -> torch.Tensor:
    """Mean cross-entropy over the loss tokens, each weighted ``(1 - mix) + mix * weight``."""
    ce, mask = token_losses(logits, labels)
    if weights is not None and mix:
        ce = ce * ((1 - mix) + mix * weights)
    return ce.sum() / mask.sum().clamp(min=1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """KL(teacher || student) per loss token at ``temperature`` (times its square), averaged."""
    s, _, mask = shifted(student_logits, labels)
    t, _, _ = shifted(teacher_logits, labels)
    log_s, log_t = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature ** 2


def build_autoencoder(student_config):
    """A one-layer decoder of the student's family and width (its own, fresh parameters)."""
    config = student_config.__class__.from_dict({**student_config.to_dict(), "num_hidden_layers": 1,
                                                "layer_types": None, "use_cache": True})
    config._attn_implementation = "sdpa" if student_config._attn_implementation == "flex_attention" \
        else student_config._attn_implementation
    return model_class(config).from_config(config, attn_implementation=config._attn_implementation)


def gist_units(input_ids: torch.Tensor, examples: torch.Tensor, gist_token_id: int):
    """Every gist unit of a batch of segmented prompts: (row, gist columns, raw columns), the raw
    columns being the real non-gist tokens between the previous run of gists (or the example's
    start) and this run. ``examples`` (B, S): the packed example of each column (0: padding); what
    follows an example's last gists (its question and answer) closes no unit."""
    units = []
    for b in range(input_ids.shape[0]):
        raw, run, current = [], [], None
        for col, (token, example) in enumerate(zip(input_ids[b].tolist(), examples[b].tolist())):
            if example == 0:
                continue
            if example != current:  # a packed example starts: nothing carries over
                if run:
                    units.append((b, run, raw))
                raw, run, current = [], [], example
            if token == gist_token_id:
                run.append(col)
                continue
            if run:  # a run of gists ended: it closes the unit of the raw tokens before it
                units.append((b, run, raw))
                raw, run = [], []
            raw.append(col)
        if run:
            units.append((b, run, raw))
    return [u for u in units if u[2]]


def autoencode_loss(autoencoder, student_cache, input_ids: torch.Tensor, examples: torch.Tensor,
                    positions: torch.Tensor, gist_token_id: int, per_unit: bool = False) -> torch.Tensor:
    """Cross-entropy of ``autoencoder`` reconstructing each unit's raw tokens (teacher-forced, after
    a ``<GIST>`` start token) with only that unit's gist keys/values of the student's last layer as
    its past (at the positions the student's forward gave them: ``positions``). ``per_unit``: each
    unit's mean, in :func:`gist_units` order, instead of the mean over every raw token."""
    units = gist_units(input_ids, examples, gist_token_id)
    if not units:
        return input_ids.new_zeros((), dtype=torch.float32)
    layer = student_cache.layers[-1]
    keys, values = layer.keys, layer.values  # (B, H, S, D), with the student's graph
    n, g = len(units), max(len(u[1]) for u in units)
    r = max(len(u[2]) for u in units)
    device = input_ids.device
    gist_col = torch.zeros(n, g, dtype=torch.long, device=device)
    gist_ok = torch.zeros(n, g, dtype=torch.bool, device=device)
    raw_col = torch.zeros(n, r, dtype=torch.long, device=device)
    raw_ok = torch.zeros(n, r, dtype=torch.bool, device=device)
    rows = torch.tensor([u[0] for u in units], device=device)
    for i, (_, gists, raw) in enumerate(units):
        gist_col[i, g - len(gists):] = torch.tensor(gists, device=device)  # left-padded past
        gist_ok[i, g - len(gists):] = True
        raw_col[i, :len(raw)] = torch.tensor(raw, device=device)
        raw_ok[i, :len(raw)] = True
    index = gist_col[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
    past = DynamicCache(ddp_cache_data=[(keys[rows].gather(2, index), values[rows].gather(2, index))])
    targets = input_ids[rows[:, None], raw_col]
    inputs = torch.cat([torch.full_like(targets[:, :1], gist_token_id), targets[:, :-1]], -1)
    last = positions[rows[:, None], gist_col].max(-1).values
    q_pos = last[:, None] + 1 + torch.arange(r, device=device)
    k_pos = torch.cat([positions[rows[:, None], gist_col], q_pos], -1)
    q = torch.arange(r, device=device)
    allowed = torch.cat([gist_ok[:, None, :].expand(-1, r, -1),
                         (q[None, None, :] <= q[None, :, None]) & raw_ok[:, None, :]], -1)[:, None]
    out = autoencoder(input_ids=inputs, position_ids=q_pos, cache=past, use_cache=True,
                      attention_mask=self_attention_masks(autoencoder, allowed, q_pos, k_pos))
    ce = F.cross_entropy(out.logits.float().transpose(1, 2), targets, reduction="none")
    if per_unit:
        return (ce * raw_ok).sum(-1) / raw_ok.sum(-1)
    return (ce * raw_ok).sum() / raw_ok.sum()


__all__ = ["Objectives", "autoencode_loss", "build_autoencoder", "distill_loss", "gist_units",
           "importance_spread", "importance_weights", "load_teacher", "weighted_lm_loss"]
