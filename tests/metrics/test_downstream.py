"""Tests of dagan_gn/metrics/downstream.py: the four-regime evaluation end to end on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from dagan_gn.store.patch_file import PatchWriter, to_uint16
from dagan_gn.metrics.downstream import (
    REGIMES,
    DownstreamConfig,
    build_classifier,
    classical_augmentation,
    evaluate_augmentation,
    evaluate_classifier,
    mean_ci,
    recalibrate_batch_norm,
    train_classifier,
)
from dagan_gn.jobs.downstream import evaluate_augmentation_files, write_downstream_report

TINY = DownstreamConfig(width=4, epochs=2, batch_size=8, seeds=[0, 1], device="cpu")


def blobs(n, num_classes, size=16, seed=0):
    """Images whose class is a bright square in one of the quadrants: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    x = torch.rand(n, 1, size, size, generator=g) * 0.4 - 0.8
    h = size // 2
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c % 4, 2)
        x[i, 0, r * h : (r + 1) * h, col * h : (col + 1) * h] += 1.2
    return x.clamp(-1, 1), labels


class Items(Dataset):
    def __init__(self, x, y, class_names=None):
        self.x, self.labels = x, y.numpy()
        if class_names:
            self.class_names = class_names

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.labels[i]), "index": i}


def test_build_classifier_shapes():
    for arch in ("resnet", "densenet"):
        net = build_classifier(3, 1, 32, arch=arch, width=4)
        assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    assert build_classifier(2, 1, 256, width=4)(torch.zeros(1, 1, 256, 256)).shape == (1, 2)
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier(2, arch="vgg")
    with pytest.raises(ValueError, match="at least 2"):
        build_classifier(1)


def test_classical_augmentation_presets():
    img = np.random.default_rng(0).random((16, 16, 1)).astype(np.float32)
    for preset in ("mammo", "natural"):
        assert classical_augmentation(preset, 16)(image=img)["image"].shape == (16, 16, 1)
    with pytest.raises(ValueError, match="preset"):
        classical_augmentation("medical")


def test_mean_ci():
    m, h = mean_ci([0.5, 0.7, 0.6])
    assert m == pytest.approx(0.6) and h == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert np.isnan(mean_ci([0.4])[1]) and mean_ci([0.4])[0] == 0.4
    assert mean_ci([0.5, float("nan"), 0.5]) == (0.5, 0.0)


def test_evaluate_classifier_auc_binary_and_multiclass():
    class Oracle(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3] * 10

    x = torch.eye(3).repeat(4, 1).reshape(12, 1, 1, 3)
    y = torch.arange(3).repeat(4)
    res = evaluate_classifier(Oracle(), Items(x, y), 3, device=torch.device("cpu"))
    assert res == {"accuracy": 1.0, "auc": 1.0}
    res = evaluate_classifier(Oracle(), Items(x[:2], y[:1].repeat(2)), 3, device=torch.device("cpu"))
    assert np.isnan(res["auc"])  # a single class in the test set: AUC undefined, not an exception


def test_four_regimes_end_to_end(tmp_path):
    x, y = blobs(32, 3, seed=0)
    xt, yt = blobs(24, 3, seed=1)
    xs, ys = blobs(48, 3, seed=2)
    names = ["a", "b", "c"]
    report = evaluate_augmentation(Items(x, y, names), Items(xt, yt, names), Items(xs, ys, names), num_classes=3,
                                   class_names=names, config=TINY, progress=False)
    assert [r["regime"] for r in report.runs] == [r for r in REGIMES for _ in (0, 1)]
    for row in report.runs:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["auc"] <= 1.0
        assert row["synthetic_items"] == (32 if "dagan" in row["regime"] or "both" in row["regime"] else 0)
    summ = report.summary()
    assert set(summ) == set(REGIMES) and all(np.isfinite(v[0]) and np.isfinite(v[1])
                                             for m in summ.values() for v in m.values())
    assert summ["real"]["auc"][0] > 0.6  # the classifier learns something in a few steps
    paths = write_downstream_report(report, tmp_path)
    md = paths["markdown"].read_text()
    assert all(f"| {r} |" in md for r in REGIMES) and "±" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert len(data["runs"]) == 8 and set(data["summary"]) == set(REGIMES)
    # same seeds → same numbers
    again = evaluate_augmentation(Items(x, y, names), Items(xt, yt, names), None, num_classes=3, config=TINY,
                                  regimes=["real"], progress=False)
    assert [r["accuracy"] for r in again.runs] == [r["accuracy"] for r in report.runs[:2]]


def test_regime_validation():
    x, y = blobs(8, 2)
    with pytest.raises(ValueError, match="synthetic dataset"):
        evaluate_augmentation(Items(x, y), Items(x, y), None, num_classes=2, config=TINY, progress=False)
    with pytest.raises(ValueError, match="unknown regime"):
        evaluate_augmentation(Items(x, y), Items(x, y), None, num_classes=2, regimes=["mixup"], progress=False)


