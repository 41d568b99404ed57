"""Black-box membership inference against a synthetic set: can an outsider who holds the synthetic patches and a
real patch tell whether that patch was in the generator's training set?

Two attacks, both on tensors only (no files; :mod:`dagan_gn.jobs.report` reads the patch files):

- **distance to the nearest synthetic patch** (the "GAN-leaks" attack of Chen et al., CCS 2020, black-box full
  version): a training patch (member) that the generator reproduced sits closer to the synthetic set than a real patch
  it never saw (non-member). The score of a query ``x`` is ``-min_j ||x - s_j||`` (pixel L2 on [-1, 1], or L2 in a
  feature space).
- **DOMIAS** (van Breugel, Sun, Qian, van der Schaar: "Membership Inference Attacks against Synthetic Data through
  Overfitting Detection", AISTATS 2023): the score is the density ratio ``p_G(x) / p_R(x)`` of the synthetic
  data over a *reference* set of real data from the same population, so a query is flagged when the generator
  over-represents the neighbourhood of that very point, not merely because the point lies in a dense region. The
  densities are Gaussian kernel density estimates (``scipy.stats.gaussian_kde``, Scott's bandwidth: the paper's
  KDE variant and the ``domias`` package's ``density_estimator="kde"``) in a low-dimensional space: the images (or
  their features) projected on the first ``n_components`` principal axes of the synthetic + reference data (a KDE
  needs many more points than dimensions). The ratio is computed as a difference of log densities, which orders the
  queries like the package's ``p_G / (p_R + 1e-20)`` but cannot underflow.

Each attack is summarised by the ROC AUC of telling members from non-members by its score (the Mann–Whitney U
statistic, ties counted half) with a stratified bootstrap confidence interval. AUC ≈ 0.5: no measurable leakage;
AUC → 1: membership can be read off the synthetic set.

A DAGAN's synthetic set is made of variants *of training patches*; a member is the source of some variants, so the
distance attack measures how far those variants stray from their sources. An AUC well above 0.5 there means the set
reveals which patches were used for training (it does not by itself mean the images are copies: see the
memorization check for that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

from dagan_gn.metrics.memorization import MemorizationError, embed, nearest_neighbors

__all__ = [
    "roc_auc",
    "bootstrap_auc",
    "nearest_synthetic_distance",
    "pca_projection",
    "domias_log_ratio",
    "AttackResult",
    "distance_attack",
    "domias_attack",
]


def roc_auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    """ROC AUC of ``scores`` (higher = "member") for the boolean ``is_member``: the Mann–Whitney U of the members
    over the non-members divided by ``n_members · n_nonmembers`` (ties count one half). NaN when a group is empty."""
    scores, is_member = np.asarray(scores, np.float64), np.asarray(is_member, bool)
    pos, neg = scores[is_member], scores[~is_member]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = stats.rankdata(np.concatenate([pos, neg]))  # average ranks: ties count half
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def bootstrap_auc(
    scores: np.ndarray, is_member: np.ndarray, *, n_bootstrap: int = 1000, level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """``(auc, low, high)``: the AUC and its percentile bootstrap interval at ``level``, members and non-members
    resampled separately (stratified, so every resample has both groups)."""
    scores, is_member = np.asarray(scores, np.float64), np.asarray(is_member, bool)
    auc = roc_auc(scores, is_member)
    if not np.isfinite(auc) or n_bootstrap < 1:
        return auc, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    pos, neg = scores[is_member], scores[~is_member]
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    aucs = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        resampled = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        aucs[b] = roc_auc(resampled, labels)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(aucs, [alpha, 1.0 - alpha])
    return auc, float(low), float(high)


def nearest_synthetic_distance(
    query: torch.Tensor, synthetic: torch.Tensor, *, chunk_size: int = 1024, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Euclidean distance ``[N]`` from every query row (image or feature vector) to its nearest synthetic row."""
    return nearest_neighbors(query, synthetic, chunk_size=chunk_size, device=device)[0]


def pca_projection(fit_on: torch.Tensor | np.ndarray, n_components: int) -> Callable[[Any], np.ndarray]:
    """A function projecting rows on the first ``n_components`` principal axes of ``fit_on`` (rows flattened; at
    most ``min(n_rows - 1, n_values)`` components)."""
    x = np.asarray(torch.as_tensor(fit_on).reshape(len(fit_on), -1).double())
    mean = x.mean(0)
    k = max(1, min(int(n_components), len(x) - 1, x.shape[1]))
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    axes = vt[:k].T

    def project(rows: Any) -> np.ndarray:
        r = np.asarray(torch.as_tensor(rows).reshape(len(rows), -1).double())
        return (r - mean) @ axes

    return project


