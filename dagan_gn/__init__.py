"""dagan-gn: conditional DAGAN data augmentation for mammography, with a GAN normalization study.

The main entry points, importable from here (each is loaded on first use, so ``import dagan_gn`` stays light and
does not import torch)::

    import dagan_gn

    dagan_gn.extract_patches(["dicom/"], "patches.h5", labels_csv="labels.csv", patch_size=256)
    cfg = dagan_gn.load_config("configs/dagan_mammo_256.yaml", ["data.path=patches.h5"])
    run = dagan_gn.train(cfg, "runs/exp1")
    dagan_gn.augment("patches.h5", run, "synthetic.h5", n=10)
    dagan_gn.check_memorization_files("patches.h5", "synthetic.h5", "reports/memorization")
    dagan_gn.evaluate_augmentation_files("patches.h5", "synthetic.h5", "reports/downstream")

Subpackages by layer (``docs/architecture.md``): ``cli`` → ``jobs`` → ``ingest``, ``store``, ``datasets``,
``phantom``, ``training``, ``metrics`` → ``nets`` → ``modules``; ``config``, ``errors``, ``fileio``, ``runtime``
below all of them.
"""

from __future__ import annotations

import importlib
import os as _os
from typing import TYPE_CHECKING, Any

# albumentations phones PyPI on import; hospitals run behind firewalls, so never let it try.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

#: Public name → the module that defines it.
_PUBLIC: dict[str, str] = {
    "DaganError": "dagan_gn.errors",
    "load_config": "dagan_gn.config",
    "save_config": "dagan_gn.config",
    "ExperimentConfig": "dagan_gn.config",
    "extract_patches": "dagan_gn.jobs.extract_patches",
    "train": "dagan_gn.jobs.train",
    "augment": "dagan_gn.jobs.augment",
    "evaluate_checkpoint": "dagan_gn.jobs.evaluate",
    "check_memorization_files": "dagan_gn.jobs.memorization",
    "evaluate_augmentation_files": "dagan_gn.jobs.downstream",
    "run_study": "dagan_gn.jobs.cifar10_study",
    "run_demo": "dagan_gn.jobs.demo",
    "PatchFile": "dagan_gn.store.patch_file",
    "PatchDataset": "dagan_gn.datasets.patches",
    "SameClassPairDataset": "dagan_gn.datasets.patches",
    "MixedRealSyntheticDataset": "dagan_gn.datasets.mixing",
    "load_generator": "dagan_gn.training.families",
    "get_family": "dagan_gn.training.families",
    "DAGANAugmenter": "dagan_gn.training.augmenter",
}

__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use (PEP 562)
    from dagan_gn.config import ExperimentConfig, load_config, save_config  # noqa: F401
    from dagan_gn.datasets.mixing import MixedRealSyntheticDataset  # noqa: F401
    from dagan_gn.datasets.patches import PatchDataset, SameClassPairDataset  # noqa: F401
    from dagan_gn.errors import DaganError  # noqa: F401
    from dagan_gn.jobs.augment import augment  # noqa: F401
    from dagan_gn.jobs.cifar10_study import run_study  # noqa: F401
    from dagan_gn.jobs.demo import run_demo  # noqa: F401
    from dagan_gn.jobs.downstream import evaluate_augmentation_files  # noqa: F401
    from dagan_gn.jobs.evaluate import evaluate_checkpoint  # noqa: F401
    from dagan_gn.jobs.extract_patches import extract_patches  # noqa: F401
    from dagan_gn.jobs.memorization import check_memorization_files  # noqa: F401
    from dagan_gn.jobs.train import train  # noqa: F401
    from dagan_gn.store.patch_file import PatchFile  # noqa: F401
    from dagan_gn.training.augmenter import DAGANAugmenter  # noqa: F401
    from dagan_gn.training.families import get_family, load_generator  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'dagan_gn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
