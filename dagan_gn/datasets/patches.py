"""PyTorch datasets over HDF5 patch files (``dagan_gn.store.patch_file`` layout).

Items are dicts ``{"image": FloatTensor[C, S, S] in [-1, 1], "label": int, "index": int}`` (``index`` = row in the
file). :class:`SameClassPairDataset` adds ``"pair"`` (another patch of the same class) and ``"pair_index"``, the input
a DAGAN generator/critic pair needs.

The HDF5 file is opened lazily in each process that reads from it (and reopened after a fork), so datasets are safe
to hand to a ``DataLoader`` with ``num_workers > 0``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from dagan_gn.store.patch_file import PatchFile, uint16_to_signed

__all__ = ["PatchDataset", "SameClassPairDataset", "limit_patches_per_class"]


class PatchDataset(Dataset):
    """Patches of one split (and optionally some classes) of a patch file.

    Args:
        path: the ``.h5`` patch file.
        split: ``"train"``, ``"val"``, ``"test"``, or ``None``/``"all"`` for every row.
        classes: keep only these class names; labels are then indices into ``classes`` (in the given order).
            ``None`` keeps every class with the file's class table.
        transform: optional callable applied to the image tensor (after scaling to [-1, 1]).
        in_memory: read the split's patches into memory once (as stored, uint16: 2 bytes a pixel) instead of one
            HDF5 read per item. For small sets: 3,840 Omniglot drawings at 32 px take 7.9 MB and a batch of 32
            pairs goes from ~10 ms to ~1 ms, which is what limits a small net on a GPU. The same values either way.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str | None = "train",
        classes: Sequence[str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        in_memory: bool = False,
    ) -> None:
        self.path = Path(path)
        self.split = split
        self.transform = transform
        with PatchFile(self.path) as pf:
            file_classes = pf.class_names
            rows = np.arange(len(pf)) if split in (None, "all") else pf.split_indices(split)
            file_labels = pf.labels
            self.patch_size = pf.patch_size
            self.channels = pf.channels
        if classes is None:
            self.class_names = list(file_classes)
            remap = np.arange(len(file_classes))
        else:
            unknown = [c for c in classes if c not in file_classes]
            if unknown:
                raise ValueError(f"{self.path}: classes {unknown} are not in the file (it has {file_classes})")
            self.class_names = list(classes)
            remap = np.asarray([self.class_names.index(c) if c in self.class_names else -1 for c in file_classes])
            rows = rows[remap[file_labels[rows]] >= 0]
        self.rows: np.ndarray = rows.astype(np.int64)
        self.labels: np.ndarray = remap[file_labels[self.rows]].astype(np.int64)
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        # Keyed by file row (sorted), so a copy with fewer rows (limit_patches_per_class) still finds its patches.
        self._memory_rows: np.ndarray | None = None
        self._memory: np.ndarray | None = None
        if in_memory:
            self._memory_rows = np.unique(self.rows)
            if len(self._memory_rows):
                lo, hi = int(self._memory_rows[0]), int(self._memory_rows[-1])
                with PatchFile(self.path) as pf:  # one contiguous read: h5py's fancy indexing is slow for many rows
                    self._memory = pf.patches[lo : hi + 1][self._memory_rows - lo]

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def _patches(self) -> h5py.Dataset:
        if self._h5 is None or self._pid != os.getpid():
            # A handle inherited through fork is not safe to use; open our own.
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5["patches"]

    def read_image(self, i: int) -> torch.Tensor:
        """Item ``i`` as FloatTensor [C, S, S] in [-1, 1] (before ``transform``): the store's scale."""
        row = int(self.rows[i])
        if self._memory is not None:
            return torch.from_numpy(uint16_to_signed(self._memory[np.searchsorted(self._memory_rows, row)]))
        return torch.from_numpy(uint16_to_signed(self._patches()[row]))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} patches")
        i = int(i) % len(self)
        image = self.read_image(i)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": int(self.labels[i]), "index": int(self.rows[i])}

    def indices_by_class(self) -> dict[int, np.ndarray]:
        """Dataset positions (not file rows) of each label present."""
        return {int(c): np.flatnonzero(self.labels == c) for c in np.unique(self.labels)}

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __getstate__(self) -> dict[str, Any]:  # pickled into spawn workers without the open handle
        state = self.__dict__.copy()
        state["_h5"], state["_pid"] = None, None
        return state

    def __del__(self) -> None:
        try:
            if self._h5 is not None and self._pid == os.getpid():
                self._h5.close()
        except Exception:
            pass


def limit_patches_per_class(ds: PatchDataset, limit: int, seed: int) -> PatchDataset:
    """A copy of a PatchDataset keeping at most ``limit`` patches per class (chosen by ``seed``, as for CIFAR-10);
    ``ds`` itself when ``limit`` is 0.

    The selection is applied to the dataset's public ``rows``/``labels`` (not with a ``Subset``) so that same-class
    pairs are also drawn from the kept patches only: a low-data experiment must not show the critic more images.
    """
    if limit <= 0:
        return ds
    import copy

    from dagan_gn.datasets.cifar10 import limit_indices_per_class

    keep = limit_indices_per_class(ds.labels, limit, seed)
    limited = copy.copy(ds)
    limited.rows = ds.rows[keep]
    limited.labels = ds.labels[keep]
    return limited


class SameClassPairDataset(Dataset):
    """Adds ``"pair"``: a different random patch of the same class (seeded by ``seed``, the item and the epoch set
    with :meth:`set_epoch`), and ``"pair_index"`` (its file row).

    Raises:
        ValueError: a class has a single patch (no pair possible); the message names the class.
    """

    def __init__(self, base: PatchDataset, seed: int = 0) -> None:
        self.base = base
        self.seed = int(seed)
        self.epoch = 0
        self._by_class = base.indices_by_class()
        for label, idx in self._by_class.items():
            if idx.size < 2:
                raise ValueError(
                    f"class {base.class_names[label]!r} has a single patch in {base.path.name} "
                    f"(split {base.split}); a same-class pair needs at least two"
                )

    @property
    def class_names(self) -> list[str]:
        return self.base.class_names

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels

    def indices_by_class(self) -> dict[int, np.ndarray]:
        return self._by_class

    def set_epoch(self, epoch: int) -> None:
        """Draw other pairs in another epoch (deterministically)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        i = int(i) % len(self.base)
        same = self._by_class[int(self.base.labels[i])]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        j = self._other(same, i, rng)
        pair = self.base.read_image(j)
        if self.base.transform is not None:
            pair = self.base.transform(pair)
        item["pair"] = pair
        item["pair_index"] = int(self.base.rows[j])
        return item

    @staticmethod
    def _other(same: np.ndarray, i: int, rng: np.random.Generator) -> int:
        """Uniform draw among the members of ``same`` (sorted positions) other than ``i``."""
        k = int(rng.integers(same.size - 1))
        pos = int(np.searchsorted(same, i))
        return int(same[k + 1] if k >= pos else same[k])
