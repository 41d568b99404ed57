"""One normalization registry for generators and critics, with MONAI-style specs.

A *spec* names a normalization and its arguments::

    "none" | "batch" | "layer" | "instance" | "weight" | "spectral"
    ("group", {"num_groups": 8})        # or the short string "group:8"
    ("group", {"num_groups": [16, 8, 4]})  # a per-layer schedule: layer i uses entry i (last entry repeats)
    ("conditional_batch", {"num_classes": 10, "embedding_dim": 128})   # BigGAN-style, generator only

Two kinds:

* *activation norms* (batch, layer, instance, group, conditional_batch) are layers placed after a conv/linear.
  They are the torch layers (``nn.BatchNorm2d``, ``nn.InstanceNorm2d``, ``nn.GroupNorm`` — the classes MONAI's
  ``Norm`` factory returns, looked up here without importing MONAI), never hand-written statistics.
  ``layer`` for feature maps means normalising each sample over (C, H, W), which is ``GroupNorm(1, C)`` — the layer
  normalization of the WGAN-GP paper — not ``nn.LayerNorm(C)`` over the last axis.
* *weight norms* (weight, spectral) re-parametrise the conv/linear itself via
  ``torch.nn.utils.parametrizations``; no layer follows it.

Only ``batch`` and ``conditional_batch`` couple the samples of a batch (in training mode); that breaks the per-sample
gradient penalty of WGAN-GP, which is why critics default to ``layer``/``group``.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn

from dagan_gn.errors import DaganError

__all__ = [
    "NormSpec",
    "NormSpecError",
    "NORMS",
    "ACTIVATION_NORMS",
    "WEIGHT_NORMS",
    "BATCH_COUPLING_NORMS",
    "parse_norm_spec",
    "format_norm_spec",
    "make_norm",
    "apply_weight_norm",
    "is_batch_coupling",
    "ConditionalBatchNorm2d",
    "apply_norm",
]

NormSpec = Union[None, str, tuple, list, dict]


class NormSpecError(DaganError, ValueError):
    """An invalid normalization spec (unknown name, bad arguments, groups that do not divide channels)."""


ACTIVATION_NORMS = ("batch", "layer", "instance", "group", "conditional_batch")
WEIGHT_NORMS = ("weight", "spectral")
NORMS = ("none",) + ACTIVATION_NORMS + WEIGHT_NORMS
BATCH_COUPLING_NORMS = ("batch", "conditional_batch")

_ALIASES = {"bn": "batch", "ln": "layer", "in": "instance", "gn": "group", "wn": "weight", "sn": "spectral",
            "cbn": "conditional_batch", "identity": "none", "": "none"}
_SHORT_ARG = {"group": "num_groups", "conditional_batch": "num_classes"}


def parse_norm_spec(spec: NormSpec) -> tuple[str, dict[str, Any]]:
    """Normalise any accepted spec form to ``(name, kwargs)``.

    Accepts ``None``, a name, ``"name:arg"`` (``group:8``, ``group:16,8,4``), ``(name, kwargs)``, ``[name, kwargs]``
    and ``{"name": ..., **kwargs}``.
    """
    if spec is None:
        return "none", {}
    if isinstance(spec, dict):
        spec = dict(spec)
        if "name" not in spec:
            raise NormSpecError(f"norm spec {spec!r} is a mapping without a 'name' key")
        name = spec.pop("name")
        kwargs = spec
    elif isinstance(spec, str):
        name, _, arg = spec.strip().partition(":")
        kwargs = {}
        name = _ALIASES.get(name.lower(), name.lower())
        if arg:
            if name not in _SHORT_ARG:
                raise NormSpecError(f"norm spec {spec!r}: '{name}' takes no ':argument'")
            try:
                values = [int(v) for v in arg.split(",")]
            except ValueError as exc:
                raise NormSpecError(f"norm spec {spec!r}: argument after ':' must be integer(s)") from exc
            kwargs[_SHORT_ARG[name]] = values[0] if len(values) == 1 else values
    elif isinstance(spec, (tuple, list)) and len(spec) in (1, 2) and isinstance(spec[0], str):
        if len(spec) == 2 and not isinstance(spec[1], dict):
            raise NormSpecError(f"norm spec {spec!r}: second element must be a dict of arguments")
        name = spec[0]
        kwargs = dict(spec[1]) if len(spec) == 2 else {}
    else:
        raise NormSpecError(f"cannot read norm spec {spec!r}; use e.g. 'group:8' or ('group', {{'num_groups': 8}})")
    name = _ALIASES.get(str(name).lower(), str(name).lower())
    if name not in NORMS:
        raise NormSpecError(f"unknown normalization '{name}'; choose one of: {', '.join(NORMS)}")
    if name == "group":
        kwargs.setdefault("num_groups", 8)
    return name, kwargs


def format_norm_spec(spec: NormSpec) -> str:
    """Short human-readable form, e.g. ``group:8`` (used in tables and file names)."""
    name, kwargs = parse_norm_spec(spec)
    if name == "group":
        g = kwargs["num_groups"]
        return "group:" + (",".join(map(str, g)) if isinstance(g, (list, tuple)) else str(g))
    return name


def is_batch_coupling(spec: NormSpec) -> bool:
    """True if the norm mixes statistics across the samples of a batch in training mode."""
    return parse_norm_spec(spec)[0] in BATCH_COUPLING_NORMS


def _pick(value: Any, layer_index: int) -> Any:
    """Entry ``layer_index`` of a per-layer schedule (last entry repeats); a scalar applies to every layer."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise NormSpecError("an empty per-layer schedule in a norm spec")
        return value[min(layer_index, len(value) - 1)]
    return value


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional batch norm (de Vries et al. 2017; BigGAN's shared-embedding form).

    Statistics from ``nn.BatchNorm2d(affine=False)``; the per-class gain and bias are linear projections of a class
    embedding. Pass ``shared_embedding`` (an ``nn.Embedding`` owned by the generator) to share one embedding across
    layers as in BigGAN; otherwise each layer owns a direct per-class gain/bias table.
    """

    def __init__(self, channels: int, num_classes: int, embedding_dim: int = 128,
                 shared_embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise NormSpecError("conditional_batch norm needs num_classes >= 1")
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.shared_embedding = shared_embedding
        if shared_embedding is not None:
            self.gain = nn.Linear(shared_embedding.embedding_dim, channels)
            self.bias = nn.Linear(shared_embedding.embedding_dim, channels)
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.gain.bias)
            nn.init.zeros_(self.bias.weight)
            nn.init.zeros_(self.bias.bias)
        else:
            self.gain_table = nn.Embedding(num_classes, channels)
            self.bias_table = nn.Embedding(num_classes, channels)
            nn.init.zeros_(self.gain_table.weight)
            nn.init.zeros_(self.bias_table.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.bn(x)
        if self.shared_embedding is not None:
            e = self.shared_embedding(y)
            gain, bias = self.gain(e), self.bias(e)
        else:
            gain, bias = self.gain_table(y), self.bias_table(y)
        # gain is parametrised as 1 + delta so an untrained layer is plain batch norm.
        return h * (1.0 + gain)[:, :, None, None] + bias[:, :, None, None]


def make_norm(spec: NormSpec, channels: int, *, layer_index: int = 0, spatial_dims: int = 2,
              shared_embedding: nn.Embedding | None = None, where: str = "") -> nn.Module:
    """The activation-norm layer for ``channels`` feature channels, or ``nn.Identity`` for none/weight/spectral.

    Args:
        spec: a registry spec (see the module docstring).
        channels: number of feature channels the layer normalises.
        layer_index: position of the layer in its network; picks entry ``layer_index`` of per-layer schedules such as
            ``("group", {"num_groups": [16, 8, 4]})`` (the last entry repeats).
        spatial_dims: 2 for feature maps (N, C, H, W), 1 for (N, C, L), 0 for (N, C) vectors.
        shared_embedding: the generator's class embedding, shared by ``conditional_batch`` layers (BigGAN).
        where: a readable name of the layer (e.g. ``"DAGANGenerator.encoder.2.norm1"``) used in error messages.

    Raises:
        NormSpecError: unknown name, bad arguments, or a group count that does not divide ``channels``.
    """
    name, kwargs = parse_norm_spec(spec)
    place = f" at {where}" if where else ""
    try:
        return _build_norm(name, kwargs, channels, layer_index, spatial_dims, shared_embedding, place)
    except TypeError as exc:  # an argument the torch layer does not take, e.g. ("batch", {"momentun": 0.1})
        raise NormSpecError(f"norm spec {spec!r}{place}: {exc}") from exc


# The torch layers by spatial dimensionality: exactly what MONAI's ``Norm[Norm.BATCH, dims]`` factory returns, without
# importing MONAI (its import costs ~7 s of CPU per process, paid by every CLI call and test worker).
_BATCH = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _build_norm(name: str, kwargs: dict[str, Any], channels: int, layer_index: int, spatial_dims: int,
                shared_embedding: nn.Embedding | None, place: str) -> nn.Module:
    if spatial_dims not in _BATCH:
        raise NormSpecError(f"norm{place}: spatial_dims must be 0, 1, 2 or 3, got {spatial_dims}")
    if name in ("none",) + WEIGHT_NORMS:
        return nn.Identity()
    if name == "batch":
        return _BATCH[spatial_dims](channels, **kwargs)
    if name == "instance":
        if spatial_dims == 0:
            raise NormSpecError(f"instance norm{place} is undefined for (N, C) vectors; use 'layer' there")
        kwargs = {"affine": True, **kwargs}
        return _INSTANCE[spatial_dims](channels, **kwargs)
    if name == "layer":
        # Per-sample over (C, H, W) with per-channel affine: GroupNorm with one group (see module docstring).
        return nn.GroupNorm(1, channels, **kwargs)
    if name == "group":
        kwargs = dict(kwargs)
        groups = int(_pick(kwargs.pop("num_groups"), layer_index))
        if groups < 1 or channels % groups != 0:
            raise NormSpecError(
                f"group norm with num_groups={groups} cannot normalise {channels} channels{place} "
                f"(layer {layer_index}): num_groups must divide the channel count; "
                f"divisors of {channels} are {[d for d in range(1, channels + 1) if channels % d == 0]}"
            )
        return nn.GroupNorm(num_groups=groups, num_channels=channels, **kwargs)
    if name == "conditional_batch":
        if spatial_dims != 2:
            raise NormSpecError(f"conditional_batch norm{place} is only defined for (N, C, H, W) feature maps")
        num_classes = int(kwargs.get("num_classes", 0))
        if num_classes < 1 and shared_embedding is not None:
            num_classes = shared_embedding.num_embeddings
        if num_classes < 1:
            raise NormSpecError(f"conditional_batch norm{place} needs num_classes >= 1 (a class-conditional model)")
        return ConditionalBatchNorm2d(channels, num_classes, int(kwargs.get("embedding_dim", 128)), shared_embedding)
    raise NormSpecError(f"unknown normalization '{name}'")  # pragma: no cover - parse_norm_spec guards


def apply_weight_norm(module: nn.Module, spec: NormSpec) -> nn.Module:
    """Wrap a conv/linear with weight or spectral normalization when ``spec`` asks for it; else return it as is."""
    name, kwargs = parse_norm_spec(spec)
    try:
        if name == "weight":
            return nn.utils.parametrizations.weight_norm(module, **kwargs)
        if name == "spectral":
            return nn.utils.parametrizations.spectral_norm(module, **kwargs)
    except TypeError as exc:  # an argument the parametrization does not take
        raise NormSpecError(f"norm spec {spec!r}: {exc}") from exc
    return module


def apply_norm(norm: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Call a norm layer, passing class labels to conditional ones."""
    if isinstance(norm, ConditionalBatchNorm2d):
        if y is None:
            raise ValueError("a conditional_batch norm needs class labels y")
        return norm(x, y)
    return norm(x)
