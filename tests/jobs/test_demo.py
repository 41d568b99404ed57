"""`dagan demo`, the README's first command, end to end on a small synthetic archive."""

import json

import h5py
import numpy as np
import torch
import yaml
from jobs.test_assess import read_rows, source_rows, write_real, write_synthetic
from PIL import Image
from typer.testing import CliRunner

from dagan_gn.cli import app
from dagan_gn.jobs.demo import variant_diversity
from dagan_gn.metrics.diversity import diversity_ratios, pixel_l1
from dagan_gn.store.patch_file import PatchFile


def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "2", "--patients", "4", "--n", "2",
                                   "--seed", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "[4/4]" in res.output and "done in" in res.output and "pixel diversity ratio" in res.output

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["extraction"]["files_skipped"] == 0 and summary["extraction"]["files_used"] == 16
    assert summary["environment"]["device"] == "cpu" and summary["environment"]["numpy"] == np.__version__
    with h5py.File(out / "patches.h5", "r") as real, h5py.File(out / "synthetic.h5", "r") as synth:
        assert real["patches"].dtype == "uint16" and real["patches"].shape[1:] == (1, 64, 64)
        n_train = int((real["split"][:] == list(real.attrs["split_names"]).index("train")).sum())
        assert n_train > 0
        # N variants of every training patch, same layout, marked synthetic.
        assert synth["patches"].shape == (2 * n_train, 1, 64, 64)
        assert bool(synth.attrs["synthetic"]) is True
    assert sorted(p.name for p in (out / "run" / "checkpoints").glob("step_*.pt"))[-1] == "step_0000002.pt"
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 64 and sheet.height > 64
    assert (out / "run" / "loss_curves.png").is_file()
    assert not (out / "patches.h5.salt").exists()  # a fixed salt for the synthetic patients: a reproducible split
    # the demo measures its own variants, as dagan assess does
    assert 0 < summary["pixel_diversity_ratio"] < 5 and 0 < summary["pixel_source_distance_ratio"] < 5
    assert 0 <= summary["pixel_identity"] <= 1
    # the demo's training config carries the measured diversity settings
    run_cfg = yaml.safe_load((out / "run" / "config.yaml").read_text())
    assert run_cfg["loss"]["mode_seeking"] > 0 and run_cfg["model"]["g_kwargs"] == {"smooth_output": True}
    # ... and the identity terms, with the class head sized from the data (normal, benign, malignant)
    assert run_cfg["model"]["critic_classes"] == 3 and run_cfg["loss"]["class_weight"] > 0
    assert run_cfg["loss"]["reconstruction"] > 0


def test_variant_diversity_matches_assess_definitions(tmp_path):
    """The demo's own figure is assess's pixel ratio: 0 for copies of the source, ~1 for real patches as variants,
    and the same value dagan assess reports (without its held-out split)."""
    real = write_real(tmp_path / "real.h5")
    rows = source_rows(real)
    copies = np.repeat(read_rows(real, rows)[:, None], 3, axis=1)
    assert variant_diversity(real, write_synthetic(tmp_path / "copies.h5", real, rows, copies)) == (0.0, 0.0, 1.0)
    # variants = other real patches of the class: both ratios about 1
    with PatchFile(real) as pf:
        train = pf.split_indices("train")
        labels = pf.labels
    others = np.stack([read_rows(real, [r2 for r2 in train if labels[r2] == labels[r] and r2 != r][:3]) for r in rows])
    diversity, distance, identity = variant_diversity(real, write_synthetic(tmp_path / "others.h5", real, rows,
                                                                            others))
    assert 0.7 < diversity < 1.3 and 0.7 < distance < 1.3
    assert identity < 0.5  # other patches of the class are not variants of the source
    images = torch.from_numpy(read_rows(real, train)) * 2 - 1
    expected = diversity_ratios(torch.from_numpy(others) * 2 - 1, labels[rows], images, labels[train], pixel_l1)
    assert abs(diversity - float(expected.nanmean())) < 1e-5
