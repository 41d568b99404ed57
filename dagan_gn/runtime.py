"""Seeding, device selection and the environment record shared by every command."""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path

import numpy as np
import torch

from dagan_gn.errors import DaganError

__all__ = ["DeviceError", "seed_everything", "resolve_device", "default_cache_dir", "environment_info"]


class DeviceError(DaganError, RuntimeError):
    """The requested device does not exist on this machine."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available else CPU; ``cuda``/``cuda:1``/``cpu`` as given, with a clear error when CUDA
    is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} was requested but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:  # "gpu", "cuda:x", ...
        raise DeviceError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc


def default_cache_dir() -> Path:
    """``$DAGAN_GN_CACHE`` or ``~/.cache/dagan_gn``: where decoded images, converted weights and reference
    statistics are kept (never inside a user's data folders)."""
    return Path(os.environ.get("DAGAN_GN_CACHE") or Path.home() / ".cache" / "dagan_gn").expanduser()


def environment_info(device: torch.device | str | None = None) -> dict[str, str]:
    """What a measured figure depends on besides its inputs, for every report JSON: the versions of torch, NumPy,
    MONAI and Python, and the device the job ran on (``device``: None for CPU-only jobs; ``"auto"`` is resolved; a
    GPU is named). Kernels differ in the last bit between versions and devices, so a figure is reproducible (or
    questionable) only together with these."""
    from importlib import metadata

    try:
        monai_version = metadata.version("monai")
    except metadata.PackageNotFoundError:
        monai_version = "not installed"
    dev = resolve_device(str(device)) if device is not None else torch.device("cpu")
    name = dev.type if dev.index is None else f"{dev.type}:{dev.index}"
    if dev.type == "cuda":
        name += f" ({torch.cuda.get_device_name(dev)})"
    return {"torch": torch.__version__, "numpy": np.__version__, "monai": monai_version,
            "python": platform.python_version(), "device": name}
