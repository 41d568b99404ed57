"""From a training Dataset to the trainer's endless, resumable batches, and the checks between data and model.

* :class:`InfiniteBatches` — batches over epochs with a checkpointable position ``(epoch, batches consumed)``;
  :class:`ResumableSampler` — the per-epoch permutation that can start part-way through an epoch.
* :func:`same_class_pairs` — the same-class pairs an image-to-image family trains on (each class needs two images):
  :class:`~dagan_gn.datasets.patches.SameClassPairDataset` over patch files, :class:`LabelledPairs` over any other
  labelled dataset (a registered data source).
* :func:`check_data_fits_model` — the images' shape and labels against ``cfg.model`` (before any step).
* :func:`data_class_count`, :func:`resolve_data_keys` — the config keys that say "from the data".

Reproducibility: the data order is derived from (seed, epoch) and the position inside the epoch is checkpointed, so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dagan_gn.datasets.mixing import dataset_labels
from dagan_gn.datasets.registry import DataError

if TYPE_CHECKING:  # pragma: no cover
    from dagan_gn.config import ExperimentConfig

__all__ = [
    "ResumableSampler",
    "InfiniteBatches",
    "same_class_pairs",
    "LabelledPairs",
    "check_data_fits_model",
    "data_class_count",
    "resolve_data_keys",
]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (per-epoch permutation from ``seed + epoch``, one shard per rank) that can start an
    epoch part-way through, so a resumed run sees exactly the samples the uninterrupted run would have seen."""

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class InfiniteBatches:
    """Endless batches over epochs with a checkpointable position ``(epoch, batches consumed in it)``.

    Workers and pinned memory come from the DataLoader; the loader's own generator (it seeds worker RNGs) is reset
    from (seed, epoch) at each epoch so worker randomness does not depend on when the iterator was created.

    Raises:
        DataError: the dataset (this process's shard of it) holds fewer items than one batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
        self.batches_per_epoch = self.sampler.num_samples // self.batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"the training data has {len(dataset)} items ({self.sampler.num_samples} per process), fewer than "
                f"one batch of {batch_size}; lower data.batch_size "
                f"(e.g. data.batch_size={max(1, self.sampler.num_samples)})"
            )
        self._generator = torch.Generator()
        # Datasets with per-epoch randomness (SameClassPairDataset.set_epoch) need fresh workers each epoch so the
        # workers' copies see the new epoch; others keep their workers alive.
        self._epoch_aware = hasattr(dataset, "set_epoch")
        self.dataset = dataset
        self.loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0 and not self._epoch_aware,
            generator=self._generator,
        )
        self.epoch = 0
        self.position = 0  # batches consumed in the current epoch
        self._it: Iterator | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._it = None

    def __iter__(self) -> "InfiniteBatches":
        return self

    def __next__(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                if self._epoch_aware:
                    self.dataset.set_epoch(self.epoch)
                self.sampler.start = self.position * self.batch_size
                self._generator.manual_seed(self.seed * 1_000_003 + self.epoch)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.position = 0
                continue
            self.position += 1
            return batch
        raise DataError("the data loader produced no batch for a whole epoch")  # pragma: no cover


class LabelledPairs(Dataset):
    """Any labelled dataset as same-class pairs: items gain ``"pair"`` (the image of another item of the same class,
    drawn from ``seed``, the item and the epoch set with :meth:`set_epoch`, as
    :class:`~dagan_gn.datasets.patches.SameClassPairDataset` draws them) and ``"pair_index"`` (that item's position).
    Every class needs two items."""

    def __init__(self, base: Dataset, seed: int = 0) -> None:
        self.base = base
        self.seed = int(seed)
        self.epoch = 0
        self.labels = dataset_labels(base)
        self._by_class = {int(k): np.flatnonzero(self.labels == k) for k in np.unique(self.labels)}
        self.class_names = list(getattr(base, "class_names", []) or [])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i) % len(self.base)
        item = dict(self.base[i])
        same = self._by_class[int(self.labels[i])]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        k = int(rng.integers(same.size - 1))
        pos = int(np.searchsorted(same, i))
        j = int(same[k + 1] if k >= pos else same[k])
        item["pair"] = self.base[j]["image"]
        item["pair_index"] = j
        return item


def same_class_pairs(base: Any, seed: int, *, where: str = "the training data", split: str = "") -> Dataset:
    """``base`` as same-class pairs (items gain ``"pair"``): a patch file's
    :class:`~dagan_gn.datasets.patches.SameClassPairDataset`, else :class:`LabelledPairs`; a :class:`DataError`
    names the classes with a single image (``where``/``split`` for the message)."""

    names = list(getattr(base, "class_names", []) or [])
    counts = collections.Counter(dataset_labels(base).tolist())
    lonely = [names[k] if k < len(names) else str(k) for k, c in sorted(counts.items()) if c < 2]
    if lonely:
        raise DataError(
            f"{where}: class(es) {', '.join(lonely)} have a single patch in split '{split}'; the DAGAN "
            f"critic needs at least two patches per class (restrict data.classes or extract more patches)"
        )
    if not hasattr(base, "read_image"):  # not a PatchDataset
        return LabelledPairs(base, seed=seed)
    from dagan_gn.datasets.patches import SameClassPairDataset

    try:
        return SameClassPairDataset(base, seed=seed)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from exc


def check_data_fits_model(ds: Dataset, cfg: "ExperimentConfig",
                          check_item: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Refuse training data that does not fit ``cfg.model`` (a :class:`DataError` saying which key to change): an
    empty dataset, images of another shape, labels beyond ``model.num_classes``/``model.critic_classes``;
    ``check_item`` checks the first item for the model family (e.g. that it has a ``"pair"``)."""
    if len(ds) == 0:
        raise DataError("the training dataset is empty")
    item = ds[0]
    shape = tuple(item["image"].shape)
    want = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    if shape != want:
        raise DataError(
            f"the training images are {list(shape)} (C, H, W) but the model expects {list(want)}; set "
            f"model.channels/model.image_size to match the data (or use the matching config)"
        )
    if check_item is not None:
        check_item(item)
    sized = [(key, n) for key, n in (("model.num_classes", cfg.model.num_classes),
                                     ("model.critic_classes", cfg.model.critic_classes)) if n > 0]
    top = max(dataset_labels(ds).tolist(), default=-1) if sized and len(ds) <= 100_000 else -1
    for key, classes in sized:
        if top >= classes:
            raise DataError(f"the data has class label {top} but {key}={classes}")


def data_class_count(ds: Dataset) -> int:
    """Classes of a training dataset: its ``class_names`` when it has them, else the largest label + 1."""
    names = getattr(ds, "class_names", None)
    if names:
        return len(names)
    return int(dataset_labels(ds).max()) + 1


def resolve_data_keys(cfg: "ExperimentConfig", ds: Dataset) -> "ExperimentConfig":
    """``cfg`` with the keys that say "from the data" resolved: ``model.critic_classes=-1`` → the number of classes of
    the training data (a copy; ``cfg`` is not changed)."""
    if cfg.model.critic_classes >= 0:
        return cfg
    model = dataclasses.replace(cfg.model, critic_classes=data_class_count(ds))
    return dataclasses.replace(cfg, model=model)
