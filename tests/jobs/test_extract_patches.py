"""Tests for dagan_gn/jobs/extract_patches.py: the extract-patches job end to end on tiny synthetic archives."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from dagan_gn.jobs.extract_patches import ExtractError, extract_patches, report_path, shard_of
from dagan_gn.store.patch_file import PatchFile, merge_patch_files, partial_path, to_uint16

S = 64
SIZE = (512, 384)
ROOT = Path(__file__).resolve().parents[2]  # subprocesses import this checkout's dagan_gn


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from dagan_gn.phantom.mammogram import make_demo_archive

    root = tmp_path_factory.mktemp("archive")
    dicom_dir, labels_csv = make_demo_archive(root, n_patients=2, seed=0, size=SIZE)
    return dicom_dir, labels_csv


def _run(archive, out, **kw):
    dicom_dir, labels_csv = archive
    kw.setdefault("labels_csv", labels_csv)
    kw.setdefault("salt", "test-salt")
    kw.setdefault("per_image", 3)
    return extract_patches([dicom_dir], out, patch_size=S, progress=False, **kw)


def _all_arrays(path):
    with PatchFile(path) as pf:
        cols = {name: pf.provenance(name) for name in pf.provenance_columns}
        return pf.patches[:], pf.labels, pf.split, cols, pf.sources


def _rows_as_set(path):
    """Each patch as (image pseudonym, centre, label, split, bytes hash): order-free comparison of two files."""
    with PatchFile(path) as pf:
        images, centres = pf.provenance("image_pseudonym"), pf.provenance("center_yx")
        return {(images[i], tuple(centres[i]), pf.class_names[pf.labels[i]], int(pf.split[i]),
                 pf.patches[i].tobytes()) for i in range(len(pf))}


@pytest.fixture(scope="module")
def straight_run(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "patches.h5"
    report = _run(archive, out)
    return out, report


def test_end_to_end_counts_labels_and_geometry(archive, straight_run):
    from dagan_gn.ingest.dicom import read_dicom
    from dagan_gn.ingest.mask import breast_mask
    from dagan_gn.ingest.privacy import Pseudonymizer
    from dagan_gn.ingest.sampling import cut_patch, tissue_fraction

    dicom_dir, labels_csv = archive
    out, report = straight_run
    assert out.exists() and not partial_path(out).exists()
    assert report.exit_code == 0 and report.files_skipped == 0
    n_files = len([p for p in dicom_dir.rglob("*") if p.is_file()])
    assert report.files_found == n_files == 8 and report.files_used == n_files
    with open(labels_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert report.lesions_used == len(rows)
    assert report_path(out).exists()
    with PatchFile(out) as pf:
        n = len(pf)
        assert pf.patches.shape == (n, 1, S, S) and pf.patches.dtype == np.uint16
        assert pf.class_names[0] == "normal" and set(pf.class_names[1:]) == {r["class"] for r in rows}
        assert report.patches_total == n == n_files * 3 + len(rows)  # 3 normal per image + 1 per lesion
        assert int((pf.labels == 0).sum()) == n_files * 3
        assert set(pf.provenance_columns) >= {"patient_pseudonym", "image_pseudonym", "center_yx", "lesion_index"}
        assert not pf.synthetic and pf.parameters["patch_size"] == S
        images = pf.provenance("image_pseudonym")
        centres = pf.provenance("center_yx")
        lesion_index = pf.provenance("lesion_index")
        spacing = pf.provenance("pixel_spacing_mm")
        assert spacing.dtype == np.float32 and np.isfinite(spacing).all() and (spacing > 0).all()
        assert set(pf.provenance("laterality")) == {"L", "R"} and set(pf.provenance("view")) == {"CC", "MLO"}
        assert len(pf.sources) == n_files and set(pf.sources) == set(images)
        assert (pf.sources[pf.provenance("source_index")] == images).all()
        pseudo = Pseudonymizer(b"test-salt")
        by_file = {}
        for path in sorted(p for p in dicom_dir.rglob("*") if p.is_file()):
            img = read_dicom(path)
            by_file[pseudo.pseudonym("image", img.meta.sop_instance_uid)] = (path, img)
        assert set(by_file) == set(images)
        lesions_by_image = {}
        for r in rows:
            lesions_by_image.setdefault((dicom_dir.parent / r["image"]).resolve(), []).append(
                (float(r["center_y"]), float(r["center_x"]), pf.class_names.index(r["class"])))
        checked_lesions = checked_normal = 0
        masks = {}
        for i in range(n):
            path, img = by_file[images[i]]
            patch = pf.patches[i, 0]
            # the stored patch is the image crop on the uint16 scale
            np.testing.assert_array_equal(patch, to_uint16(cut_patch(img.pixels, tuple(centres[i]), S)))
            if lesion_index[i] >= 0:
                cy, cx, label = lesions_by_image[path.resolve()][lesion_index[i]]
                assert pf.labels[i] == label
                assert abs(centres[i][0] - cy) < S // 2 and abs(centres[i][1] - cx) < S // 2
                checked_lesions += 1
            else:
                if images[i] not in masks:
                    masks[images[i]] = breast_mask(img.pixels, img.meta.laterality)
                mask = masks[images[i]]
                assert tissue_fraction(mask, tuple(centres[i]), S) >= 0.9
                checked_normal += 1
        assert checked_lesions == len(rows) > 0 and checked_normal == n_files * 3


def test_without_labels_every_patch_is_tissue(archive, tmp_path):
    report = _run(archive, tmp_path / "t.h5", labels_csv=None, split=(0.0, 1.0, 0.0))
    with PatchFile(tmp_path / "t.h5") as pf:
        assert pf.class_names == ["tissue"] and (pf.labels == 0).all()
        assert len(pf) == 24 and (pf.provenance("lesion_index") == -1).all()
        assert (pf.split == 1).all()
    assert report.patches_by_class == {"tissue": 24}


def test_bad_files_are_reported_and_skipped(archive, tmp_path):
    from pydicom.data import get_testdata_file

    dicom_dir, _ = archive
    work = tmp_path / "in"
    good = sorted(p for p in dicom_dir.rglob("*") if p.is_file())[:2]
    work.mkdir()
    for i, p in enumerate(good):
        shutil.copy(p, work / f"good{i}.dcm")
    (work / "empty.dcm").write_bytes(b"")
    (work / "random.dcm").write_bytes(np.random.default_rng(0).bytes(2000))
    (work / "truncated.dcm").write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
    shutil.copy(get_testdata_file("CT_small.dcm"), work / "ct.dcm")
    report = extract_patches([work], tmp_path / "o.h5", patch_size=S, per_image=2, salt="s", progress=False)
    assert report.exit_code == 3
    assert report.files_used == 2 and report.files_skipped == 4
    skipped = {Path(s["file"]).name: s["reason"] for s in report.skipped}
    assert set(skipped) == {"empty.dcm", "random.dcm", "truncated.dcm", "ct.dcm"}
    assert all(reason for reason in skipped.values())
    assert "CT" in skipped["ct.dcm"]
    with PatchFile(tmp_path / "o.h5") as pf:
        assert len(pf) == 4
    saved = report_path(tmp_path / "o.h5").read_text()
    assert "empty.dcm" in saved and "truncated.dcm" in saved
    # --allow-modality CT accepts the CT file (it may still yield no patch, but it is not skipped for modality)
    report2 = extract_patches([work / "ct.dcm"], tmp_path / "ct.h5", patch_size=S, per_image=2, salt="s",
                              allow_modalities=("MG", "CT"), progress=False)
    assert all("modality" not in s["reason"].lower() for s in report2.skipped)


def test_bad_csv_row_names_line(archive, tmp_path):
    dicom_dir, labels_csv = archive
    bad = tmp_path / "bad.csv"
    lines = labels_csv.read_text().splitlines()
    lines.insert(2, "dicom/x.dcm,benign,12,oops,5")
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ExtractError, match=r"bad.csv:3: column 'center_y' must be a number"):
        extract_patches([dicom_dir], tmp_path / "o.h5", labels_csv=bad, patch_size=S, salt="s", progress=False)
    assert not (tmp_path / "o.h5").exists() and not partial_path(tmp_path / "o.h5").exists()


def test_parameter_errors(archive, tmp_path):
    dicom_dir, _ = archive
    for kw, msg in [({"patch_size": 4}, "patch size"), ({"min_tissue": 1.5}, "min-tissue"),
                    ({"shard": (2, 2)}, "shard"), ({"split": (0.5, 0.5, 0.5)}, "split"),
                    ({"workers": 0}, "workers")]:
        with pytest.raises(ExtractError, match=msg):
            extract_patches([dicom_dir], tmp_path / "o.h5", salt="s", progress=False, **kw)
    with pytest.raises(ExtractError, match="not found"):
        extract_patches([tmp_path / "missing"], tmp_path / "o.h5", salt="s", progress=False)
    with pytest.raises(ExtractError, match="same --salt"):
        extract_patches([dicom_dir], tmp_path / "o.h5", shard=(0, 2), progress=False)


class _Killed(Exception):
    pass


def test_resume_after_kill_equals_straight_run(archive, straight_run, tmp_path):
    out = tmp_path / "r.h5"

    def die_after_three(n_done):
        if n_done == 4:  # file 4 is appended but not committed: the worst moment to die
            raise _Killed()

    with pytest.raises(_Killed):
        _run(archive, out, _on_file_written=die_after_three)
    assert not out.exists() and partial_path(out).exists()  # nothing looks complete
    with pytest.raises(ExtractError, match="--resume"):
        _run(archive, out)
    with pytest.raises(ExtractError, match="parameters differ"):
        _run(archive, out, resume=True, seed=1)
    report = _run(archive, out, resume=True)
    assert report.resumed and report.files_already_done == 3 and report.files_used == 5
    a, b = _all_arrays(straight_run[0]), _all_arrays(out)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    for name in a[3]:
        np.testing.assert_array_equal(a[3][name], b[3][name])
    np.testing.assert_array_equal(a[4], b[4])
    # resuming a finished output is a no-op
    again = _run(archive, out, resume=True)
    assert again.patches_total == report.patches_total and again.files_used == 0


@pytest.mark.slow
def test_resume_after_sigkill_of_a_subprocess(archive, straight_run, tmp_path):
    dicom_dir, labels_csv = archive
    out = tmp_path / "k.h5"
    script = textwrap.dedent(f"""
        import os, signal
        from dagan_gn.jobs.extract_patches import extract_patches
        def hook(n):
            if n == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        extract_patches([{str(dicom_dir)!r}], {str(out)!r}, labels_csv={str(labels_csv)!r}, patch_size={S},
                        per_image=3, salt="test-salt", progress=False, workers=2, _on_file_written=hook)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and partial_path(out).exists()
    report = _run(archive, out, resume=True, workers=2)
    assert report.files_already_done == 4
    assert _rows_as_set(out) == _rows_as_set(straight_run[0])
    with PatchFile(out) as pf:
        assert len(pf) == straight_run[1].patches_total


