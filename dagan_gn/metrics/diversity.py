"""How varied is a set of variants? Diversity and distance-to-source on the scale of real data.

A DAGAN makes ``V`` variants of each source patch. Two questions tell an augmentation from a copy machine:

- **diversity** — how far apart are the variants of one source? (:func:`mean_pairwise`, over the ``V(V-1)/2``
  pairs ``i < j``)
- **distance to source** — how far is each variant from the patch it was made from? (:func:`mean_source_distance`)

Raw distances mean little on their own (0.01 in pixels is a lot for a flat patch and nothing for a textured one), so
both are divided by the mean distance between **random real images of the same class**
(:func:`same_class_real_pairs`): a ratio of 1.0 means "as varied as real data", ~0 means copies.
:func:`diversity_ratios` and :func:`source_distance_ratios` return that ratio per source.

Everything here is a pure function on tensors (torch-fidelity style: no file I/O). Images are ``[B, C, H, W]`` in
[-1, 1] (the networks' scale); a :data:`Distance` maps two such batches to ``[B]`` distances, one per pair. Three
distances are provided:

- :func:`pixel_l1` — mean absolute difference on the [0, 1] intensity scale;
- :func:`ms_ssim_distance` — ``1 − MS-SSIM`` (MONAI), with fewer scales for small images (see
  :func:`ms_ssim_scales`);
- :func:`feature_l2` — Euclidean distance between feature vectors ``[B, D]``, e.g. the penultimate layer of a
  classifier (:class:`PenultimateFeatures` + :func:`dagan_gn.metrics.memorization.embed`). Embed the images
  once and pass the features ``[S, V, D]`` / ``[N, D]`` to the same functions: they only index the first dimensions.

Undefined values are NaN, never an error: a source with fewer than 2 variants has no pairwise diversity; a class
with fewer than 2 real images (or whose real images are all identical, mean distance 0) has no real-pair scale, so
its sources' ratios are NaN. Use ``ratios.nanmean()`` for a summary.

Cost: :func:`diversity_ratios` with :func:`pixel_l1` on 8 sources × 7 variants at 64 px, with 1000 real pairs per
class, takes a few milliseconds on a CPU (cheap enough for ``dagan train`` to log it at every sample step); pass a
precomputed ``reference`` (the output of :func:`same_class_real_pairs`) to skip the real pairs altogether.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "Distance",
    "pixel_l1",
    "ms_ssim_distance",
    "ms_ssim_scales",
    "feature_l2",
    "mean_pairwise",
    "mean_source_distance",
    "same_class_real_pairs",
    "diversity_ratios",
    "source_distance_ratios",
    "PenultimateFeatures",
    "group_by_source",
    "source_identity",
]

#: ``distance(a, b) -> [B]``: one distance per pair of ``a [B, ...]`` and ``b [B, ...]`` (images: [B, C, H, W] in
#: [-1, 1]). Must be symmetric and 0 for identical inputs.
Distance = Callable[[Tensor, Tensor], Tensor]

#: Pairs per call of a distance inside the aggregating functions: bounds memory (MS-SSIM keeps five full-size maps
#: per pair) without making small calls slow.
_CHUNK = 256

# The standard MS-SSIM scale weights (Wang, Simoncelli & Bovik 2003), finest scale first; MONAI's defaults.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_SSIM_KERNEL = 11


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"distance needs two batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"distance needs batches [B, ...], got shape {tuple(a.shape)}")


# --------------------------------------------------------------------------------------------- distances


def pixel_l1(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute pixel difference per pair, on the [0, 1] intensity scale (images are given in [-1, 1], so the
    difference is halved): 0 for copies, ~0.13 between two real demo patches of one class."""
    _check_pair(a, b)
    return (a.float() - b.float()).abs().flatten(1).mean(1) * 0.5


