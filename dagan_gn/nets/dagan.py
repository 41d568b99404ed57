"""Conditional DAGAN (Antoniou et al. 2017) for 1-channel patches: a U-Net residual generator and a pair critic.

Generator ``G(x, z, y=None)``: a real patch ``x`` in [-1, 1] goes through a residual U-Net (UResNet in spirit) whose
encoder downsamples *immediately* (space-to-depth stem, ``PixelUnshuffle(2)``, then stride-2 residual blocks) and
spends its width at low resolution; the output is produced at half resolution with ``2·2·C`` channels and rearranged
by ``PixelShuffle(2)``, so no layer runs at full resolution. Noise ``z`` (and the class embedding, when conditional)
forms a conditioning vector ``c`` that is

* projected to a ``z_channels × b × b`` map concatenated with the bottleneck features, and
* projected to a per-channel bias added inside every decoder stage (:class:`~dagan_gn.modules.blocks.UNetUpBlock`),

so the noise acts at every scale. Decoder stages take the encoder features of their resolution as skips; the output
is ``tanh(PixelShuffle(conv(act(norm(h)))))``, an image like ``x``.

Levels: level ``l`` has resolution ``S / (stem_factor · 2**l)`` and ``widths[l]`` channels, from the stem (level 0)
to the ``bottleneck_size`` map (level ``L-1``). Block indices for per-layer norm schedules: encoder down-blocks
``0..L-2``, bottleneck ``L-1``, decoder stages ``L..2L-2`` (coarse to fine), output norm ``2L-1``.

Critic ``D(x, x_other, y=None) -> [B]``: the pair stacked on channels (2C), a stride-2 stem conv, stride-2 residual
down-blocks to 4×4, activation, global mean pool, linear, plus the projection term ``⟨embed(y), h⟩`` when
``num_classes > 0``. Default norm ``layer`` (per-sample, keeps the WGAN-GP penalty well defined).

Sizes and costs of the presets (:func:`dagan_preset`) are in ``docs/networks.md`` and ``benchmarks/nets_flops.py``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..modules.blocks import (ResBlock, UNetUpBlock, activation, conv2d, critic_norm_spec, init_weights, linear,
                              projection_embedding, projection_score)
from ..modules.norms import NormSpec, apply_norm, apply_weight_norm, make_norm, parse_norm_spec

__all__ = ["DAGANGenerator", "DAGANCritic", "dagan_preset", "DAGAN_PRESETS", "default_generator_widths",
           "default_critic_widths"]


#: |x| bound before atanh in the input residual (atanh(0.995) ≈ 3.0 keeps the pre-activation finite and tame).
_ATANH_LIMIT = 0.995


def _levels(image_size: int, low: int, where: str) -> int:
    """Number of halvings from ``image_size`` down to ``low`` (both powers of two)."""
    if image_size < low or image_size % low or (image_size // low) & (image_size // low - 1):
        raise ValueError(f"{where}: image_size {image_size} must be {low} times a power of two")
    return int(math.log2(image_size // low))


def default_generator_widths(image_size: int, width: int, bottleneck_size: int = 4,
                             max_width: int | None = None, stem_factor: int = 2) -> list[int]:
    """Channels per generator level, from the stem resolution ``image_size / stem_factor`` down to
    ``bottleneck_size``: ``width`` doubling per halving, capped at ``max_width`` (default ``8 * width``)."""
    n = _levels(image_size // stem_factor, bottleneck_size, "DAGANGenerator")
    max_width = 8 * width if max_width is None else max_width
    return [min(width * 2 ** level, max_width) for level in range(n + 1)]


def default_critic_widths(image_size: int, width: int, max_width: int | None = None) -> list[int]:
    """Channels per critic level, from the stem output (``image_size / 2``) to 4×4: ``width`` doubling up to
    ``max_width`` (default ``8 * width``)."""
    n = _levels(image_size, 8, "DAGANCritic")
    max_width = 8 * width if max_width is None else max_width
    return [min(width * 2 ** level, max_width) for level in range(n + 1)]


def _icnr_conv(in_channels: int, out_channels: int, factor: int, norm: NormSpec, gain: float = 1.0) -> nn.Module:
    """3×3 conv to ``out_channels · factor²`` for ``PixelShuffle(factor)``, ICNR-initialised (Aitken et al. 2017):
    the ``factor²`` sub-pixel kernels of each output channel start equal, so the untrained output is a nearest
    upsampling rather than a checkerboard. ``gain`` scales the initial weights."""
    conv = init_weights(nn.Conv2d(in_channels, out_channels * factor * factor, 3, padding=1))
    with torch.no_grad():
        if factor > 1:
            base = conv.weight[:out_channels].clone()
            conv.weight.copy_(base.repeat_interleave(factor * factor, dim=0))
        conv.weight.mul_(gain)
    return apply_weight_norm(conv, norm)


class DAGANGenerator(nn.Module):
    """U-Net residual generator of the conditional DAGAN.

    Args:
        image_size: side ``S`` of the square input/output patches (``bottleneck_size`` times a power of two).
        channels: image channels ``C``.
        z_dim: noise size.
        width: base width (see :func:`default_generator_widths`); ignored when ``widths`` is given.
        norm: registry spec for every norm of the generator (``group:8`` by default; ``conditional_batch`` needs
            ``num_classes > 0``).
        num_classes: 0 for unconditional; otherwise a class embedding joins the noise in the conditioning vector
            (and feeds ``conditional_batch`` norms).
        dropout: dropout probability at the output of every decoder stage (0 disables).
        widths: explicit channels per level, full resolution first, ``log2(S / bottleneck_size) + 1`` entries.
        bottleneck_size: side of the lowest-resolution map.
        z_channels: channels of the noise map concatenated at the bottleneck (default ``max(8, widths[-1] // 4)``).
        embedding_dim: size of the class embedding (default ``min(z_dim, 64)``).
        stem_factor: space-to-depth factor of the stem (``PixelUnshuffle``) and of the output (``PixelShuffle``):
            with 2 nothing runs at full resolution, which is where a U-Net spends most of its time on a CPU.
            1 gives a plain full-resolution stem conv.
        max_width: see :func:`default_generator_widths`.
        act: activation name.
        input_residual: add ``atanh(x)`` to the output pre-activation, making the input the last skip connection
            (``G`` starts near the identity and learns variations); ``False`` gives the plain U-Net output.
        residual_gain: scale of the output conv's initial weights (default 0.1 with the input residual, so the
            untrained ``G`` is close to the identity; 1.0 without).
        noise_maps: channels of spatial noise concatenated to the skip input of every decoder stage whose side is at
            most ``noise_map_max_size`` (0: none). The maps are a fixed random linear function of ``z`` (a buffer,
            ``N(0, 1/z_dim)`` entries, so each map pixel is ~N(0, 1) and white in space): per-pixel variation that is
            still a deterministic function of the noise vector, which ``augment``'s per-variant noise seeds need.
        noise_map_max_size: largest decoder side that gets noise maps (their buffers grow with the side squared).
        smooth_output: filter the generated output (before the input residual is added) with a fixed 3×3 binomial
            kernel ``[1, 2, 1]ᵀ[1, 2, 1] / 16``, whose response is exactly zero at the Nyquist frequency: the
            sub-pixel phases of ``PixelShuffle`` can then not drift apart into a checkerboard, while the source's own
            fine detail (the residual) is untouched.
        warp: largest displacement of the *deformation* output, as a fraction of the image side (0: no
            deformation). With ``warp > 0`` the network also predicts a smooth displacement field, and the source is
            resampled along it (``grid_sample``) before the appearance residual is added: ``G(x, z) =
            tanh(atanh(warp_z(x)) + r_z(x))``. A deformed source keeps its identity by construction (the strokes of
            a new character, the lesion of a patch), so the variants of a class the generator never saw are still
            drawings of *their* source rather than re-drawings in the style of the training classes.
        warp_grid: side of the coarse grid the displacement field is averaged to before it is upsampled (bicubic)
            to the image: the deformation's smoothness (4-8 for elastic-like warps of 32-64 px images).

    Forward: ``x`` [B, C, S, S] in [-1, 1], ``z`` [B, z_dim], ``y`` LongTensor [B] or None → [B, C, S, S] in (-1, 1).
    """

    def __init__(self, image_size: int = 64, channels: int = 1, z_dim: int = 128, width: int = 32,
                 norm: NormSpec = "group:8", num_classes: int = 0, dropout: float = 0.0, *,
                 widths: Sequence[int] | None = None, bottleneck_size: int = 4, z_channels: int | None = None,
                 embedding_dim: int | None = None, max_width: int | None = None, stem_factor: int = 2,
                 act: str = "relu", input_residual: bool = True, residual_gain: float | None = None,
                 noise_maps: int = 0, noise_map_max_size: int = 32, smooth_output: bool = False,
                 warp: float = 0.0, warp_grid: int = 8) -> None:
        super().__init__()
        if stem_factor < 1 or image_size % stem_factor:
            raise ValueError(f"DAGANGenerator: stem_factor {stem_factor} must be >= 1 and divide image_size "
                             f"{image_size}")
        if widths is None:
            widths = default_generator_widths(image_size, width, bottleneck_size, max_width, stem_factor)
        widths = [int(w) for w in widths]
        n_levels = _levels(image_size // stem_factor, bottleneck_size, "DAGANGenerator") + 1
        if len(widths) != n_levels:
            raise ValueError(f"DAGANGenerator: widths {widths} must have {n_levels} entries for image_size "
                             f"{image_size}, stem_factor {stem_factor} and bottleneck_size {bottleneck_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"DAGANGenerator: dropout must be in [0, 1), got {dropout}")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.z_dim = int(z_dim)
        self.num_classes = int(num_classes)
        self.norm_spec = norm
        self.widths = widths
        self.bottleneck_size = int(bottleneck_size)
        self.stem_factor = int(stem_factor)
        self.input_residual = bool(input_residual)
        self.noise_maps = int(noise_maps)
        if self.noise_maps < 0:
            raise ValueError(f"DAGANGenerator: noise_maps must be >= 0, got {noise_maps}")
        L = n_levels
        if parse_norm_spec(norm)[0] == "conditional_batch" and num_classes <= 0:
            raise ValueError("DAGANGenerator: norm 'conditional_batch' needs num_classes > 0")

        embedding_dim = min(z_dim, 64) if embedding_dim is None else int(embedding_dim)
        self.class_embedding = nn.Embedding(num_classes, embedding_dim) if num_classes > 0 else None
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=1.0)
        cond_dim = z_dim + (embedding_dim if num_classes > 0 else 0)
        self.z_channels = max(8, widths[-1] // 4) if z_channels is None else int(z_channels)

        name = "DAGANGenerator"
        f = self.stem_factor
        self.space_to_depth = nn.PixelUnshuffle(f) if f > 1 else nn.Identity()
        self.stem = conv2d(channels * f * f, widths[0], 3, norm=norm)
        self.down = nn.ModuleList(
            ResBlock(widths[level - 1], widths[level], resample="down", down_mode="stride", norm=norm,
                     block_index=level - 1, act=act, shared_embedding=self.class_embedding,
                     where=f"{name}.down.{level - 1}")
            for level in range(1, L)
        )
        b = self.bottleneck_size
        self.z_map = linear(cond_dim, self.z_channels * b * b, norm=norm)
        self.bottleneck = ResBlock(widths[-1] + self.z_channels, widths[-1], norm=norm, block_index=L - 1, act=act,
                                   shared_embedding=self.class_embedding, where=f"{name}.bottleneck")
        # Decoder stages from the coarsest to the finest level; stage i works at side image_size / f / 2**level.
        decoder_levels = list(range(L - 2, -1, -1))
        self.noise_map_sizes = [
            (self.image_size // f) >> level if self.noise_maps and (self.image_size // f) >> level <= noise_map_max_size
            else 0 for level in decoder_levels
        ]
        for i, side in enumerate(self.noise_map_sizes):
            if side:
                # Fixed (not trained) projection z -> noise_maps x side x side: drawn from the construction RNG like
                # the weights, stored in the state_dict so a loaded generator maps z to the same maps.
                self.register_buffer(f"noise_projection_{i}",
                                     torch.randn(self.noise_maps * side * side, z_dim) / math.sqrt(z_dim))
        self.up = nn.ModuleList(
            UNetUpBlock(widths[level + 1], widths[level] + (self.noise_maps if self.noise_map_sizes[i] else 0),
                        widths[level], cond_dim=cond_dim, norm=norm, block_index=L + i, act=act,
                        shared_embedding=self.class_embedding, dropout=dropout, where=f"{name}.up.{i}")
            for i, level in enumerate(decoder_levels)
        )
        self.out_norm = make_norm(norm, widths[0], layer_index=2 * L - 1, shared_embedding=self.class_embedding,
                                  where=f"{name}.out_norm")
        self.out_act = activation(act)
        # With the input residual the untrained network should start close to the identity: a small output gain.
        if residual_gain is None:
            residual_gain = 0.1 if self.input_residual else 1.0
        self.residual_gain = float(residual_gain)
        if not 0.0 <= warp <= 0.5:
            raise ValueError(f"DAGANGenerator: warp must be in [0, 0.5] (a fraction of the image side), got {warp}")
        if warp and not 1 <= warp_grid <= image_size:
            raise ValueError(f"DAGANGenerator: warp_grid must be in [1, image_size], got {warp_grid}")
        self.warp = float(warp)
        self.warp_grid = int(warp_grid)
        # Two extra output channels, the displacement (x, y), ahead of the image channels.
        self.flow_channels = 2 if self.warp else 0
        self.out_conv = _icnr_conv(widths[0], self.flow_channels + channels, f, norm, gain=self.residual_gain)
        self.depth_to_space = nn.PixelShuffle(f) if f > 1 else nn.Identity()
        self.smooth_output = bool(smooth_output)
        if self.smooth_output:
            taps = torch.tensor([1.0, 2.0, 1.0])
            self.register_buffer("smoothing_kernel", (torch.outer(taps, taps) / 16).expand(channels, 1, 3, 3).clone(),
                                 persistent=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels or x.shape[-1] != self.image_size or \
                x.shape[-2] != self.image_size:
            raise ValueError(f"DAGANGenerator expects x of shape [B, {self.channels}, {self.image_size}, "
                             f"{self.image_size}], got {list(x.shape)}")
        if z.shape != (x.shape[0], self.z_dim):
            raise ValueError(f"DAGANGenerator expects z of shape [{x.shape[0]}, {self.z_dim}], got {list(z.shape)}")
        cond = z
        if self.class_embedding is not None:
            if y is None:
                raise ValueError("this DAGAN generator is class-conditional: pass labels y")
            cond = torch.cat([z, self.class_embedding(y)], dim=1)
        h = self.stem(self.space_to_depth(x))
        skips = [h]
        for block in self.down:
            h = block(h, y)
            skips.append(h)
        b = self.bottleneck_size
        zmap = self.z_map(cond).view(x.shape[0], self.z_channels, b, b)
        h = self.bottleneck(torch.cat([h, zmap], dim=1), y)
        for i, block in enumerate(self.up):
            skip = skips[-2 - i]
            side = self.noise_map_sizes[i]
            if side:
                noise = (z @ getattr(self, f"noise_projection_{i}").t()).view(x.shape[0], self.noise_maps, side, side)
                skip = torch.cat([skip, noise.to(skip.dtype)], dim=1)
            h = block(h, skip, cond, y)
        h = self.out_act(apply_norm(self.out_norm, h, y))
        out = self.depth_to_space(self.out_conv(h))
        source = x
        if self.warp:
            flow, out = out[:, :2], out[:, 2:]
            source = self.deform(x, flow)
        if self.smooth_output:
            out = nn.functional.conv2d(nn.functional.pad(out, (1, 1, 1, 1), mode="replicate"),
                                       self.smoothing_kernel.to(out.dtype), groups=self.channels)
        if self.input_residual:
            # The input itself is the last skip connection: the network predicts a change of x in tanh's
            # pre-activation space, so from the first step the output lives near the source patch and training
            # spends its steps on plausible variations rather than on re-learning to draw a mammogram. The pair
            # critic still penalises copies (a real pair is two different patches).
            out = out + torch.atanh(source.clamp(-_ATANH_LIMIT, _ATANH_LIMIT))
        return torch.tanh(out)

    def deform(self, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Resample ``x`` along the displacement ``flow`` [B, 2, S, S] (the network's raw output): averaged to a
        ``warp_grid``² grid, bounded by ``tanh`` to ``warp`` of the side, upsampled bicubically to S×S."""
        size = x.shape[-1]
        coarse = nn.functional.adaptive_avg_pool2d(flow.float(), self.warp_grid)
        # grid_sample's coordinates span [-1, 1] over the image: a fraction w of the side is 2w there.
        coarse = torch.tanh(coarse) * (2.0 * self.warp)
        dense = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        identity = torch.eye(2, 3, dtype=dense.dtype, device=x.device).expand(x.shape[0], 2, 3)
        grid = nn.functional.affine_grid(identity, [x.shape[0], 1, size, size], align_corners=False)
        grid = grid + dense.permute(0, 2, 3, 1)
        # Border padding: what moves in from outside is the edge's own background, not black.
        return nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                                         align_corners=False).to(x.dtype)


