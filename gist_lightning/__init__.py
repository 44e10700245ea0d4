"""gist-lightning: gist tokens for prompt compression (Mu, Li, Goodman 2023) on PyTorch Lightning.

The names below are imported when first used (:mod:`gist_lightning.lazy`): they pull in torch and
transformers, which a module that needs neither (a sweep cell's process) should not load."""

import re as _re
from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version
from pathlib import Path as _Path
from typing import TYPE_CHECKING

from .lazy import lazy_names as _lazy_names

if TYPE_CHECKING:  # (for type checkers and editors; at run time, __getattr__)
    from .cache import GistCache
    from .caching import compress
    from .generation import generate
    from .masks import CONDITIONS
    from .tokens import GIST_TOKEN, add_gist_token

__all__ = ["CONDITIONS", "GIST_TOKEN", "GistCache", "add_gist_token", "compress", "generate"]
__getattr__, __dir__ = _lazy_names(__name__, {
    "GistCache": "cache", "compress": "caching", "generate": "generation", "CONDITIONS": "masks",
    "GIST_TOKEN": "tokens", "add_gist_token": "tokens"})


def _source_version() -> str:
    """The version in pyproject.toml beside the package: a checkout on PYTHONPATH, not installed
    (as on a GPU machine with no registry, where the package cannot be pip-installed)."""
    pyproject = _Path(__file__).resolve().parents[1] / "pyproject.toml"
    found = pyproject.is_file() and _re.search(r'^version = "([^"]+)"', pyproject.read_text(), _re.M)
    return found[1] if found else "0+unknown"


try:
    __version__ = _version("gist-lightning")  # the one source is pyproject.toml
except _NotInstalled:
    __version__ = _source_version()
