"""Reconstruction error (Xiang & Li 2017): lower for a generator that can represent the images, batch-independent,
generator left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dagan_gn.metrics.reconstruction import reconstruction_error


class LinearGenerator(nn.Module):
    """G(z) = tanh(A z) reshaped to 3x8x8: a generator whose range we know."""

    def __init__(self, z_dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.z_dim = z_dim
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(z_dim, 3 * 8 * 8, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3 * 8 * 8, z_dim, generator=g))

    def forward(self, z, y=None):
        return torch.tanh(self.lin(z)).view(-1, 3, 8, 8)


def _images_of(gen: LinearGenerator, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, gen.z_dim, generator=g) * 0.05
    with torch.no_grad():
        return (gen(z) + 1) / 2


def test_representable_images_reconstruct_better():
    gen = LinearGenerator(seed=0)
    images = _images_of(gen, 12)
    good = reconstruction_error(gen, images, batch_size=5)
    other = LinearGenerator(seed=7)  # a different range: cannot produce these images
    bad = reconstruction_error(other, images, batch_size=5)
    assert good.per_image.shape == (12,)
    assert good.mean < 0.2 * bad.mean
    assert (good.per_image < bad.per_image).float().mean() > 0.9
    # The search improves on the starting point z = 0.
    with torch.no_grad():
        start = ((gen(torch.zeros(12, gen.z_dim)) + 1) / 2 - images).pow(2).mean()
    assert good.mean < 0.5 * float(start)


def test_batching_does_not_change_the_result_and_generator_is_restored():
    gen = LinearGenerator()
    gen.train()
    images = _images_of(gen, 6)
    a = reconstruction_error(gen, images, steps=10, batch_size=6)
    b = reconstruction_error(gen, images, steps=10, batch_size=1)
    torch.testing.assert_close(a.per_image, b.per_image, rtol=1e-4, atol=1e-6)
    assert gen.training and all(p.requires_grad for p in gen.parameters())
    assert a.as_dict()["recon_mse"] == pytest.approx(a.mean)


def test_bad_inputs_are_clear_errors():
    gen = LinearGenerator()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reconstruction_error(gen, torch.full((2, 3, 8, 8), -0.5))
    with pytest.raises(ValueError, match="does not match"):
        reconstruction_error(gen, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="z_dim"):
        reconstruction_error(nn.Identity(), torch.rand(2, 3, 8, 8))