def domias_log_ratio(query: np.ndarray, synthetic: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """DOMIAS's score ``log p_G(x) − log p_R(x)`` for each row of ``query`` ``[N, d]``, with ``p_G`` and ``p_R``
    Gaussian KDEs (Scott's rule) of ``synthetic`` ``[M, d]`` and ``reference`` ``[K, d]`` (low ``d``: project
    first, see :func:`pca_projection`)."""
    query, synthetic, reference = (np.asarray(a, np.float64) for a in (query, synthetic, reference))
    for name, a in (("synthetic", synthetic), ("reference", reference)):
        if len(a) <= a.shape[1]:
            raise MemorizationError(f"DOMIAS needs more {name} rows ({len(a)}) than dimensions ({a.shape[1]}) for "
                                    "its density estimate; use fewer components")
    p_g = stats.gaussian_kde(synthetic.T)
    p_r = stats.gaussian_kde(reference.T)
    return p_g.logpdf(query.T) - p_r.logpdf(query.T)


@dataclass
class AttackResult:
    """One membership attack: its AUC (members vs non-members) with the bootstrap interval, the group sizes, and
    the scores (higher = judged a member) for plots."""

    attack: str
    space: str
    auc: float
    ci_low: float
    ci_high: float
    level: float
    n_members: int
    n_nonmembers: int
    member_scores: list[float] = field(default_factory=list)
    nonmember_scores: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _features(x: torch.Tensor, extractor: Callable[[torch.Tensor], torch.Tensor] | None, device: Any) -> torch.Tensor:
    x = torch.as_tensor(x).float()
    return x if extractor is None else embed(x, extractor, device=device)


def _check(members: torch.Tensor, nonmembers: torch.Tensor, synthetic: torch.Tensor) -> None:
    if len(members) == 0 or len(nonmembers) == 0:
        raise MemorizationError(f"a membership test needs members and non-members; got {len(members)} and "
                                f"{len(nonmembers)}")
    if len(synthetic) == 0:
        raise MemorizationError("a membership test needs synthetic patches; got none")
    if members.shape[1:] != nonmembers.shape[1:] or members.shape[1:] != synthetic.shape[1:]:
        raise MemorizationError(f"shapes differ: members {tuple(members.shape[1:])}, non-members "
                                f"{tuple(nonmembers.shape[1:])}, synthetic {tuple(synthetic.shape[1:])}")


def distance_attack(
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    synthetic: torch.Tensor,
    *,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    space: str = "pixel",
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> AttackResult:
    """The nearest-synthetic-distance attack: score ``-d(x, nearest synthetic)``, AUC of members vs non-members.

    Args:
        members: ``[N, C, H, W]`` real images the generator was trained on, in [-1, 1].
        nonmembers: ``[K, C, H, W]`` real images it never saw (held-out patients).
        synthetic: ``[M, C, H, W]`` the synthetic set.
        extractor: a feature extractor (images → ``[B, D]``) to measure distances in; None for pixel L2.
        space: the name of that space, for the report.
    """
    members, nonmembers, synthetic = (torch.as_tensor(a).float() for a in (members, nonmembers, synthetic))
    _check(members, nonmembers, synthetic)
    syn = _features(synthetic, extractor, device)
    d_mem = nearest_synthetic_distance(_features(members, extractor, device), syn, device=device).double().numpy()
    d_non = nearest_synthetic_distance(_features(nonmembers, extractor, device), syn, device=device).double().numpy()
    scores = -np.r_[d_mem, d_non]
    is_member = np.r_[np.ones(len(d_mem), bool), np.zeros(len(d_non), bool)]
    auc, low, high = bootstrap_auc(scores, is_member, n_bootstrap=n_bootstrap, level=level, seed=seed)
    return AttackResult("distance", space, auc, low, high, level, len(d_mem), len(d_non),
                        member_scores=(-d_mem).tolist(), nonmember_scores=(-d_non).tolist(),
                        details={"member_median_distance": float(np.median(d_mem)),
                                 "nonmember_median_distance": float(np.median(d_non))})


def domias_attack(
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    synthetic: torch.Tensor,
    reference: torch.Tensor,
    *,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    space: str = "pixel",
    n_components: int = 5,
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> AttackResult:
    """DOMIAS (density ratio of synthetic over reference data) on images or their features.

    Args:
        reference: ``[R, C, H, W]`` real images from the same population that are neither members nor among the
            ``nonmembers`` queries (a non-member inside the reference set would raise its own ``p_R`` and bias the
            test towards leakage).
        n_components: principal axes (of synthetic + reference) the KDEs work in.
    Other arguments as :func:`distance_attack`.
    """
    members, nonmembers, synthetic, reference = (torch.as_tensor(a).float()
                                                 for a in (members, nonmembers, synthetic, reference))
    _check(members, nonmembers, synthetic)
    if len(reference) == 0:
        raise MemorizationError("DOMIAS needs a reference set of real non-member patches; got none")
    f_syn, f_ref, f_mem, f_non = (_features(x, extractor, device) for x in (synthetic, reference, members, nonmembers))
    # The axes come from the data the attacker is assumed to hold (synthetic + reference), never from the queries.
    k = min(int(n_components), len(f_syn) - 2, len(f_ref) - 2)
    if k < 1:
        raise MemorizationError(f"DOMIAS needs at least 3 synthetic and 3 reference rows; got {len(f_syn)} and "
                                f"{len(f_ref)}")
    project = pca_projection(torch.cat([f_syn, f_ref]), k)
    score = domias_log_ratio(project(torch.cat([f_mem, f_non])), project(f_syn), project(f_ref))
    is_member = np.r_[np.ones(len(f_mem), bool), np.zeros(len(f_non), bool)]
    auc, low, high = bootstrap_auc(score, is_member, n_bootstrap=n_bootstrap, level=level, seed=seed)
    return AttackResult("domias", space, auc, low, high, level, len(f_mem), len(f_non),
                        member_scores=score[is_member].tolist(), nonmember_scores=score[~is_member].tolist(),
                        details={"n_components": int(project(f_syn[:1]).shape[1]), "n_reference": len(f_ref),
                                 "n_synthetic": len(f_syn), "density": "gaussian_kde (Scott)"})
