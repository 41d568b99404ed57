"""The ``check-memorization`` job: :func:`~dagan_gn.metrics.memorization.check_memorization` on patch files, and
its report files."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagan_gn.metrics.memorization import MemorizationError, MemorizationReport, check_memorization

__all__ = ["check_memorization_files", "write_memorization_report"]


def write_memorization_report(report: MemorizationReport, out_dir: str | Path,
                              device: torch.device | str | None = None) -> dict[str, Path]:
    """Write ``memorization.md`` and ``memorization.json`` (atomically) into ``out_dir``; returns their paths. They
    name input files by base name only, so they can leave the hospital. The JSON records the package versions and
    the ``device`` the distances were computed on (``environment``)."""
    from dagan_gn.fileio import atomic_write_text
    from dagan_gn.runtime import environment_info

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "memorization.md", "json": out_dir / "memorization.json"}
    atomic_write_text(paths["markdown"], report.to_markdown())
    atomic_write_text(paths["json"], json.dumps({**report.to_dict(), "environment": environment_info(device)}, indent=2,
                                                  default=_json_default))
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"cannot serialise {type(o)}")


def check_memorization_files(
    real_path: str | Path,
    synthetic_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    train_split: str = "train",
    heldout_splits: Sequence[str] = ("val", "test"),
    max_train: int | None = None,
    max_synthetic: int | None = None,
    percentile: float = 1.0,
    copy_factor: float = 0.5,
    feature_extractor: Callable[[torch.Tensor], torch.Tensor] | str | None = "random-conv",
    chunk_size: int = 1024,
    device: str = "cpu",
    seed: int = 0,
) -> MemorizationReport:
    """:func:`check_memorization` on patch files: the real file's ``train_split`` is the training set, its
    ``heldout_splits`` the baseline, and the synthetic file (from ``dagan augment``) is checked against them.

    Patient pseudonyms come from the ``patient_pseudonym`` provenance columns; the source of each synthetic patch from
    its ``source_index`` column (a row of the real file). ``max_train`` / ``max_synthetic`` subsample (seeded) very
    large files; the sources of the checked synthetic patches are always kept in the training set.
    Writes ``memorization.md`` / ``memorization.json`` to ``out_dir`` when given.
    """
    from dagan_gn.fileio import check_writable
    from dagan_gn.store.patch_file import PatchFile, synthetic_pairing_problem
    from dagan_gn.runtime import resolve_device

    if out_dir is not None:  # fail before the distances are computed, not after
        check_writable(Path(out_dir) / "memorization.json", "--out")
    with PatchFile(real_path) as real, PatchFile(synthetic_path) as syn:
        problem = synthetic_pairing_problem(real, syn, real_path, synthetic_path)
        if problem:
            raise MemorizationError(problem)
        train_sel = _split_rows(real, train_split, real_path)
        held_sel = np.sort(np.concatenate([_split_rows(real, s, real_path) for s in heldout_splits]
                                          or [np.zeros(0, int)]))
        if len(train_sel) == 0:
            raise MemorizationError(f"{real_path}: split {train_split!r} is empty")
        if len(held_sel) == 0:
            raise MemorizationError(f"{real_path}: held-out split(s) {', '.join(heldout_splits)} are empty; the "
                                    "near-copy threshold needs held-out real patches")
        rng = np.random.default_rng(seed)
        syn_sel = np.arange(len(syn))
        if max_synthetic is not None and len(syn_sel) > max_synthetic:
            syn_sel = np.sort(rng.choice(syn_sel, max_synthetic, replace=False))
        src_global = syn.provenance("source_index") if "source_index" in syn.provenance_columns else None
        if src_global is not None:
            src_global = src_global[syn_sel].astype(np.int64)
        if max_train is not None and len(train_sel) > max_train:
            keep = rng.choice(train_sel, max_train, replace=False)
            if src_global is not None:
                keep = np.union1d(keep, np.intersect1d(src_global, train_sel))
            train_sel = np.sort(keep)
        source_index = None
        if src_global is not None:
            # source_index in the synthetic file is a row of the real file: map it to positions in the train set.
            pos = {int(g): k for k, g in enumerate(train_sel)}
            source_index = np.array([pos.get(int(g), -1) for g in src_global])
        train_patient = source_patient = None
        if "patient_pseudonym" in real.provenance_columns:
            real_pat = real.provenance("patient_pseudonym")
            train_patient = real_pat[train_sel]
            if "patient_pseudonym" in syn.provenance_columns:
                source_patient = syn.provenance("patient_pseudonym")[syn_sel]
            elif src_global is not None:
                source_patient = real_pat[src_global]
        images = [torch.from_numpy(pf.read_patches(sel, signed=True))
                  for pf, sel in ((syn, syn_sel), (real, train_sel), (real, held_sel))]
    report = check_memorization(
        *images, source_index=source_index, source_patient=source_patient, train_patient=train_patient,
        feature_extractor=feature_extractor, percentile=percentile, copy_factor=copy_factor, chunk_size=chunk_size,
        device=resolve_device(device), seed=seed,
    )
    report.meta.update(real=Path(real_path).name, synthetic=Path(synthetic_path).name, train_split=train_split,
                       heldout_splits=list(heldout_splits), seed=seed, percentile=percentile, copy_factor=copy_factor)
    if out_dir is not None:
        write_memorization_report(report, out_dir, device=device)
    return report


def _split_rows(pf: Any, split: str, path: str | Path) -> np.ndarray:
    """Rows of ``split`` in a ``PatchFile``; an unknown split is the user's error, named with the file."""
    try:
        return pf.split_indices(split)
    except ValueError as exc:
        raise MemorizationError(f"{path}: {exc}") from exc
