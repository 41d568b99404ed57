"""Tests for pipelines/omniglot_fewshot.py: the whole protocol in --smoke on a tiny Omniglot-layout zip."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from factories import make_omniglot_zip

from dagan_gn.metrics.downstream import REGIMES
from dagan_gn.store.patch_file import PatchFile

REPO = Path(__file__).resolve().parents[2]


def _pipeline():
    spec = importlib.util.spec_from_file_location("omniglot_fewshot", REPO / "pipelines" / "omniglot_fewshot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Two training alphabets (5 characters) and one held-out alphabet (3 characters), 6 drawings each."""
    work = tmp_path_factory.mktemp("omniglot")
    data = make_omniglot_zip(work / "tiny.zip", {"TrainA": 3, "TrainB": 2, "Held": 3}, drawings=6)
    common = ["--data", str(data), "--train-alphabets", "TrainA,TrainB", "--test-alphabets", "Held",
              "--shots", "1,2", "--test-per-class", "3", "--seeds", "0,1", "--smoke", "--quiet"]
    module = _pipeline()
    rc = module.main(["--out", str(work / "out"), *common])
    return module, work, common, rc


@pytest.mark.slow
def test_smoke_protocol_report_and_leak_checks(smoke_run):
    module, work, _, rc = smoke_run
    out = work / "out"
    assert rc == 0
    report = json.loads((out / "omniglot_fewshot.json").read_text())
    markdown = (out / "omniglot_fewshot.md").read_text()
    assert "| k | real | real+albumentations | real+dagan | real+both |" in markdown
    assert "\n| 1 | " in markdown and "\n| 2 | " in markdown and "\n| 3 | " not in markdown  # one row per k
    assert (out / "omniglot_fewshot.png").stat().st_size > 0 and (out / "variants_test.png").stat().st_size > 0
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    table = report["summary"]["table"]
    assert list(table) == ["1", "2"] and all(list(row) == list(REGIMES) for row in table.values())
    assert all(cell["n"] == 2 and 0.0 <= cell["mean"] <= 1.0 for row in table.values() for cell in row.values())
    assert len(report["runs"]) == 2 * 2 * len(REGIMES)
    gains = report["summary"]["gains"]["2"]["dagan_minus_real"]
    runs = {(r["k"], r["seed"], r["regime"]): r["accuracy"] for r in report["runs"]}
    assert gains["per_seed"] == [runs[(2, s, "real+dagan")] - runs[(2, s, "real")] for s in (0, 1)]
    assert set(report["seconds"]) >= {"read", "dagan_train", "augment", "classifiers", "total"}
    assert report["settings"]["task_classes"] == ["Held/character01", "Held/character02", "Held/character03"]
    # class identity of the variants, from each seed's classical classifier: a share per seed, summarised per k
    for k in ("1", "2"):
        identity = report["summary"]["class_identity"][k]
        per_run = [r["synthetic_class_identity"] for r in report["runs"]
                   if r["k"] == int(k) and r["regime"] == "real+albumentations"]
        assert identity["n"] == 2 and identity["per_seed"] == per_run and all(0 <= v <= 1 for v in per_run)
    assert "class identity of the variants in each seed's real+albumentations classifier" in markdown

    # The DAGAN was trained on the training alphabets only: its data file, as named in the run's config.
    cfg = yaml.safe_load((out / "dagan" / "config.yaml").read_text())
    with PatchFile(cfg["data"]["path"]) as pf:
        assert len(pf.class_names) == 5 and not any(c.startswith("Held/") for c in pf.class_names)
    assert cfg["model"]["num_classes"] == 0 and report["dagan"]["task_classes_seen"] == 0

    for seed in (0, 1):
        with PatchFile(out / "test" / f"seed{seed}" / "shots.h5") as pf:
            train, test = pf.split_indices("train"), pf.split_indices("test")
            ids = pf.provenance("image_pseudonym")
            assert not set(ids[train]) & set(ids[test])  # test drawings are never shots
            assert len(train) == 3 * 2 and len(test) == 3 * 3
            assert sorted(pf.provenance("shot_rank")[train]) == [0, 0, 0, 1, 1, 1]
            assert all(np.bincount(pf.labels[test]) == 3)
        with PatchFile(out / "test" / f"seed{seed}" / "variants.h5") as syn:
            assert syn.synthetic and set(syn.provenance("source_index")) <= set(train.tolist())
            assert len(syn) == 2 * len(train)
    # Shots and test drawings differ between seeds.
    with PatchFile(out / "test" / "seed0" / "shots.h5") as a, PatchFile(out / "test" / "seed1" / "shots.h5") as b:
        assert list(a.provenance("image_pseudonym")) != list(b.provenance("image_pseudonym"))


