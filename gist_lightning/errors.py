"""The package's own errors: expected failures (bad input, a file that is not what it should be,
a prompt that does not fit the model) that the command line prints as one line."""

from __future__ import annotations

import os
import signal

SIGTERM_EXIT = 128 + signal.SIGTERM  # a run stopped by a SIGTERM exits so, as a scheduler expects


class GistError(Exception):
    """An expected failure whose message names the file, record or setting and what is wrong."""


class DataFormatError(GistError, ValueError):
    """A data file that does not hold what it should; the message names the file and record."""


class ContextLengthError(GistError, ValueError):
    """Instruction + gist tokens + input + new tokens do not fit the model's positions."""


class CorruptFileError(GistError, ValueError):
    """A cache, checkpoint or data file that cannot be read: truncated, corrupt or of another kind."""


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content; another encoding is named as such, with the offending byte."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                               "save it as UTF-8") from None
