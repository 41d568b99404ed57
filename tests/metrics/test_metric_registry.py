"""Tests of dagan_gn/metrics/registry.py: the built-in entries, one registration (also as a decorator), and one clear
MetricError for a name taken twice, an unknown name or an unknown ``needs``."""

from __future__ import annotations

import pytest
import torch

from dagan_gn.errors import DaganError
from dagan_gn.metrics import diversity as div
from dagan_gn.metrics.registry import (MetricError, compute_sample_metrics, get_metric, metric_names,
                                       register_metric, unregister_metric)


def _toy_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).amax(1)


@pytest.fixture
def toy():
    """A registered toy distance, unregistered afterwards whatever the test did."""
    entry = register_metric("toy_linf", _toy_distance, needs="images", label="toy L∞", aliases=("toy",))
    yield entry
    if "toy_linf" in metric_names():
        unregister_metric("toy_linf")


def test_the_built_in_entries():
    assert metric_names(needs="images") == ("pixel", "ms_ssim")
    assert metric_names(needs="classifier_features") == ("feature",)
    assert metric_names(needs=("samples", "noise_generator")) == ("fid", "kid", "isc", "recon")
    assert get_metric("pixel").compute is div.pixel_l1 and get_metric("pixel").identity_p == 1.0
    assert get_metric("ms_ssim").identity_p is None and get_metric("feature").label == "classifier features (L2)"
    assert get_metric(" IS ").name == get_metric("inception_score").name == "isc"  # aliases, case and blanks
    assert get_metric("fid").compute is get_metric("kid").compute  # one torch-fidelity pass for both


def test_register_get_and_unregister(toy):
    assert get_metric("TOY_LINF") is toy and get_metric("toy") is toy
    assert metric_names(needs="images")[-1] == "toy_linf"  # registration order: reported after the built-ins
    assert toy.label == "toy L∞" and toy.aliases == ("toy",)
    assert unregister_metric("toy") is toy  # by an alias too; the aliases go with it
    assert "toy_linf" not in metric_names()
    with pytest.raises(MetricError, match="unknown metric 'toy'"):
        get_metric("toy")


def test_register_as_a_decorator():
    @register_metric("toy_sum", needs="samples", label="toy sum")
    def toy_sum(fake, real, *, metrics, **options):
        return {"toy_sum": float(fake.float().sum() - real.float().sum())}

    try:
        assert get_metric("toy_sum").compute is toy_sum  # the function itself is returned unchanged
        assert toy_sum(torch.ones(2), torch.zeros(2), metrics=["toy_sum"]) == {"toy_sum": 2.0}
    finally:
        unregister_metric("toy_sum")


def test_a_name_taken_twice_is_one_clear_error(toy):
    with pytest.raises(MetricError, match=r"metric name 'toy_linf' is already registered \(by 'toy_linf'\); "
                                          "unregister_metric it first"):
        register_metric("toy_linf", _toy_distance, needs="images")
    with pytest.raises(MetricError, match=r"metric name 'toy' is already registered \(by 'toy_linf'\)"):
        register_metric("other", _toy_distance, needs="images", aliases=("toy",))  # an alias counts as a name
    with pytest.raises(MetricError, match="'pixel' is already registered"):
        register_metric("Pixel", _toy_distance, needs="images")  # names are case-insensitive
    assert "other" not in metric_names() and get_metric("pixel").compute is div.pixel_l1  # nothing half-registered


def test_unknown_names_and_bad_registrations_are_metric_errors():
    with pytest.raises(MetricError, match=r"unknown metric 'precision'; registered: pixel, ms_ssim, feature, fid"):
        get_metric("precision")
    with pytest.raises(MetricError, match="unknown metric 'nope'"):
        unregister_metric("nope")
    with pytest.raises(MetricError, match="unknown needs 'pixels'; choose from images, classifier_features"):
        register_metric("toy_bad", _toy_distance, needs="pixels")
    with pytest.raises(MetricError, match="compute must be callable"):
        register_metric("toy_bad", "not a function", needs="images")
    with pytest.raises(MetricError, match="non-empty string"):
        register_metric(" ", _toy_distance, needs="images")
    with pytest.raises(MetricError, match="unknown needs"):
        metric_names(needs="pixels")
    assert "toy_bad" not in metric_names()
    err = MetricError("x")
    assert isinstance(err, DaganError) and isinstance(err, ValueError)  # the CLI reports it as one error line


def test_compute_sample_metrics_calls_each_compute_function_once():
    calls = []

    def first(fake, real, *, metrics, **options):
        calls.append(("first", list(metrics), options))
        return {m: len(fake) for m in metrics}

    def second(fake, real, *, metrics, **options):
        calls.append(("second", list(metrics), options))
        return {"second": len(real)}

    register_metric("toy_a", first, needs="samples")
    register_metric("toy_b", first, needs="samples")
    register_metric("toy_c", second, needs="samples")
    try:
        out = compute_sample_metrics(["toy_b", "toy_c", "toy_a"], torch.zeros(3), torch.zeros(5), seed=1)
        assert out == {"toy_b": 3, "toy_a": 3, "second": 5}
        assert calls == [("first", ["toy_b", "toy_a"], {"seed": 1}), ("second", ["toy_c"], {"seed": 1})]
        with pytest.raises(MetricError, match="'pixel' needs images, not samples"):
            compute_sample_metrics(["pixel"], None, None)
    finally:
        for name in ("toy_a", "toy_b", "toy_c"):
            unregister_metric(name)
