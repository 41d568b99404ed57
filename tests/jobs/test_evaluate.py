"""Tests of dagan_gn/jobs/evaluate.py's registry path: a registered metric is accepted by ``evaluate_checkpoint``
(and ``EVALUATE_METRICS``) with no change to the job, computed beside the built-ins, and gone once unregistered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dagan_gn.jobs import evaluate as evaluate_job
from dagan_gn.jobs.evaluate import EvaluateError, evaluate_checkpoint
from dagan_gn.metrics.registry import register_metric, unregister_metric


@pytest.fixture(scope="module")
def dagan_run(tmp_path_factory):
    from factories import make_checkpoint, make_patch_file

    root = tmp_path_factory.mktemp("evaluate")
    patches = make_patch_file(root / "patches.h5")
    return make_checkpoint(root / "run", patches), patches


def test_a_registered_metric_is_computed_by_evaluate(dagan_run, tmp_path):
    run, patches = dagan_run
    calls = []

    def mean_gap(fake, real, *, metrics, **options):  # a pure function of the two image sets
        calls.append((list(metrics), fake.shape, fake.dtype, real.shape, options))
        return {"mean_gap": float((fake.float().mean() - real.float().mean()).abs())}

    def needs_noise(generator, images01, labels, *, device):
        raise AssertionError("not called for an image-to-image generator")

    register_metric("mean_gap", mean_gap, needs="samples", label="mean intensity gap")
    register_metric("toy_recon", needs_noise, needs="noise_generator", label="toy reconstruction")
    try:
        assert evaluate_job.EVALUATE_METRICS[-2:] == ("mean_gap", "toy_recon")
        got = evaluate_checkpoint(run, patches, metrics=("MEAN_GAP", "kid", "toy_recon"), num_samples=6,
                                  feature_extractor="tiny", kid_subset_size=3, device="cpu", seed=0,
                                  cache_dir=tmp_path)
        with pytest.raises(EvaluateError, match=r"unknown metric\(s\) pixel; choose from fid, kid, isc, recon, "
                                                "mean_gap, toy_recon"):
            evaluate_checkpoint(run, patches, metrics=("pixel",), device="cpu")  # an assess space is not evaluate's
    finally:
        unregister_metric("mean_gap")
        unregister_metric("toy_recon")

    assert len(calls) == 1 and calls[0][0] == ["mean_gap"]  # one call, with its own name; kid went to torch-fidelity
    _, fake_shape, fake_dtype, real_shape, options = calls[0]
    assert fake_shape == (6, 3, 64, 64) and fake_dtype == torch.uint8 and real_shape[1:] == (3, 64, 64)
    assert options["feature_extractor"] == "tiny" and options["cache_key"].startswith("patches-train-")
    assert 0 <= got["mean_gap"] < 255 and np.isfinite(got["kid_mean"]) and got["kid_subset_size"] == 3
    assert got["toy_recon_unavailable"] == ("toy reconstruction needs a noise-to-image generator G(z); 'dagan' is "
                                            "G(x, z)")
    assert "mean_gap" not in evaluate_job.EVALUATE_METRICS
    with pytest.raises(EvaluateError, match=r"unknown metric\(s\) mean_gap; choose from fid, kid, isc, recon$"):
        evaluate_checkpoint(run, patches, metrics=("mean_gap",), device="cpu")
