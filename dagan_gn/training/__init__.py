"""Training engine: the model-family registry, losses, per-family train steps, the trainer loop and its cadence
handlers, checkpoints, EMA, DDP and logging.

Public entry points::

    from dagan_gn.training import build_networks, get_family, load_generator
    G, cfg, path = load_generator("runs/exp1", device="cpu")  # the EMA generator of the newest checkpoint
    images = get_family(cfg.model.name).sample(G, 16, torch.Generator().manual_seed(0), dataset=patches)
"""

from dagan_gn.training.checkpoint import (
    CheckpointError,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dagan_gn.training.families import (
    FAMILIES,
    ModelFamily,
    build_dataset,
    build_networks,
    get_family,
    load_generator,
    register_family,
)
from dagan_gn.training.handlers import Handler
from dagan_gn.training.losses import LOSSES, get_loss, gradient_penalty
from dagan_gn.training.trainer import Trainer, TrainingError

__all__ = [
    "Trainer",
    "TrainingError",
    "Handler",
    "FAMILIES",
    "ModelFamily",
    "register_family",
    "get_family",
    "build_networks",
    "build_dataset",
    "LOSSES",
    "get_loss",
    "gradient_penalty",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoint_step",
    "load_generator",
    "CheckpointError",
]
