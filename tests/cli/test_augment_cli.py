"""Tests of dagan_gn/cli/augment.py: train → augment → check-memorization → evaluate-augmentation via the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dagan_gn.cli import app
from dagan_gn.store.patch_file import PatchFile, PatchWriter, to_uint16

runner = CliRunner()


def make_patch_file(path, size=32, n=24, seed=0):
    """24 smooth patches of 12 patients: 12 train, 4 val, 8 test; 2 classes."""
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.random((n, 1, size // 8, size // 8)).astype(np.float32))
    imgs = torch.nn.functional.interpolate(base, size=size, mode="bilinear").numpy()
    split = ["train"] * 12 + ["val"] * 4 + ["test"] * 8
    with PatchWriter(path, patch_size=size, class_names=["normal", "mass"],
                     provenance={"patient_pseudonym": "str"}) as w:
        w.append(to_uint16(imgs), np.arange(n) % 2, split, {"patient_pseudonym": [f"p{i // 2}" for i in range(n)]})
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    patches = make_patch_file(root / "patches.h5")
    result = runner.invoke(app, [
        "train", "--data", str(patches), "--out", str(root / "run"), "--steps", "2", "--device", "cpu", "-q",
        "model.image_size=32", "model.g_width=8", "model.d_width=8", "model.z_dim=16", "model.num_classes=2",
        "data.batch_size=4", "data.num_workers=0", "optim.n_critic=1", "train.ema_start=0",
        "train.checkpoint_every=2", "train.sample_every=1000", "train.log_every=1",
    ])
    assert result.exit_code == 0, result.output
    return root, patches, root / "run"


def test_augment_then_checks(trained, tmp_path):
    root, patches, run = trained
    syn = tmp_path / "syn.h5"
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(app, ["augment", "--in", str(patches), "--checkpoint", str(run), "--out", str(syn),
                                 "--n", "3", "--seed", "5", "--device", "cpu", "--contact-sheet", str(sheet), "-q"])
    assert result.exit_code == 0, result.output
    assert "wrote 36 synthetic patches" in result.output and sheet.is_file()
    with PatchFile(syn) as pf:
        assert len(pf) == 36 and pf.synthetic
        assert set(pf.provenance("source_index").tolist()) == set(range(12))

    # existing output is not overwritten silently
    again = runner.invoke(app, ["augment", "--in", str(patches), "--checkpoint", str(run), "--out", str(syn),
                                "--device", "cpu", "-q"])
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output

    mem_dir = tmp_path / "mem"
    result = runner.invoke(app, ["check-memorization", "--real", str(patches), "--synthetic", str(syn),
                                 "--out", str(mem_dir), "--device", "cpu", "--chunk-size", "7"])
    assert result.exit_code == 0, result.output
    assert "| pixel |" in result.output and (mem_dir / "memorization.json").is_file()

    ev_dir = tmp_path / "ev"
    result = runner.invoke(app, ["evaluate-augmentation", "--real", str(patches), "--synthetic", str(syn),
                                 "--out", str(ev_dir), "--epochs", "1", "--width", "4", "--batch-size", "8",
                                 "--seeds", "1", "--bn-batches", "2", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    for regime in ("real", "real+albumentations", "real+dagan", "real+both"):
        assert f"| {regime} |" in result.output
    assert (ev_dir / "downstream.png").is_file() and (ev_dir / "downstream.md").is_file()
    assert json.loads((ev_dir / "downstream.json").read_text())["config"]["bn_recalibration_batches"] == 2


def test_evaluate_augmentation_defaults_to_precise_bn_with_50_batches(tmp_path, monkeypatch):
    """`--bn-batches` defaults to 50 (docs/augment.md): the config the command builds without the option."""
    import dagan_gn.jobs.downstream as downstream_job
    from dagan_gn.errors import DaganError

    seen = []

    def spy(*args, config, **kwargs):
        seen.append(config)
        raise DaganError("stopped by the test")

    monkeypatch.setattr(downstream_job, "evaluate_augmentation_files", spy)
    result = runner.invoke(app, ["evaluate-augmentation", "--real", str(tmp_path / "r.h5"), "--out",
                                 str(tmp_path / "ev"), "--device", "cpu", "-q"])
    assert result.exit_code == 2 and "stopped by the test" in result.output
    assert [c.bn_recalibration_batches for c in seen] == [50]


def test_errors_are_one_line(trained, tmp_path):
    root, patches, run = trained
    base = ["augment", "--in", str(patches), "--checkpoint", str(run), "--out", str(tmp_path / "x.h5"),
            "--device", "cpu", "-q"]
    for extra, message in (
        (["--split", "test"], "leak"),
        (["--classes", "normal,calcification"], "known classes: normal, mass"),
        (["--split", "holdout"], "no split 'holdout'"),
    ):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.h5").exists()
    result = runner.invoke(app, ["check-memorization", "--real", str(patches), "--synthetic", str(patches),
                                 "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "not a synthetic" in result.output
    result = runner.invoke(app, ["evaluate-augmentation", "--real", str(patches), "--out", str(tmp_path / "e"),
                                 "--synthetic-ratio", "lots"])
    assert result.exit_code == 2 and "--synthetic-ratio" in result.output


def test_help_lists_every_option():
    for cmd in ("augment", "evaluate-augmentation", "check-memorization"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "--seed" in result.output
