"""Memorization / privacy check for synthetic patches, to run before synthetic data leaves the hospital.

For every synthetic patch we find its nearest training patch, in pixel space (L2 on the [-1, 1] images) and in a
feature space (a frozen, seeded random convolutional network by default, or any feature extractor you pass, e.g. the
downstream classifier's penultimate layer). These distances are compared with the *real-to-real* baseline: the
distances from held-out real patches (val/test, other patients) to their nearest training patch. A held-out patch
is by construction not a copy of a training patch, so

- the ``percentile``-th percentile (default the 1st) of the held-out nearest-neighbour distances is the near-copy
  threshold; a synthetic patch closer than that to a training patch is a **near-copy**. An honest generator has
  roughly ``percentile`` % near-copies; many more means it reproduces training patches.
- a synthetic patch whose nearest training patch belongs to a **different patient** than the patch it was generated
  from, and that is *very close* to it (closer than ``copy_factor`` × the smallest held-out distance, i.e. nearer
  than any real patch of another patient came to the training set) is a **patient copy**: the generator leaks another
  patient's tissue, which conditioning on the source cannot explain.
- near-copies of the source patch itself are counted separately (a DAGAN variant too close to its own source).

Distances are computed in chunks with ``torch.cdist`` so memory stays bounded by ``chunk_size²`` distances whatever
the numbers of patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dagan_gn.errors import DaganError

__all__ = [
    "MemorizationError",
    "nearest_neighbors",
    "RandomConvFeatures",
    "embed",
    "SpaceResult",
    "MemorizationReport",
    "check_memorization",
    "count_then_indices",
]


class MemorizationError(DaganError, ValueError):
    """A memorization check that cannot run on the given patches (empty sets, shapes that differ, bad options)."""


@torch.no_grad()
def nearest_neighbors(
    query: torch.Tensor,
    reference: torch.Tensor,
    *,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from every row of ``query`` to its nearest row of ``reference``, and that row's index.

    Args:
        query: ``[N, ...]`` (flattened to ``[N, D]``).
        reference: ``[M, ...]`` with the same number of elements per row.
        chunk_size: rows per chunk on each side; peak extra memory is ``chunk_size² `` distances plus two chunks.
        device: where to compute (default: the query's device); chunks are moved there one at a time.

    Returns:
        ``(distances [N] float32, indices [N] int64)`` on the CPU.
    """
    if len(reference) == 0:
        raise MemorizationError("the reference set is empty: there are no training patches to compare with")
    q = query.reshape(len(query), int(np.prod(query.shape[1:])))
    r = reference.reshape(len(reference), -1)
    if q.shape[1] != r.shape[1]:
        raise MemorizationError(f"query rows have {q.shape[1]} values but reference rows have {r.shape[1]}")
    dev = torch.device(device) if device is not None else q.device
    best_d = torch.empty(len(q), dtype=torch.float32)
    best_i = torch.empty(len(q), dtype=torch.int64)
    for qs in range(0, len(q), chunk_size):
        qc = q[qs : qs + chunk_size].to(dev, torch.float32)
        run_d = torch.full((len(qc),), math.inf, device=dev)
        run_i = torch.zeros(len(qc), dtype=torch.int64, device=dev)
        for rs in range(0, len(r), chunk_size):
            rc = r[rs : rs + chunk_size].to(dev, torch.float32)
            # The exact (non-matmul) path: the matmul shortcut loses precision for near-identical rows, which are
            # exactly the ones we are looking for.
            d = torch.cdist(qc[None], rc[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
            m, mi = d.min(dim=1)
            better = m < run_d
            run_d = torch.where(better, m, run_d)
            run_i = torch.where(better, mi + rs, run_i)
        best_d[qs : qs + len(qc)] = run_d.cpu()
        best_i[qs : qs + len(qc)] = run_i.cpu()
    return best_d, best_i


class RandomConvFeatures(nn.Module):
    """A frozen convolutional feature extractor with seeded random weights (no download, same features for the same
    seed on every machine). Random conv features preserve local structure well enough to find near-duplicates that
    are shifted or re-contrasted slightly, which pixel L2 misses.

    Input ``[B, C, H, W]`` in [-1, 1], output ``[B, width * 4 * 4 * 2]`` (L2-normalised): mean- and max-pooled maps of
    the last of three strided conv + ReLU stages on a 4×4 grid.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        chans = [in_channels, width, width, width]
        convs = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / (cin * 9)))
            convs += [conv, nn.ReLU()]
        self.body = nn.Sequential(*convs)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        f = torch.cat([nn.functional.adaptive_avg_pool2d(h, 4), nn.functional.adaptive_max_pool2d(h, 4)], 1)
        return nn.functional.normalize(f.flatten(1), dim=1)


@torch.no_grad()
def embed(
    images: torch.Tensor | np.ndarray,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Features ``[N, F]`` (CPU, float32) of ``images`` (``[N, C, H, W]`` in [-1, 1]), computed in batches."""
    images = torch.as_tensor(images)
    if isinstance(extractor, nn.Module):
        extractor = extractor.to(device).eval()
    out = []
    for s in range(0, len(images), batch_size):
        out.append(extractor(images[s : s + batch_size].to(device, torch.float32)).float().flatten(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@dataclass
class SpaceResult:
    """Nearest-neighbour statistics in one space (``pixel`` or ``feature``)."""

    space: str
    #: Near-copy threshold: the ``percentile``-th percentile of held-out → train nearest-neighbour distances.
    threshold: float
    percentile: float
    #: Patient-copy threshold: ``copy_factor`` × the smallest held-out → train nearest-neighbour distance.
    copy_threshold: float
    heldout_nn: dict[str, float]
    synthetic_nn: dict[str, float]
    #: Fraction of synthetic patches closer to a training patch than ``threshold`` (expected ≈ percentile / 100).
    near_copy_fraction: float
    #: Near-copies whose nearest training patch is the patch they were generated from.
    source_copy_fraction: float
    #: Indices (in the synthetic set) of near-copies and of patient copies.
    near_copy_indices: list[int]
    patient_copy_indices: list[int]
    #: Median synthetic NN distance / median held-out NN distance (≪ 1: synthetic patches hug the training set).
    median_ratio: float


@dataclass
class MemorizationReport:
    """Result of :func:`check_memorization`; :meth:`passed` is the release gate."""

    n_synthetic: int
    n_train: int
    n_heldout: int
    spaces: dict[str, SpaceResult]
    #: Largest acceptable near-copy fraction (default 2 × percentile / 100).
    max_near_copy_fraction: float
    #: Per synthetic patch: nearest training index and distance in each space (lists of equal length).
    per_sample: dict[str, list] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def passed(self) -> bool:
        """No patient copies and near-copy fractions within bounds in every space."""
        return all(
            not s.patient_copy_indices and s.near_copy_fraction <= self.max_near_copy_fraction
            for s in self.spaces.values()
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed()
        return d

    def to_markdown(self) -> str:
        lines = [
            "# Memorization check",
            "",
            f"{self.n_synthetic} synthetic patches vs {self.n_train} training patches; baseline: {self.n_heldout} "
            "held-out real patches (nearest training patch of each).",
            "",
            "| space | threshold (p{:g} held-out NN) | held-out NN median | synthetic NN median | median ratio | "
            "near-copies | copies of own source | patient copies |".format(
                next(iter(self.spaces.values())).percentile if self.spaces else 1
            ),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in self.spaces.values():
            lines.append(
                f"| {s.space} | {s.threshold:.4g} | {s.heldout_nn['median']:.4g} | {s.synthetic_nn['median']:.4g} | "
                f"{s.median_ratio:.3f} | {100 * s.near_copy_fraction:.2f} % ({len(s.near_copy_indices)}) | "
                f"{100 * s.source_copy_fraction:.2f} % | {len(s.patient_copy_indices)} |"
            )
        verdict = "PASSED" if self.passed() else "FAILED"
        lines += [
            "",
            f"**{verdict}**: release requires no patient copies and at most "
            f"{100 * self.max_near_copy_fraction:.2f} % near-copies in every space.",
        ]
        lines += self.failure_lines()
        return "\n".join(lines) + "\n"

    def failure_lines(self, max_indices: int = 20) -> list[str]:
        """One ``- space: COUNT ... (indices ...)`` line per failing finding: the count first, then the synthetic
        indices (an index must never read as a count)."""
        lines = []
        for s in self.spaces.values():
            findings = [(s.patient_copy_indices, "synthetic patch(es) copying another training patient")]
            if s.near_copy_fraction > self.max_near_copy_fraction:
                findings.append((s.near_copy_indices, "near-copies of training patches (more than the "
                                 f"{100 * self.max_near_copy_fraction:.2f} % allowed)"))
            for indices, what in findings:
                if indices:
                    lines.append(f"- {s.space}: {count_then_indices(indices, what, max_indices)}")
        return lines


def count_then_indices(indices: Sequence[int], what: str, max_indices: int = 20) -> str:
    """``"3 <what> (synthetic indices 4, 17, 10768)"``, the indices cut after ``max_indices`` with ``…``."""
    shown = ", ".join(str(int(i)) for i in indices[:max_indices])
    more = ", …" if len(indices) > max_indices else ""
    word = "index" if len(indices) == 1 else "indices"
    return f"{len(indices)} {what} (synthetic {word} {shown}{more})"


def _quantiles(d: torch.Tensor) -> dict[str, float]:
    if len(d) == 0:
        return {k: float("nan") for k in ("min", "p1", "p5", "median", "mean", "max")}
    q = torch.quantile(d.double(), torch.tensor([0.01, 0.05, 0.5], dtype=torch.float64)).tolist()
    return {"min": float(d.min()), "p1": q[0], "p5": q[1], "median": q[2], "mean": float(d.mean()),
            "max": float(d.max())}


def _space(
    name: str,
    syn: torch.Tensor,
    train: torch.Tensor,
    heldout: torch.Tensor,
    *,
    percentile: float,
    source_index: np.ndarray | None,
    source_patient: np.ndarray | None,
    train_patient: np.ndarray | None,
    chunk_size: int,
    device: torch.device | str,
    copy_factor: float,
) -> tuple[SpaceResult, torch.Tensor, torch.Tensor]:
    h_d, _ = nearest_neighbors(heldout, train, chunk_size=chunk_size, device=device)
    s_d, s_i = nearest_neighbors(syn, train, chunk_size=chunk_size, device=device)
    threshold = float(torch.quantile(h_d.double(), percentile / 100.0))
    near = (s_d < threshold).numpy() if len(s_d) else np.zeros(0, bool)
    # Exact duplicates (distance 0) are near-copies even when the held-out baseline itself has a zero distance.
    near |= (s_d <= 0).numpy()
    nn_idx = s_i.numpy()
    source_copy = np.zeros_like(near)
    if source_index is not None:
        source_copy = near & (nn_idx == source_index)
    patient_copy = np.zeros_like(near)
    copy_threshold = copy_factor * float(h_d.min())
    if source_patient is not None and train_patient is not None:
        very_close = (s_d < copy_threshold).numpy() | (s_d <= 0).numpy()
        patient_copy = very_close & (train_patient[nn_idx] != source_patient)
    n = max(len(s_d), 1)
    h_med = float(h_d.median()) if len(h_d) else float("nan")
    res = SpaceResult(
        space=name,
        threshold=threshold,
        percentile=float(percentile),
        copy_threshold=copy_threshold,
        heldout_nn=_quantiles(h_d),
        synthetic_nn=_quantiles(s_d),
        near_copy_fraction=float(near.sum() / n),
        source_copy_fraction=float(source_copy.sum() / n),
        near_copy_indices=np.flatnonzero(near).tolist(),
        patient_copy_indices=np.flatnonzero(patient_copy).tolist(),
        median_ratio=float(s_d.median()) / h_med if len(s_d) and h_med > 0 else float("nan"),
    )
    return res, s_d, s_i


def check_memorization(
    synthetic: torch.Tensor | np.ndarray,
    train: torch.Tensor | np.ndarray,
    heldout: torch.Tensor | np.ndarray,
    *,
    source_index: Sequence[int] | np.ndarray | None = None,
    source_patient: Sequence[str] | np.ndarray | None = None,
    train_patient: Sequence[str] | np.ndarray | None = None,
    feature_extractor: Callable[[torch.Tensor], torch.Tensor] | str | None = "random-conv",
    percentile: float = 1.0,
    copy_factor: float = 0.5,
    max_near_copy_fraction: float | None = None,
    chunk_size: int = 1024,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MemorizationReport:
    """Nearest-training-patch distances of synthetic patches against the held-out real baseline.

    Args:
        synthetic: ``[N, C, H, W]`` synthetic images in [-1, 1].
        train: ``[M, C, H, W]`` the generator's training images in [-1, 1].
        heldout: ``[K, C, H, W]`` real images the generator never saw (val/test, other patients) in [-1, 1].
        source_index: for each synthetic patch, the index (into ``train``) of the patch it was generated from;
            enables the "copy of own source" count.
        source_patient: for each synthetic patch, the patient pseudonym of its source.
        train_patient: the patient pseudonym of each training patch; with ``source_patient`` enables patient-copy
            flags.
        feature_extractor: ``"random-conv"`` (a seeded :class:`RandomConvFeatures`), any callable mapping images to
            features (e.g. a classifier's penultimate layer), or ``None`` for pixel space only.
        percentile: held-out NN-distance percentile used as the near-copy threshold.
        copy_factor: a synthetic patch is a patient copy when its nearest training patch belongs to another patient
            than its source and it is closer than ``copy_factor`` × the smallest held-out NN distance ("very close":
            nearer than any real patch of another patient ever came to the training set).
        max_near_copy_fraction: release bound on the near-copy fraction (default ``2 * percentile / 100``).
        chunk_size: rows per distance chunk (bounds memory).
        batch_size: images per feature-extractor batch.
        device: where distances and features are computed.
        seed: seed of the random feature extractor.
    """
    syn_t, train_t, held_t = (torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float()
                              for a in (synthetic, train, heldout))
    if len(held_t) == 0:
        raise MemorizationError(
            "no held-out real patches: the near-copy threshold needs val/test patches as a baseline")
    if len(train_t) == 0:
        raise MemorizationError("no training patches to compare with")
    if syn_t.shape[1:] != train_t.shape[1:] or held_t.shape[1:] != train_t.shape[1:]:
        raise MemorizationError(
            f"image shapes differ: synthetic {tuple(syn_t.shape[1:])}, train {tuple(train_t.shape[1:])}, "
            f"held-out {tuple(held_t.shape[1:])}"
        )
    src_idx = None if source_index is None else np.asarray(source_index, dtype=np.int64)
    src_pat = None if source_patient is None else np.asarray(source_patient).astype(str)
    trn_pat = None if train_patient is None else np.asarray(train_patient).astype(str)
    for name, arr, n in (("source_index", src_idx, len(syn_t)), ("source_patient", src_pat, len(syn_t)),
                         ("train_patient", trn_pat, len(train_t))):
        if arr is not None and len(arr) != n:
            raise MemorizationError(f"{name} has {len(arr)} entries, expected {n}")
    kw = dict(percentile=percentile, copy_factor=copy_factor, source_index=src_idx, source_patient=src_pat, train_patient=trn_pat,
              chunk_size=chunk_size, device=device)
    spaces: dict[str, SpaceResult] = {}
    per_sample: dict[str, list] = {}
    res, d, i = _space("pixel", syn_t, train_t, held_t, **kw)
    spaces["pixel"] = res
    per_sample.update(pixel_nn_index=i.tolist(), pixel_nn_distance=d.tolist())
    if feature_extractor is not None:
        if isinstance(feature_extractor, str):
            if feature_extractor != "random-conv":
                raise MemorizationError(
                    f"unknown feature extractor {feature_extractor!r}; use 'random-conv' or a callable")
            feature_extractor = RandomConvFeatures(in_channels=train_t.shape[1], seed=seed)
        feats = [embed(x, feature_extractor, batch_size=batch_size, device=device) for x in (syn_t, train_t, held_t)]
        res, d, i = _space("feature", *feats, **kw)
        spaces["feature"] = res
        per_sample.update(feature_nn_index=i.tolist(), feature_nn_distance=d.tolist())
    if max_near_copy_fraction is None:
        max_near_copy_fraction = 2.0 * percentile / 100.0
    return MemorizationReport(
        n_synthetic=len(syn_t), n_train=len(train_t), n_heldout=len(held_t), spaces=spaces,
        max_near_copy_fraction=float(max_near_copy_fraction), per_sample=per_sample,
    )

