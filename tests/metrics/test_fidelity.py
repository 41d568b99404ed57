"""FID/KID/IS through torch-fidelity with the tiny random-conv extractor: identical sets ≈ 0, different sets > 0,
image conversion, caching of reference statistics, the training-time evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dagan_gn.config import ExperimentConfig
from dagan_gn.metrics.fidelity import (
    TINY_EXTRACTOR_NAME,
    TrainingEvaluator,
    compute_fidelity,
    register_tiny_feature_extractor,
    resolve_feature_extractor_name,
    to_uint8_rgb,
)


def _images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g) * 1.2 - 0.6 + shift
    return x.clamp(-1, 1)


def test_registering_the_tiny_extractor_is_idempotent():
    assert register_tiny_feature_extractor() == TINY_EXTRACTOR_NAME
    assert register_tiny_feature_extractor() == TINY_EXTRACTOR_NAME
    assert resolve_feature_extractor_name("tiny") == TINY_EXTRACTOR_NAME
    assert resolve_feature_extractor_name(None) == "inception-v3-compat"
    with pytest.raises(ValueError, match="unknown feature extractor"):
        resolve_feature_extractor_name("no-such-net")


def test_to_uint8_rgb_conversions():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    u = to_uint8_rgb(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 2, 2)
    assert u[0, 0].flatten().tolist() == [0, 128, 255, 255]  # rounded, clamped
    assert torch.equal(u[0, 0], u[0, 2])  # grayscale replicated
    hwc = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    hwc[..., 1] = 7
    out = to_uint8_rgb(hwc)
    assert out.shape == (2, 3, 4, 4) and int(out[0, 1, 0, 0]) == 7
    with pytest.raises(ValueError, match="expected images"):
        to_uint8_rgb(torch.zeros(2, 5, 4, 4))


def test_identical_sets_score_about_zero_and_different_sets_more(tmp_path):
    ref = _images(64, seed=0)
    same = compute_fidelity(ref, ref.clone(), feature_extractor="tiny", kid_subset_size=32, cache_dir=tmp_path)
    assert abs(same["fid"]) < 1e-3
    assert abs(same["kid_mean"]) < 1e-3
    other = compute_fidelity(
        _images(64, seed=1, shift=0.4), ref, feature_extractor="tiny", kid_subset_size=32, cache_dir=tmp_path
    )
    assert other["fid"] > 0.05 and other["kid_mean"] > 1e-3
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-6)
    for v in other.values():
        assert np.isfinite(v)


def test_kid_subset_is_reduced_to_the_sample_count_and_isc_runs(tmp_path):
    out = compute_fidelity(
        _images(20, seed=2),
        _images(30, seed=3),
        metrics=("kid", "is"),
        feature_extractor="tiny",
        kid_subset_size=1000,
        cache_dir=tmp_path,
    )
    assert out["kid_subset_size"] == 20
    assert out["isc_mean"] >= 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        compute_fidelity(_images(4, 0), _images(4, 1), metrics=("precision",), feature_extractor="tiny")


def test_reference_statistics_are_cached_per_key(tmp_path):
    ref = _images(40, seed=4)
    a = compute_fidelity(
        _images(40, seed=5), ref, feature_extractor="tiny", kid_subset_size=20, cache_key="toy-train", cache_dir=tmp_path
    )
    files = sorted(p.name for p in (tmp_path / "fidelity").glob("*.pt"))
    assert files and all(f.startswith("dagan-toy-train-n40-") for f in files)
    assert any("stat-fid" in f for f in files) and any("features" in f for f in files)
    # A second call with the same key reuses the cache: same numbers even if we pass a different "reference" of the
    # same size (which proves the cached statistics were used).
    b = compute_fidelity(
        _images(40, seed=5),
        _images(40, seed=6),
        feature_extractor="tiny",
        kid_subset_size=20,
        cache_key="toy-train",
        cache_dir=tmp_path,
    )
    assert a["fid"] == pytest.approx(b["fid"]) and a["kid_mean"] == pytest.approx(b["kid_mean"])


def test_grayscale_patches_work(tmp_path):
    g = torch.Generator().manual_seed(0)
    patches = torch.rand(24, 1, 64, 64, generator=g) * 2 - 1
    out = compute_fidelity(patches, patches, feature_extractor="tiny", kid_subset_size=12, cache_dir=tmp_path)
    assert abs(out["fid"]) < 1e-3


def test_training_evaluator_matches_the_trainer_contract(tmp_path):
    cfg = ExperimentConfig()
    cfg.metrics.num_samples = 48
    cfg.metrics.kid_subset_size = 16
    cfg.metrics.feature_extractor = "tiny"
    reference = _images(48, seed=7)
    ev = TrainingEvaluator(cfg, "cpu", reference=reference, cache_key="unit", cache_dir=tmp_path, chunk_size=20)
    calls = []

    def sample_fn(n: int) -> torch.Tensor:
        calls.append(n)
        return _images(n, seed=len(calls), shift=0.3)

    out = ev(sample_fn, step=10)
    assert calls == [20, 20, 8]
    assert set(out) == {"fid", "kid_mean", "kid_std"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())
    assert out["fid"] > 0


def _tiny_cifar_run(tmp_path):
    """A 2-step CIFAR DCGAN run on a tiny synthetic python archive (the trainer's real output)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datasets"))
    from test_cifar10 import write_python_archive

    from dagan_gn.jobs.cifar10_study import PRESETS, Cell, cell_config
    from dagan_gn.jobs.train import train

    archive = tmp_path / "cifar-10-python.tar.gz"
    write_python_archive(archive, per_batch=20, test=20)
    cfg = cell_config(Cell("dcgan", "layer", "group", 0), PRESETS["smoke"], archive, device="cpu",
                      feature_extractor="tiny")
    cfg.train.steps, cfg.metrics.eval_every = 2, 0
    return archive, train(cfg, tmp_path / "run")


@pytest.mark.slow
def test_dagan_evaluate_cli_on_a_cifar_run(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from dagan_gn.cli import app

    monkeypatch.setenv("DAGAN_GN_CACHE", str(tmp_path / "cache"))
    archive, run = _tiny_cifar_run(tmp_path)
    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(app, [
        "evaluate", "--checkpoint", str(run), "--data", str(archive), "--metrics", "fid,kid,recon",
        "--num-samples", "30", "--feature-extractor", "tiny", "--recon-images", "10", "--device", "cpu",
        "--seed", "1", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["step"] == 2 and got["model"] == "cifar_dcgan" and got["n_generated"] == 30
    assert got["fid"] > 0 and got["kid_subset_size"] == 30 and 0 < got["recon_mse"] < 1
    assert got["recon_images"] == 10
    bad = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "missing"), "--data", str(archive)])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(run), "--metrics", "fid,precision"])
    assert bad.exit_code == 2 and "unknown metric" in bad.output


def test_dagan_evaluate_cli_on_a_patch_run(tmp_path, monkeypatch):
    """DAGAN runs are scored on HDF5 patches: samples are G(x_real, z) over the chosen split."""
    import json

    from factories import make_checkpoint, make_patch_file
    from typer.testing import CliRunner

    from dagan_gn.cli import app

    monkeypatch.setenv("DAGAN_GN_CACHE", str(tmp_path / "cache"))
    patches = make_patch_file(tmp_path / "patches.h5")
    run = make_checkpoint(tmp_path / "run", patches)
    out = tmp_path / "metrics.json"
    res = CliRunner().invoke(app, [
        "evaluate", "--checkpoint", str(run), "--data", str(patches), "--metrics", "fid,kid",
        "--num-samples", "12", "--feature-extractor", "tiny", "--device", "cpu", "--seed", "0", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["model"] == "dagan" and got["step"] == 2 and got["split"] == "train"
    assert got["n_generated"] == 12 and got["fid"] > 0 and np.isfinite(got["kid_mean"])
