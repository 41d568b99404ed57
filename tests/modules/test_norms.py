"""The normalization registry: spec parsing, layers, statistics, schedules, weight parametrizations, errors."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from dagan_gn.modules.norms import (
    NORM_REGISTRY,
    ConditionalBatchNorm2d,
    NormSpecError,
    apply_norm,
    apply_weight_norm,
    format_norm_spec,
    is_batch_coupling,
    make_norm,
    norm_names,
    parse_norm_spec,
    register_norm,
)


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, ("none", {})),
        ("none", ("none", {})),
        ("", ("none", {})),
        ("identity", ("none", {})),
        ("batch", ("batch", {})),
        ("BN", ("batch", {})),
        ("ln", ("layer", {})),
        ("in", ("instance", {})),
        ("wn", ("weight", {})),
        ("sn", ("spectral", {})),
        ("cbn", ("conditional_batch", {})),
        ("group", ("group", {"num_groups": 8})),
        ("group:16", ("group", {"num_groups": 16})),
        (" gn:4 ", ("group", {"num_groups": 4})),
        ("group:16,8,4", ("group", {"num_groups": [16, 8, 4]})),
        ("conditional_batch:10", ("conditional_batch", {"num_classes": 10})),
        (("group", {"num_groups": 8}), ("group", {"num_groups": 8})),
        (["group", {"num_groups": [16, 8]}], ("group", {"num_groups": [16, 8]})),
        (("layer",), ("layer", {})),
        ({"name": "group", "num_groups": 2}, ("group", {"num_groups": 2})),
        ({"name": "spectral", "n_power_iterations": 2}, ("spectral", {"n_power_iterations": 2})),
        (("batch", {"momentum": 0.2}), ("batch", {"momentum": 0.2})),
    ],
)
def test_parse_norm_spec_forms(spec, expected):
    assert parse_norm_spec(spec) == expected


def test_parse_does_not_mutate_the_callers_spec():
    spec = {"name": "group", "num_groups": 4}
    tup = ("group", {"num_groups": 4})
    parse_norm_spec(spec)
    parse_norm_spec(tup)
    assert spec == {"name": "group", "num_groups": 4} and tup[1] == {"num_groups": 4}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("foo", "unknown normalization 'foo'"),
        ("batch:3", "takes no ':argument'"),
        ("group:x", "must be integer"),
        (("group", 8), "second element must be a dict"),
        (42, "cannot read norm spec"),
        ({"num_groups": 8}, "without a 'name' key"),
        (("wat", {}), "unknown normalization 'wat'"),
    ],
)
def test_parse_norm_spec_errors(spec, message):
    with pytest.raises(NormSpecError, match=message):
        parse_norm_spec(spec)


def test_unknown_norm_error_lists_choices_and_is_a_value_error():
    with pytest.raises(ValueError) as info:
        parse_norm_spec("batchnorm2d")
    for name in norm_names():
        assert name in str(info.value)


def test_format_and_batch_coupling():
    assert format_norm_spec(("group", {"num_groups": [16, 8, 4]})) == "group:16,8,4"
    assert format_norm_spec("gn:8") == "group:8"
    assert format_norm_spec(None) == "none"
    assert format_norm_spec("sn") == "spectral"
    assert is_batch_coupling("batch") and is_batch_coupling("conditional_batch:3")
    for spec in ["none", "layer", "instance", "group:4", "weight", "spectral"]:
        assert not is_batch_coupling(spec)


def test_make_norm_layer_types():
    assert isinstance(make_norm("batch", 8), nn.BatchNorm2d)
    assert isinstance(make_norm("batch", 8, spatial_dims=0), nn.BatchNorm1d)
    layer = make_norm("layer", 8)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 1
    inst = make_norm("instance", 8)
    assert isinstance(inst, nn.InstanceNorm2d) and inst.affine
    group = make_norm("group:4", 8)
    assert isinstance(group, nn.GroupNorm) and group.num_groups == 4 and group.num_channels == 8
    for spec in ["none", "weight", "spectral", None]:
        assert isinstance(make_norm(spec, 8), nn.Identity)
    assert isinstance(make_norm("conditional_batch:3", 8), ConditionalBatchNorm2d)
    assert make_norm(("batch", {"momentum": 0.5}), 4).momentum == 0.5


def test_make_norm_errors_name_the_layer():
    with pytest.raises(NormSpecError, match=r"num_groups=3 cannot normalise 8 channels at Net\.block\.2\.norm1"):
        make_norm("group:3", 8, where="Net.block.2.norm1")
    with pytest.raises(NormSpecError, match="divisors of 12 are"):
        make_norm("group:5", 12)
    with pytest.raises(NormSpecError, match="instance norm at head is undefined"):
        make_norm("instance", 8, spatial_dims=0, where="head")
    with pytest.raises(NormSpecError, match="momentun"):
        make_norm(("batch", {"momentun": 0.1}), 8)
    with pytest.raises(NormSpecError, match="needs num_classes >= 1"):
        make_norm("conditional_batch", 8)
    with pytest.raises(NormSpecError, match="n_power"):
        apply_weight_norm(nn.Linear(3, 3), ("spectral", {"n_power": 2}))


def test_group_schedule_picks_entry_per_layer_and_repeats_the_last():
    spec = ("group", {"num_groups": [16, 8, 4]})
    groups = [make_norm(spec, 32, layer_index=i).num_groups for i in range(5)]
    assert groups == [16, 8, 4, 4, 4]
    assert make_norm("group:16,8", 16, layer_index=1).num_groups == 8
    with pytest.raises(NormSpecError, match="empty per-layer schedule"):
        make_norm(("group", {"num_groups": []}), 8)


def _input(batch=4, channels=8, size=6):
    # Per-sample and per-channel offsets/scales so that every normalisation has something to remove.
    x = torch.randn(batch, channels, size, size)
    return x * torch.linspace(0.5, 3.0, channels)[None, :, None, None] + torch.arange(batch)[:, None, None, None] \
        + torch.linspace(-2, 2, channels)[None, :, None, None]


def _assert_standardised(t, dims):
    mean = t.mean(dim=dims)
    var = t.var(dim=dims, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)


def test_group_norm_statistics_per_sample_per_group():
    x = _input()
    out = make_norm("group:4", 8)(x)
    _assert_standardised(out.view(4, 4, 2, 6, 6), dims=(2, 3, 4))
    # ...but not per channel: the two channels of a group keep their relative offset.
    assert out.view(4, 4, 2, 36).mean(-1).abs().max() > 0.1


def test_layer_norm_statistics_per_sample_over_chw():
    out = make_norm("layer", 8)(_input())
    _assert_standardised(out, dims=(1, 2, 3))
    assert out.mean(dim=(2, 3)).abs().max() > 0.1  # channels are not standardised individually


def test_instance_norm_statistics_per_sample_per_channel():
    out = make_norm("instance", 8)(_input())
    _assert_standardised(out, dims=(2, 3))


def test_batch_norm_statistics_per_channel_over_batch():
    norm = make_norm("batch", 8).train()
    out = norm(_input())
    _assert_standardised(out, dims=(0, 2, 3))
    assert out.mean(dim=(1, 2, 3)).abs().max() > 0.1  # samples are not standardised individually


def test_conditional_batch_norm_starts_as_batch_norm_and_conditions_on_class():
    torch.manual_seed(0)
    x = _input()
    y = torch.tensor([0, 1, 2, 0])
    cbn = make_norm("conditional_batch:3", 8)
    reference = nn.BatchNorm2d(8, affine=False)
    torch.testing.assert_close(apply_norm(cbn, x, y), reference(x))
    with torch.no_grad():
        cbn.gain_table.weight[1].fill_(1.0)  # class 1: gain 2
    out = apply_norm(cbn, x, y)
    torch.testing.assert_close(out[1], 2 * reference(x)[1])
    torch.testing.assert_close(out[0], reference(x)[0])
    with pytest.raises(ValueError, match="needs class labels"):
        apply_norm(cbn, x)


def test_conditional_batch_norm_with_shared_embedding():
    emb = nn.Embedding(5, 16)
    cbn = make_norm("conditional_batch", 8, shared_embedding=emb)
    assert cbn.shared_embedding is emb
    out = apply_norm(cbn, _input(), torch.tensor([0, 1, 2, 4]))
    assert out.shape == (4, 8, 6, 6)
    loss = out.square().mean()
    loss.backward()
    assert cbn.gain.weight.grad is not None


def test_apply_weight_norm_parametrizations():
    conv = apply_weight_norm(nn.Conv2d(3, 4, 3), "weight")
    assert parametrize.is_parametrized(conv, "weight")
    names = {n for n, _ in conv.parametrizations.weight.named_parameters()}
    assert names == {"original0", "original1"}  # g and v
    lin = apply_weight_norm(nn.Linear(6, 5), "spectral")
    assert parametrize.is_parametrized(lin, "weight")
    lin.train()
    x = torch.randn(2, 6)
    for _ in range(30):  # power iterations converge
        lin(x)
    lin.eval()
    sigma = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
    assert sigma == pytest.approx(1.0, abs=1e-3)
    for spec in ["none", "batch", "layer", "instance", "group:2"]:
        plain = nn.Linear(2, 2)
        assert apply_weight_norm(plain, spec) is plain and not parametrize.is_parametrized(plain)


def test_builtin_registry():
    assert norm_names() == ("none", "batch", "layer", "instance", "group", "conditional_batch", "weight", "spectral")
    assert norm_names("weight") == ("weight", "spectral") and norm_names("none") == ("none",)
    assert [n for n, e in NORM_REGISTRY.items() if e.couples_batch] == ["batch", "conditional_batch"]


class _PixelNorm(nn.Module):
    """ProGAN's pixel norm: each feature vector scaled to unit RMS (per sample and position)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)


