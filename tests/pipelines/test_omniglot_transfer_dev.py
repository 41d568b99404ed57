"""Tests for pipelines/omniglot_transfer_dev.py on a tiny all_runs-layout zip and a tiny DAGAN."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dagan_gn.store.patch_file import PatchFile

REPO = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_runs_zip(path: Path, runs: int = 2, classes: int = 3, size: int = 105) -> Path:
    """Lake et al.'s ``all_runs.zip`` layout: runNN/training/classNN.png, runNN/test/itemNN.png and
    runNN/class_labels.txt pairing each test item with its training class (in a shuffled order, as the real file)."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for r in range(1, runs + 1):
            order = rng.permutation(classes) + 1
            lines = []
            for item, c in enumerate(order, start=1):
                template = rng.uniform(0.2, 0.8, size=(4, 2)) * size
                for name in (f"run{r:02d}/training/class{c:02d}.png", f"run{r:02d}/test/item{item:02d}.png"):
                    im = Image.new("1", (size, size), 1)
                    ImageDraw.Draw(im).line([tuple(p) for p in template + rng.normal(0, 2, (4, 2))], fill=0, width=3)
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    zf.writestr(name, buf.getvalue())
                lines.append(f"run{r:02d}/test/item{item:02d}.png run{r:02d}/training/class{c:02d}.png")
            zf.writestr(f"run{r:02d}/class_labels.txt", "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dagan(tmp_path_factory):
    """A tiny 64-px DAGAN (two training steps): the script only needs a checkpoint that makes variants."""
    from factories import SIZE, make_checkpoint, make_patch_file

    work = tmp_path_factory.mktemp("transfer")
    make_checkpoint(work / "dagan", make_patch_file(work / "train.h5"), num_classes=0)  # class-free, as Omniglot's
    return work, work / "dagan", SIZE


@pytest.mark.slow
def test_transfer_dev_reports_each_truncation_and_reruns_from_its_files(tiny_dagan):
    work, dagan, size = tiny_dagan
    runs = make_runs_zip(work / "all_runs.zip")
    module = _load("omniglot_transfer_dev")
    out = work / "dev"
    args = ["--reuse-dagan", str(dagan), "--out", str(out), "--runs", str(runs), "--truncations", "0,0.5",
            "--n", "2", "--size", str(size), "--quiet"]
    assert module.main(args) == 0
    report = json.loads((out / "transfer_dev.json").read_text())
    assert report["sources"] == 12 and report["characters"] == 6 and report["n"] == 2
    assert [r["truncation"] for r in report["rows"]] == [0.0, 0.5]
    for row in report["rows"]:
        assert 0 <= row["identity"] <= 1 and 0 <= row["identity_per_run"] <= 1
        assert row["diversity"] >= 0 and row["distance_to_source"] > 0
        # Within a run there are fewer candidates than among all drawings, so identity can only rise.
        assert row["identity_per_run"] >= row["identity"] - 1e-9
    with PatchFile(out / "variants_t0.5.h5") as pf:
        assert len(pf) == 24 and pf.parameters["truncation"] == 0.5 and pf.parameters["n_per_source"] == 2
    assert (out / "variants_t0.png").is_file()
    md = (out / "transfer_dev.md").read_text()
    assert "| none |" in md and "| 0.5 |" in md
    # Each character's folder holds its training drawing and its matched test drawing.
    tree = out / "runs_tree"
    assert sorted(p.name for p in (tree / "run01" / "class01").iterdir()) == ["test.png", "training.png"]
    # A rerun reuses the variants (no augment again) and reports the same figures.
    mtime = (out / "variants_t0.h5").stat().st_mtime
    assert module.main(args) == 0
    assert (out / "variants_t0.h5").stat().st_mtime == mtime
    assert json.loads((out / "transfer_dev.json").read_text())["rows"] == report["rows"]
    # Variants made with other settings (or another checkpoint) are made again, not reused.
    assert module.main([a if a != "2" else "3" for a in args]) == 0
    with PatchFile(out / "variants_t0.h5") as pf:
        assert pf.parameters["n_per_source"] == 3 and len(pf) == 36


def test_bad_truncations_and_a_zip_without_runs_fail_with_one_line(tmp_path, capsys):
    module = _load("omniglot_transfer_dev")
    with pytest.raises(SystemExit):
        module.parse_args(["--reuse-dagan", "x", "--out", str(tmp_path), "--truncations", "0,-1"])
    assert "expected numbers >= 0" in capsys.readouterr().err
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "nothing")
    with pytest.raises(SystemExit, match="no runNN/class_labels.txt"):
        module.unpack_runs(empty, tmp_path / "tree")