def ms_ssim_scales(size: int) -> tuple[int, int]:
    """``(number of scales, kernel size)`` that :func:`ms_ssim_distance` uses for images whose smaller side is
    ``size``.

    MS-SSIM halves the image ``n − 1`` times and needs the coarsest level to hold the 11-px Gaussian window (MONAI
    also checks ``size // (n − 1)² > 10``). So: 5 scales from 176 px (256 px: the standard MS-SSIM), 4 from 99 px,
    3 from 44 px (64 px), 2 from 22 px (28 and 32 px), plain SSIM (1 scale) from 11 px, and below that plain SSIM with
    the largest odd window that fits. With fewer than 5 scales the first ``n`` standard weights are used, renormalised
    to sum to 1, so the value stays in [0, 1].
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    for n in range(len(_MS_SSIM_WEIGHTS), 1, -1):
        fits_window = size // 2 ** (n - 1) >= _SSIM_KERNEL
        fits_monai_check = size // (n - 1) ** 2 > _SSIM_KERNEL - 1
        if fits_window and fits_monai_check:
            return n, _SSIM_KERNEL
    if size >= _SSIM_KERNEL:
        return 1, _SSIM_KERNEL
    return 1, size if size % 2 == 1 else size - 1


def ms_ssim_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 − MS-SSIM`` per pair (MONAI's ``compute_ms_ssim``, Gaussian window 11, σ 1.5, data range 1 on the [0, 1]
    scale); 0 for copies, about 1 for unrelated images (MONAI clamps negative MS-SSIM terms at 0; plain SSIM, used
    below 22 px, can go slightly negative, so the distance slightly above 1). Works from 1 px up; the number of scales follows the image
    size (:func:`ms_ssim_scales`: 3 scales at 64 px, 2 at 28/32 px, plain SSIM below 22 px, 5 at 256 px).
    Channels are averaged."""
    from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs

    _check_pair(a, b)
    if a.ndim != 4:
        raise ValueError(f"ms_ssim_distance needs images [B, C, H, W], got shape {tuple(a.shape)}")
    if a.shape[0] == 0:
        return a.new_zeros(0, dtype=torch.float32)
    x = (a.float() + 1).mul_(0.5).clamp_(0, 1)
    y = (b.float() + 1).mul_(0.5).clamp_(0, 1)
    scales, kernel = ms_ssim_scales(min(a.shape[-2:]))
    if scales == 1:
        ssim, _ = compute_ssim_and_cs(x, y, spatial_dims=2, kernel_size=(kernel, kernel), kernel_sigma=(1.5, 1.5),
                                      data_range=1.0)
        similarity = ssim.flatten(1).mean(1)
    else:
        w = _MS_SSIM_WEIGHTS[:scales]
        weights = tuple(v / sum(w) for v in w)
        similarity = compute_ms_ssim(x, y, spatial_dims=2, data_range=1.0, kernel_size=kernel,
                                     weights=weights).flatten()
    # Rounding leaves identical images a few 1e-7 away from similarity 1; a copy must read as distance 0.
    return (1.0 - similarity).clamp_(min=0.0)