def _write(path, x, y, split, synthetic=False):
    with PatchWriter(path, patch_size=x.shape[-1], class_names=["normal", "mass"], provenance={"source_index": "int64"},
                     synthetic=synthetic) as w:
        w.append(to_uint16((x.numpy() + 1) / 2), y.numpy(), split, {"source_index": np.arange(len(y))})
    return path


def test_files_end_to_end_and_leak_guard(tmp_path):
    x, y = blobs(36, 2, seed=0)
    real = _write(tmp_path / "real.h5", x, y, ["train"] * 24 + ["val"] * 4 + ["test"] * 8)
    xs, ys = blobs(24, 2, seed=5)
    syn = _write(tmp_path / "syn.h5", xs, ys, ["train"] * 24, synthetic=True)
    cfg = DownstreamConfig(width=4, epochs=1, batch_size=8, seeds=[0], device="cpu")
    report = evaluate_augmentation_files(real, syn, tmp_path / "out", config=cfg, progress=False)
    assert report.n_train == 24 and report.n_test == 8 and report.n_synthetic == 24
    assert (tmp_path / "out" / "downstream.md").is_file() and (tmp_path / "out" / "downstream.png").is_file()
    leaky = _write(tmp_path / "leaky.h5", xs, ys, ["test"] * 24, synthetic=True)
    with pytest.raises(ValueError, match="leak"):
        evaluate_augmentation_files(real, leaky, config=cfg, progress=False)
    with pytest.raises(ValueError, match="not a synthetic"):
        evaluate_augmentation_files(real, real, config=cfg, progress=False)
    with pytest.raises(ValueError, match="held out"):
        evaluate_augmentation_files(real, syn, test_split="train", config=cfg, progress=False)


def _batch_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_recalibrated_batch_norm_statistics_match_the_data():
    torch.manual_seed(0)
    x, y = blobs(64, 4)
    model = build_classifier(4, 1, 16, width=4)
    for bn in _batch_norms(model):  # running statistics that have nothing to do with the data
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(100.0)
    model.eval()
    stale = model(x)
    with torch.no_grad():
        model.train()
        batch_stats = model(x)  # every layer normalised by the statistics of this very batch
        model.eval()
    assert recalibrate_batch_norm(model, Items(x, y), batches=1, batch_size=64, seed=0, device=torch.device("cpu"))
    recalibrated = model(x)
    assert not model.training
    # One batch of the whole set: eval mode now uses its mean and (unbiased) variance, i.e. the train-mode output.
    assert torch.allclose(recalibrated, batch_stats, atol=0.05)
    assert not torch.allclose(stale, batch_stats, atol=0.05)


def test_recalibration_is_a_no_op_without_batch_norm_or_batches():
    x, y = blobs(16, 2)
    model = build_classifier(2, 1, 16, width=4)
    before = [bn.running_var.clone() for bn in _batch_norms(model)]
    assert not recalibrate_batch_norm(model, Items(x, y), batches=0, batch_size=8, seed=0,
                                      device=torch.device("cpu"))
    assert all(torch.equal(a, bn.running_var) for a, bn in zip(before, _batch_norms(model)))
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    assert not recalibrate_batch_norm(plain, Items(x, y), batches=3, batch_size=8, seed=0,
                                      device=torch.device("cpu"))


def test_precise_bn_is_the_default():
    """docs/augment.md: the classifier's batch-norm statistics are recomputed on 50 batches after training unless
    asked otherwise — a default config recalibrates (its running statistics differ from a run with 0 batches)."""
    assert DownstreamConfig().bn_recalibration_batches == 50
    x, y = blobs(32, 4)
    kw = dict(steps=2, seed=0, image_size=16, in_channels=1, device=torch.device("cpu"))
    default = train_classifier(Items(x, y), 4, config=DownstreamConfig(width=4, batch_size=8), **kw)
    kept = train_classifier(Items(x, y), 4, config=DownstreamConfig(width=4, batch_size=8,
                                                                    bn_recalibration_batches=0), **kw)
    assert not all(torch.equal(a.running_mean, b.running_mean)
                   for a, b in zip(_batch_norms(kept), _batch_norms(default)))


def test_train_classifier_recalibrates_only_the_batch_norm_buffers():
    x, y = blobs(32, 4)
    kw = dict(steps=4, seed=0, image_size=16, in_channels=1, device=torch.device("cpu"))
    kept = train_classifier(Items(x, y), 4, config=DownstreamConfig(width=4, batch_size=8,
                                                                    bn_recalibration_batches=0), **kw)
    recal = train_classifier(Items(x, y), 4, config=DownstreamConfig(width=4, batch_size=8,
                                                                     bn_recalibration_batches=4), **kw)
    for (name, a), b in zip(kept.state_dict().items(), recal.state_dict().values()):
        if "running" in name:
            continue
        assert torch.equal(a, b), name  # same weights: recalibration happens after training, without gradients
    assert not all(torch.equal(a.running_mean, b.running_mean) for a, b in zip(_batch_norms(kept), _batch_norms(recal)))


