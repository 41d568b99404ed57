"""Tests of dagan_gn/metrics/memorization.py: chunked nearest neighbours, planted copies, patient-copy flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dagan_gn.metrics.memorization import (
    RandomConvFeatures,
    check_memorization,
    nearest_neighbors,
)
from dagan_gn.jobs.memorization import write_memorization_report


def smooth_images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Independent blurry random images in [-1, 1] (a crude stand-in for tissue patches)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return torch.tanh(x + 0.1 * torch.randn(n, 1, size, size, generator=g))


def test_nearest_neighbors_matches_brute_force_and_chunking():
    q = torch.randn(37, 3, 4, 4)
    r = torch.randn(53, 3, 4, 4)
    d_full = torch.cdist(q.flatten(1).double(), r.flatten(1).double())
    want_d, want_i = d_full.min(1)
    for chunk in (1, 7, 1000):
        d, i = nearest_neighbors(q, r, chunk_size=chunk)
        # a nearest neighbour (float32 distances over other chunk shapes may round differently: on a near-tie another
        # reference at the same distance is as good), and its distance
        assert torch.allclose(d_full[torch.arange(len(q)), i], want_d, atol=1e-5)
        assert torch.allclose(d.double(), want_d, atol=1e-5)
    d, i = nearest_neighbors(r[[5, 9]], r, chunk_size=8)
    assert i.tolist() == [5, 9] and d.tolist() == [0.0, 0.0]  # exact copies have distance exactly 0


def test_nearest_neighbors_errors():
    with pytest.raises(ValueError, match="empty"):
        nearest_neighbors(torch.randn(2, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match="values"):
        nearest_neighbors(torch.randn(2, 4), torch.randn(3, 5))


def test_random_conv_features_deterministic_and_normalised():
    x = smooth_images(4, 0)
    a, b = RandomConvFeatures(seed=3)(x), RandomConvFeatures(seed=3)(x)
    assert torch.equal(a, b) and a.shape == (4, 32 * 16 * 2)
    assert torch.allclose(a.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.equal(a, RandomConvFeatures(seed=4)(x))


def test_planted_copy_flagged_independent_sample_not():
    train = smooth_images(60, seed=1)
    heldout = smooth_images(40, seed=2)
    independent = smooth_images(1, seed=3)
    # synthetic[0]: exact copy of train[7]; [1]: a new independent sample; [2]: copy of train[20] = its own source
    synthetic = torch.cat([train[7:8], independent, train[20:21]])
    train_patient = np.array([f"P{i // 6}" for i in range(60)])  # 10 patients, 6 patches each
    source_index = np.array([30, 31, 20])  # [0] claims train[30] (patient P5) as source but copies P1's patch
    source_patient = train_patient[source_index]
    rep = check_memorization(synthetic, train, heldout, source_index=source_index, source_patient=source_patient,
                             train_patient=train_patient, percentile=1.0, chunk_size=16)
    assert set(rep.spaces) == {"pixel", "feature"}
    for space in rep.spaces.values():
        assert space.near_copy_indices == [0, 2], space.space
        assert space.patient_copy_indices == [0]  # a different patient's patch, reproduced
        assert space.source_copy_fraction == pytest.approx(1 / 3)
        assert space.near_copy_fraction == pytest.approx(2 / 3)
        assert space.threshold > 0 and np.isfinite(space.median_ratio)
    assert rep.per_sample["pixel_nn_index"][:1] == [7] and rep.per_sample["pixel_nn_distance"][0] == 0.0
    assert rep.per_sample["pixel_nn_distance"][1] > rep.spaces["pixel"].threshold
    assert not rep.passed()
    # without the copies: nothing flagged, the check passes
    clean = check_memorization(smooth_images(100, seed=9), train, heldout, percentile=1.0,
                               train_patient=train_patient, source_patient=["P0"] * 100, max_near_copy_fraction=0.1)
    for space in clean.spaces.values():
        assert space.patient_copy_indices == [] and space.near_copy_fraction < 0.1
    assert clean.passed()


def test_custom_feature_extractor_and_pixel_only():
    train, heldout = smooth_images(20, 1), smooth_images(10, 2)
    synthetic = train[:2].clone()
    rep = check_memorization(synthetic, train, heldout, feature_extractor=lambda x: x.mean(dim=(2, 3)))
    assert rep.spaces["feature"].near_copy_indices == [0, 1]
    rep = check_memorization(synthetic, train, heldout, feature_extractor=None)
    assert list(rep.spaces) == ["pixel"]


def test_input_validation():
    a = smooth_images(4, 0)
    with pytest.raises(ValueError, match="held-out"):
        check_memorization(a, a, a[:0])
    with pytest.raises(ValueError, match="shapes"):
        check_memorization(smooth_images(2, 0, size=8), a, a)
    with pytest.raises(ValueError, match="train_patient"):
        check_memorization(a, a, a, train_patient=["x"])


def test_report_files(tmp_path):
    train, heldout = smooth_images(20, 1), smooth_images(10, 2)
    rep = check_memorization(torch.cat([train[:1], smooth_images(3, 5)]), train, heldout)
    paths = write_memorization_report(rep, tmp_path)
    md = paths["markdown"].read_text()
    assert "| pixel |" in md and "| feature |" in md and "FAILED" in md
    data = json.loads(paths["json"].read_text())
    assert data["passed"] is False and data["spaces"]["pixel"]["near_copy_indices"] == [0]
    assert len(data["per_sample"]["feature_nn_distance"]) == 4


def test_files_flag_planted_patient_copy(tmp_path):
    from dagan_gn.store.patch_file import PatchWriter, to_uint16
    from dagan_gn.jobs.memorization import check_memorization_files

    imgs = smooth_images(40, seed=11)
    patients = [f"p{i // 4}" for i in range(40)]
    split = ["train"] * 24 + ["val"] * 8 + ["test"] * 8
    real = tmp_path / "real.h5"
    cols = {"patient_pseudonym": "str"}
    with PatchWriter(real, patch_size=16, class_names=["n", "m"], provenance=cols) as w:
        w.append(to_uint16((imgs.numpy() + 1) / 2), np.arange(40) % 2, split, {"patient_pseudonym": patients})
    # synthetic: [0] claims source row 0 (patient p0) but is an exact copy of row 13 (patient p3); [1..5] new samples
    fake = torch.cat([imgs[13:14], smooth_images(5, seed=12)])
    src = np.array([0, 1, 2, 4, 5, 6])
    syn = tmp_path / "syn.h5"
    cols = {"source_index": "int64", "noise_seed": "int64", "patient_pseudonym": "str"}
    with PatchWriter(syn, patch_size=16, class_names=["n", "m"], provenance=cols, synthetic=True) as w:
        w.append(to_uint16((fake.numpy() + 1) / 2), src % 2, ["train"] * 6,
                 {"source_index": src, "noise_seed": np.arange(6), "patient_pseudonym": [patients[i] for i in src]})
    rep = check_memorization_files(real, syn, tmp_path / "report", seed=0)
    assert rep.n_train == 24 and rep.n_heldout == 16 and rep.n_synthetic == 6
    for space in rep.spaces.values():
        assert space.patient_copy_indices == [0]
        assert 0 in space.near_copy_indices
    assert (tmp_path / "report" / "memorization.md").is_file()
    sub = check_memorization_files(real, syn, max_train=3, max_synthetic=4, seed=0)
    assert 3 <= sub.n_train <= 9 and sub.n_synthetic == 4  # subsampled, but the sources of checked patches stay
    with pytest.raises(ValueError, match="not a synthetic"):
        check_memorization_files(real, real)
    with pytest.raises(ValueError, match="empty"):
        check_memorization_files(real, syn, heldout_splits=())


def test_failure_lines_state_the_count_before_the_indices():
    from dagan_gn.metrics.memorization import MemorizationReport, SpaceResult, count_then_indices

    space = SpaceResult(space="feature", threshold=1.0, percentile=1.0, copy_threshold=0.5, heldout_nn={"median": 1.0},
                        synthetic_nn={"median": 1.0}, near_copy_fraction=0.001, source_copy_fraction=0.0,
                        near_copy_indices=[10768], patient_copy_indices=[10768], median_ratio=1.0)
    report = MemorizationReport(n_synthetic=20000, n_train=10, n_heldout=10, spaces={"feature": space},
                                max_near_copy_fraction=0.02)
    assert not report.passed()
    assert report.failure_lines() == [
        "- feature: 1 synthetic patch(es) copying another training patient (synthetic index 10768)"]
    assert report.failure_lines()[0] in report.to_markdown()
    assert count_then_indices(list(range(25)), "x", 3) == "25 x (synthetic indices 0, 1, 2, …)"
    space.near_copy_fraction = 0.05
    assert len(report.failure_lines()) == 2 and "near-copies" in report.failure_lines()[1]