def feature_l2(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance per pair of feature vectors ``[B, D]`` (any trailing shape is flattened)."""
    _check_pair(a, b)
    return (a.float() - b.float()).flatten(1).pow(2).sum(1).sqrt()


def _chunked(distance: Distance, a: Tensor, b: Tensor, pairs_i: Tensor, pairs_j: Tensor) -> Tensor:
    """``distance(a[pairs_i], b[pairs_j])`` in chunks of :data:`_CHUNK` pairs (float32, on ``a``'s device)."""
    out = []
    for s in range(0, len(pairs_i), _CHUNK):
        i, j = pairs_i[s : s + _CHUNK], pairs_j[s : s + _CHUNK]
        out.append(distance(a[i], b[j]).float().reshape(-1))
    return torch.cat(out) if out else torch.zeros(0, device=a.device)


# --------------------------------------------------------------------------------------------- aggregates


@torch.no_grad()
def mean_pairwise(variants: Tensor, distance: Distance) -> Tensor:
    """Mean distance between the variants of each source, over all pairs ``i < j``.

    Args:
        variants: ``[S, V, ...]``: ``V`` variants of each of ``S`` sources (images ``[S, V, C, H, W]``, or features
            ``[S, V, D]``).
        distance: a :data:`Distance`.

    Returns:
        ``[S]`` float32 on the CPU; NaN everywhere when ``V < 2``.
    """
    if variants.ndim < 3:
        raise ValueError(f"variants must be [S, V, ...], got shape {tuple(variants.shape)}")
    s, v = variants.shape[:2]
    if v < 2:
        return torch.full((s,), float("nan"))
    i, j = torch.triu_indices(v, v, offset=1)
    flat = variants.reshape(s * v, *variants.shape[2:])
    base = (torch.arange(s) * v).repeat_interleave(len(i))
    d = _chunked(distance, flat, flat, base + i.repeat(s), base + j.repeat(s))
    return d.view(s, len(i)).mean(1).cpu()


@torch.no_grad()
def mean_source_distance(sources: Tensor, variants: Tensor, distance: Distance) -> Tensor:
    """Mean distance from each source ``[S, ...]`` to its variants ``[S, V, ...]``: ``[S]`` float32 on the CPU (NaN
    when ``V == 0``)."""
    if variants.ndim < 3 or sources.shape[0] != variants.shape[0] or sources.shape[1:] != variants.shape[2:]:
        raise ValueError(f"sources [S, ...] and variants [S, V, ...] do not match: {tuple(sources.shape)} and "
                         f"{tuple(variants.shape)}")
    s, v = variants.shape[:2]
    if v == 0:
        return torch.full((s,), float("nan"))
    flat = variants.reshape(s * v, *variants.shape[2:])
    src = torch.arange(s).repeat_interleave(v)
    d = _chunked(distance, sources, flat, src, torch.arange(s * v))
    return d.view(s, v).mean(1).cpu()


def _labels_array(labels: Tensor | np.ndarray | Sequence[int], n: int, what: str) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    arr = arr.astype(np.int64).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"{what}: {len(arr)} labels for {n} items")
    return arr


@torch.no_grad()
def same_class_real_pairs(
    images: Tensor,
    labels: Tensor | np.ndarray | Sequence[int],
    distance: Distance,
    *,
    n_pairs: int = 1000,
    seed: int = 0,
) -> dict[int, float]:
    """Mean distance between random pairs of distinct real images of the same class, per class.

    A class with at most ``n_pairs`` distinct pairs uses all of them (the exact mean); otherwise ``n_pairs`` pairs
    ``(i, j), i ≠ j`` are drawn uniformly (with replacement) from a generator seeded by ``(seed, class)``, so one
    class's value does not change when another class is added. The standard error is then about
    ``sd / sqrt(n_pairs)`` (≈ 3 % of the spread of pair distances for 1000 pairs).

    Args:
        images: ``[N, ...]`` real images (or their features).
        labels: ``[N]`` class indices.
        distance: a :data:`Distance`.
        n_pairs: pairs per class.
        seed: pair-sampling seed.

    Returns:
        ``{class: mean distance}`` for every class with at least 2 images; classes with fewer are absent.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1, got {n_pairs}")
    lab = _labels_array(labels, len(images), "same_class_real_pairs")
    out: dict[int, float] = {}
    for c in np.unique(lab).tolist():
        members = np.flatnonzero(lab == c)
        n = len(members)
        if n < 2:
            continue
        if n * (n - 1) // 2 <= n_pairs:
            i, j = np.triu_indices(n, k=1)
        else:
            rng = np.random.default_rng([int(seed), int(c)])
            i = rng.integers(0, n, n_pairs)
            j = rng.integers(0, n - 1, n_pairs)
            j = j + (j >= i)  # uniform over j != i
        gi, gj = torch.from_numpy(members[i]), torch.from_numpy(members[j])
        out[int(c)] = float(_chunked(distance, images, images, gi, gj).double().mean())
    return out


def _ratio(raw: Tensor, source_labels, reference: Mapping[int, float]) -> Tensor:
    lab = _labels_array(source_labels, len(raw), "source_labels")
    scale = torch.tensor([reference.get(int(c), float("nan")) for c in lab], dtype=torch.float64)
    # A zero scale (every real image of the class identical) is as undefined as a missing one.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, float("nan")))
    return (raw.double() / scale).float()


def group_by_source(source_index: np.ndarray | Sequence[int],
                    variant: np.ndarray | Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Group the rows of a variant set (``dagan augment``'s provenance ``source_index`` and ``variant``, one entry
    per row) by source: ``(sources, rows)`` with the sorted distinct source indices and, for each, the row numbers of
    its variants in variant order. ``np.stack([r[:v] for r in rows])`` with ``v = min(map(len, rows))`` gives the
    ``[S, V]`` row table whose images are the ``variants`` argument of the functions below."""
    source_index = np.asarray(source_index, dtype=np.int64).reshape(-1)
    variant = np.asarray(variant, dtype=np.int64).reshape(-1)
    if source_index.shape != variant.shape:
        raise ValueError(f"{len(source_index)} source indices for {len(variant)} variant numbers")
    order = np.lexsort((variant, source_index))
    sources, starts, counts = np.unique(source_index[order], return_index=True, return_counts=True)
    return sources, [order[a : a + n] for a, n in zip(starts, counts)]


def _reference(real, real_labels, distance, n_pairs, seed, reference) -> Mapping[int, float]:
    if reference is not None:
        return reference
    if real is None or real_labels is None:
        raise ValueError("pass the real images and labels, or a precomputed reference (same_class_real_pairs)")
    return same_class_real_pairs(real, real_labels, distance, n_pairs=n_pairs, seed=seed)


def diversity_ratios(
    variants: Tensor,
    source_labels: Tensor | np.ndarray | Sequence[int],
    real: Tensor | None,
    real_labels: Tensor | np.ndarray | Sequence[int] | None,
    distance: Distance = pixel_l1,
    *,
    n_pairs: int = 1000,
    seed: int = 0,
    reference: Mapping[int, float] | None = None,
) -> Tensor:
    """Per source: the mean distance between its variants divided by the mean distance between random real images of
    its class. 1.0: as varied as real data; ~0: the variants are copies of each other.

    Args:
        variants: ``[S, V, ...]`` (images in [-1, 1], or features for :func:`feature_l2`).
        source_labels: ``[S]`` class of each source.
        real: ``[N, ...]`` real images of the same kind (e.g. the training split), or None with ``reference``.
        real_labels: ``[N]`` their classes, or None with ``reference``.
        distance: a :data:`Distance` (default :func:`pixel_l1`).
        n_pairs, seed: real pairs per class and their seed (:func:`same_class_real_pairs`).
        reference: precomputed ``same_class_real_pairs(real, real_labels, distance, ...)``, to reuse one baseline
            across calls (e.g. every sample step of a training run); ``real``/``real_labels`` are then ignored.

    Returns:
        ``[S]`` float32 on the CPU; NaN for a source with ``V < 2`` or whose class has fewer than 2 real images.
    """
    ref = _reference(real, real_labels, distance, n_pairs, seed, reference)
    return _ratio(mean_pairwise(variants, distance), source_labels, ref)


def source_distance_ratios(
    sources: Tensor,
    variants: Tensor,
    source_labels: Tensor | np.ndarray | Sequence[int],
    real: Tensor | None,
    real_labels: Tensor | np.ndarray | Sequence[int] | None,
    distance: Distance = pixel_l1,
    *,
    n_pairs: int = 1000,
    seed: int = 0,
    reference: Mapping[int, float] | None = None,
) -> Tensor:
    """Per source: the mean distance from the source to its variants divided by the mean distance between random
    real images of its class. ~0: the variants are copies of the source (no augmentation); ~1: as far from the source
    as another real image of the class.

    Arguments as :func:`diversity_ratios`, plus ``sources [S, ...]``. Returns ``[S]`` float32 on the CPU; NaN for a
    source whose class has fewer than 2 real images.
    """
    ref = _reference(real, real_labels, distance, n_pairs, seed, reference)
    return _ratio(mean_source_distance(sources, variants, distance), source_labels, ref)


# --------------------------------------------------------------------------------------------- identity


def _nearest(queries: Tensor, candidates: Tensor, p: float, exclude: Tensor | None = None,
             chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """``(distance, index)`` of each query's nearest candidate (``torch.cdist`` with norm ``p`` on flattened
    vectors), chunked over queries; ``exclude [Q, K]`` True marks candidates a query may not pick."""
    q, c = queries.flatten(1).float(), candidates.flatten(1).float()
    dists, idx = [], []
    for a in range(0, len(q), chunk):
        d = torch.cdist(q[a : a + chunk], c, p=p)
        if exclude is not None:
            d = d.masked_fill(exclude[a : a + chunk], float("inf"))
        m = d.min(dim=1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists), torch.cat(idx)


def source_identity(
    sources: Tensor,
    variants: Tensor,
    source_labels: Tensor | np.ndarray | Sequence[int],
    others: Tensor | None = None,
    other_labels: Tensor | np.ndarray | Sequence[int] | None = None,
    *,
    p: float = 2.0,
) -> dict[str, Tensor]:
    """Does each variant keep its source's identity? Two per-variant tests, as ``[S, V]`` bool tensors:

    - ``nearest_is_source``: among all ``S`` sources, the variant's nearest one is its own source (a variant of a
      drawing looks most like that drawing, not like another source);
    - ``closer_than_other_class``: the variant is closer to its own source than to the nearest real image of any
      *other* class (among the sources and ``others``), i.e. it would be labelled right by its source's
      1-nearest-neighbour rule.

    Args:
        sources: ``[S, ...]`` images (or features).
        variants: ``[S, V, ...]`` of the same kind.
        source_labels: ``[S]``.
        others: optional ``[N, ...]`` more real images of the same kind (e.g. the real training split) that count as
            other-class competitors; images of the source's own class among them are ignored.
        other_labels: ``[N]`` with ``others``.
        p: the norm of the distance (1: pixel L1 ranking, 2: Euclidean features).

    Returns:
        ``{"nearest_is_source": [S, V] bool, "closer_than_other_class": [S, V] bool, "source_distance": [S, V],
        "other_class_distance": [S, V]}`` on the CPU (distances inf where no other-class image exists).
    """
    s, v = variants.shape[:2]
    if sources.shape[0] != s:
        raise ValueError(f"{sources.shape[0]} sources for variants of {s} sources")
    lab = torch.as_tensor(_labels_array(source_labels, s, "source_labels"))
    flat = variants.flatten(0, 1)
    own = torch.arange(s).repeat_interleave(v)
    _, nearest = _nearest(flat, sources, p)
    source_distance = (flat.flatten(1).float() - sources[own].flatten(1).float()).norm(p=p, dim=1)
    pool, pool_labels = sources, lab
    if others is not None:
        if other_labels is None:
            raise ValueError("pass other_labels with others")
        pool = torch.cat([sources.flatten(1).float(), others.flatten(1).float()])
        pool_labels = torch.cat([lab, torch.as_tensor(_labels_array(other_labels, len(others), "other_labels"))])
    same_class = lab[own].unsqueeze(1) == pool_labels.unsqueeze(0)
    other_distance, _ = _nearest(flat, pool, p, exclude=same_class)
    return {
        "nearest_is_source": (nearest == own).view(s, v),
        "closer_than_other_class": (source_distance < other_distance).view(s, v),
        "source_distance": source_distance.view(s, v),
        "other_class_distance": other_distance.view(s, v),
    }


# --------------------------------------------------------------------------------------------- feature space


class PenultimateFeatures(nn.Module):
    """The input of a classifier's last linear layer (its penultimate-layer embedding) as a feature extractor.

    Works for any classifier that ends in an ``nn.Linear`` (MONAI ``ResNet``'s ``fc``, ``DenseNet121``'s
    ``class_layers.out``, torchvision models): a forward hook on that layer captures its input, so the classifier
    needs no change. Calling it puts the classifier in eval mode (BatchNorm with running statistics), because in
    training mode an image's embedding would depend on the rest of its batch and copies would not be at distance 0.

    ``PenultimateFeatures(model)(images) -> [B, D]``; use with :func:`dagan_gn.metrics.memorization.embed` for
    batching.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(classifier).__name__} has no nn.Linear layer to take the embedding before")
        self.classifier = classifier
        self._head = linears[-1]

    @property
    def dim(self) -> int:
        """Embedding size (the last linear layer's ``in_features``)."""
        return int(self._head.in_features)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        captured: list[Tensor] = []
        handle = self._head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        was_training = self.classifier.training
        self.classifier.eval()
        try:
            self.classifier(images)
        finally:
            handle.remove()
            self.classifier.train(was_training)
        return captured[-1].flatten(1).float()