def test_a_norm_is_registered_with_one_call_and_used_by_the_networks(monkeypatch):
    import dagan_gn.modules.norms as norms
    from dagan_gn.nets import DAGANCritic, DAGANGenerator

    monkeypatch.setitem(NORM_REGISTRY, "pixel", None)  # both restored after the test
    monkeypatch.setitem(norms._ALIASES, "pn", None)
    register_norm("pixel", layer=lambda ctx, eps=1e-8: _PixelNorm(eps), short_arg="eps", aliases=("pn",))
    assert parse_norm_spec("pn") == ("pixel", {}) and norm_names("activation")[-1] == "pixel"
    layer = make_norm(("pixel", {"eps": 1e-6}), 8)
    assert isinstance(layer, _PixelNorm) and layer.eps == 1e-6 and not is_batch_coupling("pixel")
    out = layer(_input())
    torch.testing.assert_close(out.pow(2).mean(dim=1), torch.ones(4, 6, 6), atol=1e-4, rtol=0)
    with pytest.raises(NormSpecError, match="unexpected keyword argument 'gain'"):
        make_norm(("pixel", {"gain": 2}), 8)
    g = DAGANGenerator(image_size=64, z_dim=8, width=4, norm="pixel")
    assert any(isinstance(m, _PixelNorm) for m in g.modules())
    assert g(torch.rand(2, 1, 64, 64) * 2 - 1, torch.randn(2, 8)).shape == (2, 1, 64, 64)

    calls = []
    monkeypatch.setitem(NORM_REGISTRY, "scaled", None)

    def scaled(module, factor=0.5):
        calls.append(factor)
        with torch.no_grad():
            module.weight.mul_(factor)
        return module

    register_norm("scaled", weight=scaled)
    d = DAGANCritic(image_size=64, width=4, norm=("scaled", {"factor": 0.25}))
    assert calls and set(calls) == {0.25} and not any(isinstance(m, _PixelNorm) for m in d.modules())
    with pytest.raises(NormSpecError, match="not both"):
        register_norm("both", layer=lambda ctx: nn.Identity(), weight=scaled)
