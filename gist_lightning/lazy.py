"""Names a package imports when first used, not with the package (PEP 562): the top package's API
pulls in torch and transformers, which a sweep cell's process (``python -m
gist_lightning.sweeps.cell``: it launches fits and waits) need not hold; and a package that imported
its ``cell`` module before runpy runs it as ``__main__`` would hold two copies of it."""

from __future__ import annotations

import sys
from importlib import import_module


def lazy_names(package: str, where: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``'s ``__init__``: ``where`` maps each name to the
    submodule (relative to ``package``) that defines it."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{where[name]}", package), name)
        setattr(sys.modules[package], name, value)  # once found, a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__
