"""The ``augment`` job's output (:mod:`dagan_gn.jobs.augment`): the synthetic patch file's ``parameters`` attribute and
whether a finished file of the same parameters exists, its writer (the other attributes: checkpoint hash and step,
generator config, source file), the rows of a batch of variants with their provenance columns, and the contact sheet.

A new output of augment goes here: a provenance column is declared in :func:`open_writer` (and documented in
``docs/hdf5-format.md``) and filled in :func:`append_variants`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dagan_gn.jobs.augment_types import AugmentError, AugmentPlan, AugmentRequest

if TYPE_CHECKING:
    from dagan_gn.store.patch_file import PatchFile, PatchWriter

__all__ = ["append_variants", "contact_sheet_tiles", "finished_output", "open_writer", "output_parameters",
           "write_contact_sheet"]


def output_parameters(request: AugmentRequest, pf: PatchFile, ckpt_sha: str, n_sources: int) -> dict[str, Any]:
    """The arguments that determine the output (not batch size or device): a resumed run must match them, and a
    finished output with the same ones is complete. Base names only: the output may leave the hospital."""
    return {
        "job": "augment",
        "input": request.in_path.name,
        "input_rows": len(pf),
        "input_created": str(pf.attrs.get("created", "")),
        "checkpoint_sha256": ckpt_sha,
        "n_per_source": int(request.n),
        "split": request.split,
        "classes": list(request.classes),
        "truncation": float(request.truncation),
        **({"reject_off_class": True} if request.reject_off_class else {}),
        "seed": int(request.seed),
        "n_sources": int(n_sources),
    }


def finished_output(request: AugmentRequest, parameters: dict[str, Any], expected_rows: int) -> bool:
    """True when ``out_path`` is a finished output of these parameters; False when there is none (or it will be
    overwritten).

    Raises:
        AugmentError: an output made otherwise (or unreadable) exists and ``overwrite`` is off.
    """
    from dagan_gn.store.patch_file import PatchFile, StoreError, partial_path
    from dagan_gn.store.journal import journal_path

    out = request.out_path
    if not out.exists() or request.overwrite:
        return False
    try:
        with PatchFile(out) as existing:
            made_with, rows, synthetic = existing.parameters, len(existing), existing.synthetic
    except StoreError as exc:
        raise AugmentError(f"{out} already exists and is not a readable patch file ({exc}); pass --overwrite to "
                           "replace it") from exc
    diff = sorted(k for k in set(parameters) | set(made_with) if parameters.get(k) != made_with.get(k))
    # With rejection a finished file holds at most the expected rows (the rejected variants are not written).
    rows_ok = rows <= expected_rows if request.reject_off_class else rows == expected_rows
    if diff or not synthetic or not rows_ok:
        what = ", ".join(diff) if diff else "its content"
        raise AugmentError(f"{out} already exists (made with other arguments: {what}); pass --overwrite to "
                           "replace it")
    if not partial_path(out).exists():
        journal_path(partial_path(out)).unlink(missing_ok=True)  # a kill right after the final rename left it
    return True


def open_writer(plan: AugmentPlan, pf: PatchFile) -> PatchWriter:
    """The output writer: a fresh ``.partial`` file, or the interrupted one of the same arguments, resumed.

    Raises:
        AugmentError: the ``.partial`` file is from other arguments or cannot be resumed.
    """
    from dagan_gn.config import config_without_paths
    from dagan_gn.store.patch_file import PatchWriter, StoreError, partial_path

    out = plan.request.out_path
    columns: dict[str, Any] = {"source_index": "int64", "variant": "int32", "noise_seed": "int64"}
    columns.update({c: "str" for c in plan.sources.carried})
    try:
        writer = PatchWriter(
            out, patch_size=pf.patch_size, class_names=plan.sources.class_names, provenance=columns,
            parameters=plan.parameters, synthetic=True, channels=pf.channels, split_names=pf.split_names,
            attrs={
                "checkpoint_sha256": plan.checkpoint_sha256,
                "generator_config": config_without_paths(plan.generator_config),
                "source_file": plan.request.in_path.name,
                "checkpoint_step": plan.checkpoint_step,
                "used_ema": plan.used_ema,
            },
            resume=partial_path(out).exists(),
        )
    except StoreError as exc:
        raise AugmentError(f"cannot resume {partial_path(out)}: {exc}") from exc
    if writer.recovery_note:
        plan.notes.append(writer.recovery_note)
    if writer.resumed and writer.parameters != plan.parameters:
        diff = sorted(k for k in set(plan.parameters) | set(writer.parameters)
                      if plan.parameters.get(k) != writer.parameters.get(k))
        writer.close()
        raise AugmentError(
            f"{partial_path(out)} is an interrupted augment run with different arguments ({', '.join(diff)}); run "
            "with the same arguments to finish it, or delete it to start afresh"
        )
    return writer


def append_variants(plan: AugmentPlan, pf: PatchFile, writer: PatchWriter, src_rows: np.ndarray,
                    variants: torch.Tensor, seeds: list[int], keep: np.ndarray) -> None:
    """Append the variants of the sources ``src_rows`` (``plan.request.n`` of each, in order; ``seeds``: their noise
    seeds) that ``keep`` marks, with the sources' labels and split and the provenance columns: ``source_index``,
    ``variant``, ``noise_seed`` and the carried columns of the source."""
    from dagan_gn.store.patch_file import to_uint16

    n = plan.request.n
    rows_rep = np.repeat(src_rows, n)
    prov: dict[str, Any] = {
        "source_index": rows_rep.astype(np.int64),
        "variant": np.tile(np.arange(n), len(src_rows)).astype(np.int32),
        "noise_seed": np.asarray(seeds, dtype=np.int64),
    }
    for c in plan.sources.carried:
        prov[c] = np.repeat(pf.provenance(c, src_rows), n)
    label_rep = np.repeat(pf.labels[src_rows], n)
    if keep.any():
        writer.append(to_uint16((variants.numpy()[keep] + 1.0) * 0.5), label_rep[keep],
                      np.full(int(keep.sum()), plan.sources.split_code, dtype=np.uint8),
                      {c: col[keep] for c, col in prov.items()})


def write_contact_sheet(
    sources: torch.Tensor, variants: torch.Tensor, path: str | os.PathLike, *, padding: int = 2
) -> Path:
    """PNG grid (the project's one grid writer, :func:`dagan_gn.training.run_log.save_image_grid`): one row per
    source, the source first then its variants.

    Args:
        sources: ``[R, C, S, S]`` in [-1, 1].
        variants: ``[R, K, C, S, S]`` in [-1, 1].
        path: output PNG (written atomically).
    """
    from dagan_gn.training.run_log import save_image_grid

    rows = torch.cat([sources[:, None], variants], dim=1)  # [R, 1 + K, C, S, S]
    return save_image_grid(rows.flatten(0, 1), path, nrow=rows.shape[1], padding=padding)


def contact_sheet_tiles(plan: AugmentPlan, pf: PatchFile) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles of a finished output's contact sheet: the first ``contact_sheet_rows`` sources ``[R, C, S, S]`` and
    up to 10 variants of each ``[R, K, C, S, S]`` (for :func:`write_contact_sheet`)."""
    from dagan_gn.store.patch_file import PatchFile

    request, rows = plan.request, plan.sources.rows
    r, k = min(request.contact_sheet_rows, len(rows)), min(request.n, 10)
    with PatchFile(request.out_path) as out:
        src_index, variant = out.provenance("source_index"), out.provenance("variant")
        blank = np.full((pf.channels, pf.patch_size, pf.patch_size), -1.0, np.float32)

        def tile(p: int, j: int) -> np.ndarray:
            # A variant rejected as off-class (--reject-off-class) is a black tile: columns stay variant numbers.
            hit = np.flatnonzero((src_index == rows[p]) & (variant == j))
            return out.read_patches(hit[:1], signed=True)[0] if len(hit) else blank

        variants = np.stack([np.stack([tile(p, j) for j in range(k)]) for p in range(r)])
    src = torch.from_numpy(pf.read_patches(rows[:r], signed=True))
    return src, torch.from_numpy(variants)
