"""The ``train`` job: what ``dagan train`` calls — build a :class:`~dagan_gn.training.trainer.Trainer` from the
config, run the loop, close."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from dagan_gn.config import ExperimentConfig
from dagan_gn.locks import output_lock
from dagan_gn.training.trainer import Trainer

__all__ = ["train"]


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
