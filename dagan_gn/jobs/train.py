"""The ``train`` job: what ``dagan train`` calls — build a :class:`~dagan_gn.training.trainer.Trainer` from the
config, run the loop, close."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from dagan_gn.config import ExperimentConfig
from dagan_gn.locks import output_lock
from dagan_gn.training.trainer import Trainer, TrainingError

__all__ = ["train", "train_unless_finished", "TrainOutcome"]


def train(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    dataset: Dataset | None = None,
    networks: tuple[nn.Module, nn.Module] | None = None,
    stop_at: int | None = None,
) -> Path:
    """Train a GAN as configured and return the run folder (see ``docs/training.md``).

    ``stop_at`` stops after that generator step with a checkpoint, exactly as an interrupted run would (the linear
    LR schedule still targets ``train.steps``); used to test resumption.
    """
    # One run per run folder: a second `dagan train --out` on it stops with the holder's pid. Under torchrun only
    # rank 0 takes the lock (all ranks share the folder).
    lock = output_lock(out_dir, what="train") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        trainer = Trainer(cfg, out_dir, resume=resume, dataset=dataset, networks=networks)
        try:
            return trainer.fit(stop_at=stop_at)
        finally:
            trainer.close()


@dataclass(frozen=True)
class TrainOutcome:
    """What :func:`train_unless_finished` found and did."""

    #: The run's newest checkpoint after the call.
    checkpoint: Path
    #: This call trained (from scratch or resuming); False when the run had already reached ``train.steps``.
    trained_here: bool
    #: The step a killed run was resumed from (None: a fresh run, or nothing to do).
    resumed_from_step: int | None


def train_unless_finished(cfg: ExperimentConfig, run_dir: str | Path, *,
                          dataset: Dataset | None = None) -> TrainOutcome:
    """Train ``cfg`` in ``run_dir`` unless it already holds a checkpoint at ``train.steps``; continue a killed run
    (the pipelines' "train unless finished", one way). A run made with another config is refused before anything is
    written: the message names the keys that differ.

    Raises:
        TrainingError: ``run_dir`` holds a run of another config (``train.steps`` may differ: more steps continue).
    """
    from dagan_gn.config import config_from_dict, resume_mismatches
    from dagan_gn.training.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
    from dagan_gn.datasets.loader import resolve_data_keys
    from dagan_gn.training.families import build_dataset

    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    done = -1
    if latest is not None:
        if cfg.model.critic_classes < 0:  # compare as the trainer will: resolved from the data
            dataset = dataset if dataset is not None else build_dataset(cfg)
            cfg = resolve_data_keys(cfg, dataset)
        mismatched = resume_mismatches(config_from_dict(load_checkpoint(latest)["config"]), cfg)
        if mismatched:
            raise TrainingError(f"{run_dir} was trained with another config ({', '.join(mismatched)} differ); use "
                                "another output folder")
        done = checkpoint_step(latest) or 0
    if done >= cfg.train.steps:
        return TrainOutcome(latest, False, None)  # type: ignore[arg-type]
    train(cfg, run_dir, resume=latest is not None, dataset=dataset)
    final = latest_checkpoint(run_dir)
    if final is None:  # the trainer always writes its last step; a missing one is a bug, said plainly
        raise TrainingError(f"{run_dir}: training finished without a checkpoint")
    return TrainOutcome(final, True, done if latest is not None else None)
