"""The base LightningDataModule of every data source: it reads a source's split files, tokenizes
them with the model's tokenizer and k gist tokens, cuts them to the length limits, and batches
them with the condition's masks. A source (``suite.EmbeddedSuite``, ``alpaca_plus.AlpacaPlus``)
only says where its split files are and how to make them.

What the data needs from the model (tokenizer, architecture, k, condition) it receives once,
through :meth:`GistDataModule.connect`: by hand, or in ``setup`` from the LightningModule the
trainer runs (``GistLitModule`` owns all four).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import ContextLengthError
from ..long_context import SegmentSettings, encode_long_example
from ..masks import check_condition
from ..splits import HUMAN, SPLITS, TRAIN, VALIDATION_SPLITS
from ..templates import encode_example, prompt_text
from ..tokens import gist_token_id, special_frame, tokenizer_fingerprint
from .collate import GistCollator, LengthLimits, fit_to_limits, pack_rows
from .records import load_records

log = logging.getLogger(__name__)

# the paper's limits for Alpaca+ (LLaMA 512 / human 768; FLAN-T5 source 128, target 256 / human 384, 384)
DEFAULT_LIMITS = LengthLimits(max_length=512, max_source_length=128, max_target_length=256)
DEFAULT_HUMAN_LIMITS = LengthLimits(max_length=768, max_source_length=384, max_target_length=384)
# any odd number far from small epoch counts keeps the per-epoch seeds of EpochSampler apart
_EPOCH_SEED_STRIDE = 1000003


@dataclass(frozen=True)
class ModelFacts:
    """What the data takes from the model: its tokenizer (with ``<GIST>``), whether it is an
    encoder-decoder, k and the condition. Two equal ``token_key``s tokenize alike (the condition
    only changes the masks, which the collator builds per batch)."""

    tokenizer: object
    encoder_decoder: bool
    num_gist_tokens: int
    condition: str
    context_length: int | None = None  # positions a prompt + target may span (None: no fixed limit)
    segments: SegmentSettings | None = None  # instructions are long contexts, gisted segment by segment

    def __post_init__(self):
        if self.num_gist_tokens < 1:
            raise ValueError(f"num_gist_tokens must be >= 1; got {self.num_gist_tokens}")
        check_condition(self.condition)
        gist_token_id(self.tokenizer)  # a clear error for a tokenizer without <GIST>

    @property
    def gist_token_id(self) -> int:
        return gist_token_id(self.tokenizer)

    @functools.cached_property
    def token_key(self) -> tuple:
        # cached: hashing a 100k+ vocabulary takes a while, and connect/setup ask for it per split
        segments = asdict(self.segments) if self.segments is not None else None
        return (tokenizer_fingerprint(self.tokenizer), self.encoder_decoder, self.num_gist_tokens, segments)


class EpochSampler(DistributedSampler):
    """A shuffling sampler whose order depends only on (seed, epoch), so a run resumed from a
    mid-epoch checkpoint sees exactly the batches the uninterrupted run would have seen.

    With several data-parallel ranks, rank ``r`` takes every ``num_replicas``-th index of that order
    from the ``r``-th (the order padded with its first indices to a multiple of ``num_replicas``, as
    DistributedSampler pads), and ``skip`` counts this rank's indices. It is a DistributedSampler so
    that Lightning keeps it: the one Lightning would wrap it in has no ``skip``, and a run resumed
    mid-epoch would start the epoch again.

    ``skip`` applies to the next iteration if it is of epoch ``skip_epoch`` (None: whatever its
    epoch): a checkpoint written at an epoch's last batch resumes at the next epoch, none of which
    was seen."""

    def __init__(self, size: int, seed: int, epoch_fn, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.size, self.seed, self.epoch_fn = size, seed, epoch_fn
        self.skip, self.skip_epoch = 0, None

    def __len__(self) -> int:
        return self.num_samples  # this rank's share: the size on one process

    def __iter__(self):
        epoch = self.epoch_fn()
        g = torch.Generator().manual_seed(self.seed + _EPOCH_SEED_STRIDE * epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        order = (order * -(-self.total_size // max(self.size, 1)))[: self.total_size]
        skip = self.skip if self.skip_epoch in (None, epoch) else 0
        self.skip, self.skip_epoch = 0, None
        return iter(order[self.rank::self.num_replicas][skip:])


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable (``state_dict`` / ``load_state_dict``): it
    records the epoch and how many of its batches the trainer has processed."""

    def __init__(self, *args, progress_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress_fn = progress_fn

    def state_dict(self) -> dict:
        return {"epoch": int(self.sampler.epoch_fn()), "batches": int(self.progress_fn())}

    def load_state_dict(self, state: dict) -> None:
        # (checkpoints written before the epoch was recorded skip in whatever epoch comes first)
        self.sampler.skip, self.sampler.skip_epoch = state["batches"] * self.batch_size, state.get("epoch")


class PaddedToMultiple(torch.utils.data.Dataset):
    """A validation split padded with repeats to a multiple of the world size, each repeat marked
    ``is_padding`` so that metrics count every record exactly once while every rank runs the same
    number of batches (ZeRO-3 generation steps all ranks together)."""

    def __init__(self, dataset, multiple: int):
        self.dataset, self.size = dataset, len(dataset)
        self.total = -(-self.size // multiple) * multiple

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i % self.size], "is_padding": i >= self.size}


