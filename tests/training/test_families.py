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
    SampleInputs,
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
    family = get_family("cifar_resnet")
    seen = []

    class G(nn.Module):
        z_dim = 4

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3 * 2 * 2)

        def forward(self, z, y=None):
            seen.append(y.clone())
            return torch.tanh(self.lin(z)).view(-1, 3, 2, 2) * 5  # tanh * 5 leaves [-1, 1]: clamped

    g = G()
    out = family.sample(g, 7, torch.Generator().manual_seed(0), num_classes=3, batch_size=4)
    rng = torch.Generator().manual_seed(0)
    z1, y1 = torch.randn(4, 4, generator=rng), torch.randint(3, (4,), generator=rng)
    z2, y2 = torch.randn(3, 4, generator=rng), torch.randint(3, (3,), generator=rng)
    with torch.no_grad():
        expected = (torch.tanh(g.lin(torch.cat([z1, z2]))).view(-1, 3, 2, 2) * 5).clamp(-1, 1)
    assert torch.equal(out, expected)
    assert torch.equal(seen[0], y1) and torch.equal(seen[1], y2)


def test_generate_matches_augments_per_seed_variants():
    """``augment.generate_variants`` is family.generate over per-row seeded noise: the same bytes (the integrator
    switches augment to the family path)."""
    from dagan_gn.jobs.augment import generate_variants, sample_noise

    torch.manual_seed(0)
    g, _ = build_networks(ModelConfig(name="dagan", image_size=64, z_dim=8, g_width=4, d_width=4, g_norm="group:2",
                                      num_classes=2))
    g.eval()
    x = torch.rand(5, 1, 64, 64) * 2 - 1
    y = torch.tensor([0, 1, 1, 0, 1])
    seeds = [11, 12, 13, 14, 15]
    old = generate_variants(g, x, seeds, y, truncation=1.5, batch_size=2, device="cpu")
    new = get_family("dagan").generate(g, SampleInputs(sample_noise(seeds, 8, 1.5), x, y), batch_size=2,
                                       device="cpu")
    assert torch.equal(old, new)


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
    from dagan_gn.training.checkpoint import load_generator

    g, loaded_cfg, _ = load_generator(tmp_path)
    assert isinstance(g, MLPGenerator) and loaded_cfg.model.name == "mlp"
    assert get_family("mlp").sample(g, 3, torch.Generator()).shape == (3, 3, 32, 32)
    assert isinstance(FAMILIES["mlp"], NoiseToImageFamily) and not isinstance(FAMILIES["mlp"], ImageToImageFamily)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 2 and "loss/critic" in rec
