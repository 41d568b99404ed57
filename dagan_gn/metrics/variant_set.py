"""The measures of a variant set that ``dagan assess`` reports, on tensors (no file I/O).

- :func:`measure_space`: diversity and distance-to-source ratios of the variants in one distance space, on one real
  same-class pair scale, each summarised over sources by :func:`summarize_ratios` (mean ± 95 % CI, median,
  per-class mean, mean raw distance);
- :func:`identity_summary`: does a variant still look like *its* source
  (:func:`~dagan_gn.metrics.diversity.source_identity`);
- :func:`class_accuracy`: accuracy, balanced accuracy and per-class recall of predicted labels;
- :func:`train_class_judge`: the class-consistency classifier, trained on the real split;
- :func:`kid_with_floor`: KID of the variants against held-out images next to the real-vs-real floor.

The distance spaces themselves are entries of the metric registry (:mod:`dagan_gn.metrics.registry`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from dagan_gn.metrics import diversity as div
from dagan_gn.metrics.downstream import DownstreamConfig, mean_ci

__all__ = ["SpaceResult", "summarize_ratios", "measure_space", "identity_summary", "class_accuracy",
           "train_class_judge", "kid_with_floor"]


def summarize_ratios(ratios: torch.Tensor, labels: np.ndarray, class_names: list[str],
                     raw: torch.Tensor) -> dict[str, Any]:
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
class SpaceResult:
    """One space's figures: the real-pair scale per class, the two summaries and the per-source ratios."""

    real_pairs: dict[str, float]
    diversity: dict[str, Any]
    source_distance: dict[str, Any]
    diversity_ratios: torch.Tensor
    source_ratios: torch.Tensor


def measure_space(distance: div.Distance, sources: torch.Tensor, variants: torch.Tensor, scale: torch.Tensor,
                  scale_labels: np.ndarray, source_labels: np.ndarray, class_names: list[str], *, n_pairs: int,
                  seed: int) -> SpaceResult:
    """Both ratios in one space, on one real-pair scale (computed once, shared by the two ratios): ``sources``
    ``[S, ...]``, ``variants`` ``[S, V, ...]``, ``scale`` the real images (or features) behind the scale."""
    ref = div.same_class_real_pairs(scale, scale_labels, distance, n_pairs=n_pairs, seed=seed)
    r_div = div.diversity_ratios(variants, source_labels, None, None, distance, reference=ref)
    r_src = div.source_distance_ratios(sources, variants, source_labels, None, None, distance, reference=ref)
    d = summarize_ratios(r_div, source_labels, class_names, div.mean_pairwise(variants, distance))
    t = summarize_ratios(r_src, source_labels, class_names, div.mean_source_distance(sources, variants, distance))
    # The denominator a typical source was divided by (the "two random real patches differ by 0.131").
    scale_of_sources = np.asarray([ref.get(int(c), math.nan) for c in source_labels])
    d["raw_real_mean"] = t["raw_real_mean"] = (
        float(np.nanmean(scale_of_sources)) if np.isfinite(scale_of_sources).any() else math.nan)
    return SpaceResult({class_names[c]: m for c, m in ref.items()}, d, t, r_div, r_src)


def identity_summary(sources: torch.Tensor, variants: torch.Tensor, source_labels: np.ndarray, others: torch.Tensor,
                     other_labels: np.ndarray, *, p: float) -> dict[str, Any]:
    """The identity shares of :func:`~dagan_gn.metrics.diversity.source_identity`, mean ± 95 % CI over sources."""
    result = div.source_identity(sources, variants, source_labels, others, other_labels, p=p)
    out: dict[str, Any] = {"n_candidates": int(sources.shape[0]), "n_other": int(others.shape[0])}
    for key in ("nearest_is_source", "closer_than_other_class"):
        per_source = result[key].double().mean(dim=1).tolist()
        mean, half = mean_ci(per_source)
        out[key] = {"mean": mean, "ci95": half, "n": len(per_source)}
    return out


def class_accuracy(pred: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """``n``, ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present) and per-class ``recall``."""
    recall = {class_names[int(c)]: float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    return {"n": int(len(labels)), "accuracy": float((pred == labels).mean()) if len(labels) else math.nan,
            "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else math.nan, "recall": recall}


def train_class_judge(real_path: str | os.PathLike, real_split: str, num_classes: int, config: DownstreamConfig, *,
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


def kid_with_floor(variants: torch.Tensor, heldout: torch.Tensor, n_real: int,
                   draw_real: Callable[[int], torch.Tensor], *, feature_extractor: str, kid_subset_size: int,
                   kid_subsets: int, inception_weights: Any, device: torch.device, seed: int, notes: list[str],
                   real_split: str) -> dict[str, Any] | None:
    """KID of the variants vs held-out, and the floor: a same-size random subset of the ``n_real`` real images
    (``draw_real(n)`` draws ``n`` of them, called only when KID can be computed) vs the same held-out set, with one
    subset size for both so the two numbers are comparable. Reasons and reductions go to ``notes``; None when a
    set has fewer than 2 images."""
    from dagan_gn.metrics.fidelity import compute_fidelity

    n_floor = min(len(variants), n_real)
    k = int(min(kid_subset_size, len(variants), n_floor, len(heldout)))
    if k < 2:
        notes.append(f"KID not computed: it needs at least 2 images in each set (variants {len(variants)}, "
                     f"{real_split} {n_floor}, held-out {len(heldout)})")
        return None
    floor = draw_real(n_floor)
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
