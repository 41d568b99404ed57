"""Building blocks shared by the generators and critics, parameterised by normalization specs.

Every conv/linear goes through :func:`conv2d` / :func:`linear` so that the ``weight`` and ``spectral`` specs wrap it,
and every activation norm goes through :func:`dagan_gn.modules.norms.make_norm` (``apply_norm`` passes class labels to
``conditional_batch`` layers). A block gets a ``block_index``: per-layer group schedules such as
``("group", {"num_groups": [16, 8, 4]})`` give block ``i`` entry ``i`` (the last entry repeats).

Blocks:

* :class:`ResBlock` — the pre-activation residual block of Gulrajani et al. (2017), resample ``"up"`` (nearest ×2
  before the first conv), ``"down"`` (mean-pool after the second conv, or a stride-2 first conv) or ``None``; the
  ``optimized`` variant is the critic's first block (no norm/activation on the input image).
* :class:`UNetUpBlock` — a DAGAN U-Net decoder stage: residual up-block whose second conv also sees the encoder skip
  features, with a per-stage conditioning vector (noise + class embedding) projected and added as a channel bias.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .norms import NormSpec, NormSpecError, apply_norm, apply_weight_norm, make_norm, parse_norm_spec
from .resample import conv_mean_pool, nearest_up_conv

__all__ = [
    "init_weights",
    "class_conditioning",
    "projection_embedding",
    "projection_score",
    "conv2d",
    "linear",
    "activation",
    "critic_norm_spec",
    "ResBlock",
    "UNetUpBlock",
]


def init_weights(module: nn.Module, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weights and zero biases (deterministic given ``torch.manual_seed``); call before any
    weight/spectral parametrization wraps the module."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight, gain=gain)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return module


def conv2d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *, norm: NormSpec = None,
           bias: bool = True, padding: int | None = None, gain: float = 1.0, transposed: bool = False) -> nn.Module:
    """A ``Conv2d`` (or ``ConvTranspose2d``) with 'same'-style padding, initialised, and wrapped in weight/spectral
    normalization when ``norm`` names one (activation-norm specs leave it plain)."""
    if transposed:
        pad = (kernel_size - stride) // 2 if padding is None else padding
        layer: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, pad, bias=bias)
    else:
        pad = (kernel_size - 1) // 2 if padding is None else padding
        layer = nn.Conv2d(in_channels, out_channels, kernel_size, stride, pad, bias=bias)
    return apply_weight_norm(init_weights(layer, gain), norm)


def linear(in_features: int, out_features: int, *, norm: NormSpec = None, bias: bool = True,
           gain: float = 1.0) -> nn.Module:
    """An initialised ``Linear``, wrapped in weight/spectral normalization when ``norm`` names one."""
    return apply_weight_norm(init_weights(nn.Linear(in_features, out_features, bias=bias), gain), norm)


def activation(name: str) -> nn.Module:
    """``relu`` (Gulrajani et al.), ``lrelu`` (LeakyReLU 0.2, DCGAN critics), ``silu``."""
    acts = {"relu": lambda: nn.ReLU(), "lrelu": lambda: nn.LeakyReLU(0.2), "silu": lambda: nn.SiLU()}
    if name not in acts:
        raise ValueError(f"unknown activation '{name}'; choose one of: {', '.join(acts)}")
    return acts[name]()


def critic_norm_spec(spec: NormSpec, where: str) -> NormSpec:
    """Validate a critic norm: ``conditional_batch`` is a generator-only norm (a critic sees labels through the
    projection term instead)."""
    name, _ = parse_norm_spec(spec)
    if name == "conditional_batch":
        raise NormSpecError(f"{where}: conditional_batch is a generator norm; critics use projection conditioning "
                            "(set num_classes) with none/batch/layer/instance/group/weight/spectral")
    return spec


class ResBlock(nn.Module):
    """Pre-activation residual block (Gulrajani et al. 2017, ``ResidualBlock`` of ``gan_cifar_resnet.py``).

    ``main = conv2(act(norm2(conv1(resample_up(act(norm1(x)))))))`` then mean-pooled for ``"down"``;
    ``shortcut`` is identity when shapes match, else a 1×1 conv with the same resampling. Hidden width: ``in``
    for ``"down"`` (Gulrajani's conv_1 keeps the input width), ``out`` otherwise. The up-conv and the conv-pool pair
    run as one folded convolution each (identical result, 2–3× cheaper; ``fused_resampling = False`` or
    :func:`dagan_gn.modules.resample.set_fused_resampling` gives the literal two-step form).

    Args:
        in_channels / out_channels: channel counts.
        resample: ``"up"`` (nearest ×2), ``"down"`` (÷2) or ``None``.
        norm: registry spec for the block's norms (activation norms placed before each activation; weight norms wrap
            the convs).
        block_index: index of the block in its network, for per-layer group schedules.
        optimized: the critic's first block: ``conv1 → norm → act → conv2 → pool`` with a ``pool → conv1×1``
            shortcut and nothing applied to the raw input (Gulrajani's ``OptimizedResBlockDisc1``).
        down_mode: ``"pool"`` (convs at the input resolution then 2×2 mean pool, Gulrajani) or ``"stride"`` (first conv
            has stride 2: four times cheaper, used by the DAGAN nets at high resolution).
        act: activation name (see :func:`activation`).
        shared_embedding: the generator's class embedding for ``conditional_batch`` norms.
        where: readable name for error messages.
    """

    def __init__(self, in_channels: int, out_channels: int, *, resample: Literal["up", "down"] | None = None,
                 norm: NormSpec = "none", block_index: int = 0, optimized: bool = False,
                 down_mode: Literal["pool", "stride"] = "pool", act: str = "relu",
                 shared_embedding: nn.Embedding | None = None, hidden_channels: int | None = None,
                 where: str = "ResBlock") -> None:
        super().__init__()
        if resample not in ("up", "down", None):
            raise ValueError(f"{where}: resample must be 'up', 'down' or None, got {resample!r}")
        if down_mode not in ("pool", "stride"):
            raise ValueError(f"{where}: down_mode must be 'pool' or 'stride', got {down_mode!r}")
        if optimized and resample != "down":
            raise ValueError(f"{where}: an optimized block must downsample")
        self.resample = resample
        self.optimized = optimized
        self.down_mode = down_mode
        if hidden_channels is None:
            hidden_channels = in_channels if (resample == "down" and not optimized) else out_channels
        stride = 2 if (resample == "down" and down_mode == "stride") else 1
        self.norm1 = (nn.Identity() if optimized else
                      make_norm(norm, in_channels, layer_index=block_index, shared_embedding=shared_embedding,
                                where=f"{where}.norm1"))
        self.act1 = nn.Identity() if optimized else activation(act)
        self.conv1 = conv2d(in_channels, hidden_channels, 3, stride, norm=norm)
        self.norm2 = make_norm(norm, hidden_channels, layer_index=block_index, shared_embedding=shared_embedding,
                               where=f"{where}.norm2")
        self.act2 = activation(act)
        self.conv2 = conv2d(hidden_channels, out_channels, 3, 1, norm=norm)
        self.learned_shortcut = in_channels != out_channels or resample is not None
        self.shortcut = conv2d(in_channels, out_channels, 1, norm=norm) if self.learned_shortcut else nn.Identity()
        # Up/pool resampling around a 3×3 conv runs as one folded convolution (see modules/resample.py).
        self.fused_resampling = True

    def _pool_main(self) -> bool:
        return self.resample == "down" and self.down_mode == "pool"

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act1(apply_norm(self.norm1, x, y))
        if self.resample == "up":
            h = nearest_up_conv(self.conv1, h, fused=self.fused_resampling)
        else:
            h = self.conv1(h)
        h = self.act2(apply_norm(self.norm2, h, y))
        if self._pool_main():
            h = conv_mean_pool(self.conv2, h, fused=self.fused_resampling)
        else:
            h = self.conv2(h)
        return h + self._shortcut(x)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            # A 1×1 conv commutes with nearest upsampling: run it at the low resolution (4× cheaper).
            return F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")
        if self.resample == "down":
            # Mean pool and 1×1 conv commute (both linear): pool first so the conv runs at the low resolution.
            # For Gulrajani's non-optimized blocks this equals his ConvMeanPool shortcut.
            return self.shortcut(F.avg_pool2d(x, 2))
        return self.shortcut(x)


class UNetUpBlock(nn.Module):
    """One DAGAN U-Net decoder stage at twice the input resolution.

    ``h = conv1(up(act(norm1(x)))) + W_c c``  (noise/class conditioning added as a per-channel bias),
    ``main = conv2(act(norm2(cat(h, skip))))``  (the encoder skip enters the second conv),
    ``out = dropout(main + up(conv1x1(x)))``.

    Args:
        in_channels: channels of the coarser input.
        skip_channels: channels of the encoder features at the output resolution (0: no skip).
        out_channels: output channels.
        cond_dim: size of the conditioning vector (0: none).
        norm, block_index, act, shared_embedding, where: as for :class:`ResBlock`.
        dropout: dropout probability on the output (DAGAN's decoder dropout); 0 disables it.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *, cond_dim: int = 0,
                 norm: NormSpec = "none", block_index: int = 0, act: str = "relu",
                 shared_embedding: nn.Embedding | None = None, dropout: float = 0.0,
                 where: str = "UNetUpBlock") -> None:
        super().__init__()
        self.norm1 = make_norm(norm, in_channels, layer_index=block_index, shared_embedding=shared_embedding,
                               where=f"{where}.norm1")
        self.act1 = activation(act)
        self.conv1 = conv2d(in_channels, out_channels, 3, norm=norm)
        self.cond = linear(cond_dim, out_channels, norm=norm) if cond_dim > 0 else None
        self.norm2 = make_norm(norm, out_channels + skip_channels, layer_index=block_index,
                               shared_embedding=shared_embedding, where=f"{where}.norm2")
        self.act2 = activation(act)
        self.conv2 = conv2d(out_channels + skip_channels, out_channels, 3, norm=norm)
        self.shortcut = conv2d(in_channels, out_channels, 1, norm=norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Nearest ×2 then conv1 runs as one folded transposed convolution (see modules/resample.py).
        self.fused_resampling = True

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        h = nearest_up_conv(self.conv1, self.act1(apply_norm(self.norm1, x, y)), fused=self.fused_resampling)
        if self.cond is not None:
            if cond is None:
                raise ValueError("UNetUpBlock built with cond_dim > 0 needs a conditioning vector")
            h = h + self.cond(cond)[:, :, None, None]
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        h = self.conv2(self.act2(apply_norm(self.norm2, h, y)))
        # 1×1 conv before the nearest upsampling: same result, 4× cheaper.
        return self.dropout(h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest"))


def projection_embedding(num_classes: int, dim: int, norm: NormSpec = None) -> nn.Embedding | None:
    """Class embedding of a projection critic (Miyato & Koyama 2018), or None when unconditional; spectrally
    normalised too when the critic's norm is ``spectral``, as in their paper."""
    if num_classes <= 0:
        return None
    emb = nn.Embedding(num_classes, dim)
    nn.init.xavier_uniform_(emb.weight)
    if parse_norm_spec(norm)[0] == "spectral":
        emb = nn.utils.parametrizations.spectral_norm(emb)
    return emb


def projection_score(features: torch.Tensor, out: nn.Module, projection: nn.Module | None,
                     y: torch.Tensor | None, where: str) -> torch.Tensor:
    """Critic output from pooled ``features`` [B, F]: ``out(h) + <embed(y), h>`` (the projection term only for a
    class-conditional critic). Returns scores [B]."""
    score = out(features).squeeze(1)
    if projection is not None:
        if y is None:
            raise ValueError(f"{where} is class-conditional: pass labels y")
        score = score + (projection(y) * features).sum(dim=1)
    return score


def class_conditioning(num_classes: int, embedding_dim: int, norm: NormSpec,
                       input_features: int) -> tuple[nn.Embedding | None, nn.Module | None]:
    """Class conditioning of a noise-to-image generator: ``(class_embedding, class_to_input)``.

    The shared class embedding feeds ``conditional_batch`` norms (BigGAN); with any other norm the class enters as
    a learned bias of the input projection instead (``class_to_input``, a linear of ``input_features`` outputs).
    Both are None for an unconditional generator.
    """
    if num_classes <= 0:
        return None, None
    embedding = nn.Embedding(num_classes, embedding_dim)
    nn.init.normal_(embedding.weight, std=1.0)
    if parse_norm_spec(norm)[0] == "conditional_batch":
        return embedding, None
    return embedding, linear(embedding_dim, input_features, norm=norm, bias=False)
