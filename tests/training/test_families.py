"""The model-family registry: one entry per kind of GAN, one sampling path, a new family in one call."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from training_testutils import CIFAR_TINY, TinyImages, TinyPairs, make_cfg

from dagan_gn.config import ConfigError, ModelConfig
from dagan_gn.training.families import (
    FAMILIES,
    ImageToImageFamily,
    NoiseToImageFamily,
    build_networks,
    get_family,
    register_family,
)
from dagan_gn.training.models import DAGANModel, UnconditionalGANModel
from dagan_gn.training.trainer import Trainer


def test_builtin_families_and_unknown_name():
    assert {name: type(f).__name__ for name, f in FAMILIES.items()} == {
        "dagan": "ImageToImageFamily", "cifar_resnet": "NoiseToImageFamily", "cifar_dcgan": "NoiseToImageFamily"}
    assert FAMILIES["dagan"].steps is DAGANModel and FAMILIES["cifar_dcgan"].steps is UnconditionalGANModel
    assert FAMILIES["dagan"].conditions_on_image and not FAMILIES["cifar_resnet"].conditions_on_image
    with pytest.raises(ConfigError, match=r"unknown model 'biggan' \(config key model\.name\); choose one of: "
                                          r"dagan, cifar_resnet, cifar_dcgan"):
        build_networks(ModelConfig(name="biggan"))
    g, d = build_networks(ModelConfig(name="cifar_dcgan", image_size=32, channels=3, z_dim=8, g_width=4, d_width=4,
                                          g_norm="batch"))
    assert type(g).__name__ == "DCGANGenerator" and type(d).__name__ == "DCGANCritic"


class _Copy(nn.Module):
    """An image-to-image 'generator' that returns its source plus a trace of the noise and label."""

    z_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x, z, y=None):
        assert not self.training  # sampling runs in eval mode
        return x + self.scale * z.sum() + (0 if y is None else 0 * y.sum())


def test_image_to_image_sample_covers_the_dataset_in_a_seeded_order():
    family, ds, g = get_family("dagan"), TinyPairs(n=10, size=8), _Copy().train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = family.sample(g, 10, torch.Generator().manual_seed(4), dataset=ds, num_classes=2, batch_size=3)
    assert torch.equal(torch.get_rng_state(), before)  # private RNG only
    assert g.training  # mode restored
    assert out.shape == (10, 1, 8, 8) and out.dtype == torch.float32
    # every source exactly once (a permutation), in the order torch.randperm draws from the seed
    order = torch.randperm(10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out, ds.images[order])
    again = family.sample(g, 10, torch.Generator().manual_seed(4), dataset=ds, num_classes=2, batch_size=3)
    other = family.sample(g, 10, torch.Generator().manual_seed(5), dataset=ds, num_classes=2, batch_size=3)
    assert torch.equal(out, again) and not torch.equal(out, other)
    # more samples than images: the order cycles
    assert torch.equal(family.sample(g, 13, torch.Generator().manual_seed(4), dataset=ds)[10:], out[:3])
    with pytest.raises(ValueError, match="pass a non-empty dataset"):
        family.sample(g, 2, torch.Generator())


def test_noise_to_image_sample_draws_noise_then_labels_per_batch():
    """The draw order is the promise (bit-exact: the same seeded draws); the forward pass over batches of 4 + 3 is
    compared with one pass over 7 rows, which other kernels may round differently in the last bit (a tolerance)."""
    family = get_family("cifar_resnet")
    seen = []

    class G(nn.Module):
        z_dim = 4

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3 * 2 * 2)

        def forward(self, z, y=None):
            seen.append((z.clone(), y.clone()))
            return torch.tanh(self.lin(z)).view(-1, 3, 2, 2) * 5  # tanh * 5 leaves [-1, 1]: clamped

    g = G()
    out = family.sample(g, 7, torch.Generator().manual_seed(0), num_classes=3, batch_size=4)
    rng = torch.Generator().manual_seed(0)
    z1, y1 = torch.randn(4, 4, generator=rng), torch.randint(3, (4,), generator=rng)
    z2, y2 = torch.randn(3, 4, generator=rng), torch.randint(3, (3,), generator=rng)
    assert [(z.shape[0], y.shape[0]) for z, y in seen] == [(4, 4), (3, 3)]  # one forward per batch
    assert torch.equal(seen[0][0], z1) and torch.equal(seen[0][1], y1)  # noise, then labels, of batch 1
    assert torch.equal(seen[1][0], z2) and torch.equal(seen[1][1], y2)  # then batch 2's
    with torch.no_grad():
        expected = (torch.tanh(g.lin(torch.cat([z1, z2]))).view(-1, 3, 2, 2) * 5).clamp(-1, 1)
    assert out.shape == (7, 3, 2, 2) and out.abs().max() <= 1
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # the same computation, other batch shapes


def test_generate_variants_runs_each_row_on_its_own_seeded_noise():
    """``augment.generate_variants`` (family.generate over per-row seeded noise): row i is ``G(x_i, z_i, y_i)`` with
    ``z_i`` drawn from its own generator seeded ``seeds[i]`` and truncated, whatever the batch. The expected rows are
    computed here one at a time, straight from the generator and ``torch.randn``."""
    from dagan_gn.jobs.augment import generate_variants

    torch.manual_seed(0)
    g, _ = build_networks(ModelConfig(name="dagan", image_size=64, z_dim=8, g_width=4, d_width=4, g_norm="group:2",
                                      num_classes=2))
    g.eval()
    x = torch.rand(5, 1, 64, 64) * 2 - 1
    y = torch.tensor([0, 1, 1, 0, 1])
    seeds = [11, 12, 13, 14, 15]
    noise = []
    hook = g.register_forward_pre_hook(lambda module, args: noise.append(args[1].clone()))
    try:
        got = generate_variants(g, x, seeds, y, truncation=1.5, batch_size=2, device="cpu")
    finally:
        hook.remove()
    assert got.shape == (5, 1, 64, 64) and got.dtype == torch.float32
    z = torch.cat(noise)
    assert [len(n) for n in noise] == [2, 2, 1] and z.shape == (5, 8) and z.abs().max() <= 1.5
    for i, seed in enumerate(seeds):
        plain = torch.randn(1, 8, generator=torch.Generator().manual_seed(seed))[0]
        inside = plain.abs() <= 1.5  # the truncation redraws only the entries beyond the bound
        assert inside.any() and torch.equal(z[i][inside], plain[inside]), f"row {i}: not noise seeded {seed}"
        with torch.no_grad():
            expected = g(x[i : i + 1], z[i : i + 1], y[i : i + 1]).clamp(-1, 1)
        # one row at a time vs batches of 2: the same computation, kernels may round differently in the last bit
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[1], generate_variants(g, x[1:2], [99], y[1:2])[0])  # the noise matters


def test_sample_grids():
    g_dagan = _Copy()
    ds = TinyPairs(n=12, size=8)
    fixed = get_family("dagan").fixed_grid(g_dagan, ds, seed=0, num_classes=2)
    grid = get_family("dagan").sample_grid(g_dagan, fixed)
    assert grid.nrow == 8 and grid.images.shape == (8 * 8, 1, 8, 8) and grid.variants_per_source == 7
    rows = grid.images.view(8, 8, 1, 8, 8)
    assert torch.equal(rows[:, 0], grid.sources) and torch.equal(rows[:, 1:].reshape(-1, 1, 8, 8), grid.generated)
    assert torch.equal(fixed.inputs.labels.view(8, 7)[:, 0], torch.as_tensor(ds.labels)[
        torch.randperm(12, generator=torch.Generator().manual_seed(12345))[:8]])

    cfg = ModelConfig(name="cifar_dcgan", image_size=32, channels=3, z_dim=8, g_width=4, d_width=4, g_norm="batch",
                      num_classes=10)
    torch.manual_seed(0)
    g, _ = build_networks(cfg)
    family = get_family("cifar_dcgan")
    grid = family.sample_grid(g, family.fixed_grid(g, None, seed=0, num_classes=10))
    assert grid.images.shape == (64, 3, 32, 32) and grid.nrow == 10  # one class per column
    assert family.fixed_grid(g, None, seed=0).nrow == 8  # unconditional: square


def test_a_new_family_is_one_register_call(tmp_path, monkeypatch):
    """A family the package does not know trains, checkpoints and samples after one register_family call."""

    class MLPGenerator(nn.Module):
        def __init__(self, z_dim):
            super().__init__()
            self.z_dim = z_dim
            self.net = nn.Sequential(nn.Linear(z_dim, 3 * 32 * 32), nn.Tanh())

        def forward(self, z, y=None):
            return self.net(z).view(-1, 3, 32, 32)

    class MLPCritic(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1))

        def forward(self, x, y=None):
            return self.net(x).squeeze(1)

    monkeypatch.setitem(FAMILIES, "mlp", None)  # removed again after the test
    register_family(NoiseToImageFamily("mlp", build=lambda cfg: (MLPGenerator(cfg.z_dim), MLPCritic()),
                                       steps=UnconditionalGANModel, grid_size=4))
    cfg = make_cfg("train.steps=2", "train.sample_every=1", "train.checkpoint_every=2",
                   model=[m for m in CIFAR_TINY if not m.startswith("model.name")] + ["model.name=mlp"])
    trainer = Trainer(cfg, tmp_path, dataset=TinyImages(channels=3), log=lambda m: None)
    trainer.fit()
    trainer.close()
    assert isinstance(trainer.g_bare, MLPGenerator)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_0000000.png", "step_0000001.png", "step_0000002.png"]
    from dagan_gn.training.families import load_generator

    g, loaded_cfg, _ = load_generator(tmp_path)
    assert isinstance(g, MLPGenerator) and loaded_cfg.model.name == "mlp"
    assert get_family("mlp").sample(g, 3, torch.Generator()).shape == (3, 3, 32, 32)
    assert isinstance(FAMILIES["mlp"], NoiseToImageFamily) and not isinstance(FAMILIES["mlp"], ImageToImageFamily)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 2 and "loss/critic" in rec
