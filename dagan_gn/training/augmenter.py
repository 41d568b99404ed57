"""In-loop DAGAN augmentation: fresh variants every epoch instead of a pre-generated synthetic file.

:class:`DAGANAugmenter` takes a batch (``images [B, C, S, S]`` in [-1, 1], ``labels [B]``) on any device and
replaces a random fraction ``p`` of the images with DAGAN variants of themselves; labels are unchanged (a variant
keeps its source's class). :class:`DAGANAugmenterd` is the same as a MONAI dictionary transform for per-item
pipelines. Both run the generator through the project's one sampling path,
:meth:`~dagan_gn.training.families.ModelFamily.generate`, and draw every random number (which rows, the noise) from a
private CPU ``torch.Generator``, so a seeded augmenter gives the same batches on any device and with any other
code drawing from the global RNGs in between.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable
from torch import nn

from dagan_gn.errors import DaganError

__all__ = ["AugmenterError", "DAGANAugmenter", "DAGANAugmenterd"]


class AugmenterError(DaganError, ValueError):
    """A batch the augmenter cannot take (shape, channels, labels) or a bad option."""


class DAGANAugmenter:
    """Replace a fraction ``p`` of a batch with DAGAN variants of the same images.

    Args:
        checkpoint: a ``dagan train`` run folder (its newest checkpoint) or a checkpoint file; the EMA generator is
            used when the checkpoint has one.
        p: probability that an image is replaced by a variant of itself (each image drawn independently).
        truncation: noise truncation bound (0: plain normal noise; as ``dagan augment --truncation``).
        seed: seed of the augmenter's private generator (which rows, which noise).
        device: where the generator runs: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:N"``, or a
            ``torch.device``. The batch may live anywhere; its variants come back on its device and in its dtype.
        batch_size: rows per generator forward pass.
        use_ema: use the EMA weights when the checkpoint has them.
        generator, config: an already loaded generator and its :class:`~dagan_gn.config.ExperimentConfig` (from
            :func:`~dagan_gn.training.families.load_generator`) instead of ``checkpoint``.

    Labels are the generator's class indices (those of the data it was trained on); a class-conditional generator
    needs them, an unconditional one ignores them.

    Example::

        augment = DAGANAugmenter("runs/exp1", p=0.5, seed=0)
        for epoch in range(epochs):
            augment.set_epoch(epoch)
            for batch in loader:
                images, labels = augment(batch["image"].cuda(), batch["label"].cuda())
                loss = criterion(classifier(images), labels)
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        p: float = 0.5,
        truncation: float = 0.0,
        seed: int = 0,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 64,
        use_ema: bool = True,
        generator: nn.Module | None = None,
        config: Any = None,
    ) -> None:
        from dagan_gn.runtime import resolve_device
        from dagan_gn.training.families import load_generator
        from dagan_gn.training.families import get_family

        if not 0.0 <= float(p) <= 1.0:
            raise AugmenterError(f"p must be in [0, 1], got {p}")
        if truncation < 0:
            raise AugmenterError(f"truncation must be >= 0 (0: none), got {truncation}")
        if batch_size < 1:
            raise AugmenterError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        if generator is None:
            if checkpoint is None:
                raise AugmenterError("give a checkpoint (run folder or file) or a loaded generator and its config")
            generator, config, _ = load_generator(checkpoint, self.device, use_ema=use_ema)
        elif config is None:
            raise AugmenterError("a loaded generator needs its ExperimentConfig (config=)")
        self.family = get_family(config.model.name)
        if not self.family.conditions_on_image:
            raise AugmenterError(f"model {config.model.name!r} does not make variants of an input image; "
                                 "DAGANAugmenter needs an image-to-image (DAGAN) checkpoint")
        self.generator = generator.to(self.device).eval()
        self.config = config
        self.p, self.truncation, self.batch_size = float(p), float(truncation), int(batch_size)
        self.image_size, self.channels = int(config.model.image_size), int(config.model.channels)
        self.num_classes = int(config.model.num_classes)
        self.seed = int(seed)
        self.rng = torch.Generator().manual_seed(self.seed)
        #: The rows replaced in the last call (boolean ``[B]``, CPU).
        self.last_replaced: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reseed from ``(seed, epoch)``: epoch ``e`` gets the same draws however many batches came before it."""
        self.rng = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, int(epoch)])
                                                     .generate_state(1)[0]))

    def _check(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise AugmenterError(f"images must be [B, {self.channels}, {self.image_size}, {self.image_size}] (the "
                                 f"generator's), got {list(images.shape)}")
        if self.num_classes > 0:
            if labels is None:
                raise AugmenterError("the generator is class-conditional: pass the batch's labels")
            if labels.shape != (len(images),):
                raise AugmenterError(f"labels must be [B] = [{len(images)}], got {list(labels.shape)}")
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise AugmenterError(f"labels must be class indices in 0..{self.num_classes - 1} (the generator's "
                                     f"classes), got {int(labels.min())}..{int(labels.max())}")

    @torch.no_grad()
    def variants(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """One variant of every image (noise from the augmenter's generator unless given), on the images' device
        and in their dtype."""
        from dagan_gn.training.families import SampleInputs
        from dagan_gn.training.models import truncated_noise

        images = torch.as_tensor(images)
        labels = None if labels is None else torch.as_tensor(labels)
        self._check(images, labels)
        if len(images) == 0:
            return images.clone()
        if noise is None:
            noise = truncated_noise(len(images), int(self.generator.z_dim), self.truncation, generator=self.rng)
        y = labels.long() if self.num_classes > 0 and labels is not None else None
        out = self.family.generate(self.generator, SampleInputs(noise, images.float(), y),
                                   batch_size=self.batch_size, device=self.device)
        return out.to(images.device, images.dtype if images.is_floating_point() else torch.float32)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(images with a fraction p replaced by variants, labels unchanged)``."""
        images = torch.as_tensor(images)
        self._check(images, labels)
        replace = torch.rand(len(images), generator=self.rng) < self.p
        self.last_replaced = replace
        if not bool(replace.any()):
            return images, labels
        rows = replace.to(images.device)
        out = images.clone()
        out[rows] = self.variants(images[rows], None if labels is None else labels[rows])
        return out, labels

    def __repr__(self) -> str:
        return (f"DAGANAugmenter(p={self.p}, truncation={self.truncation}, seed={self.seed}, device={self.device}, "
                f"classes={self.num_classes})")


class DAGANAugmenterd(MapTransform, Randomizable):
    """MONAI dictionary transform: with probability ``prob`` replace ``data[key]`` (``[C, S, S]``, tensor or array
    in [-1, 1]) by a DAGAN variant of itself, for each key; ``data[label_key]`` (the class index) conditions the
    generator and is left unchanged.

    Args:
        keys: image keys to transform (MONAI's ``KeysCollection``).
        augmenter: a :class:`DAGANAugmenter` (its ``p`` is ignored; its generator, device and truncation are used).
        label_key: the key of the class label.
        prob: probability of replacing an item.

    Seed it as any MONAI random transform: ``set_random_state(seed)`` (``Compose(...).set_random_state`` does it for
    a pipeline). Batching is per item here; :class:`DAGANAugmenter` on whole batches is much faster on a GPU.
    """

    def __init__(self, keys: Any, augmenter: DAGANAugmenter, label_key: str = "label", prob: float = 0.5,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if not 0.0 <= float(prob) <= 1.0:
            raise AugmenterError(f"prob must be in [0, 1], got {prob}")
        self.augmenter, self.label_key, self.prob = augmenter, label_key, float(prob)
        self._do_transform = False
        self._noise_seed = 0

    def randomize(self, data: Any = None) -> None:
        self._do_transform = self.R.rand() < self.prob
        self._noise_seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from dagan_gn.training.models import truncated_noise

        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        label = d.get(self.label_key)
        y = None if label is None else torch.as_tensor(label).reshape(1).long()
        g = torch.Generator().manual_seed(self._noise_seed)
        for key in self.key_iterator(d):
            value = d[key]
            x = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            z = truncated_noise(1, int(self.augmenter.generator.z_dim), self.augmenter.truncation, generator=g)
            v = self.augmenter.variants(x[None], y, noise=z)[0]
            d[key] = v if isinstance(value, torch.Tensor) else v.cpu().numpy().astype(np.asarray(value).dtype)
        return d

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None
                         ) -> "DAGANAugmenterd":
        super().set_random_state(seed, state)
        return self