def test_split_is_patient_level(archive, tmp_path):
    _run(archive, tmp_path / "s.h5", split=(0.34, 0.33, 0.33), seed=5)
    with PatchFile(tmp_path / "s.h5") as pf:
        patients = pf.provenance("patient_pseudonym")
        splits_of = {}
        for p, s in zip(patients, pf.split):
            splits_of.setdefault(p, set()).add(int(s))
        assert len(splits_of) == 2
        assert all(len(s) == 1 for s in splits_of.values())  # no patient in two splits


def test_deterministic(archive, straight_run, tmp_path):
    _run(archive, tmp_path / "d.h5", workers=2)
    a, b = _all_arrays(straight_run[0]), _all_arrays(tmp_path / "d.h5")
    np.testing.assert_array_equal(a[0], b[0])
    for name in a[3]:
        np.testing.assert_array_equal(a[3][name], b[3][name])
    _run(archive, tmp_path / "e.h5", seed=1)
    c = _all_arrays(tmp_path / "e.h5")
    assert not np.array_equal(a[3]["center_yx"], c[3]["center_yx"])


def test_shards_merge_to_the_full_run(archive, straight_run, tmp_path):
    dicom_dir, _ = archive
    keys = [p.relative_to(dicom_dir).as_posix() for p in dicom_dir.rglob("*") if p.is_file()]
    assert {shard_of(k, 2) for k in keys} == {0, 1}
    r0 = _run(archive, tmp_path / "s0.h5", shard=(0, 2))
    r1 = _run(archive, tmp_path / "s1.h5", shard=(1, 2))
    assert r0.files_in_shard + r1.files_in_shard == 8 and min(r0.files_in_shard, r1.files_in_shard) > 0
    merged = merge_patch_files([tmp_path / "s0.h5", tmp_path / "s1.h5"], tmp_path / "all.h5")
    assert _rows_as_set(merged) == _rows_as_set(straight_run[0])
    with PatchFile(merged) as pf:
        assert len(pf) == straight_run[1].patches_total


