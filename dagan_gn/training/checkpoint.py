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

Rebuilding the generator of a checkpoint (``load_generator``, ``generator_from_state``) is the model family's job:
:mod:`dagan_gn.training.families`.

Reliability: a save writes a temporary file beside the target, fsyncs and renames it, so a kill or a full disk never
replaces the previous checkpoint with a broken one; a failed save raises one :class:`CheckpointError` line; temporary
files left by a killed save are removed by the next save. The stored ``config`` keeps only the base names of paths
(``data.path``, ``metrics.inception_weights``): checkpoints travel, the run's own ``config.yaml`` keeps the full paths
that ``--resume`` needs.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dagan_gn.errors import DaganError
from dagan_gn.config import ExperimentConfig, config_from_dict, config_without_paths, resume_mismatches
from dagan_gn.fileio import RecordingWriter, atomic_path
from dagan_gn.training.stopping import TrainingError

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "checkpoint_dir",
    "checkpoint_path",
    "checkpoint_step",
    "save_checkpoint",
    "load_checkpoint",
    "check_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "first_line",
    "remove_stale_temporaries",
    "resolve_checkpoint",
    "checkpoint_to_resume",
    "capture_rng_state",
    "restore_rng_state",
]

CHECKPOINT_FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
#: The temporary files ``atomic_path`` makes for checkpoints (``.step_0000100.pt.x8k2.tmp``).
_TEMP_RE = re.compile(r"^\..+\.pt\..+\.tmp$")


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


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.<name>.pt.*.tmp``) that a save killed half-way left in a checkpoint folder;
    returns them. Only this process writes checkpoints of a run, so a temporary file seen before a save is stale."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMP_RE.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
    level (e.g. ``data`` for the data-iterator position); they must be tensors or plain values. The stored config
    keeps only base names of paths (:func:`~dagan_gn.config.config_without_paths`).

    Raises:
        CheckpointError: the file cannot be written (full disk, I/O error, unwritable folder); nothing is left
            behind and an existing file at ``path`` (and every other checkpoint) is unchanged.
    """
    from dagan_gn.fileio import OutputError

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
        "config": config_without_paths(config),
    }
    if extra:
        state.update(extra)
    path = Path(path)
    remove_stale_temporaries(path.parent)
    intact = "; the previous checkpoints are unchanged"
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb", buffering=0) as fh:
                # torch.save reports a failed write as "RuntimeError: unexpected pos"; keep the OS error instead.
                sink = RecordingWriter(fh)
                torch.save(state, sink)
            if sink.error is not None:
                raise sink.error
    except OutputError as exc:
        raise CheckpointError(f"{exc}{intact}") from exc
    return path


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first sentence of an exception's message (torch's are paragraphs), at most ``limit`` characters."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else exc.__class__.__name__
    return first.split(". ")[0].rstrip(".:")[:limit]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (nothing in the file can run code) and check its
    format version.

    Raises:
        CheckpointError: missing, a folder, truncated or not a torch file, holding objects other than tensors and
            plain values, not a dagan-gn checkpoint, or from a newer format; one line naming the file.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else
                              f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():
            # The unpickler's note on a foreign pickle protocol: the error below says what matters.
            warnings.filterwarnings("ignore", module=r"torch\._weights_only_unpickler")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # weights_only met a class or function reference
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain values; refused (loading it could run code)"
            ) from exc
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a torch checkpoint (unreadable pickle data)"
        ) from exc
    except Exception as exc:  # truncated or corrupt file, or not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {first_line(exc)} "
                              "(truncated or not a torch checkpoint)") from exc
    return check_checkpoint(state, path)


def check_checkpoint(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``state`` (an already loaded checkpoint of ``path``) when it is a dagan-gn checkpoint of a format this version
    reads and holds what a checkpoint must; else :class:`CheckpointError`, one line naming the file."""
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a dagan-gn training checkpoint (no format_version)")
    if int(state["format_version"]) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, newer than this dagan-gn understands "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade dagan-gn"
        )
    missing = [k for k in ("step", "generator", "critic", "config") if k not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {', '.join(missing)})")
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


def checkpoint_to_resume(run_dir: str | os.PathLike, cfg: ExperimentConfig, resume: bool,
                         say: Callable[[str], None] = print) -> tuple[Path | None, dict[str, Any] | None]:
    """``(path, state)`` of the checkpoint a run in ``run_dir`` continues (``(None, None)`` for a new run), checked
    before anything is written.

    Raises:
        TrainingError: ``run_dir`` holds checkpoints but ``resume`` is off, or the checkpoint's config differs from
            ``cfg`` in a key that cannot change on resume (the message names the keys).
    """
    run_dir = Path(run_dir)
    path: Path | None = None
    if resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            say(f"--resume: no checkpoint in {run_dir}; starting a new run")
    elif latest_checkpoint(run_dir) is not None:
        raise TrainingError(
            f"{run_dir} already holds checkpoints; pass --resume to continue that run or choose another --out"
        )
    if path is None:
        return None, None
    state = load_checkpoint(path)
    mismatched = resume_mismatches(config_from_dict(state["config"]), cfg)
    if mismatched:
        raise TrainingError(
            f"cannot resume {path}: the config differs in {', '.join(mismatched)} "
            f"(resume with the run's own config.yaml, or start a new --out)"
        )
    return path, state
