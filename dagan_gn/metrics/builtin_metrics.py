"""The built-in quality metrics: :data:`BUILTIN_METRICS`, the :func:`~dagan_gn.metrics.registry.register_metric`
arguments of each, registered when the registry module loads (this module does not import the registry, so the two
form no import cycle; the order here is the order the jobs report them in).

- ``dagan assess`` distance spaces: ``pixel`` (L1 on [0, 1]), ``ms_ssim`` (``1 − MS-SSIM``, MONAI) and ``feature``
  (L2 between the class-consistency classifier's embeddings) — :mod:`dagan_gn.metrics.diversity`;
- ``dagan evaluate``: ``fid``, ``kid``, ``isc`` (aliases ``is``, ``inception_score``) through torch-fidelity
  (:func:`~dagan_gn.metrics.fidelity.compute_fidelity`, one feature pass for all three), and ``recon``, the
  Xiang & Li test-set reconstruction error (:mod:`dagan_gn.metrics.reconstruction`).
"""

from __future__ import annotations

from typing import Any, Sequence

from dagan_gn.metrics import diversity as div
__all__ = ["BUILTIN_METRICS", "torch_fidelity_metrics", "reconstruction_metric"]


def torch_fidelity_metrics(fake: Any, real: Any, *, metrics: Sequence[str], **options: Any) -> dict[str, Any]:
    """FID/KID/IS of ``fake`` against ``real`` in one torch-fidelity pass (imported on use: it pulls in
    torchvision)."""
    from dagan_gn.metrics.fidelity import compute_fidelity

    return compute_fidelity(fake, real, metrics=metrics, **options)


def reconstruction_metric(generator: Any, images01: Any, labels: Any, *, device: Any) -> dict[str, Any]:
    """``recon_mse``, ``recon_mse_std`` and ``recon_images`` of a noise-to-image generator on ``images01``."""
    from dagan_gn.metrics.reconstruction import reconstruction_error

    rec = reconstruction_error(generator, images01, labels=labels, device=device)
    return {**rec.as_dict(), "recon_images": len(images01)}


#: ``register_metric(**entry)`` for each entry, in this order.
BUILTIN_METRICS: tuple[dict[str, Any], ...] = (
    dict(name="pixel", compute=div.pixel_l1, needs="images", label="pixel L1", identity_p=1.0,
         description="mean absolute difference on the [0, 1] intensity scale"),
    dict(name="ms_ssim", compute=div.ms_ssim_distance, needs="images", label="1 − MS-SSIM",
         description="1 − multi-scale SSIM (MONAI)"),
    dict(name="feature", compute=div.feature_l2, needs="classifier_features", label="classifier features (L2)",
         identity_p=2.0, description="Euclidean distance between the classifier's penultimate-layer features"),
    dict(name="fid", compute=torch_fidelity_metrics, needs="samples", label="FID",
         description="Fréchet Inception Distance"),
    dict(name="kid", compute=torch_fidelity_metrics, needs="samples", label="KID",
         description="Kernel Inception Distance"),
    dict(name="isc", compute=torch_fidelity_metrics, needs="samples", label="Inception Score",
         aliases=("is", "inception_score"),
         description="Inception Score (needs torch-fidelity's own Inception weights)"),
    dict(name="recon", compute=reconstruction_metric, needs="noise_generator", label="reconstruction error",
         description="Xiang & Li test-set reconstruction error of a noise-to-image generator"),
)
