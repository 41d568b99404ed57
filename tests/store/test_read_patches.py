"""``PatchFile.read_patches``: the one HDF5 row reader (augment, check-memorization and assess read through it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import make_patch_file

from dagan_gn.store.patch_file import PatchFile, StoreError, uint16_to_signed


@pytest.fixture(scope="module")
def patch_path(tmp_path_factory):
    return make_patch_file(tmp_path_factory.mktemp("read") / "p.h5", n_train=9, n_val=2, n_test=2, size=16)


def test_rows_in_any_order_in_blocks(patch_path):
    with PatchFile(patch_path) as pf:
        everything = pf.patches[:]
        for rows in ([2, 3, 4, 5], [0, 5, 7, 12], [7, 1, 1, 9, 0], [], [12]):
            for block in (2, 512):
                got = pf.read_patches(rows, block=block)
                assert got.dtype == np.uint16 and got.shape == (len(rows), 1, 16, 16)
                assert np.array_equal(got, everything[rows])
        signed = pf.read_patches([0, 5, 7], signed=True)
        assert signed.dtype == np.float32 and np.array_equal(signed, uint16_to_signed(everything[[0, 5, 7]]))
        with pytest.raises(StoreError, match="outside the file's 13 patches"):
            pf.read_patches([3, 13])
