"""Generators and critics, and one builder per network family ``(ModelConfig) -> (generator, critic)``:

* :func:`build_dagan` — :class:`DAGANGenerator` ``G(x, z, y=None)`` and :class:`DAGANCritic`
  ``D(x, x_other, y=None)``;
* :func:`build_cifar_resnet` — :class:`ResNetGenerator` ``G(z, y=None)`` and :class:`ResNetCritic` ``D(x, y=None)``
  (Gulrajani et al. 2017);
* :func:`build_cifar_dcgan` — :class:`DCGANGenerator` / :class:`DCGANCritic`, the seed study's "Simple-CNN".

Which builder a ``ModelConfig.name`` uses is the job of the model-family registry
(:mod:`dagan_gn.training.families`, the one place a family is declared): use
``dagan_gn.training.build_networks(cfg.model)``.

Every generator has ``z_dim``; every network has ``norm_spec``. ``g_kwargs`` / ``d_kwargs`` pass extra constructor
arguments (e.g. ``widths``, ``bottleneck_size`` for DAGAN); an argument the constructor does not take is a
:class:`~dagan_gn.config.ConfigError` naming the key.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from torch import nn

from dagan_gn.config import ConfigError, ModelConfig
from dagan_gn.modules.norms import NormSpecError

from .cifar_dcgan import DCGANCritic, DCGANGenerator
from .cifar_resnet import ResNetCritic, ResNetGenerator
from .dagan import DAGAN_PRESETS, DAGANCritic, DAGANGenerator, dagan_preset

__all__ = [
    "build_dagan",
    "build_cifar_resnet",
    "build_cifar_dcgan",
    "construct",
    "DAGANGenerator",
    "DAGANCritic",
    "dagan_preset",
    "DAGAN_PRESETS",
    "ResNetGenerator",
    "ResNetCritic",
    "DCGANGenerator",
    "DCGANCritic",
]


def construct(cls: type[nn.Module], config_key: str, from_config: Mapping[str, Any],
              extra: Mapping[str, Any] | None) -> nn.Module:
    """``cls(**from_config, **extra)``, where ``extra`` is the ``config_key`` mapping (``model.g_kwargs``).

    A key ``cls`` does not take, or one that repeats an argument set by a top-level model key, is a
    :class:`ConfigError` naming ``config_key.<key>`` (not a ``TypeError`` traceback); a ``ValueError`` the
    constructor raises about its arguments becomes a :class:`ConfigError` too, since every argument came from the
    config.
    """
    extra = dict(extra or {})
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    repeated = sorted(set(extra) & set(from_config))
    if repeated:
        raise ConfigError(
            f"{', '.join(f'{config_key}.{k}' for k in repeated)}: set by the model's own keys "
            f"(model.image_size, model.g_norm, ...); remove it from {config_key}"
        )
    unknown = [] if takes_any else sorted(set(extra) - named)
    if unknown:
        known = sorted(named - set(from_config))
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{config_key}.{k}' for k in unknown)}: {cls.__name__} takes "
            f"{', '.join(known) or 'no extra arguments'}"
        )
    try:
        return cls(**from_config, **extra)
    except NormSpecError:
        raise
    except ValueError as exc:  # an architecture setting the network cannot build (widths, sizes, dropout, ...)
        raise ConfigError(f"model: {exc}") from exc


def build_dagan(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The conditional DAGAN: U-Net generator and pair critic."""
    generator = construct(DAGANGenerator, "model.g_kwargs", dict(
        image_size=cfg.image_size, channels=cfg.channels, z_dim=cfg.z_dim, width=cfg.g_width, norm=cfg.g_norm,
        num_classes=cfg.num_classes, dropout=cfg.dropout), cfg.g_kwargs)
    if cfg.critic_classes < 0:
        raise ConfigError("model.critic_classes=-1 (the data's class count) must be resolved from the training data "
                          "before the networks are built (the trainer does this)")
    critic = construct(DAGANCritic, "model.d_kwargs", dict(
        image_size=cfg.image_size, channels=cfg.channels, width=cfg.d_width, norm=cfg.d_norm,
        num_classes=cfg.num_classes, aux_classes=cfg.critic_classes), cfg.d_kwargs)
    return generator, critic


def _cifar_builder(generator_cls: type[nn.Module], critic_cls: type[nn.Module]):
    """Builder for a 32×32 CIFAR-10 network pair: widths, norms and classes from the config, extras from
    ``g_kwargs``/``d_kwargs``."""

    def build(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
        if cfg.image_size != 32:
            raise ConfigError(f"model '{cfg.name}' is a 32×32 CIFAR-10 network: set model.image_size=32 "
                              f"(got {cfg.image_size})")
        if cfg.dropout:
            raise ConfigError(f"model '{cfg.name}' has no dropout; model.dropout is a DAGAN option "
                              f"(got {cfg.dropout})")
        generator = construct(generator_cls, "model.g_kwargs", dict(
            z_dim=cfg.z_dim, width=cfg.g_width, norm=cfg.g_norm, num_classes=cfg.num_classes,
            channels=cfg.channels), cfg.g_kwargs)
        critic = construct(critic_cls, "model.d_kwargs", dict(
            width=cfg.d_width, norm=cfg.d_norm, num_classes=cfg.num_classes, channels=cfg.channels), cfg.d_kwargs)
        return generator, critic

    build.__doc__ = f"The 32×32 CIFAR-10 pair {generator_cls.__name__} / {critic_cls.__name__}."
    return build


build_cifar_resnet = _cifar_builder(ResNetGenerator, ResNetCritic)
build_cifar_dcgan = _cifar_builder(DCGANGenerator, DCGANCritic)
