"""Tests for dagan_gn.runtime: seeding and device resolution."""

import random

import numpy as np
import pytest
import torch

from dagan_gn.runtime import resolve_device, seed_everything


def test_seed_everything_makes_all_rngs_repeat():
    seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(7)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cpu"):
            resolve_device("cuda")


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    from dagan_gn.runtime import default_cache_dir

    monkeypatch.setenv("DAGAN_GN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DAGAN_GN_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "dagan_gn")


def test_environment_info_names_the_versions_and_the_device():
    import platform

    import monai

    from dagan_gn.runtime import environment_info

    info = environment_info("cpu")
    assert info == {"torch": torch.__version__, "numpy": np.__version__, "monai": monai.__version__,
                    "python": platform.python_version(), "device": "cpu"}
    assert environment_info() == info  # CPU-only jobs pass no device
    assert environment_info(torch.device("cpu")) == info
    auto = environment_info("auto")["device"]
    if torch.cuda.is_available():
        assert auto.startswith("cuda (") and torch.cuda.get_device_name() in auto  # the GPU is named
    else:
        assert auto == "cpu"
