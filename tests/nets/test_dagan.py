"""DAGAN generator and pair critic: shapes for every norm and size, conditioning, presets, budget, errors."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dagan_gn.config import ModelConfig
from dagan_gn.modules.norms import NormSpecError
from dagan_gn.config import ConfigError
from dagan_gn.nets import DAGAN_PRESETS, DAGANCritic, DAGANGenerator, build_dagan, dagan_preset

NORMS = ["none", "batch", "layer", "instance", "group:2", "weight", "spectral"]
SIZES = [64, 128, 256]


def _tiny_g(size, norm="group:2", **kw):
    return DAGANGenerator(image_size=size, channels=1, z_dim=8, width=4, norm=norm, **kw)


def _tiny_d(size, norm="layer", **kw):
    return DAGANCritic(image_size=size, channels=1, width=4, norm=norm, **kw)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("norm", NORMS + ["conditional_batch"])
def test_generator_shapes_range_and_backward(size, norm):
    num_classes = 3 if norm == "conditional_batch" else 0
    g = _tiny_g(size, norm, num_classes=num_classes)
    x = torch.rand(2, 1, size, size) * 2 - 1
    z = torch.randn(2, 8)
    y = torch.tensor([0, 2]) if num_classes else None
    out = g(x, z, y)
    assert out.shape == x.shape
    assert out.abs().max() <= 1.0
    out.square().mean().backward()
    grads = [p.grad for p in g.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("norm", NORMS)
def test_critic_shapes_and_backward(size, norm):
    d = _tiny_d(size, norm)
    x, x2 = torch.randn(2, 1, size, size), torch.randn(2, 1, size, size, requires_grad=True)
    score = d(x, x2)
    assert score.shape == (2,)
    score.sum().backward()
    assert torch.isfinite(x2.grad).all() and x2.grad.abs().sum() > 0


def test_critic_sees_the_pair_on_channels():
    d = _tiny_d(64)
    assert d.stem.in_channels == 2
    d3 = DAGANCritic(image_size=64, channels=3, width=4)
    assert d3.stem.in_channels == 6
    with pytest.raises(ValueError, match="differ in shape"):
        d(torch.randn(2, 1, 64, 64), torch.randn(2, 1, 32, 32))
    # Swapping the pair changes the score: the critic is not symmetric in (x, x_other).
    a, b = torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64)
    assert not torch.allclose(d(a, b), d(b, a))


def test_conditional_models_use_labels():
    g = _tiny_g(64, num_classes=4).eval()
    d = _tiny_d(64, num_classes=4)
    x, z = torch.randn(2, 1, 64, 64), torch.randn(2, 8)
    y0, y1 = torch.tensor([0, 0]), torch.tensor([3, 3])
    assert not torch.allclose(g(x, z, y0), g(x, z, y1))
    with torch.no_grad():
        d.projection.weight.normal_()
    assert not torch.allclose(d(x, x, y0), d(x, x, y1))
    with pytest.raises(ValueError, match="class-conditional"):
        g(x, z)
    with pytest.raises(ValueError, match="class-conditional"):
        d(x, x)


def test_noise_changes_output_and_dropout_only_in_training():
    g = _tiny_g(64, dropout=0.3)
    x = torch.randn(2, 1, 64, 64)
    z = torch.randn(2, 8)
    g.eval()
    assert torch.equal(g(x, z), g(x, z))
    assert not torch.allclose(g(x, z), g(x, torch.randn(2, 8)))
    g.train()
    assert not torch.allclose(g(x, z), g(x, z))


def test_generator_input_checks():
    g = _tiny_g(64)
    with pytest.raises(ValueError, match=r"expects x of shape \[B, 1, 64, 64\]"):
        g(torch.randn(2, 1, 32, 32), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"expects z of shape \[2, 8\]"):
        g(torch.randn(2, 1, 64, 64), torch.randn(2, 9))
    with pytest.raises(ValueError, match="must have 4 entries"):
        DAGANGenerator(image_size=64, widths=[8, 8, 8])
    with pytest.raises(ValueError, match="power of two"):
        DAGANGenerator(image_size=96)
    with pytest.raises(ValueError, match="needs num_classes > 0"):
        DAGANGenerator(image_size=64, width=4, norm="conditional_batch")
    with pytest.raises(NormSpecError, match="generator norm"):
        DAGANCritic(image_size=64, norm="conditional_batch")


def test_group_count_error_names_the_layer():
    with pytest.raises(NormSpecError, match=r"DAGANGenerator\.down\.0\.norm1"):
        DAGANGenerator(image_size=64, widths=[6, 8, 16, 32], norm="group:4")
    with pytest.raises(NormSpecError, match=r"DAGANCritic\.blocks\.0\.norm1"):
        DAGANCritic(image_size=64, widths=[6, 8, 16, 32], norm="group:4")


def test_per_block_group_schedule():
    g = DAGANGenerator(image_size=64, width=8, norm=("group", {"num_groups": [8, 4, 2]}), stem_factor=2)
    assert g.down[0].norm1.num_groups == 8
    assert g.down[1].norm1.num_groups == 4
    assert g.down[2].norm1.num_groups == 2
    assert g.up[0].norm1.num_groups == 2  # schedule's last entry repeats


def test_stem_factor_one_and_explicit_widths():
    g = DAGANGenerator(image_size=64, z_dim=8, stem_factor=1, widths=[4, 8, 8, 16, 16], norm="group:2")
    assert g(torch.randn(1, 1, 64, 64), torch.randn(1, 8)).shape == (1, 1, 64, 64)
    assert g.widths == [4, 8, 8, 16, 16]


def test_attributes_and_build_dagan():
    cfg = ModelConfig(name="dagan", image_size=64, z_dim=16, g_width=4, d_width=4, g_norm="group:2",
                      d_norm="instance", num_classes=2, dropout=0.1, g_kwargs={"z_channels": 4},
                      d_kwargs={"down_mode": "pool"})
    g, d = build_dagan(cfg)
    assert isinstance(g, DAGANGenerator) and isinstance(d, DAGANCritic)
    assert g.z_dim == 16 and g.z_channels == 4 and g.norm_spec == "group:2" and d.norm_spec == "instance"
    assert d.blocks[0].down_mode == "pool"
    x = torch.randn(2, 1, 64, 64)
    y = torch.tensor([0, 1])
    assert d(x, g(x, torch.randn(2, 16), y), y).shape == (2,)


def test_config_errors_name_the_key():
    """An unknown or repeated g_kwargs/d_kwargs key, or an architecture the net cannot build, is a one-line
    ConfigError naming the key (not a TypeError traceback)."""
    cfg = ModelConfig(name="dagan", image_size=64, z_dim=8, g_width=4, d_width=4, g_norm="group:2")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model\.g_kwargs\.z_chanels: DAGANGenerator takes .*"
                                          r"z_channels"):
        build_dagan(dataclasses.replace(cfg, g_kwargs={"z_chanels": 4}))
    with pytest.raises(ConfigError, match=r"model\.d_kwargs\.downmode"):
        build_dagan(dataclasses.replace(cfg, d_kwargs={"downmode": "pool"}))
    with pytest.raises(ConfigError, match=r"model\.g_kwargs\.norm: set by the model's own keys"):
        build_dagan(dataclasses.replace(cfg, g_kwargs={"norm": "batch"}))
    with pytest.raises(ConfigError, match=r"^model: DAGANGenerator: widths \[4, 8\] must have"):
        build_dagan(dataclasses.replace(cfg, g_kwargs={"widths": [4, 8]}))
    with pytest.raises(NormSpecError, match="num_groups must divide"):
        build_dagan(dataclasses.replace(cfg, g_norm="group:3"))


def test_deterministic_init_given_seed():
    def state(seed):
        torch.manual_seed(seed)
        g, d = build_dagan(ModelConfig(name="dagan", **dagan_preset("tiny")))
        return {**g.state_dict(), **{"d." + k: v for k, v in d.state_dict().items()}}

    a, b, c = state(1), state(1), state(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


def _gflops(module, *inputs):
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / 1e9


def test_presets_and_compute_budget():
    assert set(DAGAN_PRESETS) == {"tiny", "64", "128", "256"}
    with pytest.raises(ValueError, match="unknown DAGAN preset"):
        dagan_preset("512")
    sizes = {}
    for name in DAGAN_PRESETS:
        overrides = dagan_preset(name)
        overrides["g_kwargs"]["mutated"] = True  # a copy: the registry entry must not change
        assert "mutated" not in DAGAN_PRESETS[name]["g_kwargs"]
        sizes[name] = overrides["image_size"]
    assert sizes == {"tiny": 64, "64": 64, "128": 128, "256": 256}
    g, _ = build_dagan(ModelConfig(name="dagan", **dagan_preset("tiny")))
    tiny = _gflops(g, torch.zeros(1, 1, 64, 64), torch.zeros(1, g.z_dim))
    assert 0.05 < tiny < 1.0  # "a few hundred MFLOP"
    # The 256-px default must stay within 20 GFLOP per patch (counted on the meta device: no compute).
    with torch.device("meta"):
        g, _ = build_dagan(ModelConfig(name="dagan", **dagan_preset("256")))
        big = _gflops(g, torch.zeros(1, 1, 256, 256), torch.zeros(1, g.z_dim))
    assert big <= 20.0


def test_pixel_shuffle_output_starts_without_checkerboard():
    """ICNR init: the four sub-pixels of each 2×2 output cell start equal (a nearest upsampling of a half-res map)."""
    g = _tiny_g(64, norm="group:2", input_residual=False).eval()
    out = g(torch.randn(1, 1, 64, 64), torch.randn(1, 8))
    cells = torch.nn.functional.pixel_unshuffle(out, 2)  # [1, 4, 32, 32]: the 4 sub-pixels per cell
    torch.testing.assert_close(cells, cells[:, :1].expand_as(cells))


def test_input_residual_starts_near_the_source_patch():
    """With the input as the last skip the untrained output tracks x far better than the plain U-Net output."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 64, 64) * 1.6 - 0.8
    z = torch.randn(4, 8)
    residual = _tiny_g(64, norm="group:2").eval()
    torch.manual_seed(0)
    plain = _tiny_g(64, norm="group:2", input_residual=False).eval()
    with torch.no_grad():
        err_residual = (residual(x, z) - x).abs().mean().item()
        err_plain = (plain(x, z) - x).abs().mean().item()
    corr = torch.corrcoef(torch.stack([residual(x, z).flatten(), x.flatten()]))[0, 1].item()
    assert corr > 0.8, corr
    assert err_residual < 0.5 * err_plain, (err_residual, err_plain)


