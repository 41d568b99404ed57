"""Tiny in-memory datasets and configs for the training tests (no HDF5, no CIFAR files needed).

A plain module, not a conftest.py, so that ``from training_testutils import ...`` can never resolve to another
directory's conftest."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from dagan_gn.config import ExperimentConfig, load_config


class TinyPairs(Dataset):
    """``n`` random images in [-1, 1] with ``k`` classes; ``pair`` is another image of the same class."""

    def __init__(self, n: int = 16, size: int = 32, k: int = 2, channels: int = 1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, channels, size, size, generator=g) * 2 - 1
        self.labels = torch.arange(n) % k
        self.k = k
        self.class_names = [f"c{i}" for i in range(k)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        j = (i + self.k) % len(self.images)  # same class (labels cycle with period k)
        return {"image": self.images[i], "label": int(self.labels[i]), "index": i, "pair": self.images[j]}


class TinyImages(TinyPairs):
    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "index": i}


DAGAN32 = [
    "model.name=dagan", "model.image_size=32", "model.g_width=8", "model.d_width=8", "model.g_norm=group:4",
    "model.d_norm=layer", "model.z_dim=8",
]
CIFAR_TINY = [
    "model.name=cifar_resnet", "model.image_size=32", "model.channels=3", "model.g_width=16", "model.d_width=16",
    "model.g_norm=batch", "model.d_norm=layer", "model.z_dim=16",
]
COMMON = [
    "data.batch_size=4", "data.num_workers=0", "train.device=cpu", "train.progress=false", "train.log_every=1",
    "train.sample_every=0", "train.checkpoint_every=0", "optim.n_critic=2", "train.ema_decay=0.9", "train.ema_start=2",
]


def make_cfg(*overrides: str, model=DAGAN32) -> ExperimentConfig:
    return load_config(None, [*model, *COMMON, *overrides])
