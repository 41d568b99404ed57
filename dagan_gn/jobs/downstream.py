"""The ``evaluate-augmentation`` job: :func:`~dagan_gn.metrics.downstream.evaluate_augmentation` on patch files,
and its report files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dagan_gn.errors import DaganError
from dagan_gn.metrics.downstream import (REGIMES, DownstreamConfig, DownstreamError, DownstreamReport,
                                         evaluate_augmentation)

__all__ = ["evaluate_augmentation_files", "write_downstream_report"]


def write_downstream_report(report: DownstreamReport, out_dir: str | os.PathLike,
                            device: str | None = None) -> dict[str, Path]:
    """``downstream.md`` (table), ``downstream.json`` (every run) and ``downstream.png`` (bar chart) in ``out_dir``,
    each written atomically. They name input files by base name only, so they can leave the hospital. The JSON
    records the package versions and the ``device`` the classifiers trained on (``environment``)."""
    from dagan_gn.fileio import atomic_write_text
    from dagan_gn.runtime import environment_info

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "downstream.md", "json": out_dir / "downstream.json",
             "png": out_dir / "downstream.png"}
    atomic_write_text(paths["markdown"], report.to_markdown())
    atomic_write_text(paths["json"], json.dumps({**report.to_dict(), "environment": environment_info(device)}, indent=2,
                                                  default=str))
    report.plot(paths["png"])
    return paths


def _patches(path: str | os.PathLike, split: str, classes: Sequence[str] | None):
    """``PatchDataset`` of one split; an unknown split or class is the user's error, named with the file."""
    from dagan_gn.datasets.patches import PatchDataset

    try:
        return PatchDataset(path, split=split, classes=list(classes) if classes else None)
    except DaganError:  # StoreError: not a patch file
        raise
    except (KeyError, ValueError) as exc:
        raise DownstreamError(f"{path}: {exc}") from exc


def evaluate_augmentation_files(
    real_path: str | os.PathLike,
    synthetic_path: str | os.PathLike | None,
    out_dir: str | os.PathLike | None = None,
    *,
    train_split: str = "train",
    test_split: str = "test",
    classes: Sequence[str] | None = None,
    config: DownstreamConfig | None = None,
    regimes: Sequence[str] = REGIMES,
    progress: bool = True,
) -> DownstreamReport:
    """:func:`evaluate_augmentation` on patch files: ``train_split`` of the real file for training, its
    ``test_split`` (held-out patients) for evaluation, and the synthetic file (``dagan augment``) for the DAGAN
    regimes. Writes the report to ``out_dir`` when given."""
    from dagan_gn.fileio import check_writable

    if out_dir is not None:  # fail before the classifiers train, not after
        check_writable(Path(out_dir) / "downstream.json", "--out")
    if train_split == test_split:
        raise DownstreamError(f"train and test split are both {train_split!r}: evaluation would not be held out")
    real = _patches(real_path, train_split, classes)
    test = _patches(real_path, test_split, classes)
    if len(real) == 0:
        raise DownstreamError(f"{real_path}: the {train_split!r} split has no patches")
    if len(test) == 0:
        raise DownstreamError(f"{real_path}: the {test_split!r} split has no patches to evaluate on")
    synthetic = None
    if synthetic_path is not None:
        from dagan_gn.store.patch_file import PatchFile

        with PatchFile(synthetic_path) as pf:
            if not pf.synthetic:
                raise DownstreamError(f"{synthetic_path} is not a synthetic patch file (made by `dagan augment`)")
            syn_classes = list(pf.class_names)
            split_present = [pf.split_names[s] for s in np.unique(pf.split)]
        if syn_classes != list(_patches(real_path, train_split, None).class_names):
            raise DownstreamError(f"{synthetic_path} has classes {syn_classes}, not those of {real_path}")
        if test_split in split_present:
            raise DownstreamError(
                f"{synthetic_path} contains variants of {test_split!r} patches: evaluating on that split would leak"
            )
        synthetic = _patches(synthetic_path, train_split, classes)
    report = evaluate_augmentation(real, test, synthetic, num_classes=len(real.class_names),
                                   class_names=real.class_names, config=config, regimes=regimes, progress=progress)
    # Base names only: the report is meant to be shared, and a folder name may name a patient.
    report.meta.update(real=Path(real_path).name,
                       synthetic=None if synthetic_path is None else Path(synthetic_path).name,
                       train_split=train_split, test_split=test_split)
    if out_dir is not None:
        write_downstream_report(report, out_dir, device=config.device)
    return report
