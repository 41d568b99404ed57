"""Residual blocks: shapes per resampling mode, norm placement, weight-norm wrapping, schedules, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dagan_gn.modules.blocks import ResBlock, UNetUpBlock, activation, conv2d, critic_norm_spec, linear
from dagan_gn.modules.norms import NormSpecError


@pytest.mark.parametrize(
    "kwargs, out_shape",
    [
        (dict(resample=None), (2, 8, 8, 8)),
        (dict(resample="up"), (2, 8, 16, 16)),
        (dict(resample="down"), (2, 8, 4, 4)),
        (dict(resample="down", down_mode="stride"), (2, 8, 4, 4)),
        (dict(resample="down", optimized=True), (2, 8, 4, 4)),
    ],
)
@pytest.mark.parametrize("norm", ["none", "batch", "layer", "instance", "group:2", "weight", "spectral"])
def test_resblock_shapes_and_backward(kwargs, out_shape, norm):
    block = ResBlock(4, 8, norm=norm, **kwargs)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = block(x)
    assert out.shape == out_shape
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_resblock_identity_shortcut_and_hidden_widths():
    same = ResBlock(8, 8, norm="layer")
    assert isinstance(same.shortcut, nn.Identity)
    down = ResBlock(8, 16, resample="down")
    assert down.conv1.out_channels == 8 and down.conv2.out_channels == 16  # Gulrajani: conv_1 keeps input width
    up = ResBlock(8, 4, resample="up")
    assert up.conv1.out_channels == 4
    opt = ResBlock(3, 8, resample="down", optimized=True, norm="layer")
    assert isinstance(opt.norm1, nn.Identity) and isinstance(opt.act1, nn.Identity)
    assert isinstance(opt.norm2, nn.GroupNorm)


def test_down_shortcut_equals_gulrajani_conv_mean_pool():
    block = ResBlock(4, 6, resample="down")
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(block._shortcut(x), F.avg_pool2d(block.shortcut(x), 2), atol=1e-6, rtol=1e-5)
    up = ResBlock(4, 6, resample="up")
    torch.testing.assert_close(up._shortcut(x), up.shortcut(F.interpolate(x, scale_factor=2)), atol=1e-6, rtol=1e-5)


def test_blocks_wrap_every_conv_in_weight_norms():
    for spec in ["weight", "spectral"]:
        block = ResBlock(4, 8, resample="up", norm=spec)
        for conv in (block.conv1, block.conv2, block.shortcut):
            assert parametrize.is_parametrized(conv, "weight")
        assert isinstance(block.norm1, nn.Identity) and isinstance(block.norm2, nn.Identity)
    plain = ResBlock(4, 8, resample="up", norm="group:2")
    assert not parametrize.is_parametrized(plain.conv1)


def test_block_index_selects_group_schedule_entry():
    spec = ("group", {"num_groups": [8, 4, 2]})
    assert ResBlock(8, 8, norm=spec, block_index=0).norm1.num_groups == 8
    assert ResBlock(8, 8, norm=spec, block_index=2).norm2.num_groups == 2
    assert ResBlock(8, 8, norm=spec, block_index=7).norm2.num_groups == 2


def test_group_count_error_names_the_block():
    with pytest.raises(NormSpecError, match=r"at Critic\.blocks\.3\.norm1"):
        ResBlock(6, 8, norm="group:4", where="Critic.blocks.3")


def test_conditional_batch_block_needs_labels():
    emb = nn.Embedding(3, 8)
    block = ResBlock(4, 4, resample="up", norm="conditional_batch", shared_embedding=emb)
    x = torch.randn(2, 4, 4, 4)
    assert block(x, torch.tensor([0, 2])).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="class labels"):
        block(x)


def test_unet_up_block_with_skip_and_condition():
    block = UNetUpBlock(16, 8, 8, cond_dim=5, norm="group:4", dropout=0.5)
    x, skip, cond = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 8, 8), torch.randn(2, 5)
    out = block(x, skip, cond)
    assert out.shape == (2, 8, 8, 8)
    assert block.norm2.num_channels == 16  # the second conv sees [h, skip]
    block.eval()
    other = block(x, skip, torch.randn(2, 5))
    assert not torch.allclose(block(x, skip, cond), other)  # the condition changes the output
    with pytest.raises(ValueError, match="conditioning vector"):
        block(x, skip)
    no_skip = UNetUpBlock(16, 0, 8)
    assert no_skip(x).shape == (2, 8, 8, 8)


def test_conv_helpers_padding_and_init_are_deterministic():
    assert conv2d(3, 4, 4, 2)(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 16, 16)
    assert conv2d(3, 4, 3)(torch.zeros(1, 3, 9, 9)).shape == (1, 4, 9, 9)
    assert conv2d(4, 3, 4, 2, transposed=True)(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 16, 16)
    torch.manual_seed(3)
    a = linear(5, 7)
    torch.manual_seed(3)
    b = linear(5, 7)
    torch.testing.assert_close(a.weight, b.weight)
    assert torch.count_nonzero(a.bias) == 0


def test_activation_and_critic_norm_validation():
    assert isinstance(activation("lrelu"), nn.LeakyReLU)
    with pytest.raises(ValueError, match="unknown activation"):
        activation("gelu2")
    assert critic_norm_spec("layer", "D") == "layer"
    with pytest.raises(NormSpecError, match="generator norm"):
        critic_norm_spec("conditional_batch:3", "D")
