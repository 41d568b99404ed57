"""Real + synthetic training data: :class:`MixedRealSyntheticDataset` mixes real patches with DAGAN variants at a
chosen ratio (or tops every class up to the largest one), applies optional albumentations transforms on top and marks
every item with ``"synthetic"``.

It is a plain ``torch.utils.data.Dataset`` of dicts, so it plugs into a ``DataLoader`` or a MONAI pipeline as is::

    import albumentations as A
    real = PatchDataset("patches.h5", split="train")
    fake = PatchDataset("synthetic.h5", split="train")
    mixed = MixedRealSyntheticDataset(real, fake, synthetic_ratio=0.5,
                                      transform=A.Compose([A.HorizontalFlip(), A.RandomRotate90()]), seed=0)
    item = mixed[0]   # {"image": FloatTensor[1, S, S] in [-1, 1], "label": 1, "index": 17, "synthetic": True, ...}

Classical augmentation is albumentations' job; this module only converts between the network's ``[C, S, S]`` tensors
in [-1, 1] and the ``H×W×C`` float images in [0, 1] that albumentations expects.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MixedRealSyntheticDataset", "apply_albumentations", "dataset_labels", "BALANCE"]

#: ``synthetic_ratio`` value that asks for per-class balancing instead of a global ratio.
BALANCE = "balance"


def apply_albumentations(image: torch.Tensor, transform: Callable[..., dict]) -> torch.Tensor:
    """Apply an albumentations transform to a network image.

    Args:
        image: ``FloatTensor[C, H, W]`` in [-1, 1].
        transform: an albumentations ``Compose`` (or any callable taking ``image=`` and returning ``{"image": ...}``).

    Returns:
        ``FloatTensor[C, H', W']`` in [-1, 1] (clipped, since e.g. brightness changes may leave the range).
    """
    hwc = ((image.detach().cpu().float().permute(1, 2, 0).numpy() + 1.0) * 0.5).astype(np.float32)
    out = transform(image=np.ascontiguousarray(hwc))["image"]
    if isinstance(out, torch.Tensor):  # ToTensorV2 at the end of a Compose already gives C×H×W
        chw = out.float()
    else:
        out = np.asarray(out, dtype=np.float32)
        if out.ndim == 2:  # some transforms drop a singleton channel axis
            out = out[..., None]
        chw = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
    return (chw.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Integer label of every item of ``dataset``.

    Uses a ``labels`` attribute (array-like, one per item) when the dataset has one — ``PatchDataset`` and
    ``CIFAR10Dataset`` do — or the labels of a ``Subset``'s dataset, and otherwise reads the items (slow for big
    datasets, fine for small ones).
    """
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        labels = np.asarray(labels if not isinstance(labels, torch.Tensor) else labels.cpu().numpy())
        if labels.shape == (len(dataset),):
            return labels.astype(np.int64)
    return np.asarray([int(dataset[i]["label"]) for i in range(len(dataset))], dtype=np.int64)


def _class_names(dataset: Dataset | None) -> list[str] | None:
    names = getattr(dataset, "class_names", None)
    return None if names is None else [str(n) for n in names]


