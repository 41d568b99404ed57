"""Folded resampling convolutions: identical (float64) to the literal two-step forms, gradients and the gradient
penalty's double backward included, for single layers and for whole networks with every critic norm."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.flop_counter import FlopCounterMode

from dagan_gn.modules import resample
from dagan_gn.modules.blocks import conv2d
from dagan_gn.modules.resample import (conv_mean_pool, mean_pool_folded_weight, nearest_up_conv,
                                       nearest_up_folded_weight, set_fused_resampling)
from dagan_gn.nets import DAGANCritic, DAGANGenerator, ResNetCritic, ResNetGenerator


@pytest.fixture(autouse=True)
def always_fold(monkeypatch, request):
    """These tiny inputs are below the size where the fold pays: force it, so the folded form is what is compared."""
    if "keep_threshold" not in request.keywords:
        monkeypatch.setattr(resample, "FOLD_MIN_OUTPUT_PIXELS", 0)


def _conv(cin, cout, k, norm=None):
    torch.manual_seed(3)
    return conv2d(cin, cout, k, norm=norm).double()


@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("k", [3, 1, 5])
def test_conv_mean_pool_folded_equals_conv_then_pool(size, k):
    conv = _conv(4, 6, k)
    x = torch.randn(3, 4, size, size, dtype=torch.float64)
    literal = F.avg_pool2d(conv(x), 2)
    folded = conv_mean_pool(conv, x, fused=True)
    assert folded.shape == literal.shape == (3, 6, size // 2, size // 2)
    torch.testing.assert_close(folded, literal, rtol=0, atol=1e-12)
    assert mean_pool_folded_weight(conv.weight).shape == (6, 4, k + 1, k + 1)


@pytest.mark.parametrize("size", [4, 5])
def test_nearest_up_conv_folded_equals_upsample_then_conv(size):
    conv = _conv(5, 3, 3)
    x = torch.randn(2, 5, size, size, dtype=torch.float64)
    literal = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    folded = nearest_up_conv(conv, x, fused=True)
    assert folded.shape == literal.shape == (2, 3, 2 * size, 2 * size)
    torch.testing.assert_close(folded, literal, rtol=0, atol=1e-12)
    assert nearest_up_folded_weight(conv.weight).shape == (5, 3, 4, 4)  # transposed-conv layout [I, O, 4, 4]


def test_fold_gradients_match_including_double_backward():
    """The gradient-penalty pattern through each folded layer: same input gradients and same weight gradients of a
    function of those input gradients."""
    for fn, size in ((conv_mean_pool, 8), (nearest_up_conv, 4)):
        grads = []
        for fused in (True, False):
            conv = _conv(4, 4, 3)
            x = torch.randn(2, 4, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            x.requires_grad_(True)
            out = fn(conv, x, fused=fused).relu().pow(2).sum()
            (gx,) = torch.autograd.grad(out, x, create_graph=True)
            gx.norm().backward()
            grads.append((gx.detach(), conv.weight.grad.clone(), conv.bias.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unfoldable_convs_fall_back_to_the_literal_form():
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    strided = nn.Conv2d(2, 2, 3, stride=2, padding=1).double()
    torch.testing.assert_close(conv_mean_pool(strided, x), F.avg_pool2d(strided(x), 2))
    five = _conv(2, 2, 5)  # the up fold is for 3×3 kernels only
    torch.testing.assert_close(nearest_up_conv(five, x), five(F.interpolate(x, scale_factor=2, mode="nearest")))
    with pytest.raises(ValueError, match="3×3"):
        nearest_up_folded_weight(five.weight)


def test_folded_conv_uses_the_normalised_weight_of_a_spectral_conv():
    conv = _conv(3, 3, 3, norm="spectral").eval()  # eval: no power iteration, both forms see the same σ
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(conv_mean_pool(conv, x), F.avg_pool2d(conv(x), 2), rtol=0, atol=1e-12)


def _penalty(critic, real, fake):
    """The WGAN-GP penalty in float64 (``losses.gradient_penalty`` works in float32): fixed α, last input moves."""
    reals = real if isinstance(real, tuple) else (real,)
    fakes = fake if isinstance(fake, tuple) else (fake,)
    moving = (0.3 * reals[-1] + 0.7 * fakes[-1].detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(*reals[:-1], moving).sum(), moving, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def _nets(kind: str, norm: str):
    torch.manual_seed(0)
    if kind == "resnet":
        g = ResNetGenerator(z_dim=8, width=8, norm="group:2" if norm == "none" else "batch")
        d = ResNetCritic(width=8, norm=norm)
    else:
        g = DAGANGenerator(image_size=32, channels=1, widths=(8, 8, 8), z_dim=4, norm="group:4")
        d = DAGANCritic(image_size=32, channels=1, widths=(4, 8, 8), norm=norm, down_mode="pool")
    return g.double(), d.double()


@pytest.mark.parametrize("kind", ["resnet", "dagan"])
@pytest.mark.parametrize("norm", ["none", "layer", "group:2", "weight", "spectral"])
def test_networks_fused_equal_literal_with_penalty_gradients(kind, norm):
    g, d = _nets(kind, norm)
    assert set_fused_resampling(g, True) > 0 and set_fused_resampling(d, True) > 0
    g_plain, d_plain = copy.deepcopy(g), copy.deepcopy(d)  # same weights and spectral-norm vectors
    set_fused_resampling(g_plain, False)
    set_fused_resampling(d_plain, False)
    assert all(not m.fused_resampling for m in d_plain.modules() if hasattr(m, "fused_resampling"))
    results = []
    for G, D in ((g, d), (g_plain, d_plain)):
        gen = torch.Generator().manual_seed(2)  # same inputs for both forms
        if kind == "resnet":
            z = torch.randn(3, 8, dtype=torch.float64, generator=gen)
            fake = G(z)
            real = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=gen) * 2 - 1
            critic = D
            pen_real, pen_fake = real, fake
        else:
            src = torch.rand(3, 1, 32, 32, dtype=torch.float64, generator=gen) * 2 - 1
            other = torch.rand(3, 1, 32, 32, dtype=torch.float64, generator=gen) * 2 - 1
            fake = G(src, torch.randn(3, 4, dtype=torch.float64, generator=gen))
            critic = D
            pen_real, pen_fake = (src, other), (src, fake)
        reals = pen_real if isinstance(pen_real, tuple) else (pen_real,)
        fakes = pen_fake if isinstance(pen_fake, tuple) else (pen_fake,)
        score = critic(*reals).mean() - critic(*fakes).mean()
        gp = _penalty(critic, pen_real, pen_fake)
        (score + 10 * gp).backward()
        results.append((fake.detach(), gp.detach(),
                        [p.grad.clone() for p in D.parameters()], [p.grad.clone() for p in G.parameters()]))
    (f1, gp1, dg1, gg1), (f2, gp2, dg2, gg2) = results
    torch.testing.assert_close(f1, f2, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gp1, gp2, rtol=1e-9, atol=1e-10)
    for a, b in zip(dg1 + gg1, dg2 + gg2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_fused_and_literal_networks_share_one_state_dict_layout():
    g, d = _nets("resnet", "layer")
    plain = copy.deepcopy(d)
    set_fused_resampling(plain, False)
    assert d.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(d.state_dict())  # checkpoints move freely between the two forms


@pytest.mark.keep_threshold
def test_fold_is_used_only_where_it_pays():
    """Small outputs (batch-1 inference of coarse levels) keep the literal form; training-sized ones fold."""
    conv = _conv(4, 4, 3)

    def flops(fn, x):
        with FlopCounterMode(display=False) as counter:
            fn(conv, x)
        return counter.get_total_flops()

    small_down, big_down = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(16, 4, 32, 32, dtype=torch.float64)
    # conv3×3 at full resolution: 9 taps per input pixel; folded: 16 taps per output pixel = 4 per input pixel
    assert flops(conv_mean_pool, small_down) == 2 * 9 * 4 * 4 * 64
    assert flops(conv_mean_pool, big_down) == 16 * 2 * 16 * 4 * 4 * 256
    small_up, big_up = torch.randn(1, 4, 4, 4, dtype=torch.float64), torch.randn(16, 4, 8, 8, dtype=torch.float64)
    assert flops(nearest_up_conv, small_up) == 2 * 9 * 4 * 4 * 64  # 3×3 conv on the 8×8 upsampled map
    assert flops(nearest_up_conv, big_up) < flops(lambda c, x: c(F.interpolate(x, scale_factor=2)), big_up)
    torch.testing.assert_close(nearest_up_conv(conv, big_up), conv(F.interpolate(big_up, scale_factor=2)))
