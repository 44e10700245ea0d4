"""Padding id rows into a batch, on either side."""

from __future__ import annotations

import pytest

from gist_lightning.padding import pad_batch


def test_left_and_right_padding():
    ids, mask = pad_batch([[5, 6, 7], [8], []], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=-100, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, -100, -100]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="side must be"):
        pad_batch([[1]], 0, "middle")