class MixedRealSyntheticDataset(Dataset):
    """Real and synthetic items mixed in fixed proportions, with optional albumentations on top.

    The epoch is a fixed, seeded list of ``(source, index)`` pairs: every real item exactly once plus

    - ``synthetic_ratio=r`` (a float in [0, 1)): ``round(n_real * r / (1 - r))`` synthetic items, so a fraction ``r``
      of the epoch is synthetic (``r=0`` gives the real data alone); ``r=1`` means synthetic only.
    - ``synthetic_ratio="balance"``: per-class balancing — each class is topped up with synthetic items of the same
      class until it has as many items as the largest real class.

    Synthetic items are drawn without replacement while the synthetic pool lasts, then with replacement. The order
    is shuffled; :meth:`set_epoch` redraws the synthetic subset and the order for a new epoch (same seed and epoch →
    same list), which keeps multi-worker loading and resumed runs reproducible.

    Args:
        real: dataset of real items (dicts with ``"image"`` and ``"label"``), e.g. ``PatchDataset``.
        synthetic: dataset of synthetic items with the same classes and label numbering, or ``None`` (real only).
        synthetic_ratio: fraction of synthetic items in an epoch, or ``"balance"``.
        transform: albumentations transform applied to every image (real and synthetic), or ``None``.
        transform_synthetic: apply ``transform`` to synthetic items too (default True).
        seed: seed of the sampling plan and of the albumentations randomness.

    Every item is the underlying item's dict (``index`` stays the index inside its own dataset) plus
    ``"synthetic": bool``.
    """

    def __init__(
        self,
        real: Dataset,
        synthetic: Dataset | None = None,
        synthetic_ratio: float | str = 0.5,
        transform: Callable[..., dict] | None = None,
        *,
        transform_synthetic: bool = True,
        seed: int = 0,
    ) -> None:
        if synthetic is None:
            synthetic_ratio = 0.0
        if isinstance(synthetic_ratio, str):
            if synthetic_ratio != BALANCE:
                raise ValueError(f"synthetic_ratio must be a number in [0, 1] or '{BALANCE}', got {synthetic_ratio!r}")
        elif not (0.0 <= float(synthetic_ratio) <= 1.0) or math.isnan(float(synthetic_ratio)):
            raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio}")
        if len(real) == 0 and synthetic_ratio != 1.0:
            raise ValueError("the real dataset is empty")
        real_names, syn_names = _class_names(real), _class_names(synthetic)
        if real_names is not None and syn_names is not None and real_names != syn_names:
            raise ValueError(
                f"real and synthetic datasets have different classes: {real_names} vs {syn_names}; "
                "the synthetic file must come from `dagan augment` on the same patch file"
            )
        self.real = real
        self.synthetic = synthetic
        self.synthetic_ratio = synthetic_ratio
        self.transform = transform
        self.transform_synthetic = transform_synthetic
        self.seed = int(seed)
        self.class_names = real_names or syn_names
        self._real_labels = dataset_labels(real) if synthetic_ratio == BALANCE else None
        self._syn_labels = dataset_labels(synthetic) if synthetic is not None and synthetic_ratio == BALANCE else None
        self.epoch = 0
        self._plan = self._make_plan()

    # -- sampling plan -------------------------------------------------------------------------------------------
    def _draw(self, rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
        """``k`` members of ``pool``: a permutation while it lasts, then uniform draws with replacement."""
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        if len(pool) == 0:
            raise ValueError("cannot draw synthetic items from an empty pool")
        whole, rest = divmod(k, len(pool))
        parts = [rng.permutation(pool) for _ in range(min(whole, 1))]
        if whole > 1:
            parts.append(rng.choice(pool, size=(whole - 1) * len(pool), replace=True))
        parts.append(rng.choice(pool, size=rest, replace=False))
        return np.concatenate(parts).astype(np.int64)

    def _make_plan(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_real = len(self.real)
        ratio = self.synthetic_ratio
        if ratio == 1.0:
            syn_idx = np.arange(len(self.synthetic), dtype=np.int64)
            real_idx = np.zeros(0, dtype=np.int64)
        else:
            real_idx = np.arange(n_real, dtype=np.int64)
            if ratio == BALANCE:
                counts = np.bincount(self._real_labels)
                target = counts.max()
                parts = []
                for c, have in enumerate(counts):
                    need = int(target - have)
                    pool = np.flatnonzero(self._syn_labels == c)
                    if need > 0 and len(pool) == 0:
                        name = self.class_names[c] if self.class_names and c < len(self.class_names) else c
                        raise ValueError(
                            f"per-class balancing needs {need} synthetic items of class {name!r} but the synthetic "
                            "dataset has none; augment that class too or use a numeric synthetic_ratio"
                        )
                    parts.append(self._draw(rng, pool, need))
                syn_idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            else:
                n_syn = int(round(n_real * float(ratio) / (1.0 - float(ratio))))
                syn_idx = self._draw(rng, np.arange(len(self.synthetic)), n_syn) if n_syn else np.zeros(0, np.int64)
        plan = np.concatenate(
            [np.stack([np.zeros_like(real_idx), real_idx], 1), np.stack([np.ones_like(syn_idx), syn_idx], 1)]
        )
        return plan[rng.permutation(len(plan))]

    def set_epoch(self, epoch: int) -> None:
        """Redraw the synthetic subset and the order for ``epoch`` (deterministic given the seed)."""
        self.epoch = int(epoch)
        self._plan = self._make_plan()

    @property
    def num_synthetic(self) -> int:
        """Synthetic items in the current epoch."""
        return int(self._plan[:, 0].sum())

    @property
    def labels(self) -> np.ndarray:
        """Label of every item of the current epoch (reads labels of the underlying datasets)."""
        real = self._real_labels if self._real_labels is not None else dataset_labels(self.real)
        out = np.empty(len(self._plan), dtype=np.int64)
        is_syn = self._plan[:, 0] == 1
        out[~is_syn] = real[self._plan[~is_syn, 1]]
        if is_syn.any():
            syn = self._syn_labels if self._syn_labels is not None else dataset_labels(self.synthetic)
            out[is_syn] = syn[self._plan[is_syn, 1]]
        return out

    # -- Dataset protocol ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._plan)

    def __getitem__(self, i: int) -> dict[str, Any]:
        source, idx = (int(v) for v in self._plan[i])
        is_syn = source == 1
        item = dict((self.synthetic if is_syn else self.real)[idx])
        item["synthetic"] = is_syn
        if self.transform is not None and (self.transform_synthetic or not is_syn):
            # Reseed the transform per item so an epoch is reproducible whatever the worker count or access order.
            seed = int(np.random.default_rng([self.seed, self.epoch, i, 1]).integers(2**31))
            if hasattr(self.transform, "set_random_seed"):  # albumentations >= 2 keeps its own generators
                self.transform.set_random_seed(seed)
                item["image"] = apply_albumentations(item["image"], self.transform)
            else:  # older albumentations / plain callables draw from the global RNGs
                py_state, np_state = random.getstate(), np.random.get_state()
                random.seed(seed)
                np.random.seed(seed)
                try:
                    item["image"] = apply_albumentations(item["image"], self.transform)
                finally:
                    random.setstate(py_state)
                    np.random.set_state(np_state)
        return item
