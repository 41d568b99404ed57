"""Generators and critics, built from a :class:`dagan_gn.config.ModelConfig` through one registry.

    generator, critic = build_networks(cfg.model)

``NETWORKS`` maps ``ModelConfig.name`` to a builder ``(ModelConfig) -> (generator, critic)``:

* ``dagan`` — :class:`DAGANGenerator` ``G(x, z, y=None)`` and :class:`DAGANCritic` ``D(x, x_other, y=None)``;
* ``cifar_resnet`` — :class:`ResNetGenerator` ``G(z, y=None)`` and :class:`ResNetCritic` ``D(x, y=None)``
  (Gulrajani et al. 2017);
* ``cifar_dcgan`` — :class:`DCGANGenerator` / :class:`DCGANCritic`, the seed study's "Simple-CNN".

Every generator has ``z_dim``; every network has ``norm_spec``. ``g_kwargs`` / ``d_kwargs`` pass extra constructor
arguments (e.g. ``widths``, ``bottleneck_size`` for DAGAN).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .cifar_dcgan import DCGANCritic, DCGANGenerator
from .cifar_resnet import ResNetCritic, ResNetGenerator
from .dagan import DAGAN_PRESETS, DAGANCritic, DAGANGenerator, dagan_preset

__all__ = [
    "NETWORKS",
    "build_networks",
    "DAGANGenerator",
    "DAGANCritic",
    "dagan_preset",
    "DAGAN_PRESETS",
    "ResNetGenerator",
    "ResNetCritic",
    "DCGANGenerator",
    "DCGANCritic",
]


def _build_dagan(cfg) -> tuple[nn.Module, nn.Module]:
    generator = DAGANGenerator(image_size=cfg.image_size, channels=cfg.channels, z_dim=cfg.z_dim, width=cfg.g_width,
                               norm=cfg.g_norm, num_classes=cfg.num_classes, dropout=cfg.dropout,
                               **dict(cfg.g_kwargs or {}))
    critic = DAGANCritic(image_size=cfg.image_size, channels=cfg.channels, width=cfg.d_width, norm=cfg.d_norm,
                         num_classes=cfg.num_classes, **dict(cfg.d_kwargs or {}))
    return generator, critic


def _check_cifar(cfg) -> None:
    if cfg.image_size != 32:
        raise ValueError(f"model '{cfg.name}' is a 32×32 CIFAR-10 network: set model.image_size=32 "
                         f"(got {cfg.image_size})")
    if cfg.dropout:
        raise ValueError(f"model '{cfg.name}' has no dropout; model.dropout is a DAGAN option (got {cfg.dropout})")


def _cifar_builder(generator_cls: type[nn.Module], critic_cls: type[nn.Module]):
    """Builder for a 32×32 CIFAR-10 network pair: widths, norms and classes from the config, extras from
    ``g_kwargs``/``d_kwargs``."""

    def build(cfg) -> tuple[nn.Module, nn.Module]:
        _check_cifar(cfg)
        generator = generator_cls(z_dim=cfg.z_dim, width=cfg.g_width, norm=cfg.g_norm, num_classes=cfg.num_classes,
                                  channels=cfg.channels, **dict(cfg.g_kwargs or {}))
        critic = critic_cls(width=cfg.d_width, norm=cfg.d_norm, num_classes=cfg.num_classes, channels=cfg.channels,
                            **dict(cfg.d_kwargs or {}))
        return generator, critic

    return build


_build_cifar_resnet = _cifar_builder(ResNetGenerator, ResNetCritic)
_build_cifar_dcgan = _cifar_builder(DCGANGenerator, DCGANCritic)


#: ``ModelConfig.name`` → builder returning ``(generator, critic)``.
NETWORKS: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {
    "dagan": _build_dagan,
    "cifar_resnet": _build_cifar_resnet,
    "cifar_dcgan": _build_cifar_dcgan,
}


def build_networks(model_cfg) -> tuple[nn.Module, nn.Module]:
    """Build ``(generator, critic)`` for ``model_cfg`` (a :class:`dagan_gn.config.ModelConfig`).

    Raises:
        ValueError: unknown ``model_cfg.name`` (the message lists the choices) or an invalid architecture setting;
            :class:`dagan_gn.modules.norms.NormSpecError` (a ``ValueError``) for a bad norm spec.
    """
    name = str(model_cfg.name)
    if name not in NETWORKS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(NETWORKS)}")
    return NETWORKS[name](model_cfg)
