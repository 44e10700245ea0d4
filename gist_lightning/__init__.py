"""gist-lightning: gist tokens for prompt compression (Mu, Li, Goodman 2023) on PyTorch Lightning."""

from importlib.metadata import version as _version

from .cache import GistCache
from .caching import compress
from .generation import generate
from .masks import CONDITIONS
from .tokens import GIST_TOKEN, add_gist_token

__all__ = ["CONDITIONS", "GIST_TOKEN", "GistCache", "add_gist_token", "compress", "generate"]
__version__ = _version("gist-lightning")  # the one source is pyproject.toml
