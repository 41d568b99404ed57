"""The "Simple-CNN" GAN of the seed study: DCGAN-style 32×32 generator and critic (Radford et al. 2016, in the
form of Gulrajani et al.'s ``gan_cifar.py``), with any registry norm.

Generator (``W`` = width)::

    z → linear → 4W×4×4 → norm → ReLU
    → convT 4×4/2 (4W→2W, 8×8) → norm → ReLU → convT 4×4/2 (2W→W, 16×16) → norm → ReLU
    → convT 4×4/2 (W→3, 32×32) → tanh

Critic::

    x → conv 4×4/2 (3→W, 16×16) → LReLU → conv 4×4/2 (W→2W, 8×8) → norm → LReLU
    → conv 4×4/2 (2W→4W, 4×4) → norm → LReLU → flatten → linear (16·4W → 1)  [+ projection ⟨embed(y), h⟩]

No norm on the critic's first layer and the generator's output (DCGAN convention). Norm layer ``i`` (in order of
appearance) uses entry ``i`` of a group schedule.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.blocks import activation, conv2d, critic_norm_spec, linear, projection_embedding, projection_score
from ..modules.norms import NormSpec, apply_norm, make_norm
from .cifar_resnet import Cifar32Generator

__all__ = ["DCGANGenerator", "DCGANCritic"]


class DCGANGenerator(Cifar32Generator):
    """DCGAN-style generator: ``forward(z, y=None) -> [B, 3, 32, 32]`` in [-1, 1].

    Args:
        z_dim: noise size.
        width: base width ``W`` (the 4×4 stage has 4W channels).
        norm: registry spec (``batch`` in DCGAN; ``conditional_batch`` needs ``num_classes > 0``).
        num_classes: 0 for unconditional; otherwise a shared class embedding feeds ``conditional_batch`` norms or,
            with other norms, a learned bias of the input projection.
    """

    def __init__(self, z_dim: int = 128, width: int = 64, norm: NormSpec = "batch", num_classes: int = 0,
                 embedding_dim: int = 128, channels: int = 3, image_size: int = 32) -> None:
        super().__init__("DCGANGenerator", z_dim, width, norm, num_classes, embedding_dim, channels, image_size,
                         4 * 4 * 4 * width)
        chans = [4 * width, 2 * width, width]
        self.norms = nn.ModuleList(
            make_norm(norm, c, layer_index=i, shared_embedding=self.class_embedding, where=f"DCGANGenerator.norms.{i}")
            for i, c in enumerate(chans)
        )
        self.convs = nn.ModuleList([
            conv2d(4 * width, 2 * width, 4, 2, norm=norm, transposed=True),
            conv2d(2 * width, width, 4, 2, norm=norm, transposed=True),
            conv2d(width, channels, 4, 2, norm=norm, transposed=True),
        ])
        self.act = activation("relu")

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.project_input(z, y).view(z.shape[0], 4 * self.width, 4, 4)
        for norm, conv in zip(self.norms, self.convs):
            h = conv(self.act(apply_norm(norm, h, y)))
        return torch.tanh(h)


class DCGANCritic(nn.Module):
    """DCGAN-style critic: ``forward(x, y=None) -> [B]``.

    Args:
        width: base width ``W`` (convs of W, 2W, 4W channels).
        norm: registry spec (``layer`` by default; ``conditional_batch`` is rejected).
        num_classes: > 0 adds the projection term.
    """

    def __init__(self, width: int = 64, norm: NormSpec = "layer", num_classes: int = 0, channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        if image_size != 32:
            raise ValueError(f"DCGANCritic is the 32×32 CIFAR-10 network; got image_size={image_size}")
        critic_norm_spec(norm, "DCGANCritic")
        self.norm_spec = norm
        self.image_size = 32
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.convs = nn.ModuleList([
            conv2d(channels, width, 4, 2, norm=norm),
            conv2d(width, 2 * width, 4, 2, norm=norm),
            conv2d(2 * width, 4 * width, 4, 2, norm=norm),
        ])
        self.norms = nn.ModuleList([
            nn.Identity(),
            make_norm(norm, 2 * width, layer_index=1, where="DCGANCritic.norms.1"),
            make_norm(norm, 4 * width, layer_index=2, where="DCGANCritic.norms.2"),
        ])
        self.act = activation("lrelu")
        feat = 4 * 4 * 4 * width
        self.out = linear(feat, 1, norm=norm)
        self.projection = projection_embedding(num_classes, feat, norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for conv, norm in zip(self.convs, self.norms):
            h = self.act(apply_norm(norm, conv(h)))
        return projection_score(h.flatten(1), self.out, self.projection, y, "DCGANCritic")
