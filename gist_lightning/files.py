"""Writing files so that a reader never sees half of one and nothing a user had is clobbered by
accident: the one atomic-write helper of the project (cache files, data splits, predictions)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def free_path(path: Path) -> Path:
    """``path``, or ``name-1.ext``, ``name-2.ext``... if it exists: nothing is overwritten."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, the file written there is
    flushed to disk and renamed onto ``path`` (atomic on POSIX); when it fails, it is removed.

    A crash leaves at most a stray ``.<name>.*.tmp`` file, and two writers of one path leave one
    complete file. With ``overwrite=False`` an existing ``path`` is refused before anything is written.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block succeeds it is renamed onto
    ``path``, so a reader (or a resumed run) sees the whole folder or none of it. ``replace=True``
    puts it in place of an existing ``path`` (moved aside first, removed once the new one is in);
    otherwise an existing ``path`` is refused before anything is written. When the block fails the
    temporary folder is removed; a kill leaves a ``.<name>.*.tmp`` folder (:func:`remove_strays`)."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.", suffix=".tmp"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_strays(folder: str | os.PathLike) -> list[Path]:
    """Remove what killed writes of :func:`atomic_path` / :func:`atomic_dir` left under ``folder``
    (``.<name>.*.tmp`` files and folders); return what was removed."""
    return [stray for stray in sorted(Path(folder).rglob(".*.tmp")) if remove_strays_at(stray)]


def remove_strays_at(stray: Path) -> bool:
    """Remove one stray temporary file or folder; False when it is already gone."""
    if not stray.exists():  # inside a stray folder removed just before
        return False
    if stray.is_dir():
        shutil.rmtree(stray, ignore_errors=True)
    else:
        stray.unlink(missing_ok=True)
    return True
