"""What the processes of one server share beside LitServe's queues: the server's own temporary
folder, ``gist-serve-<pid>-*`` in the system's temporary folder (``<pid>``: the main process), with

- ``metrics/``: the Prometheus multi-process files (``metrics.py``);
- ``cancelled/``: one empty file per request whose client left, named by its uid. LitServe hands a
  queued message to whichever worker takes it first, so a cancellation sent through its queue
  missed the worker running the request whenever there were several; here every worker looks at
  each engine step and drops the requests of its own that are listed. The HTTP process removes a
  file once the request's last event has come back;
- ``workers/``: each worker's engine stats, rewritten when they change (``/v1/cache/stats`` adds
  them up).

``gist-lightning serve`` makes the folder before any process starts and removes it when it stops. A
server killed with SIGKILL cannot: the next server to start removes the folders that no live process
holds. Every process of a server holds a shared lock on its folder's ``lock`` file for as long as it
lives (the forked HTTP process shares the main process's; each spawned worker takes its own), and the
kernel drops the locks of a process that dies, so a folder is removed only when its lock can be taken
exclusively: never while any process that writes there is alive, however many write at once, and
whatever became of the main process (a worker orphaned by a SIGKILL of the main process still holds
its folder). Without ``fcntl`` (Windows) nothing is locked and nothing is swept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

PREFIX = "gist-serve-"
# this process's open lock files, by folder: a lock lasts as long as its file stays open
_held: dict[str, int] = {}


def remove_dead(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the folders of servers of which no process is alive (under ``root``, default the system's
    temporary folder); return them. A folder without a ``lock`` file (one being made, or not a
    server's) is left alone."""
    removed = []
    if fcntl is None:
        return removed
    for folder in sorted(Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*")):
        try:
            fd = os.open(folder / "lock", os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a process of that server still holds it
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


class ServerFolder:
    """One server's shared folder (see the module docstring). Only its path travels to the worker
    processes; each of them calls :meth:`join` once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def create(cls, root: str | os.PathLike | None = None) -> ServerFolder:
        """Remove dead servers' folders, then make this server's, held by this process (and by the
        processes it forks)."""
        remove_dead(root)
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        for sub in ("metrics", "cancelled", "workers"):
            (path / sub).mkdir()
        # locked under another name, then renamed: a sweep never finds the lock file unlocked
        _held[str(path)] = _lock(path / "lock.new")
        os.replace(path / "lock.new", path / "lock")
        return cls(path)

    def join(self) -> None:
        """Hold the folder from this process too, for as long as it lives (a spawned worker)."""
        if str(self.path) not in _held:
            _held[str(self.path)] = _lock(self.path / "lock")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        fd = _held.pop(str(self.path), None)
        if fd is not None:
            os.close(fd)

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    # -- cancellations: the HTTP process lists them, every worker reads them ------------------------
    def cancel(self, uid: str) -> None:
        (self.path / "cancelled" / uid).touch()

    def forget(self, uid: str) -> None:
        (self.path / "cancelled" / uid).unlink(missing_ok=True)

    def cancelled(self) -> set[str]:
        """The uids of the requests whose client left and whose last event has not come back yet."""
        try:
            return set(os.listdir(self.path / "cancelled"))
        except FileNotFoundError:  # the server is stopping
            return set()

    # -- each worker's stats ----------------------------------------------------------------------------
    def publish_stats(self, worker: str, stats: dict) -> None:
        """Replace worker ``worker``'s stats (a reader sees the old file or the new one, never half)."""
        path = self.path / "workers" / f"{worker}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(stats))
            os.replace(tmp, path)
        except FileNotFoundError:  # the server is stopping
            pass

    def worker_stats(self) -> dict[str, dict]:
        """Every worker's latest stats, by worker id."""
        out = {}
        for path in sorted((self.path / "workers").glob("*.json")):
            try:
                out[path.stem] = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
        return out


def _lock(path: Path) -> int:
    """Open ``path`` (made if missing) and hold a shared lock on it; the open file, kept open."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)
    return fd
