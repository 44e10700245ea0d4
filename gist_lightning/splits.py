"""Names shared by data, evaluation, the CLI and the experiments: the splits, the metric keys
logged per split, and the metric that picks the best checkpoint. Everything else imports them."""

from __future__ import annotations

TRAIN = "train"
VALIDATION_SPLITS = ("validation_seen", "validation_unseen", "validation_human")
SPLITS = (TRAIN, *VALIDATION_SPLITS)
# short names for result tables and plots
SHORT = {"validation_seen": "seen", "validation_unseen": "unseen", "validation_human": "human"}
HUMAN = "validation_human"  # hand-written instructions: longer, so they have their own length limits

# per-split quality metrics (ROUGE-L x100 as the authors computed it, exact match in %)
ROUGE_L = "rougeL"
EXACT_MATCH = "exact_match"
QUALITY_METRICS = (ROUGE_L, EXACT_MATCH)


def metric_key(split: str, metric: str) -> str:
    """The logged name of ``metric`` on ``split`` (``validation_unseen/rougeL``)."""
    return f"{split}/{metric}"


# the paper keeps the checkpoint with the best ROUGE-L on unseen instructions
BEST_METRIC = metric_key("validation_unseen", ROUGE_L)
BEST_MODE = "max"
