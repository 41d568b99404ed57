"""The ``evaluate`` job: score a saved generator (run folder or checkpoint file) with FID/KID/IS and, for
noise-to-image generators, the reconstruction error.

The metrics are the metric registry's entries (:mod:`dagan_gn.metrics.registry`) that need ``samples`` (generated vs
real images; the wanted ones sharing a compute function are computed in one call) or a ``noise_generator``
(reported as ``<name>_unavailable`` for image-to-image generators): a newly registered one is accepted by
``--metrics`` with no change here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dagan_gn.errors import DaganError
from dagan_gn.metrics.fidelity import (_dataset_fingerprint, reference_images_for_config,
                                       resolve_feature_extractor_name, to_uint8_rgb)
from dagan_gn.metrics.registry import MetricError, compute_sample_metrics, get_metric, metric_names

__all__ = ["evaluate_checkpoint", "EvaluateError", "EVALUATE_METRICS", "EVALUATE_NEEDS"]

#: What the metrics ``evaluate_checkpoint`` computes need (registry ``needs``).
EVALUATE_NEEDS = ("samples", "noise_generator")


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "EVALUATE_METRICS":  # what ``evaluate_checkpoint`` can compute, read from the registry on each use
        return metric_names(needs=EVALUATE_NEEDS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EvaluateError(DaganError, ValueError):
    """An evaluation request that cannot be carried out (unknown metric or extractor, no data, empty split)."""


def _run_data_path(checkpoint: Path, stored: str | None) -> str | None:
    """The training data of the run a checkpoint belongs to: ``data.path`` of ``RUN/config.yaml`` when the
    checkpoint sits in ``RUN/checkpoints/`` (the checkpoint itself keeps only the base name), else ``stored``."""
    run_config = checkpoint.parent.parent / "config.yaml"
    if checkpoint.parent.name == "checkpoints" and run_config.is_file():
        import yaml

        try:
            saved = (yaml.safe_load(run_config.read_text()) or {}).get("data", {}).get("path")
        except (OSError, yaml.YAMLError, AttributeError):
            saved = None
        if saved:
            return str(saved)
    return stored


def _sample_uint8(family, generator, n: int, seed: int, **sample_kwargs) -> torch.Tensor:
    """``n`` seeded samples of ``generator`` as torch-fidelity's ``uint8 [n, 3, H, W]``."""
    return to_uint8_rgb(family.sample(generator, n, torch.Generator().manual_seed(seed), **sample_kwargs))


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    metrics: Sequence[str] = ("fid", "kid"),
    num_samples: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    feature_extractor: str | None = None,
    kid_subset_size: int | None = None,
    recon_images: int = 1000,
    split: str | None = None,
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    use_ema: bool = True,
) -> dict:
    """Score a trained generator (run folder or checkpoint file): FID/KID/IS against real images, and for
    noise-to-image (CIFAR) generators the Xiang & Li reconstruction error on held-out test images.

    * CIFAR runs (``cifar_resnet``/``cifar_dcgan``): samples ``G(z)``; reference = training images of ``data``;
      ``recon`` on the ``test`` split.
    * DAGAN runs: samples ``G(x_real, z)`` over real patches of ``split`` (default: the run's training split) of the
      HDF5 file ``data``; reference = those real patches (grayscale replicated to RGB: comparable only within one
      dataset). ``recon`` does not apply (the generator is conditioned on an image) and is reported as unavailable.

    ``num_samples`` defaults to the run's ``metrics.num_samples``; other unset options come from the run's config.
    ``data`` defaults to the ``data.path`` of the run's own ``config.yaml`` (checkpoints keep only its base name).
    Returns a JSON-ready dict (metrics, sample counts, checkpoint name and sha256, data file name, step, device,
    notes): base names only, so the result can be shared.
    """
    from dagan_gn.runtime import resolve_device, seed_everything
    from dagan_gn.training.checkpoint import load_checkpoint, resolve_checkpoint
    from dagan_gn.training.families import generator_from_state, get_family

    wanted = _wanted_metrics(metrics)
    seed_everything(seed)
    dev = resolve_device(device)
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    generator, cfg = generator_from_state(state, path, device=dev, use_ema=use_ema)
    step = state.get("step")
    del state
    cfg.data.path = str(data) if data is not None else _run_data_path(path, cfg.data.path)
    if not cfg.data.path:
        raise EvaluateError("no data: pass --data (the run's config names none)")
    n = int(num_samples or cfg.metrics.num_samples)
    weights = inception_weights or cfg.metrics.inception_weights or None
    extractor = feature_extractor or cfg.metrics.feature_extractor
    try:
        resolve_feature_extractor_name(extractor)
    except ValueError as exc:  # the name came from the user or the run's config
        raise EvaluateError(f"--feature-extractor: {exc}") from exc
    family = get_family(cfg.model.name)
    kid_size = int(kid_subset_size or cfg.metrics.kid_subset_size)
    result = _result_header(path, step, cfg, extractor, seed, dev)
    fidelity_metrics = [m for m in wanted if get_metric(m).needs == "samples"]
    if fidelity_metrics and n < 2:
        raise EvaluateError(f"--num-samples must be at least 2 for {', '.join(fidelity_metrics)}, got {n}")
    sample_kwargs = {"num_classes": cfg.model.num_classes, "batch_size": batch_size, "device": dev}
    options = dict(inception_weights=weights, feature_extractor=extractor, device=dev, kid_subset_size=kid_size,
                   cache_dir=cache_dir, batch_size=batch_size, seed=seed)
    return _score(family, generator, cfg, result, wanted, fidelity_metrics, n=n, seed=seed, split=split,
                  recon_images=recon_images, sample_kwargs=sample_kwargs, options=options)


