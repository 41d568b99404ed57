"""``dagan train`` end to end through the CLI: DAGAN (64 px, tiny) on an HDF5 patch file, CIFAR ResNet (tiny) on an
image tree, resume and its config guard, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dagan_gn.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

FAST = ["data.batch_size=4", "optim.n_critic=1", "train.sample_every=1", "train.checkpoint_every=1",
        "train.log_every=1", "data.num_workers=0"]


def _write_patches(path: Path, counts: dict[str, int], size: int = 64, val: int = 0) -> Path:
    from dagan_gn.store.patch_file import PatchWriter, to_uint16

    rng = np.random.default_rng(0)
    labels, split = [], []
    for k, n in enumerate(counts.values()):
        labels += [k] * n
        split += ["train"] * n
    labels += [0] * val
    split += ["val"] * val
    images = rng.random((len(labels), 1, size, size)).astype(np.float32)
    with PatchWriter(path, patch_size=size, class_names=list(counts), provenance={}) as w:
        w.append(to_uint16(images), labels, split, {})
    return path


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    return _write_patches(tmp_path_factory.mktemp("h5") / "patches.h5", {"benign": 6, "malignant": 6})


def _invoke(*args: str):
    return runner.invoke(app, ["train", *map(str, args)])


def _last_record(run: Path) -> dict:
    """The last training-scalars record (sample-grid metrics and evaluations are records of their own)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss/critic" in r][-1]


@pytest.mark.slow
def test_dagan_tiny_end_to_end_and_resume(tmp_path, patches):
    run = tmp_path / "run"
    res = _invoke("--config", ROOT / "configs/dagan_tiny.yaml", "--data", patches, "--out", run, "--steps", 2,
                  "--seed", 3, "--quiet", *FAST)
    assert res.exit_code == 0, res.output
    assert (run / "config.yaml").is_file() and "seed: 3" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "step_0000002.pt").is_file()
    assert (run / "samples" / "step_0000002.png").is_file() and (run / "loss_curves.png").is_file()
    rec = _last_record(run)
    assert rec["step"] == 2
    assert all(math.isfinite(rec[k]) for k in ("loss/critic", "loss/generator", "loss/gradient_penalty"))

    # continue to step 3
    res = _invoke("--config", ROOT / "configs/dagan_tiny.yaml", "--data", patches, "--out", run, "--steps", 3,
                  "--seed", 3, "--quiet", "--resume", *FAST)
    assert res.exit_code == 0, res.output
    assert (run / "checkpoints" / "step_0000003.pt").is_file()

    # a resume whose config changes something that matters is refused, naming the keys
    res = _invoke("--config", ROOT / "configs/dagan_tiny.yaml", "--data", patches, "--out", run, "--steps", 4,
                  "--seed", 3, "--quiet", "--resume", *FAST, "optim.d_lr=0.5")
    assert res.exit_code == 2
    assert "optim.d_lr" in res.output and "train.seed" not in res.output
    assert "Traceback" not in res.output

    from dagan_gn.training import load_generator

    G, cfg, path = load_generator(run)
    assert path.name == "step_0000003.pt" and cfg.model.image_size == 64 and not G.training


@pytest.mark.slow
def test_cifar_resnet_tiny_end_to_end(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("DAGAN_GN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for cls in ("airplane", "cat"):
        d = tmp_path / "cifar" / "train" / cls
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    run = tmp_path / "run"
    res = _invoke("--config", ROOT / "configs/cifar10_resnet_ln.yaml", "--data", tmp_path / "cifar", "--out", run,
                  "--steps", 2, "--device", "cpu", "--quiet", *FAST, "model.g_width=16", "model.d_width=16",
                  "model.z_dim=16", "metrics.eval_every=2", "metrics.feature_extractor=tiny",
                  "metrics.num_samples=8", "metrics.kid_subset_size=4", "metrics.metrics=[fid,kid]")
    assert res.exit_code == 0, res.output
    assert (run / "checkpoints" / "step_0000002.pt").is_file()
    assert (run / "checkpoints" / "best.pt").is_file()  # evaluated at step 2 with the metrics' TrainingEvaluator
    assert (run / "samples" / "step_0000002.png").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss/critic" in r][-1]
    assert math.isfinite(losses["loss/critic"]) and math.isfinite(losses["loss/generator"])
    assert any(math.isfinite(r.get("eval/fid", float("nan"))) for r in records)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.g_norm=fancy"], "unknown normalization 'fancy'"),
        (["model.g_norm=group:5"], "num_groups must divide"),
        (["loss.name=lsgan"], "unknown loss 'lsgan'"),
        (["optim.nope=1"], "unknown config key 'optim.nope'"),
        (["data.split=val"], "empty split"),
        (["data.batch_size=64"], "lower data.batch_size"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path, patches, extra, message):
    res = _invoke("--config", ROOT / "configs/dagan_tiny.yaml", "--data", patches, "--out", tmp_path / "r",
                  "--quiet", "--steps", 1, *extra)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.output
    assert "Traceback" not in res.output


def test_single_patch_class_and_missing_data(tmp_path):
    lonely = _write_patches(tmp_path / "lonely.h5", {"normal": 4, "calcification": 1})
    res = _invoke("--config", ROOT / "configs/dagan_tiny.yaml", "--data", lonely, "--out", tmp_path / "r", "--quiet")
    assert res.exit_code == 2 and "calcification" in res.output and "single patch" in res.output
    res = _invoke("--config", ROOT / "configs/dagan_tiny.yaml", "--data", tmp_path / "nope.h5", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "does not exist" in res.output


def test_help_lists_options():
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0
    for opt in ("--config", "--data", "--out", "--resume", "--steps", "--device", "--seed", "--amp", "OVERRIDES"):
        assert opt in res.output
