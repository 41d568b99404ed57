"""Data sources: one registry entry per ``data.kind``, the only place that knows how a kind of data is read.

    source = get_data_source(cfg.data.kind)        # "patches", "cifar10", "image_folder", or one you registered
    images = source.training(cfg)                  # the training images (no pairs: the model family adds those)
    test = source.split(cfg, "test")               # the images of another split, when the kind has splits
    reference, split = source.reference_images(cfg)  # the real images FID/KID compare against, and their split

An entry holds up to four functions of the :class:`~dagan_gn.config.ExperimentConfig`:

* ``training(cfg) -> Dataset`` (required): the training images of ``cfg.data`` (its split, classes and
  ``limit_per_class``), items ``{"image", "label", "index"}`` as the datasets contract says. The trainer checks
  ``data.path`` first (given, exists), so a builder only reads; a problem is a :class:`DataError` naming the path.
* ``split(cfg, name) -> Dataset``: the images of split ``name`` (evaluation, variants of held-out images).
* ``reference(cfg) -> (Dataset, split name)``: FID/KID's real images (default: ``split(cfg, cfg.data.split)``,
  else the training images). A dataset with an ``images_uint8`` tensor is read from it directly.
* ``check(cfg)``: refuse a config before anything is read (e.g. a key the kind does not support).

Who reads it: the model family (``family.training_dataset(cfg)``, :mod:`dagan_gn.training.families`),
:func:`dagan_gn.metrics.fidelity.reference_images_for_config` and ``dagan evaluate``. Adding a data source is one
:func:`register_data_source` call; an unknown ``data.kind`` is one :class:`DataError` listing the registered kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch.utils.data import Dataset

from dagan_gn.errors import DaganError

if TYPE_CHECKING:  # pragma: no cover
    from dagan_gn.config import ExperimentConfig

__all__ = [
    "DataError",
    "DataSource",
    "DATA_SOURCES",
    "register_data_source",
    "unregister_data_source",
    "get_data_source",
    "training_images",
]


class DataError(DaganError, ValueError):
    """Training or evaluation data that cannot be used: unknown ``data.kind``, missing or unreadable data, an empty
    split, too few images for a batch or for same-class pairs, images that do not fit the model."""


@dataclass(frozen=True)
class DataSource:
    """One kind of data (``data.kind``): how its training images, other splits and FID reference are read."""

    kind: str
    training: Callable[["ExperimentConfig"], Dataset]
    split: Callable[["ExperimentConfig", str], Dataset] | None = None
    reference: Callable[["ExperimentConfig"], tuple[Dataset, str]] | None = None
    check: Callable[["ExperimentConfig"], None] | None = None
    description: str = ""

    def split_images(self, cfg: "ExperimentConfig", name: str) -> Dataset:
        """The images of split ``name`` (a :class:`DataError` when the kind has no splits)."""
        if self.split is None:
            raise DataError(f"data.kind '{self.kind}' has no splits to read '{name}' from")
        return self.split(cfg, name)

    def reference_images(self, cfg: "ExperimentConfig") -> tuple[Dataset, str]:
        """The real images FID/KID compare against and the name of their split (for the statistics cache key)."""
        if self.reference is not None:
            return self.reference(cfg)
        if self.split is not None:
            return self.split(cfg, cfg.data.split), cfg.data.split
        return self.training(cfg), "train"


#: ``data.kind`` → its source.
DATA_SOURCES: dict[str, DataSource] = {}


def register_data_source(kind: str, *, training: Callable[["ExperimentConfig"], Dataset],
                         split: Callable[["ExperimentConfig", str], Dataset] | None = None,
                         reference: Callable[["ExperimentConfig"], tuple[Dataset, str]] | None = None,
                         check: Callable[["ExperimentConfig"], None] | None = None,
                         description: str = "") -> DataSource:
    """Add (or replace) the data source of ``data.kind = kind``; returns it."""
    source = DataSource(str(kind), training, split, reference, check, description)
    DATA_SOURCES[source.kind] = source
    return source


def unregister_data_source(kind: str) -> DataSource | None:
    """Remove the source of ``kind`` (tests, plugins); returns it, or None when there was none."""
    return DATA_SOURCES.pop(str(kind), None)


def get_data_source(kind: str) -> DataSource:
    """The source registered as ``kind`` (a :class:`DataError` listing the known kinds otherwise)."""
    try:
        return DATA_SOURCES[str(kind)]
    except KeyError:
        raise DataError(f"unknown data.kind '{kind}'; choose one of: {', '.join(DATA_SOURCES)}") from None


def training_images(cfg: "ExperimentConfig") -> Dataset:
    """The training images of ``cfg.data`` through its source, after the checks every kind shares (a known kind,
    a ``data.path`` that exists, the source's own ``check``)."""
    source = get_data_source(cfg.data.kind)
    if not cfg.data.path:
        raise DataError("no training data given: pass --data PATH (or set data.path)")
    if not Path(cfg.data.path).exists():
        raise DataError(f"training data {cfg.data.path} does not exist")
    if source.check is not None:
        source.check(cfg)
    return source.training(cfg)


# ------------------------------------------------------------------------------------------------ built-in kinds
def _patches_split(cfg: "ExperimentConfig", name: str) -> Any:
    from dagan_gn.datasets.patches import PatchDataset

    path = Path(cfg.data.path)
    try:
        return PatchDataset(path, split=name, classes=list(cfg.data.classes) or None,
                            in_memory=cfg.data.in_memory and name == cfg.data.split)
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"cannot use {path} split '{name}': {exc}") from exc


