"""Shared test setup: offline, headless, deterministic and light on the 2-core CI machine."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # pytest -n 2 runs two workers on two cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
