"""Class prototypes in a feature space: does a synthetic item lie nearest its own class?

A pure function on tensors (the embedding is passed in): :func:`off_class_mask` marks the synthetic items whose
embedding is nearer, by cosine, another class's prototype (the mean normalised embedding of that class's real
items) than their own label's. ``evaluate_augmentation`` uses it with the classical classifier's features to report
the variants' class identity and, with ``reject_off_class``, to drop the off-class ones.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dagan_gn.errors import DaganError

__all__ = ["off_class_mask", "PrototypeError"]


class PrototypeError(DaganError, ValueError):
    """A synthetic class with no real items to build a prototype from."""


@torch.no_grad()
def off_class_mask(embed: Callable[[torch.Tensor], torch.Tensor], real_images: torch.Tensor, real_labels: torch.Tensor,
                   synthetic_images: torch.Tensor, synthetic_labels: torch.Tensor,
                   batch_size: int = 256) -> torch.Tensor:
    """True for each synthetic image whose embedding (``embed``: images → ``[B, D]``) lies nearest, by cosine, to
    another class's prototype (the mean normalised embedding of that class's real images) than to its own label's.
    A synthetic label with no real image has no prototype to be near: refused."""
    def embedded(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([embed(images[a : a + batch_size]).float().flatten(1)
                          for a in range(0, len(images), batch_size)])

    real_labels, synthetic_labels = real_labels.long().cpu(), synthetic_labels.long().cpu()
    missing = sorted(set(synthetic_labels.tolist()) - set(real_labels.tolist()))
    if missing:
        raise PrototypeError(f"synthetic class(es) {missing} have no real images to build a prototype from")
    real = nn.functional.normalize(embedded(real_images).cpu(), dim=1)
    classes = int(max(real_labels.max(), synthetic_labels.max())) + 1
    prototypes = torch.zeros(classes, real.shape[1]).index_add_(0, real_labels, real)
    present = torch.bincount(real_labels, minlength=classes) > 0
    prototypes = nn.functional.normalize(prototypes, dim=1)
    similarity = nn.functional.normalize(embedded(synthetic_images).cpu(), dim=1) @ prototypes.t()
    similarity[:, ~present] = -float("inf")
    return similarity.argmax(1) != synthetic_labels
