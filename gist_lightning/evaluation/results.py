"""What evaluation hands around, as typed objects: what ``validation_step`` returns for a batch,
and the per-split results the callbacks compute (read by the run summary and by tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ValidationBatchOutput:
    """One validation batch of one split, repeats that only keep ranks in step left out."""

    split: str
    x: list[str]  # the prompt as text (instruction, gist tokens, input)
    y_pred: list[str]  # greedy generation through the gist cache
    y_true: list[str]
    instruction_tokens: list[int]  # tokens before the gist span (what gist caching replaces)
    cached_positions: list[int]  # what each row's cache holds in their place (its gists; a long
    # context: every segment's gists, and what its layout keeps beside them)


@dataclass(frozen=True)
class SplitScores:
    """ROUGE-L (x100) and exact match (%) of one split, over ``count`` records."""

    rougeL: float
    exact_match: float
    count: int


@dataclass(frozen=True)
class SplitCompression:
    """Compression statistics of one split: instruction length against k, and what caching holds."""

    records: int
    instruction_tokens_mean: float
    instruction_tokens_p50: float
    instruction_tokens_p90: float
    num_gist_tokens: int
    cached_positions_mean: float  # positions the run's cache holds per record, counted in the cache
    compression_ratio: float  # mean instruction tokens / mean cached positions (inf: nothing cached)
    instruction_cache_bytes: float  # a pos_control (instruction) cache of the mean instruction
    gist_cache_bytes: float  # the run's cache: cached_positions_mean positions
    # matmul FLOPs of prefilling instruction + cached positions, which a gist cache saves per call
    # (2 x non-embedding parameters x tokens; attention's quadratic part left out: a lower bound)
    prefill_flops_saved: float


@dataclass(frozen=True)
class ExportResult:
    """Where the best model was exported (``path``), from which weights (``source``), or why it
    was not (``skipped``, with the command that does it); ``notes``: what a user should know about
    it (no validation chose the weights, an earlier export replaced or kept beside it)."""

    path: Path | None
    source: str
    skipped: str | None = None
    notes: tuple[str, ...] = ()
