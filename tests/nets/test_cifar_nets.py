"""CIFAR-10 ResNet (Gulrajani et al. 2017) and DCGAN ("Simple-CNN") nets: shapes per norm, conditioning,
parameter counts of docs/networks.md, determinism, config errors."""

import pytest
import torch
from torch import nn

from dagan_gn.config import ModelConfig
from dagan_gn.modules.norms import ConditionalBatchNorm2d, NormSpecError
from dagan_gn.config import ConfigError
from dagan_gn.nets import (DCGANCritic, DCGANGenerator, ResNetCritic, ResNetGenerator, build_cifar_dcgan,
                           build_cifar_resnet)

G_NORMS = ["none", "batch", "layer", "instance", "group:4", "weight", "spectral", "conditional_batch"]
D_NORMS = ["none", "batch", "layer", "instance", "group:4", "weight", "spectral"]
FAMILIES = {"cifar_resnet": (ResNetGenerator, ResNetCritic), "cifar_dcgan": (DCGANGenerator, DCGANCritic)}
BUILDERS = {"cifar_resnet": build_cifar_resnet, "cifar_dcgan": build_cifar_dcgan}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm", G_NORMS)
def test_generator_shapes_and_backward(family, norm):
    gen_cls, _ = FAMILIES[family]
    num_classes = 3 if norm == "conditional_batch" else 0
    g = gen_cls(z_dim=16, width=8, norm=norm, num_classes=num_classes)
    y = torch.tensor([0, 2]) if num_classes else None
    out = g(torch.randn(2, 16), y)
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    out.mean().backward()
    assert all(p.grad is not None for p in g.parameters())
    assert g.z_dim == 16 and g.norm_spec == norm


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm", D_NORMS)
def test_critic_shapes_and_backward(family, norm):
    _, critic_cls = FAMILIES[family]
    d = critic_cls(width=8, norm=norm)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    score = d(x)
    assert score.shape == (2,)
    score.sum().backward()
    assert torch.isfinite(x.grad).all() and d.norm_spec == norm


@pytest.mark.parametrize("family", FAMILIES)
def test_class_conditioning(family):
    gen_cls, critic_cls = FAMILIES[family]
    for norm in ["conditional_batch", "group:4"]:  # CBN, or a class bias of the input projection
        g = gen_cls(z_dim=16, width=8, norm=norm, num_classes=4)
        with torch.no_grad():
            for module in g.modules():  # CBN gains start at zero (plain BN); give them something to say
                if isinstance(module, ConditionalBatchNorm2d):
                    module.gain.weight.normal_()
                    module.bias.weight.normal_()
        g.eval()
        z = torch.randn(2, 16)
        assert not torch.allclose(g(z, torch.tensor([0, 0])), g(z, torch.tensor([3, 3])))
        with pytest.raises(ValueError, match="class-conditional"):
            g(z)
    d = critic_cls(width=8, num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(d(x, torch.tensor([0, 0])), d(x, torch.tensor([3, 3])))
    with pytest.raises(ValueError, match="class-conditional"):
        d(x)
    with pytest.raises(NormSpecError, match="generator norm"):
        critic_cls(width=8, norm="conditional_batch")
    with pytest.raises(NormSpecError, match="num_classes >= 1"):
        gen_cls(z_dim=16, width=8, norm="conditional_batch")


# Documented in docs/networks.md (width 128, Gulrajani et al.'s CIFAR ResNet; published G ≈ 1.2 M, D ≈ 1.0 M).
RESNET_COUNTS = {
    ("G", "batch"): 1_204_483,
    ("G", "none"): 1_202_691,
    ("D", "none"): 1_053_825,
    ("D", "layer"): 1_055_617,
}
DCGAN_COUNTS = {("G", "batch"): 1_187_907, ("D", "layer"): 663_745, ("D", "none"): 662_977}


def test_resnet_parameter_counts_match_the_architecture_table():
    for (which, norm), expected in RESNET_COUNTS.items():
        net = ResNetGenerator(z_dim=128, width=128, norm=norm) if which == "G" else ResNetCritic(width=128, norm=norm)
        assert count(net) == expected, (which, norm)
    # Weight norms re-parametrise without changing the structure: g adds one scale per output channel.
    assert count(ResNetCritic(width=128, norm="spectral")) == RESNET_COUNTS[("D", "none")]


def test_resnet_structure_is_gulrajani():
    g = ResNetGenerator(width=128)
    assert g.input.out_features == 128 * 4 * 4
    assert [b.resample for b in g.blocks] == ["up", "up", "up"]
    assert g.out_conv.kernel_size == (3, 3) and g.out_conv.out_channels == 3
    d = ResNetCritic(width=128)
    assert [b.resample for b in d.blocks] == ["down", "down", None, None]
    assert d.blocks[0].optimized and not d.blocks[1].optimized
    assert d.out.in_features == 128


def test_dcgan_parameter_counts():
    for (which, norm), expected in DCGAN_COUNTS.items():
        net = DCGANGenerator(z_dim=128, width=64, norm=norm) if which == "G" else DCGANCritic(width=64, norm=norm)
        assert count(net) == expected, (which, norm)


@pytest.mark.parametrize("name", ["cifar_resnet", "cifar_dcgan"])
def test_builders_and_deterministic_init(name):
    build_networks = BUILDERS[name]
    cfg = ModelConfig(name=name, image_size=32, channels=3, z_dim=16, g_width=8, d_width=8, g_norm="batch",
                      d_norm="group:4")
    torch.manual_seed(5)
    g1, d1 = build_networks(cfg)
    torch.manual_seed(5)
    g2, d2 = build_networks(cfg)
    for a, b in ((g1, g2), (d1, d2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(g1, FAMILIES[name][0]) and isinstance(d1, FAMILIES[name][1])
    with pytest.raises(ConfigError, match="image_size=32"):
        build_networks(ModelConfig(name=name, image_size=64, channels=3))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model\.d_kwargs\.depth"):
        build_networks(ModelConfig(name=name, image_size=32, channels=3, d_kwargs={"depth": 3}))
    with pytest.raises(ConfigError, match="dropout"):
        build_networks(ModelConfig(name=name, image_size=32, channels=3, dropout=0.1))
