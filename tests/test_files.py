"""The one atomic-write helper: all or nothing, no clobbering unless asked."""

from __future__ import annotations

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
