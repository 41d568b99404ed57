"""Membership inference (dagan_gn/metrics/membership.py): a generator that copies its training set is caught
(AUC ≈ 1), one that emits other real patches is not (AUC ≈ 0.5); DOMIAS agrees with the ``domias`` package."""

import numpy as np
import pytest
import torch
from scipy import stats

from dagan_gn.metrics.membership import (bootstrap_auc, distance_attack, domias_attack, domias_log_ratio,
                                         pca_projection, roc_auc)
from dagan_gn.metrics.memorization import MemorizationError, RandomConvFeatures


def _patches(n, seed, size=16):
    """Smooth random patches in [-1, 1] (the same kind of population for every seed)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear") * 2 - 1


def test_roc_auc_counts_ties_half_and_matches_the_definition():
    assert roc_auc(np.array([3, 2, 1, 0]), np.array([1, 1, 0, 0], bool)) == 1.0
    assert roc_auc(np.array([0, 1, 2, 3]), np.array([1, 1, 0, 0], bool)) == 0.0
    assert roc_auc(np.ones(4), np.array([1, 1, 0, 0], bool)) == 0.5
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=40), rng.random(40) < 0.5
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert roc_auc(s, y) == pytest.approx(np.mean(pairs))
    assert np.isnan(roc_auc(s, np.zeros(40, bool)))


def test_bootstrap_interval_brackets_the_auc_and_is_seeded():
    rng = np.random.default_rng(1)
    s, y = np.r_[rng.normal(0.5, 1, 60), rng.normal(0, 1, 60)], np.r_[np.ones(60, bool), np.zeros(60, bool)]
    auc, lo, hi = bootstrap_auc(s, y, n_bootstrap=300, seed=3)
    assert lo < auc < hi and 0.5 < auc < 0.8
    assert bootstrap_auc(s, y, n_bootstrap=300, seed=3) == (auc, lo, hi)


@pytest.mark.parametrize("extractor", [None, RandomConvFeatures(1, width=8, seed=0)], ids=["pixel", "feature"])
def test_a_generator_that_copies_its_training_set_is_caught(extractor):
    members, nonmembers = _patches(40, 0), _patches(40, 1)
    result = distance_attack(members, nonmembers, members.clone(), extractor=extractor, n_bootstrap=200)
    assert result.auc == 1.0 and result.ci_low > 0.95
    assert result.n_members == result.n_nonmembers == 40


@pytest.mark.parametrize("extractor", [None, RandomConvFeatures(1, width=8, seed=0)], ids=["pixel", "feature"])
def test_a_generator_that_emits_held_out_patches_leaks_nothing(extractor):
    members, nonmembers, other_real = _patches(60, 0), _patches(60, 1), _patches(120, 2)
    result = distance_attack(members, nonmembers, other_real, extractor=extractor, n_bootstrap=300)
    assert abs(result.auc - 0.5) < 0.12
    assert result.ci_low < 0.5 < result.ci_high


def test_domias_separates_copies_and_not_fresh_real_data():
    members, nonmembers, reference = _patches(40, 0), _patches(40, 1), _patches(150, 3)
    # A KDE smooths over its bandwidth (Scott's rule), so DOMIAS needs the copies to dominate their neighbourhood.
    leak = domias_attack(members, nonmembers, members.clone(), reference, n_bootstrap=200)
    assert leak.auc > 0.85 and leak.ci_low > 0.75
    fresh = domias_attack(members, nonmembers, _patches(150, 2), reference, n_bootstrap=300)
    assert abs(fresh.auc - 0.5) < 0.15 and fresh.ci_low < 0.5 < fresh.ci_high


def _package_kde_baseline(x_test, x_g, x_ref):
    """``domias.baselines.kde_baseline`` of domias 0.0.5 (Apache-2.0), eq. 2 of the paper, copied verbatim: the
    package itself needs scikit-learn, pandas and geomloss, which this project does not install."""
    p_G_approx = stats.gaussian_kde(x_g.transpose(1, 0))
    score_1 = p_G_approx.evaluate(x_test.transpose(1, 0))
    p_R_approx = stats.gaussian_kde(x_ref.transpose(1, 0))
    score_2 = score_1 / (p_R_approx.evaluate(x_test.transpose(1, 0)) + 1e-20)
    return score_1, score_2


def test_domias_score_matches_the_package_on_a_toy_case():
    try:
        from domias.baselines import kde_baseline
    except ImportError:
        kde_baseline = _package_kde_baseline
    rng = np.random.default_rng(0)
    ref, mem, non = rng.normal(size=(200, 2)), rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
    syn = np.r_[mem + rng.normal(scale=0.05, size=mem.shape), rng.normal(size=(150, 2))]
    x, y = np.r_[mem, non], np.r_[np.ones(50, bool), np.zeros(50, bool)]
    _, package = kde_baseline(x, syn, ref)
    ours = domias_log_ratio(x, syn, ref)
    np.testing.assert_allclose(ours, np.log(package), rtol=0, atol=1e-9)
    assert roc_auc(ours, y) == roc_auc(package, y) == pytest.approx(0.676)


def test_pca_projection_keeps_the_main_axis():
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(0, 10, 100), rng.normal(0, 0.1, 100)]
    p = pca_projection(torch.from_numpy(x), 1)(torch.from_numpy(x))
    assert p.shape == (100, 1) and abs(np.corrcoef(p[:, 0], x[:, 0])[0, 1]) > 0.999


def test_bad_inputs_are_named():
    a = _patches(4, 0)
    with pytest.raises(MemorizationError, match="members and non-members"):
        distance_attack(a[:0], a, a)
    with pytest.raises(MemorizationError, match="shapes differ"):
        distance_attack(a, a, _patches(4, 1, size=8))
    with pytest.raises(MemorizationError, match="reference"):
        domias_attack(a, a, a, a[:0])