@pytest.mark.slow
def test_rerun_resumes_everything_and_dev_task_reuses_the_dagan(smoke_run):
    module, work, common, _ = smoke_run
    out = work / "out"
    lines = (out / "test" / "runs.jsonl").read_text().count("\n")
    mtime = (out / "dagan" / "config.yaml").stat().st_mtime
    first = json.loads((out / "omniglot_fewshot.json").read_text())["stage_seconds_last_work"]
    assert module.main(["--out", str(out), *common]) == 0
    assert (out / "test" / "runs.jsonl").read_text().count("\n") == lines  # no classifier trained again
    assert (out / "dagan" / "config.yaml").stat().st_mtime == mtime  # nor the DAGAN
    again = json.loads((out / "omniglot_fewshot.json").read_text())
    # The report still states what the stages cost when they did their work, not the reuse's near-zero times.
    for stage in ("dagan_train", "augment", "classifiers"):
        assert again["stage_seconds_last_work"][stage] == first[stage] > 0
    assert again["seconds"]["classifiers"] < first["classifiers"]
    assert module.main(["--out", str(out), *common, "--dev", "--dev-classes", "3"]) == 0
    dev = json.loads((out / "omniglot_fewshot_dev.json").read_text())
    assert dev["settings"]["task"] == "dev" and dev["dagan"]["task_classes_seen"] == 3
    assert all(c.startswith("Train") for c in dev["settings"]["task_classes"])
    assert "which the DAGAN was trained on" in (out / "omniglot_fewshot_dev.md").read_text()


def test_bad_protocols_fail_with_one_line(smoke_run, tmp_path, capsys):
    module, work, common, _ = smoke_run
    assert module.main(["--out", str(tmp_path / "a"), *common, "--shots", "4"]) == 2  # 4 shots + 3 tests > 6
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: character Held/character01 has 6 drawings") and "\n" not in err
    conditional = [*common, "model.num_classes=5"]
    assert module.main(["--out", str(tmp_path / "b"), *conditional]) == 2
    assert "must be unconditional" in capsys.readouterr().err
    # A DAGAN that was trained on the held-out characters is refused for the test task.
    assert module.main(["--out", str(tmp_path / "c"), *common, "--train-alphabets", "Held",
                        "--test-alphabets", "Held"]) == 2
    assert "both training and test alphabets" in capsys.readouterr().err


@pytest.mark.slow
def test_parallel_workers_give_the_same_runs(smoke_run, tmp_path):
    module, work, common, _ = smoke_run
    rc = module.main(["--out", str(tmp_path / "par"), *common, "--reuse-dagan", str(work / "out" / "dagan"),
                      "--workers", "2", "--regimes", "real,real+dagan"])
    assert rc == 0
    par = json.loads((tmp_path / "par" / "omniglot_fewshot.json").read_text())
    seq = json.loads((work / "out" / "omniglot_fewshot.json").read_text())
    assert par["settings"]["regimes"] == ["real", "real+dagan"] and par["settings"]["workers"] == 2

    def key(r):
        return r["k"], r["seed"], r["regime"]

    # Equal, not close: both sides train on one intra-op thread (tests/conftest.py; the workers set threads=1), the
    # same computation on the same machine. With another thread count the sums round differently (not promised).
    seq_runs = {key(r): (r["accuracy"], r["auc"]) for r in seq["runs"]}
    assert {key(r): (r["accuracy"], r["auc"]) for r in par["runs"]} == {
        k: v for k, v in seq_runs.items() if k[2] in ("real", "real+dagan")}
    targets = par["summary"]["targets"]
    assert targets["both_beats_classical_at_k1"] is None  # the regimes were not run: not measured, not "failed"


