"""The inputs of ``dagan assess``: check that a synthetic file and a real file belong together, choose the sources,
the real-pair scale and the held-out patches (seeded), and read them as tensors (:func:`read_inputs`).

Every refusal is one :class:`AssessError` naming the file and the problem; every reduction or fallback (a subset of
the sources, uneven variant counts, an empty held-out split) is a note in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dagan_gn.errors import DaganError
from dagan_gn.metrics import diversity as div

__all__ = ["AssessError", "AssessInputs", "read_inputs", "signed_rows"]


class AssessError(DaganError, ValueError):
    """Inputs that cannot be assessed together; the message names the file and the problem."""


@dataclass
class AssessInputs:
    """The rows chosen (of the real and the synthetic file), the notes on the choice, and the images read."""

    class_names: list[str]
    heldout_split: str
    source_rows: np.ndarray  # [S] rows of the real file
    source_labels: np.ndarray  # [S]
    variant_rows: np.ndarray  # [S, V] rows of the synthetic file
    n_sources_total: int
    train_rows: np.ndarray  # every row of the real split
    scale_rows: np.ndarray  # rows of the real split behind the real-pair scale (capped per class)
    heldout_rows: np.ndarray
    notes: list[str]
    #: Images as float32 in [-1, 1]: sources [S, C, H, W], variants [S, V, C, H, W], the real-pair scale and the
    #: held-out patches (with their labels), and the labels of the whole real split.
    sources: torch.Tensor | None = None
    variants: torch.Tensor | None = None
    scale_images: torch.Tensor | None = None
    scale_labels: np.ndarray | None = None
    heldout: torch.Tensor | None = None
    heldout_labels: np.ndarray | None = None
    train_labels: np.ndarray | None = None


def signed_rows(pf, rows: np.ndarray) -> torch.Tensor:
    """Rows (any order, repeats allowed) of a patch file as float32 ``[N, C, S, S]`` in [-1, 1]."""
    return torch.from_numpy(pf.read_patches(rows, signed=True))


def read_inputs(real_path: Path, synthetic_path: Path, *, real_split: str, heldout_split: str,
                max_sources: int | None, max_real_per_class: int, max_heldout: int,
                rng: np.random.Generator) -> AssessInputs:
    """Check the two files, choose the rows (:func:`select_rows`) and read their images."""
    from dagan_gn.store.patch_file import PatchFile

    with PatchFile(real_path) as real, PatchFile(synthetic_path) as syn:
        sel = select_rows(real, syn, real_path, synthetic_path, real_split=real_split, heldout_split=heldout_split,
                          max_sources=max_sources, max_real_per_class=max_real_per_class, max_heldout=max_heldout,
                          rng=rng)
        s, v = sel.variant_rows.shape
        sel.sources = signed_rows(real, sel.source_rows)
        sel.variants = signed_rows(syn, sel.variant_rows).view(s, v, *sel.sources.shape[1:])
        sel.scale_images = signed_rows(real, sel.scale_rows)
        sel.scale_labels = real.labels[sel.scale_rows]
        sel.heldout = signed_rows(real, sel.heldout_rows)
        sel.heldout_labels = real.labels[sel.heldout_rows]
        sel.train_labels = real.labels[sel.train_rows]
    return sel


def select_rows(real, syn, real_path: Path, syn_path: Path, *, real_split: str, heldout_split: str,
                max_sources: int | None, max_real_per_class: int, max_heldout: int,
                rng: np.random.Generator) -> AssessInputs:
    """The checks and the seeded choices of two open patch files (``rng`` draws: sources, scale, held-out)."""
    notes: list[str] = []
    _check_files(real, syn, real_path, syn_path, real_split=real_split, heldout_split=heldout_split)
    src, var = _check_provenance(real, syn, real_path, syn_path, notes)
    heldout_split, held_rows = _heldout_rows(real, real_path, syn_path, src, heldout_split, real_split, notes)
    train_rows = real.split_indices(real_split)
    if len(train_rows) == 0:
        raise AssessError(f"{real_path}: the {real_split!r} split is empty")
    source_rows, variant_rows, n_total = _pick_sources(src, var, max_sources, rng, notes)

    # The real-pair scale: up to max_real_per_class images of each class of the real split.
    scale = []
    for c in np.unique(real.labels[train_rows]):
        members = train_rows[real.labels[train_rows] == c]
        if len(members) > max_real_per_class:
            members = rng.choice(members, max_real_per_class, replace=False)
        scale.append(members)
    scale_rows = np.sort(np.concatenate(scale))
    if len(scale_rows) < len(train_rows):
        notes.append(f"real-pair scale from {len(scale_rows)} of the {len(train_rows)} {real_split!r} patches "
                     f"(at most {max_real_per_class} per class)")
    if len(held_rows) > max_heldout:
        held_rows = np.sort(rng.choice(held_rows, max_heldout, replace=False))
        notes.append(f"{max_heldout} held-out patches used (random, seeded)")
    lacking = [real.class_names[c] for c in np.unique(real.labels[source_rows])
               if (real.labels[scale_rows] == c).sum() < 2]
    if lacking:
        notes.append(f"classes {', '.join(lacking)} have fewer than 2 real {real_split!r} patches: their sources' "
                     "ratios are undefined (n/a) and left out of the means")
    return AssessInputs(class_names=list(real.class_names), heldout_split=heldout_split, source_rows=source_rows,
                        source_labels=real.labels[source_rows], variant_rows=variant_rows, n_sources_total=n_total,
                        train_rows=train_rows, scale_rows=scale_rows, heldout_rows=held_rows, notes=notes)


def _check_files(real, syn, real_path: Path, syn_path: Path, *, real_split: str, heldout_split: str) -> None:
    """The file-level checks: kinds, provenance columns, patch shape, class table, splits."""
    if real.synthetic:
        raise AssessError(f"{real_path}: is a synthetic patch file; --real must be the real patches")
    if not syn.synthetic:
        raise AssessError(f"{syn_path}: not a synthetic patch file (made by `dagan augment`)")
    missing = [c for c in ("source_index", "variant") if c not in syn.provenance_columns]
    if missing:
        raise AssessError(f"{syn_path}: no provenance column(s) {', '.join(missing)}, so its variants cannot be "
                          "grouped by source (is it a `dagan augment` output?)")
    if (syn.patch_size, syn.channels) != (real.patch_size, real.channels):
        raise AssessError(f"{syn_path} holds {syn.channels}×{syn.patch_size}px patches but {real_path.name} "
                          f"{real.channels}×{real.patch_size}px")
    if list(syn.class_names) != list(real.class_names):
        raise AssessError(f"{syn_path} has classes {list(syn.class_names)}, but {real_path.name} has "
                          f"{list(real.class_names)}: variants must come from the real file's class table")
    if len(syn) == 0:
        raise AssessError(f"{syn_path}: holds no patches")
    for split in (real_split, heldout_split):
        if split not in real.split_names:
            raise AssessError(f"{real_path}: unknown split {split!r}; the file has {real.split_names}")
    if real_split == heldout_split:
        raise AssessError(f"the real split and the held-out split are both {real_split!r}: fidelity and class "
                          "consistency need patches the classifier did not see")


def _check_provenance(real, syn, real_path: Path, syn_path: Path, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each variant's ``(source_index, variant)``, after checking that its source row is in the real file with the
    same class (and patient pseudonym, when both files have one)."""
    src = syn.provenance("source_index").astype(np.int64)
    var = syn.provenance("variant").astype(np.int64)
    outside = (src < 0) | (src >= len(real))
    if outside.any():
        raise AssessError(f"{syn_path}: {int(outside.sum())} variants come from rows (e.g. {int(src[outside][0])}) "
                          f"that are not in {real_path.name} ({len(real)} rows): was it made from another patch file?")
    wrong_class = syn.labels != real.labels[src]
    if wrong_class.any():
        raise AssessError(f"{syn_path}: {int(wrong_class.sum())} variants have another class than their source row "
                          f"in {real_path.name}: was it made from another patch file?")
    if "patient_pseudonym" in syn.provenance_columns and "patient_pseudonym" in real.provenance_columns:
        if (syn.provenance("patient_pseudonym") != real.provenance("patient_pseudonym")[src]).any():
            raise AssessError(f"{syn_path}: the patient pseudonyms of its variants differ from their source rows in "
                              f"{real_path.name}: was it made from another patch file?")
    source_file = syn.attrs.get("source_file")
    if source_file and Path(str(source_file)).name != real_path.name:
        notes.append(f"the synthetic file was made from a file named {Path(str(source_file)).name}; its rows match "
                     f"{real_path.name} (classes and pseudonyms checked)")
    return src, var