def _patches_training(cfg: "ExperimentConfig") -> Any:
    from dagan_gn.datasets.patches import limit_patches_per_class

    data = cfg.data
    base = _patches_split(cfg, data.split)
    if len(base) == 0:
        raise DataError(f"{data.path}: split '{data.split}' has no patches (empty split); check data.split/data.classes")
    return limit_patches_per_class(base, data.limit_per_class, cfg.train.seed)


def _patches_reference(cfg: "ExperimentConfig") -> tuple[Any, str]:
    from dagan_gn.datasets.patches import PatchDataset

    # All classes of the split (data.classes does not narrow the FID reference).
    return PatchDataset(cfg.data.path, split=cfg.data.split), cfg.data.split


def _cifar10_split(cfg: "ExperimentConfig", name: str) -> Any:
    from dagan_gn.datasets.cifar10 import CIFAR10Dataset

    return CIFAR10Dataset(cfg.data.path, name)


def _cifar10_training(cfg: "ExperimentConfig") -> Any:
    from dagan_gn.datasets.cifar10 import CIFAR10Dataset

    path = Path(cfg.data.path)
    try:
        ds = CIFAR10Dataset(path, split="train", limit_per_class=cfg.data.limit_per_class, seed=cfg.train.seed)
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"cannot read CIFAR-10 from {path}: {exc}") from exc
    if len(ds) == 0:
        raise DataError(f"{path}: the CIFAR-10 training split is empty")
    return ds


def _cifar10_reference(cfg: "ExperimentConfig") -> tuple[Any, str]:
    from dagan_gn.datasets.cifar10 import CIFAR10Dataset

    # The training images, selected with the default selection seed (0) when data.limit_per_class is set.
    return CIFAR10Dataset(cfg.data.path, "train", limit_per_class=cfg.data.limit_per_class), "train"


def _image_folder_check(cfg: "ExperimentConfig") -> None:
    if cfg.data.split != "train":
        raise DataError(f"data.kind 'image_folder' has no splits (every image trains), but data.split is "
                        f"'{cfg.data.split}'; use data.split=train, or import the folder with dagan import-images")


def _image_folder_training(cfg: "ExperimentConfig") -> Any:
    from dagan_gn.datasets.cifar10 import limit_indices_per_class
    from dagan_gn.datasets.image_folder import ImageArrayDataset, read_image_folder

    try:
        data = read_image_folder(cfg.data.path, size=cfg.model.image_size, color=cfg.model.channels == 3,
                                 class_prefixes=list(cfg.data.classes) or None)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read images from {cfg.data.path}: {exc}") from exc
    if cfg.data.limit_per_class > 0:
        data = data.select(limit_indices_per_class(data.labels, cfg.data.limit_per_class, cfg.train.seed))
    return ImageArrayDataset(data.images, data.labels, data.class_names)


register_data_source(
    "patches", training=_patches_training, split=_patches_split, reference=_patches_reference,
    description="an HDF5 patch file (dagan extract-patches / import-images): split, classes, limit_per_class")
register_data_source(
    "cifar10", training=_cifar10_training, split=_cifar10_split, reference=_cifar10_reference,
    description="CIFAR-10: the python archive, its folder, or image zips/folders (train and test splits)")
register_data_source(
    "image_folder", training=_image_folder_training, check=_image_folder_check,
    description="class folders or zips of images read in place (datasets/image_folder.py), resized to "
                "model.image_size; no splits")
