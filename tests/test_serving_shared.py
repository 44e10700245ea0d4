"""A server's shared folder: removed at a later start only once no process that writes there is alive
(however many write at once, whichever of them died first), never while one is; cancellations and
worker stats read back as written."""

from __future__ import annotations

import multiprocessing as mp
import os

from gist_lightning.serving import shared
from gist_lightning.serving.shared import ServerFolder, remove_dead


def _hold(path: str, ready) -> None:
    """A worker of the server at ``path``: no lock inherited (as a spawned process), its own taken."""
    for fd in shared._held.values():
        os.close(fd)
    shared._held.clear()
    ServerFolder(path).join()
    ready.set()
    while True:
        os.pause()


def _release(folder: ServerFolder) -> None:
    """What the death of the process that made ``folder`` does to its lock (the folder stays)."""
    os.close(shared._held.pop(str(folder.path)))


def test_a_folder_is_removed_only_once_every_process_that_holds_it_is_dead(tmp_path):
    folder = ServerFolder.create(tmp_path)
    assert folder.path.name.startswith(f"gist-serve-{os.getpid()}-") and folder.metrics.is_dir()
    ctx = mp.get_context("fork")  # instant, and _hold drops what fork inherited
    workers = []
    for _ in range(2):
        ready = ctx.Event()
        worker = ctx.Process(target=_hold, args=(str(folder.path), ready), daemon=True)
        worker.start()
        assert ready.wait(30)
        workers.append(worker)
    try:
        assert remove_dead(tmp_path) == [] and folder.path.is_dir()  # its maker is alive
        _release(folder)  # its maker killed, its two workers left
        assert remove_dead(tmp_path) == [] and folder.path.is_dir()
        workers[0].kill()
        workers[0].join(10)
        assert remove_dead(tmp_path) == [] and folder.path.is_dir()  # one writer is still alive
        workers[1].kill()
        workers[1].join(10)
        assert remove_dead(tmp_path) == [folder.path] and not folder.path.exists()
    finally:
        for worker in workers:
            worker.kill()


def test_a_new_servers_start_removes_dead_folders_and_keeps_live_ones(tmp_path):
    dead, live = ServerFolder.create(tmp_path), ServerFolder.create(tmp_path)
    _release(dead)
    being_made = tmp_path / "gist-serve-1-abc"  # no lock file yet: left alone
    being_made.mkdir()
    other = tmp_path / "unrelated"
    other.mkdir()
    new = ServerFolder.create(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.path.name, new.path.name,
                                                                 "gist-serve-1-abc", "unrelated"])
    new.remove()
    live.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gist-serve-1-abc", "unrelated"]


def test_cancellations_and_worker_stats_read_back(tmp_path):
    folder = ServerFolder.create(tmp_path)
    folder.cancel("a")
    folder.cancel("b")
    folder.forget("a")
    folder.forget("never-listed")
    assert folder.cancelled() == {"b"}
    folder.publish_stats("0", {"requests": 1})
    folder.publish_stats("1", {"requests": 2})
    folder.publish_stats("0", {"requests": 3})
    assert folder.worker_stats() == {"0": {"requests": 3}, "1": {"requests": 2}}
    assert not [p for p in (folder.path / "workers").iterdir() if p.suffix != ".json"]  # no temporaries
    folder.remove()
    assert folder.cancelled() == set() and folder.worker_stats() == {}
    folder.publish_stats("0", {"requests": 4})  # a worker still stepping while the server stops