def _wanted_metrics(metrics: Sequence[str]) -> list[str]:
    """The registered names of the wanted metrics (aliases resolved, repeats dropped), in the order given.

    Raises:
        EvaluateError: an unknown name, or one that ``evaluate`` does not compute, or none at all.
    """
    names = list(dict.fromkeys(m.strip().lower() for m in metrics))
    known = metric_names(needs=EVALUATE_NEEDS)
    canonical = {m: _canonical(m) for m in names}
    bad = [m for m in names if canonical[m] not in known]
    if bad or not names:
        raise EvaluateError(f"unknown metric(s) {', '.join(bad) or '(none)'}; choose from {', '.join(known)}")
    return list(dict.fromkeys(canonical[m] for m in names))


def _canonical(name: str) -> str | None:
    """The registered name of ``name`` (or of the metric it is an alias of); None when unknown."""
    try:
        return get_metric(name).name
    except MetricError:  # not registered (or an empty name)
        return None


def _result_header(path: Path, step, cfg, extractor: str, seed: int, dev: torch.device) -> dict:
    """What every result starts with: the checkpoint, the run, the data file, the settings and the environment."""
    from dagan_gn.fileio import sha256_file
    from dagan_gn.runtime import environment_info

    return {
        "checkpoint": path.name,
        "checkpoint_sha256": sha256_file(path),
        "step": int(step) if step is not None else None,
        "model": cfg.model.name,
        "data": Path(cfg.data.path).name,
        "feature_extractor": extractor,
        "seed": seed,
        "device": str(dev),
        "environment": environment_info(dev),
    }


def _score(family, generator, cfg, result: dict, wanted: list[str], fidelity_metrics: list[str], *, n: int,
           seed: int, split: str | None, recon_images: int, sample_kwargs: dict, options: dict) -> dict:
    """The metrics of ``wanted`` added to ``result``: sampled over real patches for image-to-image families, from
    noise (CIFAR-10 reference) for noise-to-image ones."""
    generator_metrics = [m for m in wanted if get_metric(m).needs == "noise_generator"]
    sources, result["split"] = family.evaluation_sources(cfg, split)  # DataError: an unknown kind, split or class
    if sources is not None:  # variants of real images, compared with those images
        if len(sources) == 0:
            raise EvaluateError(f"{cfg.data.path}: split '{result['split']}' has no images")
        if fidelity_metrics:
            fake = _sample_uint8(family, generator, n, seed, dataset=sources, **sample_kwargs)
            pick = np.sort(np.random.default_rng(seed).permutation(len(sources))[: min(n, len(sources))])
            real = to_uint8_rgb(torch.stack([sources[int(i)]["image"] for i in pick]))
            key = f"patches-{result['split']}-{_dataset_fingerprint(real)}"
            result.update(compute_sample_metrics(fidelity_metrics, fake, real, cache_key=key, **options))
        for m in generator_metrics:
            result[f"{m}_unavailable"] = (f"{get_metric(m).label} needs a noise-to-image generator G(z); "
                                          f"'{family.name}' is G(x, z)")
        return result

    if fidelity_metrics:
        fake = _sample_uint8(family, generator, n, seed, **sample_kwargs)
        real, key = reference_images_for_config(cfg, n)
        result.update(compute_sample_metrics(fidelity_metrics, fake, real, cache_key=key, **options))
    if generator_metrics:
        from dagan_gn.datasets.cifar10 import CIFAR10Dataset

        test = CIFAR10Dataset(cfg.data.path, "test", limit_per_class=max(1, -(-recon_images // 10)), seed=seed)
        images = test.images_uint8[:recon_images].float() / 255.0
        labels = test.labels[:recon_images] if cfg.model.num_classes > 0 else None
        for m in generator_metrics:
            result.update(get_metric(m).compute(generator, images, labels, device=options["device"]))
    return result
