"""Training checkpoints: written atomically, newest K kept, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values (the contract in ``docs/architecture.md``)::

    generator, critic        state dicts of the bare networks (never DDP/compiled wrappers)
    ema                      state dict of the averaged generator, or None
    optim_g, optim_d         optimizer state dicts
    scaler                   {"g": ..., "d": ...} GradScaler state dicts (empty when AMP fp16 is off)
    step                     generator steps completed
    rng                      RNG states (python/numpy/torch/cuda) as tensors and plain values, one entry per rank
    data                     position of the data iterator (epoch, batches consumed in that epoch)
    best_fid                 the lowest FID of the periodic evaluations so far (inf without them)
    train_model              the training steps' own state (``GANModel.state_dict()``), only when it has any
    config                   the resolved ExperimentConfig as a nested plain dict
    format_version           CHECKPOINT_FORMAT_VERSION

``load_generator`` is what ``augment`` and ``metrics`` use to get a trained generator back.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dagan_gn.errors import DaganError
from dagan_gn.config import ExperimentConfig, config_from_dict
from dagan_gn.fileio import atomic_path

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "checkpoint_dir",
    "checkpoint_path",
    "checkpoint_step",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "load_generator",
    "resolve_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

CHECKPOINT_FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(DaganError, RuntimeError):
    """A checkpoint is missing, unreadable, of an unknown format, or does not fit the networks."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``RUN/checkpoints/step_XXXXXXX.pt``."""
    return checkpoint_dir(run_dir) / f"step_{int(step):07d}.pt"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The generator step in a ``step_XXXXXXX.pt`` file name, or None for any other name (``best.pt``)."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain values (``weights_only``-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states][: torch.cuda.device_count()])


# --------------------------------------------------------------------------------------------------- save / load
def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``step_*.pt`` files of a run (or of a ``checkpoints`` folder), oldest first. ``best.pt`` is not listed."""
    root = Path(run_dir)
    folder = root if root.name == "checkpoints" and not (root / "checkpoints").is_dir() else checkpoint_dir(root)
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := checkpoint_step(p)) is not None and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoints/step_*.pt`` of a run folder, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints (``best.pt`` is never touched); returns the deleted."""
    if keep <= 0:
        return []
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def save_checkpoint(
    path: str | os.PathLike,
    *,
    step: int,
    generator: nn.Module,
    critic: nn.Module,
    config: ExperimentConfig | dict,
    optim_g: torch.optim.Optimizer | None = None,
    optim_d: torch.optim.Optimizer | None = None,
    ema: nn.Module | dict | None = None,
    scaler: dict[str, Any] | None = None,
    rng: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically to ``path`` (a file name, usually :func:`checkpoint_path`).

    ``rng`` defaults to this process's RNG states (:func:`capture_rng_state`). ``extra`` entries are stored at the top
    level (e.g. ``data`` for the data-iterator position); they must be tensors or plain values.
    """
    from dagan_gn.config import config_to_dict

    cfg_dict = config if isinstance(config, dict) else config_to_dict(config)
    if isinstance(ema, nn.Module):
        ema = ema.state_dict()
    state: dict[str, Any] = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "step": int(step),
        "generator": generator.state_dict(),
        "critic": critic.state_dict(),
        "ema": ema,
        "optim_g": optim_g.state_dict() if optim_g is not None else None,
        "optim_d": optim_d.state_dict() if optim_d is not None else None,
        "scaler": scaler or {},
        "rng": rng if rng is not None else capture_rng_state(),
        "config": cfg_dict,
    }
    if extra:
        state.update(extra)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check its format version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt/truncated file or not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from exc
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a dagan-gn training checkpoint (no format_version)")
    if int(state["format_version"]) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, newer than this dagan-gn understands "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade dagan-gn"
        )
    return state


def resolve_checkpoint(run_dir_or_file: str | os.PathLike) -> Path:
    """The checkpoint file itself, or the newest ``checkpoints/step_*.pt`` of a run folder."""
    p = Path(run_dir_or_file)
    if p.is_file():
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"no checkpoints/step_*.pt found in run folder {p}")
        return latest
    raise CheckpointError(f"{p} is neither a checkpoint file nor a run folder")


def load_generator(
    run_dir_or_file: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, ExperimentConfig, Path]:
    """Rebuild the generator of a run from a checkpoint file or a run folder (its newest step checkpoint).

    Returns ``(generator in eval mode on device, the run's ExperimentConfig, checkpoint path)``; the EMA weights are
    used when ``use_ema`` and the checkpoint has them.
    """
    from dagan_gn.training.families import build_networks

    path = resolve_checkpoint(run_dir_or_file)
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    generator, _ = build_networks(cfg.model)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["generator"]
    try:
        generator.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the generator built from its config: {exc}") from exc
    generator.to(device).eval()
    return generator, cfg, path
