"""The ``evaluate`` job: score a saved generator (run folder or checkpoint file) with FID/KID/IS and, for
noise-to-image generators, the reconstruction error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dagan_gn.errors import DaganError
from dagan_gn.metrics.fidelity import (METRIC_NAMES, _dataset_fingerprint, compute_fidelity,
                                       reference_images_for_config, resolve_feature_extractor_name, to_uint8_rgb)

__all__ = ["evaluate_checkpoint", "EvaluateError", "EVALUATE_METRICS"]


#: What ``evaluate_checkpoint`` can compute: the fidelity metrics plus the reconstruction error.
EVALUATE_METRICS = METRIC_NAMES + ("recon",)


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
    from dagan_gn.fileio import sha256_file
    from dagan_gn.runtime import environment_info, resolve_device, seed_everything
    from dagan_gn.datasets.registry import get_data_source
    from dagan_gn.training.checkpoint import load_checkpoint, resolve_checkpoint
    from dagan_gn.training.families import generator_from_state, get_family

    wanted = list(dict.fromkeys(m.strip().lower() for m in metrics))
    wanted = ["isc" if m in ("is", "inception_score") else m for m in wanted]
    bad = [m for m in wanted if m not in EVALUATE_METRICS]
    if bad or not wanted:
        raise EvaluateError(
            f"unknown metric(s) {', '.join(bad) or '(none)'}; choose from {', '.join(EVALUATE_METRICS)}")
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
    result: dict = {
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
    fidelity_metrics = [m for m in wanted if m in METRIC_NAMES]
    if fidelity_metrics and n < 2:
        raise EvaluateError(f"--num-samples must be at least 2 for {', '.join(fidelity_metrics)}, got {n}")
    sample_kwargs = {"num_classes": cfg.model.num_classes, "batch_size": batch_size, "device": dev}
    if family.conditions_on_image:
        from dagan_gn.datasets.patches import PatchDataset

        cfg.data.split = split or cfg.data.split
        try:
            ds = PatchDataset(cfg.data.path, split=cfg.data.split, classes=cfg.data.classes or None)
        except DaganError:  # StoreError: not a patch file
            raise
        except (KeyError, ValueError) as exc:  # an unknown split or class of that file
            raise EvaluateError(f"{cfg.data.path}: {exc}") from exc
        if len(ds) == 0:
            raise EvaluateError(f"{cfg.data.path}: split '{cfg.data.split}' has no patches")
        result["split"] = cfg.data.split
        if fidelity_metrics:
            fake = _sample_uint8(family, generator, n, seed, dataset=ds, **sample_kwargs)
            pick = np.sort(np.random.default_rng(seed).permutation(len(ds))[: min(n, len(ds))])
            real = to_uint8_rgb(torch.stack([ds[int(i)]["image"] for i in pick]))
            key = f"patches-{cfg.data.split}-{_dataset_fingerprint(real)}"
            result.update(
                compute_fidelity(fake, real, metrics=fidelity_metrics, inception_weights=weights,
                                 feature_extractor=extractor, device=dev, kid_subset_size=kid_size, cache_key=key,
                                 cache_dir=cache_dir, batch_size=batch_size, seed=seed)
            )
        if "recon" in wanted:
            result["recon_unavailable"] = (f"reconstruction error needs a noise-to-image generator G(z); "
                                           f"'{family.name}' is G(x, z)")
        return result

    get_data_source(cfg.data.kind)  # the run's own data.kind; an unknown one is a DataError before any sampling
    result["split"] = "train"
    if fidelity_metrics:
        fake = _sample_uint8(family, generator, n, seed, **sample_kwargs)
        real, key = reference_images_for_config(cfg, n)
        result.update(
            compute_fidelity(fake, real, metrics=fidelity_metrics, inception_weights=weights,
                             feature_extractor=extractor, device=dev, kid_subset_size=kid_size, cache_key=key,
                             cache_dir=cache_dir, batch_size=batch_size, seed=seed)
        )
    if "recon" in wanted:
        from dagan_gn.datasets.cifar10 import CIFAR10Dataset
        from dagan_gn.metrics.reconstruction import reconstruction_error

        test = CIFAR10Dataset(cfg.data.path, "test", limit_per_class=max(1, -(-recon_images // 10)), seed=seed)
        images = test.images_uint8[:recon_images].float() / 255.0
        labels = test.labels[:recon_images] if cfg.model.num_classes > 0 else None
        rec = reconstruction_error(generator, images, labels=labels, device=dev)
        result.update(rec.as_dict())
        result["recon_images"] = len(images)
    return result