def test_target_spacing(archive, tmp_path):
    from dagan_gn.phantom.mammogram import write_synthetic_mammogram

    report = _run(archive, tmp_path / "ts.h5", labels_csv=None, target_spacing_mm=0.2, per_image=2)
    with PatchFile(tmp_path / "ts.h5") as pf:
        assert np.allclose(pf.provenance("pixel_spacing_mm"), 0.2, rtol=0.01)  # size rounding
        assert pf.provenance("center_yx").max() < 256  # the 512-row image became 256 rows
    assert report.exit_code == 0
    nospacing = write_synthetic_mammogram(tmp_path / "nos" / "a.dcm", size=SIZE, pixel_spacing_mm=None)
    r = extract_patches([nospacing.parent], tmp_path / "n.h5", patch_size=S, target_spacing_mm=0.2, salt="s",
                        progress=False)
    assert r.exit_code == 3 and "PixelSpacing" in r.skipped[0]["reason"]


def test_no_identifier_reaches_the_output(tmp_path):
    import pydicom

    from dagan_gn.phantom.mammogram import write_synthetic_mammogram

    src = tmp_path / "in"
    planted = {
        "patient_id": "ZQPATIENT4711",
        "patient_name": "Smithers^Johanna",
        "study_date": "19870623",
        "accession": "ACCX99812",
        "institution": "Saint Elsewhere Clinic",
        "birth_date": "19450817",
    }
    paths = [
        write_synthetic_mammogram(src / "ZQPATIENT4711" / f"{lat}_{view}.dcm", seed=i, size=SIZE, laterality=lat,
                                  view=view, lesions=[(256, 120 if lat == "L" else 264, 12, "benign")], **planted)
        for i, (lat, view) in enumerate([("L", "CC"), ("R", "MLO")])
    ]
    strings = set(planted.values()) | {"Smithers", "Johanna"}
    for p in paths:
        ds = pydicom.dcmread(p)
        strings |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class,center_x,center_y,radius\n"
                      f"{paths[0].relative_to(tmp_path).as_posix()},benign,120,256,12\n")
    out = tmp_path / "out.h5"
    report = extract_patches([src], out, labels_csv=labels, patch_size=S, per_image=4, progress=False)
    assert report.exit_code == 0 and report.patches_total > 0
    data = out.read_bytes()
    with PatchFile(out) as pf:
        pseudonym = pf.provenance("patient_pseudonym")[0]
        attr_text = repr(pf.attrs)
    assert pseudonym.encode() in data  # provenance strings are stored uncompressed: the byte search is meaningful
    for s in strings:
        assert s.encode() not in data, f"identifier {s!r} found in the HDF5 bytes"
        assert s.encode("utf-16-le") not in data
        assert s not in attr_text
    salt = Path(str(out) + ".salt").read_bytes()
    assert salt not in data and salt.hex().encode() not in data
    # nothing path-like either
    assert b"ZQPATIENT" not in data and str(tmp_path).encode() not in data
    with h5py.File(out, "r") as f:
        names = []
        f.visit(names.append)
    assert all("ZQ" not in n for n in names)


