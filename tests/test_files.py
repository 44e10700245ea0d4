"""The one atomic-write helper: all or nothing, no clobbering unless asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gist_lightning.files import atomic_path, free_path, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash in the middle")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_overwrite_only_when_asked(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "one\r\n")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_text_atomic(path, "two", overwrite=False)
    assert path.read_bytes() == b"one\r\n"  # written as given
    write_text_atomic(path, "two")
    assert path.read_text() == "two"


def test_free_path_numbers_instead_of_overwriting(tmp_path):
    first = free_path(tmp_path / "p.csv")
    first.write_text("x")
    second = free_path(tmp_path / "p.csv")
    assert (first.name, second.name) == ("p.csv", "p-1.csv")


_WRITE_THEN_WAIT = """
import sys, time
from gist_lightning.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_strays_of_dead_writers_go_and_those_of_live_writers_stay(tmp_path):
    """A writer still inside atomic_path (another run writing into the folder) keeps its temporary;
    once it is killed, the temporary is a stray: found, removed by remove_strays and by
    ``gist-lightning clean``. A temporary of another host is never removed (its writer cannot be
    seen from here); one of an earlier version, which names no writer, is."""
    from gist_lightning.cli import main
    from gist_lightning.files import find_strays, remove_strays

    writer = subprocess.Popen([sys.executable, "-c", _WRITE_THEN_WAIT, str(tmp_path / "best.ckpt")],
                              stdout=subprocess.PIPE, text=True)
    try:
        live = Path(writer.stdout.readline().strip())
        assert live.exists() and live.parent == tmp_path
        assert find_strays(tmp_path) == [] and remove_strays(tmp_path) == [] and live.exists()
    finally:
        writer.kill()
        writer.wait()
    other_host = tmp_path / ".last.ckpt.w1@some-other-node.abc.tmp"
    legacy = tmp_path / "predictions" / ".step20.csv.x1y2z3.tmp"
    for path in (other_host, legacy):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    assert find_strays(tmp_path) == [live, legacy]
    main(["clean", str(tmp_path)])
    assert not live.exists() and not legacy.exists() and other_host.exists()


def test_a_kill_inside_a_write_leaves_a_stray_that_clean_removes(tmp_path, capsys):
    from gist_lightning.cli import main

    subprocess.run([sys.executable, "-c", "import os, signal, sys\nfrom gist_lightning.files import "
                    "atomic_path\nwith atomic_path(sys.argv[1]) as tmp:\n    os.kill(os.getpid(), "
                    "signal.SIGKILL)", str(tmp_path / "checkpoints" / "best-step20.ckpt")])
    [stray] = (tmp_path / "checkpoints").iterdir()
    main(["clean", "--dry_run", str(tmp_path)])
    assert capsys.readouterr().out == f"would remove {stray}\n" and stray.exists()
    main(["clean", str(tmp_path)])
    assert capsys.readouterr().out == f"removed {stray}\n" and not stray.exists()
    main(["clean", str(tmp_path)])
    assert capsys.readouterr().out == "nothing to remove\n"
