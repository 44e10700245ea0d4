"""Data: sources (one DataModule each), records, templates' batching and the shared base."""

from .alpaca_plus import AlpacaPlus
from .collate import LengthLimits
from .datamodule import GistDataModule
from .long_recall import LongRecall
from .suite import EmbeddedSuite

__all__ = ["AlpacaPlus", "EmbeddedSuite", "GistDataModule", "LengthLimits", "LongRecall"]
