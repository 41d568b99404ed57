"""The CIFAR-10 ResNet WGAN-GP of Gulrajani et al. (2017), as in the GroupNorm-study table, with any registry norm.

Generator (``width`` = 128)::

    z (128) → linear → 128×4×4
    → ResBlock up (128→128, 8×8) → ResBlock up (16×16) → ResBlock up (32×32)
    → norm → ReLU → conv3×3 (128→3) → tanh

Critic::

    x (3×32×32) → optimized ResBlock down (3→128, 16×16) → ResBlock down (8×8)
    → ResBlock (128) → ResBlock (128) → ReLU → global mean pool → linear (128→1)  [+ projection ⟨embed(y), h⟩]

Class conditioning: ``conditional_batch`` norm in the generator (BigGAN-style shared class embedding), projection
discriminator (Miyato & Koyama 2018) in the critic. Norm layers of block ``i`` use entry ``i`` of a group schedule;
the generator's final norm uses index 3 (after the three blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.blocks import (ResBlock, activation, class_conditioning, conv2d, critic_norm_spec, linear,
                              projection_embedding, projection_score)
from ..modules.norms import NormSpec, apply_norm, make_norm

__all__ = ["Cifar32Generator", "ResNetGenerator", "ResNetCritic"]


class Cifar32Generator(nn.Module):
    """Shared front of the 32×32 CIFAR-10 generators: attributes, class conditioning and the input projection
    ``z → input_features`` (plus the class bias when conditional without conditional BN); subclasses add the body.
    """

    def __init__(self, name: str, z_dim: int, width: int, norm: NormSpec, num_classes: int, embedding_dim: int,
                 channels: int, image_size: int, input_features: int) -> None:
        super().__init__()
        if image_size != 32:
            raise ValueError(f"{name} is the 32×32 CIFAR-10 network; got image_size={image_size}")
        self.z_dim = int(z_dim)
        self.norm_spec = norm
        self.image_size = 32
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.width = int(width)
        # Without conditional BN the class enters as a learned bias of the input projection.
        self.class_embedding, self.class_to_input = class_conditioning(num_classes, embedding_dim, norm,
                                                                       input_features)
        self.input = linear(z_dim, input_features, norm=norm)

    def project_input(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The flat input projection of the noise (and class)."""
        if self.num_classes > 0 and y is None:
            raise ValueError("this generator is class-conditional: pass labels y")
        h = self.input(z)
        if self.class_to_input is not None:
            h = h + self.class_to_input(self.class_embedding(y))
        return h


class ResNetGenerator(Cifar32Generator):
    """Gulrajani et al.'s CIFAR-10 ResNet generator: ``forward(z, y=None) -> [B, 3, 32, 32]`` in [-1, 1].

    Args:
        z_dim: noise size (128 in the paper).
        width: channels of every stage (``DIM_G`` = 128).
        norm: registry spec (``batch`` in the paper; ``conditional_batch`` needs ``num_classes > 0``).
        num_classes: 0 for unconditional; otherwise the generator owns a shared class embedding used by
            ``conditional_batch`` norms (with other norms the embedding is added to the noise projection).
        embedding_dim: size of the shared class embedding.
    """

    def __init__(self, z_dim: int = 128, width: int = 128, norm: NormSpec = "batch", num_classes: int = 0,
                 embedding_dim: int = 128, channels: int = 3, image_size: int = 32) -> None:
        super().__init__("ResNetGenerator", z_dim, width, norm, num_classes, embedding_dim, channels, image_size,
                         4 * 4 * width)
        self.blocks = nn.ModuleList(
            ResBlock(width, width, resample="up", norm=norm, block_index=i, shared_embedding=self.class_embedding,
                     where=f"ResNetGenerator.blocks.{i}")
            for i in range(3)
        )
        self.out_norm = make_norm(norm, width, layer_index=3, shared_embedding=self.class_embedding,
                                  where="ResNetGenerator.out_norm")
        self.out_act = activation("relu")
        self.out_conv = conv2d(width, channels, 3, norm=norm)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.project_input(z, y).view(z.shape[0], self.width, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        h = self.out_act(apply_norm(self.out_norm, h, y))
        return torch.tanh(self.out_conv(h))


class ResNetCritic(nn.Module):
    """Gulrajani et al.'s CIFAR-10 ResNet critic: ``forward(x, y=None) -> [B]`` (unbounded WGAN scores).

    Args:
        width: channels of every stage (``DIM_D`` = 128).
        norm: registry spec (none in the paper; ``layer`` here by default: it keeps samples independent, which the
            per-sample gradient penalty needs). ``conditional_batch`` is rejected.
        num_classes: > 0 adds the projection term ``⟨embed(y), h⟩``.
    """

    def __init__(self, width: int = 128, norm: NormSpec = "layer", num_classes: int = 0, channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        if image_size != 32:
            raise ValueError(f"ResNetCritic is the 32×32 CIFAR-10 network; got image_size={image_size}")
        critic_norm_spec(norm, "ResNetCritic")
        self.norm_spec = norm
        self.image_size = 32
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.blocks = nn.ModuleList([
            ResBlock(channels, width, resample="down", optimized=True, norm=norm, block_index=0,
                     where="ResNetCritic.blocks.0"),
            ResBlock(width, width, resample="down", norm=norm, block_index=1, where="ResNetCritic.blocks.1"),
            ResBlock(width, width, norm=norm, block_index=2, where="ResNetCritic.blocks.2"),
            ResBlock(width, width, norm=norm, block_index=3, where="ResNetCritic.blocks.3"),
        ])
        self.act = activation("relu")
        self.out = linear(width, 1, norm=norm)
        self.projection = projection_embedding(num_classes, width, norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for block in self.blocks:
            h = block(h)
        return projection_score(self.act(h).mean(dim=(2, 3)), self.out, self.projection, y, "ResNetCritic")