class PackedRows(torch.utils.data.Dataset):
    """Training rows of several examples each (:func:`~gist_lightning.data.collate.pack_rows`)."""

    def __init__(self, dataset, rows: list[list[int]]):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.dataset[j] for j in self.rows[i]]


class GistDataModule(L.LightningDataModule):
    """Train loader and one named loader per validation split (``splits.VALIDATION_SPLITS``).

    Subclasses say where the split files are (:meth:`split_path`) and may make them
    (:meth:`prepare_data`); everything else is shared. The model's facts (tokenizer, k, condition,
    positions, segments) arrive through :meth:`connect`: in a Trainer the
    :class:`~gist_lightning.module.GistLitModule` calls it from its ``setup``; alone, call it yourself.

    Example::

        from gist_lightning.data import EmbeddedSuite
        from gist_lightning.tokens import add_gist_token, load_tokenizer

        tok = load_tokenizer("suite")
        add_gist_token(tok)
        data = EmbeddedSuite(batch_size=8)
        data.prepare_data()  # generates the splits (no download)
        data.connect(tok, encoder_decoder=False, num_gist_tokens=1, condition="gist")
        batch = next(iter(data.train_dataloader()))  # input_ids, attention_mask, labels

    Args:
        batch_size / eval_batch_size: per-process batch sizes for training / validation.
        limits: token limits (decoder-only: ``max_length`` of prompt + target; encoder-decoder:
            ``max_source_length`` and ``max_target_length``). A target is shortened, an example
            whose prompt does not fit is dropped and counted; gist tokens are never cut.
        human_limits: the same for ``validation_human`` (hand-written instructions run longer).
        max_validation_records: keep the first N records of each validation split (None: all).
        num_workers: DataLoader workers.
        cache_dir: where generated data and tokenized datasets are kept.
        seed: the order of training batches (a function of seed and epoch only, so resuming is exact).
        packing: training rows hold several examples end to end, up to ``limits.max_length`` tokens
            (decoder-only); ``batch_size`` then counts rows. Each example keeps its own gist rule and
            positions and sees no other example, so its loss is what it would be alone.
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        limits: LengthLimits = DEFAULT_LIMITS,
        human_limits: LengthLimits = DEFAULT_HUMAN_LIMITS,
        max_validation_records: int | None = None,
        num_workers: int = 0,
        cache_dir: str = ".cache/gist_lightning",
        seed: int = 0,
        packing: bool = False,
    ):
        super().__init__()
        # the CLI may hand a dataclass argument over as a mapping; missing fields keep the defaults
        self.limits, self.human_limits = (x if isinstance(x, LengthLimits) else replace(default, **x)
                                          for x, default in ((limits, DEFAULT_LIMITS),
                                                             (human_limits, DEFAULT_HUMAN_LIMITS)))
        # hyperparameters stay plain data, so checkpoints load with torch.load(weights_only=True);
        # the second call records them as the run's initial hyperparameters too (hparams.yaml)
        self.save_hyperparameters(ignore=["limits", "human_limits"])
        self.save_hyperparameters({**self.hparams, "limits": asdict(self.limits),
                                   "human_limits": asdict(self.human_limits)})
        self.facts: ModelFacts | None = None
        self.datasets: dict[str, Dataset] = {}
        self.dropped: dict[str, int] = {}

    # -- what a source provides ---------------------------------------------------------------
    def split_path(self, split: str) -> Path:
        """The JSON / JSONL file of ``split`` (records ``{"instruction", "input", "output", "source"}``)."""
        raise NotImplementedError

    # -- what the model provides --------------------------------------------------------------
    def connect(self, tokenizer, encoder_decoder: bool, num_gist_tokens: int, condition: str,
                context_length: int | None = None, segments: SegmentSettings | None = None) -> None:
        """Take the model's tokenizer (with ``<GIST>``), architecture, k, condition, context length and,
        for a model that gists long contexts segment by segment, its segment settings. Connecting facts
        that tokenize alike again keeps the tokenized splits; other facts drop them."""
        facts = ModelFacts(tokenizer, encoder_decoder, num_gist_tokens, condition, context_length, segments)
        for name, limits in (("limits", self.limits), ("human_limits", self.human_limits)):
            if not encoder_decoder and context_length is not None and limits.max_length > context_length:
                raise ContextLengthError(f"data.{name}.max_length={limits.max_length} exceeds the model's "
                                         f"{context_length} positions; set it to {context_length} or less")
        if self.hparams.packing and encoder_decoder:
            raise ValueError("data.packing puts several examples in one decoder row; an encoder-decoder "
                             "model takes one source per row: set data.packing false")
        if self.facts is None or self.facts.token_key != facts.token_key:
            self.datasets, self.dropped = {}, {}
            self._packing = (None,)  # the rows of the dropped training split
        self.facts = facts

    def _connected(self) -> ModelFacts:
        if self.facts is None:
            raise RuntimeError(f"{type(self).__name__} has no tokenizer yet: run it with a GistLitModule in "
                               "a Trainer, or call connect(tokenizer, encoder_decoder, num_gist_tokens, "
                               "condition)")
        return self.facts

    @property
    def tokenizer(self):
        return self._connected().tokenizer

    @property
    def validation_names(self) -> tuple[str, ...]:
        return VALIDATION_SPLITS

    # -- loading ------------------------------------------------------------------------------
    def limits_for(self, split: str) -> LengthLimits:
        return self.human_limits if split == HUMAN else self.limits

    def _load_split(self, split: str) -> Dataset:
        """``split`` read, tokenized for the connected model and cut to the length limits (examples
        that cannot fit are dropped and counted); tokenized splits are cached by ``datasets``."""
        ds, fingerprint = self._read_split(split)
        ds = ds.map(self._tokenizer_for(split), new_fingerprint=fingerprint, desc=f"tokenizing {split}",
                    remove_columns=[c for c in ds.column_names if c != "output"])
        return self._keep_fitting(split, ds, fingerprint)

    def _read_split(self, split: str) -> tuple[Dataset, str]:
        """The split's records (checked, named by file and record on error) and the fingerprint of
        what its tokenization depends on: the file, the model's token facts and the limits."""
        facts, h = self._connected(), self.hparams
        path = self.split_path(split)
        records = load_records(path)
        if split != TRAIN and h.max_validation_records is not None:
            records = records[: h.max_validation_records]
        stat = path.stat()
        fingerprint = hashlib.sha1(
            json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, len(records), *facts.token_key,
                        self.limits_for(split).__dict__]).encode()
        ).hexdigest()
        if split == TRAIN:
            ds = load_dataset("json", data_files=str(path), split="train",
                              cache_dir=str(Path(h.cache_dir) / "datasets"))
        else:
            ds = Dataset.from_list(records)
        return ds, fingerprint

    def _tokenizer_for(self, split: str):
        """The function that encodes one record of ``split`` for the connected model: a short
        instruction with k gists, or a long context with its segments' gists."""
        facts, limits = self._connected(), self.limits_for(split)
        tok, gist_id, k, enc_dec = (facts.tokenizer, facts.gist_token_id, facts.num_gist_tokens,
                                    facts.encoder_decoder)
        segments = facts.segments
        if segments is not None and split == TRAIN:  # limits hold for the most gists a batch can draw
            segments = replace(segments, gists_per_segment=segments.most_gists)

        def tokenize(rec):
            if segments is not None:
                ex = encode_long_example(tok, rec["instruction"], rec["input"], rec["output"], segments,
                                         gist_id)
            else:
                ex = encode_example(tok, rec["instruction"], rec["input"], rec["output"], k, gist_id, enc_dec)
            fitted = fit_to_limits(ex, limits, enc_dec)
            ex, keep = fitted or ex, fitted is not None
            return {"prefix": ex.prefix, "gists": ex.gists, "suffix": ex.suffix, "target": ex.target,
                    "keep": keep, "x": prompt_text(rec["instruction"], rec["input"], k, enc_dec)}

        return tokenize

    def _keep_fitting(self, split: str, ds: Dataset, fingerprint: str) -> Dataset:
        """The examples that fit the limits; the others are counted in ``dropped`` and logged."""
        kept = ds.filter(lambda r: r["keep"], new_fingerprint=fingerprint + "-kept")
        self.dropped[split] = len(ds) - len(kept)
        if self.dropped[split]:
            log.warning("%s: dropped %d of %d examples that do not fit the length limits %s",
                        split, self.dropped[split], len(ds), self.limits_for(split))
        return kept

    def setup(self, stage: str | None = None) -> None:
        """Lightning's hook, run before the model's: loads the splits if the data is connected
        already (by hand); in a Trainer the :class:`~gist_lightning.module.GistLitModule` connects
        and loads it from its own ``setup``, which Lightning runs next."""
        if self.facts is not None:
            self.load(stage)

    def load(self, stage: str | None = None) -> None:
        """Load and tokenize the splits ``stage`` needs (every split for ``fit``; the validation splits
        for ``validate``/``test``/``predict``), once per connected model. Needs :meth:`connect`."""
        self._connected()
        splits = VALIDATION_SPLITS if stage in ("validate", "test", "predict") else SPLITS
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self._load_split(split)

    def longest_prompt(self, split: str) -> int:
        """Tokens of the longest prompt (instruction + gists + input) of a loaded split."""
        ds = self.datasets[split]
        return max((len(a) + len(b) + len(c) for a, b, c in zip(ds["prefix"], ds["gists"], ds["suffix"])),
                   default=0)

    # -- batching -----------------------------------------------------------------------------
    def collator(self, for_generation: bool, packed: bool = False) -> GistCollator:
        facts = self._connected()
        return GistCollator(facts.tokenizer.pad_token_id, facts.gist_token_id, facts.condition,
                            facts.encoder_decoder, facts.num_gist_tokens, for_generation, packed,
                            facts.segments, len(special_frame(facts.tokenizer)[0]))

    def packed_rows(self) -> list[list[int]]:
        """The training examples' indices, packed into rows of ``limits.max_length`` tokens (once per
        loaded split: the rows are fixed, their order is shuffled per epoch)."""
        ds = self.datasets[TRAIN]
        key = (id(ds), self.limits.max_length)
        if getattr(self, "_packing", (None,))[0] != key:
            lengths = [len(a) + len(b) + len(c) + len(d)
                       for a, b, c, d in zip(ds["prefix"], ds["gists"], ds["suffix"], ds["target"])]
            rows = pack_rows(lengths, self.limits.max_length)
            log.info("packing: %d examples into %d rows of %d tokens (%.0f%% filled)", len(lengths),
                     len(rows), self.limits.max_length,
                     100 * sum(lengths) / max(1, len(rows) * self.limits.max_length))
            self._packing = (key, rows)
        return self._packing[1]

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _batches_processed(self) -> int:
        return (self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer is not None
                else 0)

    def train_dataloader(self) -> DataLoader:
        self.load("fit")  # loaded already in a Trainer; says what it needs when never connected
        dataset = self.datasets[TRAIN]
        if self.hparams.packing:
            dataset = PackedRows(dataset, self.packed_rows())
        # this rank's share of the data-parallel ranks (all of it on one process)
        shares = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        sampler = EpochSampler(len(dataset), self.hparams.seed, self._epoch, **shares)
        return ResumableLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                               collate_fn=self.collator(False, packed=self.hparams.packing),
                               num_workers=self.hparams.num_workers, progress_fn=self._batches_processed)

    def val_dataloader(self) -> list[DataLoader]:
        self.load("validate")
        loaders = []
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        for split in VALIDATION_SPLITS:
            dataset, sampler = self.datasets[split], None
            if distributed:  # our own sampler: Lightning's would count repeated records twice
                dataset = PaddedToMultiple(dataset, dist.get_world_size())
                sampler = DistributedSampler(dataset, shuffle=False)
            loaders.append(DataLoader(dataset, batch_size=self.hparams.eval_batch_size, sampler=sampler,
                                      collate_fn=self.collator(True), num_workers=self.hparams.num_workers))
        return loaders

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
