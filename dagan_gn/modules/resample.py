"""Resampling convolutions computed in one cheaper, mathematically identical convolution.

Gulrajani et al.'s ResNet blocks resample around a 3×3 convolution:

* ``ConvMeanPool``: a 3×3 conv at the input resolution, then a 2×2 mean pool;
* ``UpsampleConv``: a nearest-neighbour ×2 upsampling, then a 3×3 conv at the output resolution.

Both are compositions of linear maps, so each equals a single convolution whose kernel is the 3×3 kernel folded with
the resampling:

* conv 3×3 → mean pool 2×2  ==  conv 4×4, stride 2, padding 1, kernel ``¼ Σ_{a,b∈{0,1}} shift_{a,b}(K)``;
* nearest up ×2 → conv 3×3  ==  transposed conv 4×4, stride 2, padding 1, kernel ``A K Aᵀ`` with
  ``A = [[0,0,1],[0,1,1],[1,1,0],[1,0,0]]`` (each output phase sees a 2×2 window of the low-resolution input).

The folded forms do 16 instead of 36 multiply-adds per output pixel and channel pair and skip the full-resolution
intermediate (2.2–2.8× faster per layer on the CPU, including the gradient penalty's double backward), while the
parameters stay the 3×3 kernels: checkpoints, initialisation, weight/spectral normalization and the number of
parameters are unchanged, and the two forms agree to rounding (tests compare them in float64, gradients and the
gradient penalty included). ``set_fused_resampling(net, False)`` switches a network back to the literal two-step
form (the benchmarks' reference does, to stand for the common ports).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "mean_pool_folded_weight",
    "nearest_up_folded_weight",
    "conv_mean_pool",
    "nearest_up_conv",
    "set_fused_resampling",
    "FOLD_MIN_OUTPUT_PIXELS",
]


def _spatial_first(weight: torch.Tensor) -> torch.Tensor:
    """``[O, I, kh, kw]`` → contiguous ``[kh, kw, O, I]``: the fold's adds then run over long contiguous rows (on
    the conv layout they would walk 3-element rows, 4× slower for a 384×384 kernel)."""
    return weight.permute(2, 3, 0, 1).contiguous()


def _mean_pool_fold_axis(w: torch.Tensor, dim: int) -> torch.Tensor:
    # A 2-wide mean after the conv: tap t of the folded kernel is the mean of taps t-1 and t of the original.
    n = w.shape[dim]
    inner = w.narrow(dim, 1, n - 1) + w.narrow(dim, 0, n - 1)
    return 0.5 * torch.cat([w.narrow(dim, 0, 1), inner, w.narrow(dim, n - 1, 1)], dim)


def mean_pool_folded_weight(weight: torch.Tensor) -> torch.Tensor:
    """Kernel ``[O, I, k+1, k+1]`` of the stride-2 conv equal to ``conv(weight) → avg_pool2d(2)`` (a strided view;
    convolutions reorder their weights anyway)."""
    w = _spatial_first(weight)
    return _mean_pool_fold_axis(_mean_pool_fold_axis(w, 0), 1).permute(2, 3, 0, 1)


def _nearest_up_fold_axis(w: torch.Tensor, dim: int) -> torch.Tensor:
    # Along one axis the even output phase sees input rows (i-1, i) with taps (K0, K1+K2) and the odd phase rows
    # (i, i+1) with taps (K0+K1, K2); a stride-2 transposed conv with padding 1 reads them as [K2, K1+K2, K0+K1, K0].
    k0, k1, k2 = w.unbind(dim)
    return torch.stack([k2, k1 + k2, k0 + k1, k0], dim)


def nearest_up_folded_weight(weight: torch.Tensor) -> torch.Tensor:
    """Kernel ``[I, O, 4, 4]`` (transposed-conv layout, a strided view) equal to
    ``interpolate(×2, nearest) → conv3×3(weight)``."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"nearest_up_folded_weight needs a 3×3 kernel, got {tuple(weight.shape[-2:])}")
    w = _spatial_first(weight)
    return _nearest_up_fold_axis(_nearest_up_fold_axis(w, 0), 1).permute(3, 2, 0, 1)


#: The fold is used when the layer's output has at least this many pixels over the whole batch. Folding costs a
#: pass over the kernel per call and transposed convolutions are slow on tiny maps, while the saving grows with the
#: pixels: measured on the CPU the fold loses below ~500 output pixels (batch-1 inference of the 4×4/8×8 levels)
#: and wins above ~1000 (every training batch). Both forms give the same result up to rounding.
FOLD_MIN_OUTPUT_PIXELS = 1024


def _fold_pays(x: torch.Tensor, scale: float) -> bool:
    return x.shape[0] * x.shape[-2] * x.shape[-1] * scale >= FOLD_MIN_OUTPUT_PIXELS


def _plain_same_conv(conv: nn.Module) -> bool:
    """A zero-padded 'same' conv with an odd square kernel, stride 1, no dilation or groups: the foldable kind."""
    if not isinstance(conv, nn.Conv2d):
        return False
    k = conv.kernel_size[0]
    return (conv.kernel_size == (k, k) and k % 2 == 1 and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and conv.padding == ((k - 1) // 2,) * 2)


def conv_mean_pool(conv: nn.Module, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``avg_pool2d(conv(x), 2)``, as one stride-2 convolution when ``fused``, ``conv`` is foldable and the output
    is large enough for the fold to pay (:data:`FOLD_MIN_OUTPUT_PIXELS`).

    ``conv`` may carry a weight/spectral-norm parametrization: ``conv.weight`` is the normalised kernel.
    """
    if not (fused and _plain_same_conv(conv) and _fold_pays(x, 0.25)):
        return F.avg_pool2d(conv(x), 2)
    k = conv.kernel_size[0]
    return F.conv2d(x, mean_pool_folded_weight(conv.weight), conv.bias, stride=2, padding=(k - 1) // 2)


def nearest_up_conv(conv: nn.Module, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))``, as one stride-2 transposed convolution when
    ``fused``, ``conv`` is a 3×3 'same' conv and the output is large enough (:data:`FOLD_MIN_OUTPUT_PIXELS`)."""
    if not (fused and _plain_same_conv(conv) and conv.kernel_size == (3, 3) and _fold_pays(x, 4.0)):
        return conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    return F.conv_transpose2d(x, nearest_up_folded_weight(conv.weight), conv.bias, stride=2, padding=1)


def set_fused_resampling(module: nn.Module, enabled: bool) -> int:
    """Switch every block of ``module`` that has a ``fused_resampling`` flag to the folded (``True``, the default) or
    the literal two-step form. Returns how many blocks were switched."""
    count = 0
    for m in module.modules():
        if hasattr(m, "fused_resampling"):
            m.fused_resampling = bool(enabled)
            count += 1
    return count
