"""Tests of dagan_gn/jobs/assess.py: copies score 0, real-like variants score 1, KID at small n with its floor,
the report files, and one clear error per bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dagan_gn.jobs.assess import AssessError, assess
from dagan_gn.metrics.downstream import DownstreamConfig
from dagan_gn.metrics.fidelity import compute_fidelity
from dagan_gn.store.patch_file import PatchFile, PatchWriter, to_uint16

SIZE = 32
CLASSES = ["normal", "benign", "malignant"]
N_TRAIN, N_TEST, N_SOURCES, V = 30, 10, 8, 4  # per class
FAST = dict(classifier=DownstreamConfig(width=4, epochs=3, batch_size=16), feature_extractor="tiny", n_pairs=200,
            device="cpu", progress=False)


def class_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blurry random patches in [0, 1]; the class sets blob scale and brightness (three distinct tissue types)."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c, coarse in enumerate((4, 8, 16)):
        x = torch.nn.functional.interpolate(torch.randn(n_per_class, 1, coarse, coarse, generator=g), size=SIZE,
                                            mode="bilinear", align_corners=False)
        images.append(((torch.tanh(0.8 * x + 0.3 * (c - 1)) + 1) / 2).numpy())
        labels.append(np.full(n_per_class, c))
    return np.concatenate(images), np.concatenate(labels)


def write_real(path, seed=0, classes=CLASSES, splits=("train", "test")):
    """N_TRAIN train and N_TEST held-out patches per class, one patient per patch."""
    train, train_y = class_images(N_TRAIN, seed)
    test, test_y = class_images(N_TEST, seed + 1)
    images, labels = np.concatenate([train, test]), np.concatenate([train_y, test_y])
    split = [splits[0]] * len(train) + [splits[1]] * len(test)
    with PatchWriter(path, patch_size=SIZE, class_names=classes, provenance={"patient_pseudonym": "str"}) as w:
        w.append(to_uint16(images), labels, split, {"patient_pseudonym": [f"P-{i:04d}" for i in range(len(images))]})
    return path


def source_rows(real_path) -> np.ndarray:
    """The first N_SOURCES train rows of each class."""
    with PatchFile(real_path) as pf:
        train = pf.split_indices("train")
        return np.concatenate([train[pf.labels[train] == c][:N_SOURCES] for c in range(len(pf.class_names))])


def write_synthetic(path, real_path, rows, variants01, *, classes=None, labels=None, patients=None, keep=None):
    """A synthetic file like `dagan augment` writes: variants ``[len(rows), V', 1, S, S]`` of real ``rows``
    (``keep``: a mask over the ``len(rows) * V'`` variants, to leave some out)."""
    with PatchFile(real_path) as pf:
        classes = classes or pf.class_names
        labels = pf.labels[rows] if labels is None else labels
        patients = pf.provenance("patient_pseudonym")[rows] if patients is None else patients
    n, v = variants01.shape[:2]
    keep = np.ones(n * v, bool) if keep is None else keep
    cols = {"source_index": "int32", "variant": "int32", "noise_seed": "int64", "patient_pseudonym": "str"}
    prov = {"source_index": np.repeat(rows, v), "variant": np.tile(np.arange(v), n), "noise_seed": np.arange(n * v),
            "patient_pseudonym": np.repeat(np.asarray(patients, dtype=object), v)}
    with PatchWriter(path, patch_size=SIZE, class_names=classes, provenance=cols, synthetic=True,
                     attrs={"source_file": "patches.h5"}) as w:
        w.append(to_uint16(variants01.reshape(n * v, 1, SIZE, SIZE)[keep]), np.repeat(labels, v)[keep],
                 ["train"] * int(keep.sum()), {k: col[keep] for k, col in prov.items()})
    return path


def read_rows(real_path, rows) -> np.ndarray:
    with PatchFile(real_path) as pf:
        return np.stack([pf.read_patch(r) for r in rows]).astype(np.float32) / 65535.0


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return write_real(tmp_path_factory.mktemp("assess") / "patches.h5")


def test_copy_set_scores_zero_everywhere_and_writes_the_report(real, tmp_path):
    rows = source_rows(real)
    copies = np.repeat(read_rows(real, rows)[:, None], V, axis=1)
    syn = write_synthetic(tmp_path / "copies.h5", real, rows, copies)
    out = tmp_path / "report"
    report = assess(real, syn, out, seed=3, **FAST)

    assert report.n_sources == 3 * N_SOURCES and report.variants_per_source == V
    assert set(report.spaces) == {"pixel", "ms_ssim", "feature"}
    for space in report.spaces:
        assert abs(report.diversity[space]["mean"]) < 1e-3, space
        assert abs(report.source_distance[space]["mean"]) < 1e-3, space
        assert all(c in report.real_pair_distance[space] for c in CLASSES)
    # Copies keep their identity perfectly: every variant's nearest source is its own, closer than any other class.
    assert set(report.identity) == {"pixel", "feature"}
    for space, ident in report.identity.items():
        assert ident["nearest_is_source"]["mean"] == 1.0 and ident["closer_than_other_class"]["mean"] == 1.0, space
        assert ident["n_candidates"] == 3 * N_SOURCES and ident["n_other"] > 0
    # Copies are classified exactly as their sources: recall per class equals the sources' recall.
    cc = report.class_consistency
    assert cc["variants"]["n"] == 3 * N_SOURCES * V and cc["heldout"]["n"] == 3 * N_TEST
    assert 0 <= cc["variants"]["accuracy"] <= 1 and cc["classifier"]["balance_classes"]
    # KID: n smaller than the requested subset works; the floor is a same-size real sample.
    fd = report.fidelity
    assert fd["kid_subset_size"] == 3 * N_TEST and fd["kid_subset_size_requested"] == 1000
    assert fd["n_floor"] == min(3 * N_SOURCES * V, 3 * N_TRAIN) and np.isfinite(fd["kid_mean"]) and np.isfinite(fd["floor_kid_mean"])
    assert any("KID subset size 30 instead of 1000" in n for n in report.notes)

    names = {p.name for p in out.iterdir()}
    assert names == {"assess.json", "assess.md", "contact_sheet.png", "diversity_hist.png"}
    data = json.loads((out / "assess.json").read_text())  # strict JSON: NaN would not parse back as a number
    assert data["diversity"]["pixel"]["mean"] == pytest.approx(report.diversity["pixel"]["mean"])
    assert data["environment"]["device"] == "cpu" and data["environment"]["torch"] == torch.__version__
    assert len(data["per_source"]) == 3 * N_SOURCES and data["per_source"][0]["source_index"] == int(rows[0])
    md = (out / "assess.md").read_text()
    assert "| pixel L1 |" in md and "real floor" in md and "contact_sheet.png" in md and "## Identity" in md
    assert data["identity"]["feature"]["nearest_is_source"]["mean"] == 1.0
    for text in (md, (out / "assess.json").read_text()):
        assert str(tmp_path) not in text  # base names only: the report is shareable
    # Contact sheet: up to 8 rows (sources taken in turn from each class), source + V variants per row.
    from PIL import Image

    w, h = Image.open(out / "contact_sheet.png").size
    assert (w, h) == (2 + (1 + V) * (SIZE + 2), 2 + 8 * (SIZE + 2))


def test_real_patches_as_variants_score_about_one(real, tmp_path):
    """Variants drawn from new real patches of the source's class are as varied as real data: ratios ≈ 1. With
    24 sources × 6 pairs and a 200-pair scale per class the mean's standard error is a few percent (the rigorous
    tolerance is derived in tests/metrics/test_diversity.py); 0.15 is > 4 of them."""
    rows = source_rows(real)
    fresh, fresh_y = class_images(N_SOURCES * V, seed=99)  # the same distribution, other patches
    order = np.argsort(fresh_y, kind="stable")
    variants = fresh[order].reshape(3 * N_SOURCES, V, 1, SIZE, SIZE)
    syn = write_synthetic(tmp_path / "realish.h5", real, rows, variants)
    report = assess(real, syn, None, run_kid=False, seed=0, **FAST)
    for space in ("pixel", "ms_ssim"):
        assert report.diversity[space]["mean"] == pytest.approx(1.0, abs=0.15), space
        assert report.source_distance[space]["mean"] == pytest.approx(1.0, abs=0.15), space
    assert report.diversity["feature"]["mean"] == pytest.approx(1.0, abs=0.3)  # a 3-epoch classifier's embedding
    # New patches of the class are not variants of their source: the nearest of 24 sources is the own one about as
    # often as chance among a class's 8 sources (1/8), far from the copies' 1.0.
    assert report.identity["pixel"]["nearest_is_source"]["mean"] < 0.4
    assert report.fidelity is None and "KID not run" in report.notes


def test_noise_variants_order_and_subsets(real, tmp_path):
    rows = source_rows(real)
    src = read_rows(real, rows)
    g = np.random.default_rng(0)
    means = []
    for sigma in (0.01, 0.05):
        noisy = np.clip(src[:, None] + sigma * g.standard_normal((len(rows), V, 1, SIZE, SIZE)), 0, 1)
        syn = write_synthetic(tmp_path / f"noise{sigma}.h5", real, rows, noisy.astype(np.float32))
        report = assess(real, syn, None, run_kid=False, run_classifier=False, max_sources=10, seed=1, **{
            k: v for k, v in FAST.items() if k != "classifier"})
        assert report.n_sources == 10 and report.n_sources_total == 3 * N_SOURCES
        assert set(report.spaces) == {"pixel", "ms_ssim"} and report.class_consistency is None
        means.append(report.diversity["pixel"]["mean"])
    assert 0 < means[0] < means[1] < 0.5


def test_kid_below_subset_size_and_uneven_variant_counts(real, tmp_path):
    out = compute_fidelity(torch.rand(5, 1, SIZE, SIZE) * 2 - 1, torch.rand(7, 1, SIZE, SIZE) * 2 - 1,
                           metrics=("kid",), feature_extractor="tiny", kid_subset_size=50)
    assert out["kid_subset_size"] == 5 and out["kid_subset_size_requested"] == 50 and np.isfinite(out["kid_mean"])

    rows = source_rows(real)[:3]
    variants = np.repeat(read_rows(real, rows)[:, None], 3, axis=1)
    keep = np.ones(9, bool)
    keep[2] = False  # the first source lacks its last variant: 2, 3, 3 variants
    uneven = write_synthetic(tmp_path / "uneven.h5", real, rows, variants, keep=keep)
    report = assess(real, uneven, None, run_classifier=False, kid_subset_size=1000, seed=0,
                    **{k: v for k, v in FAST.items() if k != "classifier"})
    assert report.variants_per_source == 2 and any("2 to 3 variants" in n for n in report.notes)
    assert report.fidelity["kid_subset_size"] == 6 and report.fidelity["n_variants"] == 6  # 3 sources × 2


def test_single_variant_and_heldout_fallback(tmp_path):
    real = write_real(tmp_path / "p.h5", splits=("train", "val"))  # no test split: falls back to val
    rows = source_rows(real)
    syn = write_synthetic(tmp_path / "one.h5", real, rows, read_rows(real, rows)[:, None])
    report = assess(real, syn, None, run_classifier=False, run_kid=False, seed=0,
                    **{k: v for k, v in FAST.items() if k != "classifier"})
    assert report.heldout_split == "val"
    assert any("'test' split" in n and "'val' used" in n for n in report.notes)
    assert math.isnan(report.diversity["pixel"]["mean"])  # one variant: no variant pairs
    assert report.source_distance["pixel"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert any("single variant" in n for n in report.notes)


# --------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_one_clear_error_naming_the_file(real, tmp_path):
    rows = source_rows(real)
    copies = np.repeat(read_rows(real, rows)[:, None], 2, axis=1)
    kw = dict(run_classifier=False, run_kid=False, progress=False)

    with pytest.raises(AssessError, match=r"patches\.h5: not a synthetic patch file"):
        assess(real, real, None, **kw)
    good = write_synthetic(tmp_path / "good.h5", real, rows, copies)
    with pytest.raises(AssessError, match=r"good\.h5: is a synthetic patch file"):
        assess(good, good, None, **kw)

    far = write_synthetic(tmp_path / "far.h5", real, rows + 10_000, copies, labels=np.zeros(len(rows), int),
                          patients=["x"] * len(rows))
    with pytest.raises(AssessError, match=r"far\.h5: .*not in patches\.h5"):
        assess(real, far, None, **kw)

    other = write_synthetic(tmp_path / "other_classes.h5", real, rows, copies, classes=["a", "b", "c"])
    with pytest.raises(AssessError, match=r"other_classes\.h5 has classes \['a', 'b', 'c'\]"):
        assess(real, other, None, **kw)

    relabelled = write_synthetic(tmp_path / "relabelled.h5", real, rows, copies, labels=(np.arange(len(rows)) % 3))
    with pytest.raises(AssessError, match=r"relabelled\.h5: \d+ variants have another class"):
        assess(real, relabelled, None, **kw)

    strangers = write_synthetic(tmp_path / "strangers.h5", real, rows, copies, patients=["P-9999"] * len(rows))
    with pytest.raises(AssessError, match=r"strangers\.h5: the patient pseudonyms"):
        assess(real, strangers, None, **kw)

    with PatchFile(real) as pf:
        test_rows = pf.split_indices("test")[:3]
    leak = write_synthetic(tmp_path / "leak.h5", real, test_rows, np.repeat(read_rows(real, test_rows)[:, None], 2, 1))
    with pytest.raises(AssessError, match=r"leak\.h5: contains variants of 'test' patches"):
        assess(real, leak, None, **kw)

    with pytest.raises(AssessError, match="both 'train'"):
        assess(real, good, None, heldout_split="train", **kw)
    with pytest.raises(AssessError, match="unknown split 'holdout'"):
        assess(real, good, None, heldout_split="holdout", **kw)
    with pytest.raises(ValueError, match="no such patch file"):
        assess(tmp_path / "missing.h5", good, None, **kw)

    bare = tmp_path / "bare.h5"
    with PatchWriter(bare, patch_size=SIZE, class_names=CLASSES, provenance={"noise_seed": "int64"},
                     synthetic=True) as w:
        w.append(to_uint16(copies[:, 0]), np.zeros(len(rows), int), ["train"] * len(rows),
                 {"noise_seed": np.arange(len(rows))})
    with pytest.raises(AssessError, match=r"bare\.h5: no provenance column\(s\) source_index, variant"):
        assess(real, bare, None, **kw)
    assert not (tmp_path / "report").exists()


# --------------------------------------------------------------------------------------------- the metric registry


def test_a_registered_distance_is_measured_and_reported(real, tmp_path):
    """One register_metric call (a pure function) adds a space to assess's JSON, table and Markdown; unregistered,
    it is gone again."""
    from dagan_gn.metrics.registry import register_metric, unregister_metric

    def linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # largest pixel difference on [0, 1]
        return (a.float() - b.float()).abs().flatten(1).amax(1) / 2

    rows = source_rows(real)
    copies = np.repeat(read_rows(real, rows)[:, None], V, axis=1)
    syn = write_synthetic(tmp_path / "copies.h5", real, rows, copies)
    kw = dict(run_classifier=False, run_kid=False, seed=0, **{k: v for k, v in FAST.items() if k != "classifier"})
    register_metric("toy_linf", linf, needs="images", label="toy L∞", identity_p=float("inf"))
    try:
        report = assess(real, syn, tmp_path / "with", **kw)
        table = report.summary_table()
    finally:
        unregister_metric("toy_linf")

    assert report.spaces == ["pixel", "ms_ssim", "toy_linf"]  # registration order
    data = json.loads((tmp_path / "with" / "assess.json").read_text())
    assert data["diversity"]["toy_linf"]["mean"] == pytest.approx(0.0, abs=1e-6)  # copies
    assert data["source_distance"]["toy_linf"]["n"] == 3 * N_SOURCES
    assert set(data["real_pair_distance"]["toy_linf"]) == set(CLASSES)
    assert all("toy_linf" in row["diversity"] for row in data["per_source"])
    assert data["identity"]["toy_linf"]["nearest_is_source"]["mean"] == 1.0
    md = (tmp_path / "with" / "assess.md").read_text()
    assert "| toy L∞ | 0.000" in md and "diversity, toy L∞" in md  # its row and its per-class column
    assert "| toy L∞ | 1.000" in md  # its identity row
    assert "\ntoy L∞ " in table and "identity (toy L∞)" in table

    again = assess(real, syn, tmp_path / "without", **kw)
    assert again.spaces == ["pixel", "ms_ssim"]
    assert "toy" not in (tmp_path / "without" / "assess.md").read_text()
    assert "toy_linf" not in (tmp_path / "without" / "assess.json").read_text()
