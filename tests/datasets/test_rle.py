"""datasets/rle.py: the VoxDet-SoIR RLE.py convention, both pixel orders and the top-left-1 case."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.rle import voxdet_decode, voxdet_decode_with_box, voxdet_encode, voxdet_shape
from tests.datasets.voxdet_replica import builder_rle, column_major_rle_without_transpose


def test_encode_starts_with_the_first_pixels_value():
    starts_0 = np.array([[0, 0, 1], [1, 1, 0]])
    starts_1 = np.array([[1, 1, 0], [0, 0, 1]])
    assert voxdet_encode(starts_0) == {"counts": [2, 3, 1], "size": (2, 3), "transpose": False}
    assert voxdet_encode(starts_1) == {"counts": [2, 3, 1], "size": (2, 3), "transpose": False}  # no 0-run
    assert voxdet_encode(np.ones((2, 2), dtype=bool))["counts"] == [4]


def test_encode_matches_an_independent_encoder_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((7, 11)) < rng.random()
        assert voxdet_encode(mask) == builder_rle(mask)


def test_decode_reads_the_first_run_as_zeros_row_major():
    mask = np.array([[0, 0, 1], [1, 1, 0]], dtype=bool)
    assert np.array_equal(voxdet_decode(voxdet_encode(mask)), mask)
    # A top-left 1 is read inverted, as RLE.py's decoder does.
    assert np.array_equal(voxdet_decode(voxdet_encode(~mask)), mask)


def test_decode_without_transpose_key_returns_the_transpose():
    counts = {"counts": [1, 2, 3], "size": (2, 3)}  # rows 0 1 1 / 0 0 0, read .T
    assert np.array_equal(voxdet_decode(counts), np.array([[0, 0], [1, 0], [1, 0]], dtype=bool))
    assert voxdet_shape(counts) == (3, 2)
    assert np.array_equal(voxdet_decode({**counts, "transpose": True}), voxdet_decode(counts))
    assert voxdet_decode({**counts, "transpose": False}).shape == (2, 3)
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:5] = True
    assert np.array_equal(voxdet_decode(column_major_rle_without_transpose(mask)), mask)


def test_decode_with_box_undoes_the_top_left_inversion():
    mask = np.zeros((5, 8), dtype=bool)
    mask[0:2, 0:3] = True  # starts with a 1
    decoded, complemented = voxdet_decode_with_box(voxdet_encode(mask), [0, 0, 3, 2])
    assert complemented and np.array_equal(decoded, mask)
    inner = np.zeros((5, 8), dtype=bool)
    inner[1:4, 2:6] = True
    decoded, complemented = voxdet_decode_with_box(voxdet_encode(inner), [2, 1, 6, 4])
    assert not complemented and np.array_equal(decoded, inner)
    full = np.ones((5, 8), dtype=bool)  # counts [40]: read as empty, complement is full
    decoded, complemented = voxdet_decode_with_box(voxdet_encode(full), [0, 0, 8, 5])
    assert complemented and decoded.all()


def test_decode_with_box_refuses_a_box_that_fits_neither():
    mask = np.zeros((5, 8), dtype=bool)
    mask[1:4, 2:6] = True
    with pytest.raises(ValueError, match="neither the decoded mask .* nor its complement"):
        voxdet_decode_with_box(voxdet_encode(mask), [0, 0, 3, 3])


def test_bad_counts_and_sizes_are_errors():
    with pytest.raises(ValueError, match="sum to 2\\*3 = 6"):
        voxdet_decode({"counts": [1, 2], "size": (2, 3), "transpose": False})
    with pytest.raises(ValueError, match="'size' must be 2 positive ints"):
        voxdet_decode({"counts": [6], "size": (6,), "transpose": False})