class DAGANCritic(nn.Module):
    """Pair critic of the conditional DAGAN: scores ``(x, x_other)`` stacked on channels.

    Args:
        image_size: side ``S`` of the patches (8 times a power of two).
        channels: image channels ``C`` (the critic sees ``2C``).
        width: base width (see :func:`default_critic_widths`); ignored when ``widths`` is given.
        norm: registry spec (``layer`` by default; ``conditional_batch`` is rejected).
        num_classes: > 0 adds the projection term ``⟨embed(y), h⟩``.
        widths: explicit channels per level, from the stem output (``S / 2``) to 4×4.
        down_mode: ``"stride"`` (default, cheap) or ``"pool"`` (Gulrajani's conv-then-mean-pool blocks).
        act: activation name.
        aux_classes: > 0 adds an auxiliary class head (a linear layer on the pooled features) over the *training*
            classes: the DAGAN identity term (``loss.class_weight``). It classifies a single image ``v`` from the
            features of the self-pair ``(v, v)``, so the source of a pair can never carry the answer.

    Forward: ``x``, ``x_other`` [B, C, S, S], ``y`` LongTensor [B] or None → scores [B]; with ``with_logits=True``
    → ``(scores [B], class logits [B, aux_classes])`` from the same features (one forward for both; the model steps
    put real/fake pairs and self-pairs in one batch).
    """

    def __init__(self, image_size: int = 64, channels: int = 1, width: int = 32, norm: NormSpec = "layer",
                 num_classes: int = 0, *, widths: Sequence[int] | None = None, max_width: int | None = None,
                 down_mode: str = "stride", act: str = "relu", aux_classes: int = 0) -> None:
        super().__init__()
        critic_norm_spec(norm, "DAGANCritic")
        if aux_classes < 0:
            raise ValueError(f"DAGANCritic: aux_classes must be >= 0 (resolve model.critic_classes=-1 from the "
                             f"data first), got {aux_classes}")
        if widths is None:
            widths = default_critic_widths(image_size, width, max_width)
        widths = [int(w) for w in widths]
        n_levels = _levels(image_size, 8, "DAGANCritic") + 1
        if len(widths) != n_levels:
            raise ValueError(f"DAGANCritic: widths {widths} must have {n_levels} entries for image_size {image_size}")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.norm_spec = norm
        self.widths = widths
        self.stem = conv2d(2 * channels, widths[0], 4, 2, norm=norm, padding=1)
        self.blocks = nn.ModuleList(
            ResBlock(widths[i], widths[i + 1], resample="down", down_mode=down_mode, norm=norm, block_index=i,
                     act=act, where=f"DAGANCritic.blocks.{i}")
            for i in range(len(widths) - 1)
        )
        self.act = activation(act)
        self.out = linear(widths[-1], 1, norm=norm)
        self.projection = projection_embedding(num_classes, widths[-1], norm)
        self.aux_classes = int(aux_classes)
        # Plain linear layer (no weight/spectral norm): the head is a classifier trained with cross-entropy, not
        # part of the Lipschitz-constrained score.
        self.class_head = init_weights(nn.Linear(widths[-1], self.aux_classes)) if self.aux_classes else None

    def forward(self, x: torch.Tensor, x_other: torch.Tensor, y: torch.Tensor | None = None, *,
                with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.shape != x_other.shape:
            raise ValueError(f"DAGANCritic: x {list(x.shape)} and x_other {list(x_other.shape)} differ in shape")
        h = self.stem(torch.cat([x, x_other], dim=1))
        for block in self.blocks:
            h = block(h)
        features = self.act(h).mean(dim=(2, 3))
        scores = projection_score(features, self.out, self.projection, y, "DAGANCritic")
        if not with_logits:
            return scores
        if self.class_head is None:
            raise ValueError("DAGANCritic: with_logits needs a class head (aux_classes > 0)")
        return scores, self.class_head(features)


#: ModelConfig overrides per preset (``image_size``, widths, z size and constructor extras).
DAGAN_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.2 GFLOP per 64² patch: unit tests and the CPU demo.
    "tiny": {"image_size": 64, "z_dim": 64, "g_width": 24, "d_width": 16, "g_kwargs": {}, "d_kwargs": {}},
    "64": {"image_size": 64, "z_dim": 128, "g_width": 64, "d_width": 64, "g_kwargs": {}, "d_kwargs": {}},
    "128": {"image_size": 128, "z_dim": 128, "g_width": 48, "d_width": 48, "g_kwargs": {}, "d_kwargs": {}},
    # Width 24 at 128² (after the space-to-depth stem) doubling to 384 at 8²/4²: ~4 GFLOP per 256² patch, the
    # throughput target (>= 10 patches/s on 2 CPU cores) rather than FLOPs being the binding constraint, because the
    # high-resolution levels are memory-bound (norms, activations, upsampling), not matmul-bound.
    "256": {"image_size": 256, "z_dim": 128, "g_width": 24, "d_width": 32, "g_kwargs": {"max_width": 384},
            "d_kwargs": {}},
}


def dagan_preset(name: str) -> dict[str, Any]:
    """ModelConfig overrides of a DAGAN preset: ``tiny`` (tests, CPU demo), ``64``, ``128``, ``256``.

    Apply with ``dataclasses.replace(cfg.model, name="dagan", **dagan_preset("256"))``.
    """
    key = str(name)
    if key not in DAGAN_PRESETS:
        raise ValueError(f"unknown DAGAN preset '{name}'; choose one of: {', '.join(DAGAN_PRESETS)}")
    preset = DAGAN_PRESETS[key]
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in preset.items()}