def test_off_class_mask_rejects_variants_nearest_another_prototype():
    from dagan_gn.metrics.prototypes import PrototypeError, off_class_mask

    real = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    real_y = torch.tensor([0, 0, 1, 1])
    syn = torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    syn_y = torch.tensor([0, 0, 1, 1])
    mask = off_class_mask(lambda x: x, real, real_y, syn, syn_y, batch_size=3)
    assert mask.tolist() == [False, True, False, True]
    with pytest.raises(PrototypeError, match=r"class\(es\) \[2\]"):
        off_class_mask(lambda x: x, real, real_y, syn, torch.tensor([0, 0, 2, 1]))


class Mixed(Items):
    """Items with the ``synthetic`` flag MixedRealSyntheticDataset adds."""

    def __init__(self, x, y, synthetic):
        super().__init__(x, y)
        self.synthetic = synthetic

    def __getitem__(self, i):
        return {**super().__getitem__(i), "synthetic": bool(self.synthetic[i])}


def test_synthetic_weight_zero_ignores_the_synthetic_items_labels():
    x, y = blobs(32, 4)
    synthetic = torch.arange(32) % 2 == 1
    wrong = torch.where(synthetic, (y + 1) % 4, y)
    cfg = DownstreamConfig(width=4, batch_size=8, seeds=[0], device="cpu", synthetic_weight=0.0)

    def trained(labels, config):
        model = train_classifier(Mixed(x, labels, synthetic), 4, steps=6, config=config, seed=0, image_size=16,
                                 in_channels=1, device=torch.device("cpu"))
        return model.state_dict()

    a, b = trained(y, cfg), trained(wrong, cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same shapes and batches: only the ignored labels differ
    full = DownstreamConfig(width=4, batch_size=8, seeds=[0], device="cpu", synthetic_weight=1.0)
    c, d = trained(y, full), trained(wrong, full)
    assert not all(torch.equal(c[k], d[k]) for k in c)


def test_reject_off_class_reports_the_share_dropped():
    x, y = blobs(24, 4)
    test_x, test_y = blobs(16, 4, seed=1)
    # synthetic: true-looking images, half of them labelled as another class
    sx, sy = blobs(24, 4, seed=2)
    sy_wrong = torch.where(torch.arange(24) % 2 == 0, (sy + 2) % 4, sy)
    cfg = DownstreamConfig(width=4, epochs=6, batch_size=8, seeds=[0], device="cpu", reject_off_class=True,
                           augmentation="natural")
    report = evaluate_augmentation(Items(x, y), Items(test_x, test_y), Items(sx, sy_wrong), num_classes=4,
                                   config=cfg, regimes=["real+albumentations", "real+dagan"], progress=False)
    row = next(r for r in report.runs if r["regime"] == "real+dagan")
    assert 0.3 <= row["rejected_share"] <= 0.7  # the mislabelled half, as told by a 6-epoch classifier
    classical = next(r for r in report.runs if r["regime"] == "real+albumentations")
    assert "rejected_share" not in classical
    # the same classifier's features tell the class identity: the kept share
    assert classical["synthetic_class_identity"] == pytest.approx(1.0 - row["rejected_share"])


def test_classical_run_reports_the_class_identity_of_the_variants_without_rejecting_any():
    x, y = blobs(24, 4)
    test_x, test_y = blobs(16, 4, seed=1)
    sx, sy = blobs(24, 4, seed=2)
    cfg = DownstreamConfig(width=4, epochs=6, batch_size=8, seeds=[0], device="cpu", augmentation="natural")
    right = evaluate_augmentation(Items(x, y), Items(test_x, test_y), Items(sx, sy), num_classes=4, config=cfg,
                                  regimes=["real+albumentations", "real+dagan"], progress=False)
    wrong = evaluate_augmentation(Items(x, y), Items(test_x, test_y), Items(sx, (sy + 1) % 4), num_classes=4,
                                  config=cfg, regimes=["real+albumentations"], progress=False)
    shares = [next(r for r in rep.runs if r["regime"] == "real+albumentations")["synthetic_class_identity"]
              for rep in (right, wrong)]
    assert shares[0] >= 0.8 and shares[1] <= 0.2, shares  # true labels vs every label shifted by one class
    assert "Class identity of the synthetic patches: " in right.to_markdown()
    assert f"{shares[1]:.3f}" in wrong.to_markdown()
    dagan_row = next(r for r in right.runs if r["regime"] == "real+dagan")
    assert "synthetic_class_identity" not in dagan_row and dagan_row["synthetic_items"] > 0
    alone = evaluate_augmentation(Items(x, y), Items(test_x, test_y), None, num_classes=4, config=cfg,
                                  regimes=["real+albumentations"], progress=False)
    assert "synthetic_class_identity" not in alone.runs[0]
