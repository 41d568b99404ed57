"""Generator regularizers that act on *pairs of outputs*: the mode-seeking term (Mao et al. 2019, MSGAN).

A conditional generator trained only against a critic tends to ignore its noise: the critic judges one output per
condition, and one good output per source patch already fools it, so ``G(x, z1) ≈ G(x, z2)`` (the classic DAGAN
failure, "all other images are the same"). MSGAN asks two variants of the same source to differ in proportion to
their noises::

    ratio = mean|G(x, z1) - G(x, z2)| / mean|z1 - z2|       (means over the batch and all pixels / noise entries)
    L_ms  = λ / (ratio + ε)                                 (added to the generator loss; ``loss.mode_seeking: λ``)

Maximising the ratio spreads the outputs of one source over image space; the adversarial term keeps each of them
plausible. ``1/(ratio + ε)`` (MSGAN's form) has a large gradient exactly where the generator ignores ``z`` and a
vanishing one once variants are diverse, so it does not push diversity past what the critic accepts. The image
distance is on the networks' [-1, 1] scale.
"""

from __future__ import annotations

import torch

__all__ = ["mode_seeking_ratio", "mode_seeking_penalty", "paired_noise_inputs"]


def mode_seeking_ratio(fake_a: torch.Tensor, fake_b: torch.Tensor, z_a: torch.Tensor,
                       z_b: torch.Tensor) -> torch.Tensor:
    """``mean|fake_a - fake_b| / mean|z_a - z_b|`` as a differentiable fp32 scalar (MSGAN's ``lz``)."""
    image_distance = (fake_a.float() - fake_b.float()).abs().mean()
    noise_distance = (z_a.float() - z_b.float()).abs().mean()
    return image_distance / noise_distance


def mode_seeking_penalty(ratio: torch.Tensor, weight: float, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's generator term ``weight / (ratio + eps)`` (to be minimised)."""
    return weight / (ratio + eps)


def paired_noise_inputs(z: torch.Tensor, *conditions: torch.Tensor | None
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Inputs for one generator forward of two variants per condition: ``[z; z2]`` with a fresh ``z2`` drawn like
    ``z`` (global RNG, ``z``'s device), and every condition repeated ``[c; c]`` (None stays None). The two halves of
    the output are then the variant pairs of :func:`mode_seeking_ratio`."""
    z2 = torch.randn(z.shape, device=z.device, dtype=z.dtype)
    doubled = tuple(None if c is None else torch.cat([c, c]) for c in conditions)
    return torch.cat([z, z2]), doubled
