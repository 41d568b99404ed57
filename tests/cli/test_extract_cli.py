"""Tests for dagan_gn/cli/extract.py: ``dagan extract-patches`` and ``dagan merge-patches``."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from dagan_gn.cli import app
from dagan_gn.store.patch_file import PatchFile

runner = CliRunner()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from dagan_gn.phantom.mammogram import make_demo_archive

    return make_demo_archive(tmp_path_factory.mktemp("cli"), n_patients=2, seed=1, size=(512, 384))


def _invoke(args):
    result = runner.invoke(app, args)
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_help_documents_every_option():
    result = runner.invoke(app, ["extract-patches", "--help"])
    assert result.exit_code == 0
    for opt in ["--out", "--labels", "--patch-size", "--per-image", "--stride", "--min-tissue", "--target-spacing",
                "--split", "--workers", "--seed", "--salt", "--salt-file", "--resume", "--shard", "--allow-modality",
                "--quiet", "--overwrite", "--max-pixels"]:
        assert opt in result.output
    merge = runner.invoke(app, ["merge-patches", "--help"])
    assert merge.exit_code == 0 and "--overwrite" in merge.output


def test_max_pixels_default_is_the_readers_default():
    import inspect

    from dagan_gn.cli.extract import extract_patches_cmd
    from dagan_gn.ingest.dicom import DEFAULT_MAX_PIXELS

    assert inspect.signature(extract_patches_cmd).parameters["max_pixels"].default.default == DEFAULT_MAX_PIXELS


def test_max_pixels_skips_large_images_by_name(archive, tmp_path):
    dicom_dir, _ = archive
    result, out = _invoke(["extract-patches", str(dicom_dir), "--out", str(tmp_path / "o.h5"), "--patch-size", "64",
                           "--quiet", "--salt", "k", "--max-pixels", "1000"])
    assert result.exit_code == 3, out
    report = json.loads((tmp_path / "o.h5.report.json").read_text())
    assert report["files_skipped"] == 8 and report["max_pixels"] == 1000
    assert set(report["environment"]) == {"torch", "numpy", "monai", "python", "device"}
    assert all("more than the limit of 1,000" in s["reason"] for s in report["skipped"])


def test_extract_and_merge(archive, tmp_path):
    dicom_dir, labels = archive
    common = ["--labels", str(labels), "--patch-size", "64", "--per-image", "2", "--quiet", "--salt", "k"]
    result, out = _invoke(["extract-patches", str(dicom_dir), "--out", str(tmp_path / "all.h5"), *common])
    assert result.exit_code == 0, out
    assert "patches" in out
    report = json.loads((tmp_path / "all.h5.report.json").read_text())
    assert report["files_used"] == 8 and report["skipped"] == []
    for i in range(2):
        result, out = _invoke(["extract-patches", str(dicom_dir), "--out", str(tmp_path / f"s{i}.h5"), *common,
                               "--shard", f"{i}/2"])
        assert result.exit_code == 0, out
    result, out = _invoke(["merge-patches", str(tmp_path / "s0.h5"), str(tmp_path / "s1.h5"),
                           "--out", str(tmp_path / "merged.h5")])
    assert result.exit_code == 0, out
    with PatchFile(tmp_path / "merged.h5") as m, PatchFile(tmp_path / "all.h5") as a:
        assert len(m) == len(a) and sorted(m.sources) == sorted(a.sources)


def test_skipped_files_exit_3(archive, tmp_path):
    dicom_dir, _ = archive
    work = tmp_path / "in"
    shutil.copytree(dicom_dir, work)
    (work / "broken.dcm").write_bytes(b"DICM but not really")
    result, out = _invoke(["extract-patches", str(work), "--out", str(tmp_path / "o.h5"), "--patch-size", "64",
                           "--per-image", "1", "--quiet", "--salt", "k"])
    assert result.exit_code == 3, out
    assert "skipped" in out
    report = json.loads((tmp_path / "o.h5.report.json").read_text())
    assert [s["file"].endswith("broken.dcm") for s in report["skipped"]] == [True]


def test_all_files_skipped_says_nothing_was_extracted(tmp_path):
    work = tmp_path / "in"
    work.mkdir()
    for name in ("a.dcm", "b.dcm"):
        (work / name).write_bytes(b"DICM but not really")
    result, out = _invoke(["extract-patches", str(work), "--out", str(tmp_path / "o.h5"), "--patch-size", "64",
                           "--quiet", "--salt", "k"])
    assert result.exit_code == 3, out
    assert "none of the 2 input file(s) gave patches" in out and "o.h5.report.json" in out
    with PatchFile(tmp_path / "o.h5") as pf:  # an empty but valid file: shards of a --shard run still merge
        assert len(pf) == 0


def test_fatal_errors_exit_2(archive, tmp_path):
    dicom_dir, labels = archive
    bad = tmp_path / "bad.csv"
    bad.write_text("image,class,center_x,center_y,radius\nx.dcm,benign,1,2,zero\n")
    result, out = _invoke(["extract-patches", str(dicom_dir), "--out", str(tmp_path / "o.h5"), "--labels", str(bad),
                           "--salt", "k", "--quiet"])
    assert result.exit_code == 2
    assert "bad.csv:2" in out and "Traceback" not in out
    for args in (["--shard", "3/2"], ["--shard", "x"], ["--split", "0.5,0.6"]):
        result, out = _invoke(["extract-patches", str(dicom_dir), "--out", str(tmp_path / "o.h5"), "--salt", "k",
                               "--quiet", *args])
        assert result.exit_code == 2, (args, out)
    result, out = _invoke(["extract-patches", str(tmp_path / "nothing"), "--out", str(tmp_path / "o.h5"), "--quiet"])
    assert result.exit_code == 2 and "not found" in out
    result, out = _invoke(["merge-patches", str(tmp_path / "none.h5"), "--out", str(tmp_path / "m.h5")])
    assert result.exit_code == 2 and "no such patch file" in out