def _heldout_rows(real, real_path: Path, syn_path: Path, src: np.ndarray, heldout_split: str, real_split: str,
                  notes: list[str]) -> tuple[str, np.ndarray]:
    """The held-out split (``test`` ↔ ``val`` when empty) and its rows; refused when variants come from it."""
    held_rows = real.split_indices(heldout_split)
    if len(held_rows) == 0:
        fallback = {"test": "val", "val": "test"}.get(heldout_split)
        if fallback and fallback != real_split and len(real.split_indices(fallback)):
            notes.append(f"the {heldout_split!r} split of {real_path.name} is empty; held-out split {fallback!r} used")
            heldout_split, held_rows = fallback, real.split_indices(fallback)
        else:
            raise AssessError(f"{real_path}: the held-out split {heldout_split!r} is empty (and no val/test split to "
                              "fall back on)")
    held_names = {real.split_names[s] for s in np.unique(real.split[src])}
    if heldout_split in held_names:
        raise AssessError(f"{syn_path}: contains variants of {heldout_split!r} patches of {real_path.name}; "
                          "comparing them with that split would leak (pass another --heldout-split)")
    return heldout_split, held_rows


def _pick_sources(src: np.ndarray, var: np.ndarray, max_sources: int | None, rng: np.random.Generator,
                  notes: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Variants grouped by source, each source's in variant order; up to ``max_sources`` sources (seeded), the
    first ``V`` variants of each (``V``: the fewest any chosen source has). Returns ``(source rows, variant rows
    [S, V], number of sources in the file)``."""
    sources, groups = div.group_by_source(src, var)
    counts = np.array([len(g) for g in groups])
    n_total = len(sources)
    pick = np.arange(n_total)
    if max_sources is not None and n_total > max_sources:
        pick = np.sort(rng.choice(n_total, max_sources, replace=False))
        notes.append(f"{max_sources} of the {n_total} sources assessed (random, seeded)")
    v = int(counts[pick].min())
    if counts[pick].max() != v:
        notes.append(f"sources have {v} to {int(counts[pick].max())} variants; the first {v} of each are used")
    if v < 2:
        notes.append("a single variant per source: diversity (variant-to-variant distance) is undefined")
    return sources[pick], np.stack([groups[k][:v] for k in pick]), n_total