@pytest.mark.slow
def test_an_unfinished_dagan_training_is_resumed(smoke_run, tmp_path):
    import shutil

    module, work, common, _ = smoke_run
    out = tmp_path / "resume"
    out.mkdir()
    shutil.copytree(work / "out" / "dagan", out / "dagan")  # a run that stopped at step 2 ...
    shutil.copy(work / "out" / "dagan_train.h5", out / "dagan_train.h5")
    rc = module.main(["--out", str(out), *common, "--steps", "3", "--regimes", "real", "--shots", "1"])  # ... of 3
    assert rc == 0
    dagan = json.loads((out / "omniglot_fewshot.json").read_text())["dagan"]
    assert dagan["trained_here"] and dagan["resumed_from_step"] == 2 and dagan["step"] == 3
    # A changed config is refused instead of silently mixing two trainings.
    assert module.main(["--out", str(out), *common, "--steps", "3", "optim.g_lr=0.5"]) == 2


def test_truncation_reaches_the_variants_report_and_fingerprint(smoke_run, tmp_path):
    module, work, common, _ = smoke_run
    args = ["--reuse-dagan", str(work / "out" / "dagan"), *common, "--regimes", "real+dagan", "--shots", "1"]
    plain, cut = tmp_path / "plain", tmp_path / "cut"
    assert module.main(["--out", str(plain), *args]) == 0
    assert module.main(["--out", str(cut), *args, "--truncation", "0.5"]) == 0
    with PatchFile(cut / "test" / "seed0" / "variants.h5") as syn:
        assert syn.parameters["truncation"] == 0.5
    report = json.loads((cut / "omniglot_fewshot.json").read_text())
    assert report["settings"]["truncation"] == 0.5
    assert "noise truncated at 0.5" in (cut / "omniglot_fewshot.md").read_text()
    assert "truncated" not in (plain / "omniglot_fewshot.md").read_text()
    # Rerunning the untruncated folder with a bound makes its variants again instead of reusing them.
    variants = plain / "test" / "seed0" / "variants.h5"
    with PatchFile(variants) as syn:
        assert syn.parameters["truncation"] == 0.0
    assert module.main(["--out", str(plain), *args, "--truncation", "0.25"]) == 0
    with PatchFile(variants) as syn:
        assert syn.parameters["truncation"] == 0.25
    with pytest.raises(SystemExit):
        module.parse_args(["--out", str(tmp_path), "--truncation", "-1"])


def test_variant_diversity_is_assess_s_definition(tmp_path):
    """Copies of the shots: diversity 0, distance 0, identity 1; the second character's variants swapped with the
    first's: identity 0 for those."""
    from dagan_gn.store.patch_file import PatchWriter, to_uint16

    module = _pipeline()
    rng = np.random.default_rng(0)
    shots = rng.random((4, 1, 8, 8)).astype(np.float32)  # characters 0, 1, 0, 1 (two drawings each)
    with PatchWriter(tmp_path / "shots.h5", patch_size=8, class_names=["a", "b"],
                     provenance={"shot_rank": "int32"}) as w:
        w.append(to_uint16(shots), [0, 1, 0, 1], ["train"] * 4, {"shot_rank": [0, 0, 1, 1]})

    def write(path, variants):
        with PatchWriter(path, patch_size=8, class_names=["a", "b"], synthetic=True,
                         provenance={"source_index": "int64", "variant": "int32"}) as w:
            w.append(to_uint16(variants), np.repeat([0, 1, 0, 1], 2), ["train"] * 8,
                     {"source_index": np.repeat(range(4), 2), "variant": np.tile([0, 1], 4)})
        return path

    copies = write(tmp_path / "copies.h5", np.repeat(shots, 2, axis=0))
    assert module.variant_diversity(tmp_path / "shots.h5", copies) == {"diversity": 0.0, "distance_to_source": 0.0,
                                                                        "identity": 1.0}
    swapped = write(tmp_path / "swapped.h5", np.repeat(shots[[0, 3, 2, 1]], 2, axis=0))
    div = module.variant_diversity(tmp_path / "shots.h5", swapped)
    assert div["identity"] == 0.5 and div["diversity"] == 0.0 and div["distance_to_source"] > 0
