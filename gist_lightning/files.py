"""Writing files so that a reader never sees half of one and nothing a user had is clobbered by
accident: the one atomic-write helper of the project (cache files, data splits, predictions)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
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


def _writer() -> str:
    """This process, as its temporaries name it: ``w<pid>@<host>`` (the host's first label)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
    return f"w{os.getpid()}@{host}"


_WRITER = re.compile(r"\.w(\d+)@([A-Za-z0-9_-]+)\.[^.]*\.tmp$")


def writer_alive(stray: str | os.PathLike) -> bool:
    """Whether the process that made the temporary ``stray`` may still be writing it: True for a
    live process of this host, and for a writer on another host (a shared filesystem: its processes
    cannot be seen from here); False for a dead process of this host, or a temporary of an earlier
    version that named no writer."""
    found = _WRITER.search(Path(stray).name)
    if found is None:
        return False
    pid, host = int(found.group(1)), found.group(2)
    if host != _writer().split("@", 1)[1]:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer()}.", suffix=".tmp")
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
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_writer()}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.{_writer()}.",
                                        suffix=".tmp"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_strays(folder: str | os.PathLike) -> list[Path]:
    """The temporaries of :func:`atomic_path` / :func:`atomic_dir` under ``folder`` (``.<name>.*.tmp``
    files and folders, the outermost only) whose writer is dead: what a kill left behind. Those of
    live writers (another run writing into the same folder) are not listed."""
    found: list[Path] = []
    for stray in sorted(Path(folder).rglob(".*.tmp")):
        if not any(parent in found for parent in stray.parents) and not writer_alive(stray):
            found.append(stray)
    return found


def remove_strays(folder: str | os.PathLike) -> list[Path]:
    """Remove what killed writes left under ``folder`` (:func:`find_strays`); return what was removed."""
    return [stray for stray in find_strays(folder) if remove_strays_at(stray)]


def remove_strays_at(stray: Path) -> bool:
    """Remove one stray temporary file or folder (one whose writer is dead); False when it is
    already gone or its writer may still be writing it."""
    if not stray.exists() or writer_alive(stray):  # inside a stray folder removed just before
        return False
    if stray.is_dir():
        shutil.rmtree(stray, ignore_errors=True)
    else:
        stray.unlink(missing_ok=True)
    return True
