"""The report of ``dagan assess``: :class:`AssessReport` (what was measured, as JSON), its plain-text summary table,
its Markdown page and the diversity histogram.

Every per-space row, column and panel is generated from the spaces the report holds, named by their entries in the
metric registry (:mod:`dagan_gn.metrics.registry`: ``label``); a space that is no longer registered is named by its
key. Nothing here computes a metric (:mod:`dagan_gn.metrics.variant_set` does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from dagan_gn.metrics.registry import MetricError, get_metric

__all__ = ["AssessReport", "write_assess_report", "plot_histograms", "space_label"]


def space_label(space: str) -> str:
    """How a distance space is named in the report: its registered ``label`` (the key when unregistered)."""
    try:
        return get_metric(space).label
    except MetricError:
        return space


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
            rows.append((space_label(s), _fmt_ci(d), _fmt_ci(t), _fmt(d.get("raw_mean"), 4),
                         _fmt(d.get("raw_real_mean"), 4)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        out = [f"{self.synthetic} vs {self.real}: {self.n_sources} sources × {self.variants_per_source} variants "
               "(ratios to random real same-class pairs: 1 = as varied as real data, 0 = copies; mean ± 95 % CI)",
               *lines]
        for space, ident in self.identity.items():
            out.append(f"identity ({space_label(space)}): nearest source is its own "
                       f"{_fmt_ci(ident['nearest_is_source'])}, closer to its source than to any other class "
                       f"{_fmt_ci(ident['closer_than_other_class'])}")
        cc = self.class_consistency
        if cc is not None:
            out.append(f"class consistency: accuracy on variants {_fmt(cc['variants']['accuracy'])} "
                       f"(balanced {_fmt(cc['variants']['balanced_accuracy'])}), on held-out real "
                       f"{_fmt(cc['heldout']['accuracy'])} (balanced {_fmt(cc['heldout']['balanced_accuracy'])})")
        fd = self.fidelity
        if fd is not None:
            out.append(f"KID vs held-out: variants {_fmt(fd['kid_mean'], 4)}, real floor "
                       f"{_fmt(fd['floor_kid_mean'], 4)} (subset {fd['kid_subset_size']}, {fd['feature_extractor']})")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)

    def to_markdown(self) -> str:
        """The Markdown page (``assess.md``): one section per measure, then notes and figures."""
        lines = [*self._markdown_spaces(), *self._markdown_identity(), *self._markdown_class_consistency(),
                 *self._markdown_fidelity()]
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

    def _markdown_spaces(self) -> list[str]:
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
            "| space | diversity | distance to source | variant pairs (raw) | variant–source (raw) | "
            "real pairs (raw) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in self.spaces:
            d, t = self.diversity[s], self.source_distance[s]
            lines.append(f"| {space_label(s)} | {_fmt_ci(d)} [{_fmt(d['median'])}] | {_fmt_ci(t)} "
                         f"[{_fmt(t['median'])}] | {_fmt(d['raw_mean'], 4)} | {_fmt(t['raw_mean'], 4)} | "
                         f"{_fmt(d['raw_real_mean'], 4)} |")
        lines += ["", "Per class (mean ratio over the class's sources; real-pair distance in brackets):", "",
                  "| class | sources | " + " | ".join(f"diversity, {space_label(s)}" for s in self.spaces) + " |",
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
        return lines

    def _markdown_identity(self) -> list[str]:
        if not self.identity:
            return []
        lines = ["", "## Identity", "",
                 "Does a variant still look like *its* source? Per variant: is its nearest neighbour among all "
                 "assessed sources its own source, and is it closer to its source than to the nearest real patch "
                 "of any other class (the sources and the real-pair patches)? Share of variants per source, mean "
                 "± 95 % CI over sources. Diversity near 1 with identity near 1/sources is a new random patch of "
                 "the class, not a variant of its source.", "",
                 "| space | nearest source is its own | closer to its source than to another class | sources | "
                 "real-pair patches |", "| --- | ---: | ---: | ---: | ---: |"]
        for space, ident in self.identity.items():
            lines.append(f"| {space_label(space)} | {_fmt_ci(ident['nearest_is_source'])} | "
                         f"{_fmt_ci(ident['closer_than_other_class'])} | {ident['n_candidates']} | "
                         f"{ident['n_other']} |")
        return lines

    def _markdown_class_consistency(self) -> list[str]:
        cc = self.class_consistency
        lines = ["", "## Class consistency", ""]
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
        return lines

    def _markdown_fidelity(self) -> list[str]:
        fd = self.fidelity
        lines = ["", "## Fidelity (KID)", ""]
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
        return lines

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



def plot_histograms(report: AssessReport, results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One panel per space: the per-source diversity ratios (bars) and distance-to-source ratios (outline), with
    the real-data level 1.0 marked. ``results``: space → an object with ``diversity_ratios`` and ``source_ratios``
    (:class:`~dagan_gn.metrics.variant_set.SpaceResult`)."""
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
        ax.set_title(f"{space_label(space)} (median diversity {_fmt(report.diversity[space]['median'], 2)})",
                     fontsize=9)
        ax.set_xlabel("ratio to real same-class pair distance")
        ax.set_ylabel("sources")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{report.synthetic}: {report.n_sources} sources × {report.variants_per_source} variants",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

