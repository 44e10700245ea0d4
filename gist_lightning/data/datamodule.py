"""The LightningDataModule of every run: the embedded suite or Alpaca+ split files, tokenized
with k gist tokens, cut to the length limits and batched with the condition's masks."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import AutoTokenizer

from ..masks import check_condition
from ..templates import encode_example, prompt_text
from ..tokens import add_gist_token
from . import suite
from .alpaca_plus import SPLITS, VALIDATION_SPLITS, load_records, split_file, write_json_atomic
from .collate import GistCollator, LengthLimits, fit_to_limits

log = logging.getLogger(__name__)

SUITE = "suite"
SUITE_TOKENIZER = str(Path(__file__).resolve().parents[1] / "assets" / "suite_tokenizer")


def load_tokenizer(name_or_path: str, add_gist: bool = True):
    """A tokenizer by hub id or local folder (``"suite"``: the one shipped for the embedded suite),
    with the gist token (and a pad token where it had none) added unless ``add_gist`` is False
    (the model adds it itself, to resize its embeddings)."""
    tok = AutoTokenizer.from_pretrained(SUITE_TOKENIZER if name_or_path == SUITE else name_or_path)
    if add_gist:
        add_gist_token(tok)
    return tok


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), so a run resumed from a
    mid-epoch checkpoint sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, size: int, seed: int, epoch_fn):
        self.size, self.seed, self.epoch_fn = size, seed, epoch_fn
        self.skip = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 1000003 * self.epoch_fn())
        order = torch.randperm(self.size, generator=g).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable (``state_dict`` / ``load_state_dict``): it
    records how many batches of the current epoch the trainer has processed."""

    def __init__(self, *args, progress_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress_fn = progress_fn

    def state_dict(self) -> dict:
        return {"batches": int(self.progress_fn())}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.skip = state["batches"] * self.batch_size


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


class GistDataModule(L.LightningDataModule):
    """Train loader and three named validation loaders (``validation_seen``, ``validation_unseen``,
    ``validation_human``).

    Args:
        data: ``"suite"`` (the embedded suite, generated into ``cache_dir``) or a folder of
            Alpaca+ split files (``alpaca_plus_<split>.json``, or ``<split>.json[l]``).
        tokenizer: hub id or local folder; ``"suite"`` for the shipped suite tokenizer.
        num_gist_tokens: k, the number of gist tokens after the instruction.
        condition: ``gist``, ``pos_control`` or ``neg_control``.
        encoder_decoder: use the encoder-decoder template and batching (T5).
        max_length / max_source_length / max_target_length: limits (decoder-only / encoder-decoder).
        max_length_human / max_source_length_human / max_target_length_human: the human split's limits.
        max_validation_records: keep the first N records of each validation split (None: all).
        seed: the order of training batches (a function of seed and epoch only, so resuming is exact).
        suite_seed / suite_train_size / suite_validation_size: how the embedded suite is generated.
    """

    def __init__(
        self,
        data: str = SUITE,
        tokenizer: str = SUITE,
        num_gist_tokens: int = 1,
        condition: str = "gist",
        encoder_decoder: bool = False,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        max_length: int = 512,
        max_source_length: int = 128,
        max_target_length: int = 256,
        max_length_human: int = 768,
        max_source_length_human: int = 384,
        max_target_length_human: int = 384,
        max_validation_records: int | None = None,
        num_workers: int = 0,
        cache_dir: str = ".cache/gist_lightning",
        seed: int = 0,
        suite_seed: int = 0,
        suite_train_size: int = 20000,
        suite_validation_size: int = 200,
    ):
        super().__init__()
        if num_gist_tokens < 1:
            raise ValueError(f"num_gist_tokens must be >= 1; got {num_gist_tokens}")
        check_condition(condition)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        self.datasets: dict[str, Dataset] = {}
        self.dropped: dict[str, int] = {}

    # what the model needs, for LightningCLI argument links
    @property
    def gist_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<GIST>")

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def validation_names(self) -> tuple[str, ...]:
        return VALIDATION_SPLITS

    def _suite_dir(self) -> Path:
        h = self.hparams
        return Path(h.cache_dir) / f"suite-seed{h.suite_seed}-train{h.suite_train_size}-val{h.suite_validation_size}"

    def split_path(self, split: str) -> Path:
        if self.hparams.data == SUITE:
            return self._suite_dir() / f"{split}.json"
        return split_file(self.hparams.data, split)

    def prepare_data(self) -> None:
        """Generate the embedded suite into the cache folder (once); nothing else is downloaded."""
        if self.hparams.data != SUITE:
            return
        folder = self._suite_dir()
        if all((folder / f"{s}.json").is_file() for s in SPLITS):
            return
        h = self.hparams
        splits = suite.generate_suite(h.suite_seed, h.suite_train_size, h.suite_validation_size)
        splits["validation_human"] = suite.human_records()
        for name, records in splits.items():
            write_json_atomic(folder / f"{name}.json", records, overwrite=True)

    def _limits(self, split: str) -> LengthLimits:
        h = self.hparams
        if split == "validation_human":
            return LengthLimits(h.max_length_human, h.max_source_length_human, h.max_target_length_human)
        return LengthLimits(h.max_length, h.max_source_length, h.max_target_length)

    def _load_split(self, split: str) -> Dataset:
        path = self.split_path(split)
        records = load_records(path)  # checks every record, names file and record on error
        if split != "train" and self.hparams.max_validation_records is not None:
            records = records[: self.hparams.max_validation_records]
        h = self.hparams
        limits = self._limits(split)
        stat = path.stat()
        fingerprint = hashlib.sha1(
            json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, len(records), h.tokenizer,
                        self.vocab_size, h.num_gist_tokens, h.encoder_decoder, limits.__dict__]).encode()
        ).hexdigest()
        if split == "train":
            ds = load_dataset("json", data_files=str(path), split="train", cache_dir=str(Path(h.cache_dir) / "datasets"))
        else:
            ds = Dataset.from_list(records)
        tok, gist_id, k, enc_dec = self.tokenizer, self.gist_token_id, h.num_gist_tokens, h.encoder_decoder

        def tokenize(rec):
            ex = encode_example(tok, rec["instruction"], rec["input"], rec["output"], k, gist_id, enc_dec)
            fitted = fit_to_limits(ex, limits, enc_dec)
            keep = fitted is not None
            ex = fitted or ex
            return {"prefix": ex.prefix, "gists": ex.gists, "suffix": ex.suffix, "target": ex.target, "keep": keep,
                    "x": prompt_text(rec["instruction"], rec["input"], k, enc_dec)}

        ds = ds.map(tokenize, new_fingerprint=fingerprint, desc=f"tokenizing {split}",
                    remove_columns=[c for c in ds.column_names if c != "output"])
        kept = ds.filter(lambda r: r["keep"], new_fingerprint=fingerprint + "-kept")
        self.dropped[split] = len(ds) - len(kept)
        if self.dropped[split]:
            log.warning("%s: dropped %d of %d examples that do not fit the length limits %s",
                        split, self.dropped[split], len(ds), limits)
        return kept

    def setup(self, stage: str | None = None) -> None:
        splits = VALIDATION_SPLITS if stage in ("validate", "test", "predict") else SPLITS
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self._load_split(split)

    def collator(self, for_generation: bool) -> GistCollator:
        h = self.hparams
        return GistCollator(self.tokenizer.pad_token_id, self.gist_token_id, h.condition, h.encoder_decoder,
                            h.num_gist_tokens, for_generation)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _batches_processed(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSampler(len(self.datasets["train"]), self.hparams.seed, self._epoch)
        return ResumableLoader(self.datasets["train"], batch_size=self.hparams.batch_size, sampler=sampler,
                               collate_fn=self.collator(False), num_workers=self.hparams.num_workers,
                               progress_fn=self._batches_processed)

    def val_dataloader(self) -> list[DataLoader]:
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
