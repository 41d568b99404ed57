"""Training engine: losses registry, per-model train steps, the trainer loop, checkpoints, EMA, DDP and logging.

Public entry points::

    from dagan_gn.training import load_generator
    G, cfg, path = load_generator("runs/exp1", device="cpu")  # the EMA generator of the newest checkpoint
"""

from dagan_gn.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_generator,
    save_checkpoint,
)
from dagan_gn.training.losses import LOSSES, get_loss, gradient_penalty
from dagan_gn.training.trainer import Trainer, TrainingError

__all__ = [
    "Trainer",
    "TrainingError",
    "LOSSES",
    "get_loss",
    "gradient_penalty",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "load_generator",
    "CheckpointError",
]
