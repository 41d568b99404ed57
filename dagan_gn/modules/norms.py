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

The registry is open, as MONAI's ``Norm`` factory is: :func:`register_norm` adds a norm by name in one call, and every
network of the package (and every config) can then use it::

    register_norm("pixel", layer=lambda ctx, eps=1e-8: PixelNorm(eps))          # an activation norm
    register_norm("spectral2", weight=lambda module, **kw: my_parametrization(module, **kw))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

from dagan_gn.errors import DaganError

__all__ = [
    "NormSpec",
    "NormSpecError",
    "NormContext",
    "NormEntry",
    "NORM_REGISTRY",
    "register_norm",
    "norm_names",
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


@dataclass(frozen=True)
class NormContext:
    """Where an activation norm is built: what its builder may need besides the spec's own arguments."""

    channels: int
    layer_index: int = 0
    spatial_dims: int = 2
    shared_embedding: nn.Embedding | None = None
    #: `` at <layer name>`` (or empty), for error messages.
    place: str = ""


@dataclass(frozen=True)
class NormEntry:
    """A registered normalization: an activation norm (``layer``: ``(NormContext, **kwargs) -> nn.Module`` placed
    after a conv/linear), a weight norm (``weight``: ``(module, **kwargs) -> module``) or neither (``none``)."""

    name: str
    layer: Callable[..., nn.Module] | None = None
    weight: Callable[..., nn.Module] | None = None
    #: Mixes statistics across the samples of a batch in training mode (breaks the per-sample gradient penalty).
    couples_batch: bool = False
    #: The argument of the short form ``name:value`` (``group:8`` → ``num_groups``).
    short_arg: str | None = None
    #: Arguments filled in when a spec leaves them out.
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "activation" if self.layer is not None else "weight" if self.weight is not None else "none"


#: Name → entry of every registered normalization (see :func:`register_norm`).
NORM_REGISTRY: dict[str, NormEntry] = {}
_ALIASES: dict[str, str] = {}


def register_norm(
    name: str,
    *,
    layer: Callable[..., nn.Module] | None = None,
    weight: Callable[..., nn.Module] | None = None,
    couples_batch: bool = False,
    short_arg: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    aliases: Sequence[str] = (),
) -> NormEntry:
    """Register (or replace) the normalization ``name``; at most one of ``layer`` and ``weight``.

    Args:
        layer: builds the norm layer: ``layer(ctx: NormContext, **spec_kwargs) -> nn.Module``.
        weight: wraps a conv/linear: ``weight(module, **spec_kwargs) -> module``.
        couples_batch: True for norms with cross-sample statistics (batch norm and its kin).
        short_arg: the argument of ``"name:value"`` specs.
        defaults: arguments a spec may leave out.
        aliases: other names for it (``"gn"`` for ``group``).
    """
    key = str(name).lower()
    if layer is not None and weight is not None:
        raise NormSpecError(f"register_norm({name!r}): give layer= or weight=, not both")
    entry = NormEntry(key, layer, weight, bool(couples_batch), short_arg, dict(defaults or {}))
    NORM_REGISTRY[key] = entry
    for alias in aliases:
        _ALIASES[str(alias).lower()] = key
    return entry


def norm_names(kind: str | None = None) -> tuple[str, ...]:
    """Registered names, in registration order; ``kind`` (``activation``, ``weight``, ``none``) filters them."""
    return tuple(n for n, e in NORM_REGISTRY.items() if kind is None or e.kind == kind)


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
            short = NORM_REGISTRY[name].short_arg if name in NORM_REGISTRY else None
            if short is None:
                raise NormSpecError(f"norm spec {spec!r}: '{name}' takes no ':argument'")
            try:
                values = [int(v) for v in arg.split(",")]
            except ValueError as exc:
                raise NormSpecError(f"norm spec {spec!r}: argument after ':' must be integer(s)") from exc
            kwargs[short] = values[0] if len(values) == 1 else values
    elif isinstance(spec, (tuple, list)) and len(spec) in (1, 2) and isinstance(spec[0], str):
        if len(spec) == 2 and not isinstance(spec[1], dict):
            raise NormSpecError(f"norm spec {spec!r}: second element must be a dict of arguments")
        name = spec[0]
        kwargs = dict(spec[1]) if len(spec) == 2 else {}
    else:
        raise NormSpecError(f"cannot read norm spec {spec!r}; use e.g. 'group:8' or ('group', {{'num_groups': 8}})")
    name = _ALIASES.get(str(name).lower(), str(name).lower())
    if name not in NORM_REGISTRY:
        raise NormSpecError(f"unknown normalization '{name}'; choose one of: {', '.join(NORM_REGISTRY)}")
    return name, {**NORM_REGISTRY[name].defaults, **kwargs}


def format_norm_spec(spec: NormSpec) -> str:
    """Short human-readable form, e.g. ``group:8`` (used in tables and file names)."""
    name, kwargs = parse_norm_spec(spec)
    short = NORM_REGISTRY[name].short_arg
    if short is None or short not in kwargs:
        return name
    value = kwargs[short]
    return f"{name}:" + (",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))


def is_batch_coupling(spec: NormSpec) -> bool:
    """True if the norm mixes statistics across the samples of a batch in training mode."""
    return NORM_REGISTRY[parse_norm_spec(spec)[0]].couples_batch


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
    if spatial_dims not in _BATCH:
        raise NormSpecError(f"norm{place}: spatial_dims must be 0, 1, 2 or 3, got {spatial_dims}")
    entry = NORM_REGISTRY[name]
    if entry.layer is None:
        return nn.Identity()
    ctx = NormContext(int(channels), int(layer_index), int(spatial_dims), shared_embedding, place)
    try:
        return entry.layer(ctx, **kwargs)
    except TypeError as exc:  # an argument the torch layer does not take, e.g. ("batch", {"momentun": 0.1})
        raise NormSpecError(f"norm spec {spec!r}{place}: {exc}") from exc


# The torch layers by spatial dimensionality: exactly what MONAI's ``Norm[Norm.BATCH, dims]`` factory returns, without
# importing MONAI (its import costs ~7 s of CPU per process, paid by every CLI call and test worker).
_BATCH = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _batch(ctx: NormContext, **kwargs: Any) -> nn.Module:
    return _BATCH[ctx.spatial_dims](ctx.channels, **kwargs)


def _instance(ctx: NormContext, **kwargs: Any) -> nn.Module:
    if ctx.spatial_dims == 0:
        raise NormSpecError(f"instance norm{ctx.place} is undefined for (N, C) vectors; use 'layer' there")
    return _INSTANCE[ctx.spatial_dims](ctx.channels, **{"affine": True, **kwargs})


def _layer(ctx: NormContext, **kwargs: Any) -> nn.Module:
    # Per-sample over (C, H, W) with per-channel affine: GroupNorm with one group (see module docstring).
    return nn.GroupNorm(1, ctx.channels, **kwargs)


def _group(ctx: NormContext, num_groups: Any, **kwargs: Any) -> nn.Module:
    groups, channels = int(_pick(num_groups, ctx.layer_index)), ctx.channels
    if groups < 1 or channels % groups != 0:
        raise NormSpecError(
            f"group norm with num_groups={groups} cannot normalise {channels} channels{ctx.place} "
            f"(layer {ctx.layer_index}): num_groups must divide the channel count; "
            f"divisors of {channels} are {[d for d in range(1, channels + 1) if channels % d == 0]}"
        )
    return nn.GroupNorm(num_groups=groups, num_channels=channels, **kwargs)


def _conditional_batch(ctx: NormContext, num_classes: int = 0, embedding_dim: int = 128) -> nn.Module:
    if ctx.spatial_dims != 2:
        raise NormSpecError(f"conditional_batch norm{ctx.place} is only defined for (N, C, H, W) feature maps")
    num_classes = int(num_classes)
    if num_classes < 1 and ctx.shared_embedding is not None:
        num_classes = ctx.shared_embedding.num_embeddings
    if num_classes < 1:
        raise NormSpecError(f"conditional_batch norm{ctx.place} needs num_classes >= 1 (a class-conditional model)")
    return ConditionalBatchNorm2d(ctx.channels, num_classes, int(embedding_dim), ctx.shared_embedding)


def apply_weight_norm(module: nn.Module, spec: NormSpec) -> nn.Module:
    """Wrap a conv/linear with weight or spectral normalization when ``spec`` asks for it; else return it as is."""
    name, kwargs = parse_norm_spec(spec)
    wrap = NORM_REGISTRY[name].weight
    if wrap is None:
        return module
    try:
        return wrap(module, **kwargs)
    except TypeError as exc:  # an argument the parametrization does not take
        raise NormSpecError(f"norm spec {spec!r}: {exc}") from exc


def apply_norm(norm: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Call a norm layer, passing class labels to conditional ones."""
    if isinstance(norm, ConditionalBatchNorm2d):
        if y is None:
            raise ValueError("a conditional_batch norm needs class labels y")
        return norm(x, y)
    return norm(x)


register_norm("none", aliases=("identity", ""))
register_norm("batch", layer=_batch, couples_batch=True, aliases=("bn",))
register_norm("layer", layer=_layer, aliases=("ln",))
register_norm("instance", layer=_instance, aliases=("in",))
register_norm("group", layer=_group, short_arg="num_groups", defaults={"num_groups": 8}, aliases=("gn",))
register_norm("conditional_batch", layer=_conditional_batch, couples_batch=True, short_arg="num_classes",
              aliases=("cbn",))
register_norm("weight", weight=nn.utils.parametrizations.weight_norm, aliases=("wn",))
register_norm("spectral", weight=nn.utils.parametrizations.spectral_norm, aliases=("sn",))