def test_options_are_one_checked_record_and_keywords_override_it(archive, tmp_path):
    from dagan_gn.jobs.extract_patches import ExtractionOptions

    options = ExtractionOptions(patch_size=S, per_image=3, split=[0.5, 0.25, 0.25], shard=("0", "1"))
    assert options.split == (0.5, 0.25, 0.25) and options.shard == (0, 1) and options.margin == S // 4
    with pytest.raises(ExtractError, match="max-pixels must be positive"):
        ExtractionOptions(max_pixels=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['patchsize'\]"):
        extract_patches([archive[0]], tmp_path / "t.h5", salt="s", patchsize=S)
    a = _run(archive, tmp_path / "kw.h5", labels_csv=None, seed=3)
    b = extract_patches([archive[0]], tmp_path / "opt.h5", ExtractionOptions(patch_size=S, per_image=7, seed=3),
                        per_image=3, salt="test-salt", progress=False)  # the keyword wins over the record
    assert a.parameters == b.parameters and a.parameters["per_image"] == 3
    assert set(a.parameters) == {  # the stored parameters (checked on --resume) did not change with the refactor
        "patch_size", "per_image", "per_lesion", "min_tissue", "stride", "target_spacing_mm", "split", "seed", "shard",
        "allow_modalities", "labels_sha256", "lesion_jitter", "lesion_margin", "intensity"}
    np.testing.assert_array_equal(_all_arrays(tmp_path / "kw.h5")[0], _all_arrays(tmp_path / "opt.h5")[0])


def test_an_existing_output_is_refused_unless_overwrite(archive, straight_run, tmp_path):
    out = tmp_path / "o.h5"
    out.write_text("an unrelated file the operator cares about")
    with pytest.raises(ExtractError, match=r"o\.h5 already exists; pass --overwrite to replace it"):
        _run(archive, out)
    assert out.read_text() == "an unrelated file the operator cares about" and not partial_path(out).exists()
    report = _run(archive, out, overwrite=True)
    assert report.exit_code == 0
    np.testing.assert_array_equal(_all_arrays(out)[0], _all_arrays(straight_run[0])[0])
    with pytest.raises(ExtractError, match="already exists"):  # a finished patch file too
        _run(archive, out)


def test_an_output_inside_the_inputs_or_equal_to_one_is_refused_even_with_overwrite(archive, tmp_path):
    dicom_dir, _ = archive
    with pytest.raises(ExtractError, match=r"is inside the input folder .*dicom; write the patch file outside"):
        _run(archive, dicom_dir / "sub" / "p.h5", overwrite=True)
    assert not list(dicom_dir.rglob("*.h5*")) and not (dicom_dir / "sub").exists()
    one = sorted(p for p in dicom_dir.rglob("*") if p.is_file())[0]
    before = one.read_bytes()
    with pytest.raises(ExtractError, match="is one of the input files"):
        extract_patches([one], one, salt="s", patch_size=S, overwrite=True, progress=False)
    assert one.read_bytes() == before
    with pytest.raises(ExtractError, match=r"is a folder; give the path of the \.h5 file"):
        _run(archive, tmp_path)
    labels = tmp_path / "labels.csv"
    shutil.copy(archive[1], labels)
    with pytest.raises(ExtractError, match="is the labels CSV"):
        _run(archive, labels, labels_csv=labels, overwrite=True)


def test_images_smaller_than_a_patch_are_skipped_by_name(tmp_path):
    import pydicom

    from dagan_gn.phantom.mammogram import write_synthetic_mammogram

    src = write_synthetic_mammogram(tmp_path / "src" / "a.dcm", size=SIZE)
    work = tmp_path / "in"
    work.mkdir()
    for rows, cols in ((1, 1), (16, 16), (S - 1, 300)):
        ds = pydicom.dcmread(src)
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = np.full((rows, cols), 900, np.uint16).tobytes()
        ds.SOPInstanceUID = f"1.2.3.{rows}"
        ds.save_as(work / f"{rows}x{cols}.dcm")
    report = extract_patches([work], tmp_path / "o.h5", salt="s", patch_size=S, progress=False)
    assert report.exit_code == 3 and report.files_skipped == 3 and report.files_used == 0
    reasons = {Path(s["file"]).name: s["reason"] for s in report.skipped}
    assert reasons == {"1x1.dcm": "image is 1x1 pixels, smaller than one 64x64 patch",
                       "16x16.dcm": "image is 16x16 pixels, smaller than one 64x64 patch",
                       "63x300.dcm": "image is 300x63 pixels, smaller than one 64x64 patch"}


def test_the_same_image_twice_is_written_once_with_a_warning(archive, straight_run, tmp_path):
    dicom_dir, labels_csv = archive
    work = tmp_path / "in"
    shutil.copytree(dicom_dir, work / "dicom")
    first = sorted(p for p in (work / "dicom").rglob("*") if p.is_file())[0]
    shutil.copy(first, work / "dicom" / "zz_second_export.dcm")  # same SOPInstanceUID, another file
    (work / "dicom" / "zz_link.dcm").symlink_to(first)  # the very same file through a link
    shutil.copy(labels_csv, work / "labels.csv")
    report = extract_patches([work / "dicom"], tmp_path / "o.h5", labels_csv=work / "labels.csv", salt="test-salt",
                             patch_size=S, per_image=3, progress=False)
    assert report.exit_code == 0 and report.files_used == 8 and report.files_duplicate == 1
    warnings = {Path(w["file"]).name: w["warning"] for w in report.warnings}
    assert warnings["zz_second_export.dcm"] == f"same image (SOPInstanceUID) as {first}; not written twice"
    assert warnings["zz_link.dcm"] == f"same file as {first} (reached through a link); read once"
    assert _rows_as_set(tmp_path / "o.h5") == _rows_as_set(straight_run[0])