def test_residual_gain_scales_the_initial_change_of_the_source():
    x = torch.rand(2, 1, 64, 64) * 1.6 - 0.8
    z = torch.randn(2, 8)
    changes = []
    for gain in (0.1, 1.0):
        torch.manual_seed(0)
        g = _tiny_g(64, residual_gain=gain).eval()
        assert g.residual_gain == gain
        with torch.no_grad():
            changes.append((g(x, z) - x).abs().mean().item())
    assert changes[0] < 0.5 * changes[1], changes
    assert _tiny_g(64, input_residual=False).residual_gain == 1.0


def test_noise_maps_at_decoder_levels_are_a_deterministic_function_of_z():
    torch.manual_seed(0)
    g = DAGANGenerator(image_size=64, z_dim=8, width=4, norm="group:2", noise_maps=2, noise_map_max_size=16).eval()
    # 64 px, stem 2: levels 32, 16, 8, 4 px; decoder stages at 8, 16, 32 px; maps only up to 16 px
    assert g.noise_map_sizes == [8, 16, 0]
    assert {k for k in g.state_dict() if k.startswith("noise_projection")} == {
        "noise_projection_0", "noise_projection_1"}
    assert g.up[1].conv2.in_channels == 2 * g.widths[1] + 2
    x, z = torch.rand(2, 1, 64, 64) * 2 - 1, torch.randn(2, 8)
    with torch.no_grad():
        a, b, c = g(x, z), g(x, z.clone()), g(x, torch.randn(2, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    other = DAGANGenerator(image_size=64, z_dim=8, width=4, norm="group:2", noise_maps=2, noise_map_max_size=16)
    other.load_state_dict(g.state_dict())  # the projections travel with the weights
    with torch.no_grad():
        assert torch.equal(other.eval()(x, z), a)
    with pytest.raises(ValueError, match="noise_maps"):
        _tiny_g(64, noise_maps=-1)


def test_smooth_output_removes_the_nyquist_checkerboard_of_the_generated_part():
    x, z = torch.rand(2, 1, 64, 64) * 2 - 1, torch.randn(2, 8)

    def checkerboard(smooth: bool) -> float:
        torch.manual_seed(0)
        g = _tiny_g(64, input_residual=False, smooth_output=smooth).eval()
        with torch.no_grad():
            # sub-pixel kernels that differ (small, so tanh stays linear): PixelShuffle alone draws a checkerboard
            g.out_conv.weight.normal_(std=0.01)
            out = g(x, z)
        a, b, c, d = torch.nn.functional.pixel_unshuffle(out, 2).unbind(1)
        return float((a - b - c + d)[:, 2:-2, 2:-2].abs().mean() / (out - out.mean()).abs().mean())

    rough, smooth = checkerboard(False), checkerboard(True)
    assert rough > 0.3 and smooth < 0.15 * rough, (rough, smooth)  # measured: 2.29 -> 0.18
    g = _tiny_g(64, smooth_output=True)
    assert "smoothing_kernel" not in g.state_dict()  # a constant, not a weight


def test_warp_output_adds_two_flow_channels_and_checks_its_bounds():
    plain, warped = _tiny_g(64), _tiny_g(64, warp=0.1, warp_grid=4)
    assert plain.out_conv.out_channels == 4 and warped.out_conv.out_channels == 3 * 4  # (2 flow + 1 image) x 2²
    with pytest.raises(ValueError, match="warp must be"):
        _tiny_g(64, warp=0.6)
    with pytest.raises(ValueError, match="warp_grid"):
        _tiny_g(64, warp=0.1, warp_grid=0)


def test_deform_with_zero_flow_is_the_identity_and_a_constant_flow_shifts_by_whole_pixels():
    g = _tiny_g(32, warp=0.1, warp_grid=4)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(g.deform(x, torch.zeros(2, 2, 32, 32)), x, atol=1e-5, rtol=0)
    # displacement d (a fraction of the side) is 2d in grid units = tanh(raw) * 2 * warp: one pixel right is 1/32
    raw = torch.atanh(torch.tensor((1 / 32) / 0.1))
    flow = torch.zeros(2, 2, 32, 32)
    flow[:, 0] = raw  # x displacement: each output pixel samples the input one pixel to its right
    shifted = g.deform(x, flow)
    torch.testing.assert_close(shifted[..., :-1], x[..., 1:], atol=1e-4, rtol=0)


def test_deform_never_moves_a_pixel_further_than_warp():
    g = _tiny_g(32, warp=0.125, warp_grid=4)
    x = torch.zeros(1, 1, 32, 32) - 1
    x[..., 16, 16] = 1.0  # one bright pixel; a huge flow pushes it as far as the bound allows
    flow = torch.full((1, 2, 32, 32), 50.0)
    out = g.deform(x, flow)
    bright = (out > 0).nonzero()[:, -2:].float()
    assert len(bright) >= 1
    # tanh saturates at warp · side = 4 px: the bright pixel moves 4 px up-left, not off the image
    assert torch.all((bright - torch.tensor([12.0, 12.0])).abs() <= 1.0), bright


def test_warp_generator_keeps_the_source_structure_at_init_and_differs_per_noise():
    torch.manual_seed(0)
    g = _tiny_g(32, warp=0.1, warp_grid=4, smooth_output=True).eval()
    x = torch.rand(3, 1, 32, 32) * 1.6 - 0.8
    with torch.no_grad():
        a, b = g(x, torch.randn(3, 8)), g(x, torch.randn(3, 8))
    assert a.shape == x.shape and a.abs().max() < 1
    assert not torch.equal(a, b)
    corr = torch.corrcoef(torch.stack([a.flatten(), x.flatten()]))[0, 1].item()
    assert corr > 0.8, corr
