"""Tests of dagan_gn/metrics/diversity.py: distances, pairwise means, the real-pair scale and the ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dagan_gn.metrics.diversity import (
    PenultimateFeatures,
    diversity_ratios,
    feature_l2,
    group_by_source,
    mean_pairwise,
    mean_source_distance,
    ms_ssim_distance,
    ms_ssim_scales,
    pixel_l1,
    same_class_real_pairs,
    source_distance_ratios,
)
from dagan_gn.metrics.downstream import build_classifier
from dagan_gn.metrics.memorization import embed

SIZE = 32
N_CLASSES = 3


def class_images(n_per_class: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent blurry random images in [-1, 1] whose class sets the blob scale and brightness, so classes
    differ and images within a class vary (a stand-in for patches of three tissue types)."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c, coarse in enumerate((4, 8, 16)):
        base = torch.randn(n_per_class, 1, coarse, coarse, generator=g)
        x = torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)
        images.append(torch.tanh(0.8 * x + 0.3 * (c - 1)))
        labels.append(torch.full((n_per_class,), c))
    return torch.cat(images), torch.cat(labels)


@pytest.fixture(scope="module")
def embedder():
    """The penultimate embedding of a seeded (untrained) MONAI ResNet: a fixed feature space."""
    torch.manual_seed(0)
    model = build_classifier(N_CLASSES, 1, SIZE, width=8)
    features = PenultimateFeatures(model)
    return lambda x: embed(x.reshape(-1, *x.shape[-3:]), features).reshape(*x.shape[:-3], -1)


def spaces(embedder):
    """(name, distance, transform to that space) for the three spaces `dagan assess` reports."""
    ident = lambda x: x  # noqa: E731
    return [("pixel", pixel_l1, ident), ("ms_ssim", ms_ssim_distance, ident), ("feature", feature_l2, embedder)]


# --------------------------------------------------------------------------------------------- distances


def test_pixel_l1_is_on_the_unit_intensity_scale():
    a = torch.full((2, 1, 4, 4), -1.0)  # intensity 0
    b = torch.stack([torch.full((1, 4, 4), 0.0), torch.full((1, 4, 4), 1.0)])  # intensity 0.5 and 1
    assert pixel_l1(a, b).tolist() == pytest.approx([0.5, 1.0])
    assert pixel_l1(a, a).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="same shape"):
        pixel_l1(a, b[:1])


@pytest.mark.parametrize("size,scales", [(8, 1), (28, 2), (32, 2), (64, 3), (128, 4), (256, 5)])
def test_ms_ssim_scales_follow_the_image_size(size, scales):
    n, kernel = ms_ssim_scales(size)
    assert n == scales
    assert kernel <= size and kernel % 2 == 1
    if n > 1:
        assert size // 2 ** (n - 1) >= kernel  # the coarsest level still holds the window


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 1), (256, 1)])
def test_ms_ssim_distance_zero_for_copies_and_grows_with_noise(size, channels):
    g = torch.Generator().manual_seed(size)
    x = torch.tanh(torch.nn.functional.interpolate(torch.randn(3, channels, 8, 8, generator=g), size=size,
                                                   mode="bilinear", align_corners=False))
    assert ms_ssim_distance(x, x).tolist() == [0.0, 0.0, 0.0]
    noise = torch.randn(x.shape, generator=g)
    d = [ms_ssim_distance(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.02, 0.1, 0.4)]
    assert 0 < d[0] < d[1] < d[2] <= 1.0


def test_feature_l2_and_penultimate_features_match_the_classifier_head():
    torch.manual_seed(0)
    for arch in ("resnet", "densenet"):
        model = build_classifier(2, 1, 32, arch=arch, width=4)
        model.train()
        feats = PenultimateFeatures(model)
        x = torch.randn(5, 1, 32, 32)
        f = feats(x)
        assert f.shape == (5, feats.dim)
        assert model.training  # restored after the eval-mode forward
        with torch.no_grad():
            head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
            assert torch.allclose(head(f), model.eval()(x), atol=1e-5)
        # Eval mode: an image's embedding does not depend on its batch.
        assert torch.allclose(feats(x[:1]), f[:1], atol=1e-5)
    a, b = torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    assert feature_l2(a, b).tolist() == pytest.approx([5.0, 1.0])
    with pytest.raises(ValueError, match="nn.Linear"):
        PenultimateFeatures(torch.nn.Conv2d(1, 1, 3))


# --------------------------------------------------------------------------------------------- aggregates


def test_mean_pairwise_and_source_distance_by_hand():
    # One source, 3 one-pixel variants at intensities 0.5, 0.6, 0.8 ([-1, 1]: 0, 0.2, 0.6).
    variants = torch.tensor([0.0, 0.2, 0.6]).view(1, 3, 1, 1, 1)
    assert mean_pairwise(variants, pixel_l1).tolist() == pytest.approx([(0.1 + 0.3 + 0.2) / 3])
    source = torch.tensor([-0.2]).view(1, 1, 1, 1)
    assert mean_source_distance(source, variants, pixel_l1).tolist() == pytest.approx([(0.1 + 0.2 + 0.4) / 3])
    # Several sources are independent of each other; fewer than 2 variants → NaN.
    two = torch.cat([variants, variants + 0.2])
    assert mean_pairwise(two, pixel_l1).tolist() == pytest.approx([0.2, 0.2])
    assert math.isnan(mean_pairwise(variants[:, :1], pixel_l1).item())
    with pytest.raises(ValueError, match="do not match"):
        mean_source_distance(source, variants.view(3, 1, 1, 1, 1), pixel_l1)


def test_same_class_real_pairs_exact_sampled_seeded_and_missing_classes():
    images = torch.tensor([0.0, 0.2, 0.6, 0.9, -0.5]).view(5, 1, 1, 1)
    labels = [0, 0, 0, 1, 2]
    ref = same_class_real_pairs(images, labels, pixel_l1, n_pairs=3)
    assert set(ref) == {0}  # classes 1 and 2 have a single image
    assert ref[0] == pytest.approx((0.1 + 0.3 + 0.2) / 3)  # 3 pairs ≤ n_pairs: all of them, exactly

    imgs, labs = class_images(40, seed=1)
    a = same_class_real_pairs(imgs, labs, pixel_l1, n_pairs=200, seed=5)
    assert a == same_class_real_pairs(imgs, labs, pixel_l1, n_pairs=200, seed=5)
    assert a != same_class_real_pairs(imgs, labs, pixel_l1, n_pairs=200, seed=6)
    # Sampled pairs never pair an image with itself: with distinct images every pair distance is > 0.
    is_same = lambda x, y: (x == y).flatten(1).all(1).float()  # noqa: E731
    assert max(same_class_real_pairs(imgs, labs, is_same, n_pairs=500).values()) == 0.0
    # One class's value does not depend on the other classes being present.
    only0 = same_class_real_pairs(imgs[labs == 0], labs[labs == 0], pixel_l1, n_pairs=200, seed=5)
    assert only0[0] == a[0]


def test_ratios_nan_for_undefined_classes_and_reference_reuse():
    real, real_labels = class_images(20, seed=2)
    keep = real_labels != 2
    real, real_labels = torch.cat([real[keep], real[~keep][:1]]), torch.cat([real_labels[keep], torch.tensor([2])])
    variants = class_images(4, seed=3)[0].view(3, 4, 1, SIZE, SIZE)
    labels = torch.tensor([0, 1, 2])
    r = diversity_ratios(variants, labels, real, real_labels)
    assert torch.isfinite(r[:2]).all() and math.isnan(r[2].item())  # class 2 has one real image
    ref = same_class_real_pairs(real, real_labels, pixel_l1)
    torch.testing.assert_close(diversity_ratios(variants, labels, None, None, reference=ref), r, equal_nan=True)
    s = source_distance_ratios(variants[:, 0], variants[:, 1:], labels, None, None, reference=ref)
    assert torch.isfinite(s[:2]).all() and math.isnan(s[2].item())
    zero = diversity_ratios(variants, labels, None, None, reference={0: 0.0, 1: 1.0, 2: 1.0})
    assert math.isnan(zero[0].item())  # a zero real-pair scale is undefined, not infinite
    with pytest.raises(ValueError, match="reference"):
        diversity_ratios(variants, labels, None, None)


# --------------------------------------------------------------------------------------------- the contract


def test_copy_set_scores_zero_in_all_three_spaces(embedder):
    real, real_labels = class_images(30, seed=10)
    sources, source_labels = class_images(4, seed=11)
    copies = sources.unsqueeze(1).expand(-1, 5, -1, -1, -1).contiguous()
    for name, dist, to_space in spaces(embedder):
        r, v, s = to_space(real), to_space(copies), to_space(sources)
        div = diversity_ratios(v, source_labels, r, real_labels, dist, n_pairs=200)
        src = source_distance_ratios(s, v, source_labels, r, real_labels, dist, n_pairs=200)
        assert div.abs().max() < 1e-4, name
        assert src.abs().max() < 1e-4, name


def test_real_heldout_patches_grouped_as_variants_score_about_one(embedder):
    """Held-out real images of one class, grouped 4 at a time as if they were variants, are exactly as varied as
    real pairs, so the mean ratio estimates 1. The tolerance comes from the sample sizes: the standard error of the
    mean over the S independent groups, plus that of the per-class real-pair scale (a U-statistic over n images per class has
    variance at most 2σ²/n (Hoeffding), and drawing n_pairs of its pairs adds σ²/n_pairs); 4 standard errors."""
    n_train, n_groups, v, n_pairs = 150, 15, 4, 500
    real, real_labels = class_images(n_train, seed=20)
    held, held_labels = class_images(n_groups * v, seed=21)  # sorted by class: consecutive groups share one
    variants = held.view(N_CLASSES * n_groups, v, 1, SIZE, SIZE)
    group_labels = held_labels.view(-1, v)[:, 0]
    for name, dist, to_space in spaces(embedder):
        r, var = to_space(real), to_space(variants)
        ref = same_class_real_pairs(r, real_labels, dist, n_pairs=n_pairs, seed=0)
        ratios = diversity_ratios(var, group_labels, None, None, dist, reference=ref)
        se_groups = ratios.std().item() / math.sqrt(len(ratios))
        # Each class holds 1/3 of the groups and has its own, independent scale error.
        rel_se_ref = math.sqrt(sum((_pair_sd(r[real_labels == c], dist) / ref[c]) ** 2 for c in ref)
                               * (2 / n_train + 1 / n_pairs)) / len(ref)
        tol = 4 * math.hypot(se_groups, rel_se_ref)
        assert tol < 0.15, (name, tol)  # the check has power: a 15 % bias would fail
        assert abs(ratios.mean().item() - 1.0) < tol, (name, ratios.mean().item(), tol)
        # Distance to a "source" (another held-out image of the class) is also ≈ 1.
        src = source_distance_ratios(var[:, 0], var[:, 1:], group_labels, None, None, dist, reference=ref)
        assert abs(src.mean().item() - 1.0) < 2 * tol, name


def _pair_sd(x: torch.Tensor, dist) -> float:
    """Standard deviation of the distance between disjoint pairs of ``x`` (the σ of one pair distance)."""
    half = len(x) // 2
    return dist(x[:half], x[half : 2 * half]).std().item()


def test_noise_perturbed_copies_have_small_diversity_growing_with_the_noise(embedder):
    real, real_labels = class_images(40, seed=30)
    sources, source_labels = class_images(3, seed=31)
    g = torch.Generator().manual_seed(32)
    noise = torch.randn(len(sources), 6, 1, SIZE, SIZE, generator=g)
    for name, dist, to_space in spaces(embedder):
        r = to_space(real)
        ref = same_class_real_pairs(r, real_labels, dist, n_pairs=300)
        means = []
        for sigma in (0.01, 0.05, 0.2):
            v = to_space((sources.unsqueeze(1) + sigma * noise).clamp(-1, 1))
            means.append(diversity_ratios(v, source_labels, None, None, dist, reference=ref).mean().item())
        assert 0 < means[0] < means[1] < means[2], (name, means)
        assert means[0] < 0.3, (name, means)  # 1 % noise is far less varied than real data


def test_ratios_on_the_training_sample_grid_shape():
    """The shape `dagan train` logs: 8 sources × 7 variants at 64 px (its speed is in benchmarks/diversity.py)."""
    g = torch.Generator().manual_seed(0)
    variants = torch.rand(8, 7, 1, 64, 64, generator=g) * 2 - 1
    real = torch.rand(64, 1, 64, 64, generator=g) * 2 - 1
    labels, real_labels = np.arange(8) % 3, np.arange(64) % 3
    a = diversity_ratios(variants, labels, real, real_labels)
    assert a.shape == (8,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    # Independent uniform noise images: variants are as varied as the "real" ones.
    assert a.mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(a, diversity_ratios(variants, labels, real, real_labels))


def test_group_by_source_orders_rows_by_source_then_variant():
    source_index = [7, 3, 7, 3, 7, 5]
    variant = [2, 1, 0, 0, 1, 0]
    sources, rows = group_by_source(source_index, variant)
    assert sources.tolist() == [3, 5, 7]
    assert [r.tolist() for r in rows] == [[3, 1], [5], [2, 4, 0]]
    with pytest.raises(ValueError, match="3 source indices for 2 variant numbers"):
        group_by_source([1, 2, 3], [0, 1])


def test_source_identity_on_known_geometry():
    from dagan_gn.metrics.diversity import source_identity

    # Sources on a line at 0, 10, 20 (classes 0, 0, 1); variants placed by hand.
    sources = torch.tensor([[0.0], [10.0], [20.0]])
    variants = torch.tensor([
        [[1.0], [4.0]],    # source 0: both nearest to itself
        [[6.0], [14.0]],   # source 1: both nearest to 10 (own; 14 is 6 from source 2)
        [[16.0], [9.0]],   # source 2: 16 is nearest to 20 (own); 9 is nearest to source 1 (another class)
    ])
    labels = [0, 0, 1]
    out = source_identity(sources, variants, labels, p=1.0)
    assert out["nearest_is_source"].tolist() == [[True, True], [True, True], [True, False]]
    # other-class distance: sources 0/1 compete only with source 2 (class 1), source 2 with sources 0 and 1
    assert out["other_class_distance"].tolist() == [[19.0, 16.0], [14.0, 6.0], [6.0, 1.0]]
    assert out["closer_than_other_class"].tolist() == [[True, True], [True, True], [True, False]]
    # an extra real image of class 1 at 5 beats variants 4 (4 from its source, 1 from the extra) and 6 (4 vs 1)
    extra = source_identity(sources, variants, labels, torch.tensor([[5.0]]), [1], p=1.0)
    assert extra["closer_than_other_class"].tolist() == [[True, False], [False, True], [True, False]]
    # same-class extras never compete
    same = source_identity(sources, variants, labels, torch.tensor([[5.0]]), [0], p=1.0)
    assert same["closer_than_other_class"].tolist() == out["closer_than_other_class"].tolist()
    with pytest.raises(ValueError, match="other_labels"):
        source_identity(sources, variants, labels, torch.tensor([[5.0]]))
