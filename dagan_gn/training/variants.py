"""Synthetic variants of a batch of images from an image-to-image (DAGAN) generator, reproducible row by row: the
noise of each variant is drawn from its own seed (:func:`noise_seed` of the base seed, the source's row and the
variant's number), so the output depends on neither the batch size nor where an interrupted run resumed; and a
critic class head's verdict on each variant (:func:`off_class_variants`). Used by ``dagan augment``
(:mod:`dagan_gn.jobs.augment`) and the pipelines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from dagan_gn.training.families import ModelFamily

__all__ = ["generate_variants", "noise_seed", "off_class_variants", "sample_noise"]


def noise_seed(seed: int, source_index: int, variant: int) -> int:
    """The noise seed of variant ``variant`` of input row ``source_index`` (a 63-bit int, stored as int64)."""
    state = np.random.SeedSequence([int(seed), int(source_index), int(variant)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def sample_noise(seeds: Sequence[int], z_dim: int, truncation: float = 0.0) -> torch.Tensor:
    """Noise ``[len(seeds), z_dim]`` on the CPU, row ``i`` drawn from its own generator seeded with ``seeds[i]``
    (truncated at ``truncation`` when > 0, as in training), so every row is reproducible on its own."""
    from dagan_gn.training.models import truncated_noise

    rows = [truncated_noise(1, z_dim, truncation, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(rows) if rows else torch.zeros(0, z_dim)


@torch.no_grad()
def generate_variants(
    generator: nn.Module,
    x: torch.Tensor,
    seeds: Sequence[int],
    y: torch.Tensor | None = None,
    *,
    truncation: float = 0.0,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    family: "ModelFamily | None" = None,
) -> torch.Tensor:
    """Run a DAGAN generator on source images with per-sample noise seeds, through its model family's one
    generator forward (:meth:`dagan_gn.training.families.ModelFamily.generate`).

    Args:
        generator: ``G(x, z, y=None)`` with a ``z_dim`` attribute, in eval mode.
        x: sources ``[B, C, S, S]`` in [-1, 1] (repeat a source to get several variants of it).
        seeds: one noise seed per row of ``x`` (see :func:`noise_seed`).
        y: class labels ``[B]`` for a class-conditional generator, else None.
        truncation: noise truncation bound (0: none).
        batch_size: rows per forward pass.
        device: where to run (default: the generator's device).
        family: the image-to-image model family of the generator (default: the DAGAN's).

    Returns:
        ``[B, C, S, S]`` float32 in [-1, 1] on the CPU.
    """
    from dagan_gn.training.families import SampleInputs, get_family

    if len(seeds) != len(x):
        raise ValueError(f"{len(seeds)} noise seeds for {len(x)} source images")
    if len(x) == 0:
        return torch.zeros_like(x, dtype=torch.float32)
    family = family or get_family("dagan")
    z = sample_noise(seeds, int(generator.z_dim), truncation)
    return family.generate(generator, SampleInputs(z, x.float(), y), batch_size=batch_size, device=device)


@torch.no_grad()
def off_class_variants(critic: nn.Module, variants: torch.Tensor, labels: torch.Tensor,
                       conditioning: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    """True for each variant that the critic's class head (reading the self-pair ``(v, v)``) puts in a class other
    than ``labels``; ``conditioning``: the class labels a class-conditional critic takes (its projection term)."""
    device = next(critic.parameters()).device
    predicted = []
    for a in range(0, len(variants), batch_size):
        v = variants[a : a + batch_size].to(device)
        y = None if conditioning is None else conditioning[a : a + batch_size].to(device)
        predicted.append(critic(v, v, y, with_logits=True)[1].argmax(1).cpu())
    return torch.cat(predicted) != labels.long().cpu()
