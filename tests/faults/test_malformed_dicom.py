"""A corpus of malformed, odd and hostile DICOM inputs through ``dagan extract-patches --workers 2``: each file must
be named in the report and on stderr with its reason (or used, or warned about), the run must exit 3 and nothing
may reach stderr but the job's own one-line messages (no traceback, no raw pydicom output). The counts are in
docs/extract.md (Reliability)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dagan_gn.phantom.mammogram import write_synthetic_mammogram

ROOT = Path(__file__).resolve().parents[2]
S = 64
SIZE = (256, 192)
LATIN1 = os.fsdecode(b"r\xe9sum\xe9_latin1.dcm")
LATIN1_BROKEN = os.fsdecode(b"cass\xe9_latin1.dcm")

#: pydicom's own test files (never downloaded) → the expected outcome. Read with --allow-modality '*', so each is
#: judged on its own defect rather than on its modality.
PYDICOM_FILES = {
    "CT_small.dcm": ("used", ""),
    "MR_small_RLE.dcm": ("warning", r"no patch: no 64x64 window is covered by breast tissue"),
    "rtplan.dcm": ("skipped", r"no pixel data: not an image \(RT Plan Storage\)"),
    "rtplan_truncated.dcm": ("skipped", r"file truncated or corrupt: element \(300A,00B0\) runs past the end"),
    "MR_truncated.dcm": ("skipped", r"pixel data truncated: 8130 of 8192 bytes"),
    "SC_rgb_rle.dcm": ("skipped", r"colour image \(PhotometricInterpretation RGB, 3 samples per pixel\)"),
    "SC_rgb_rle_2frame.dcm": ("skipped", r"multi-frame image \(2 frames"),
    "rtdose.dcm": ("skipped", r"multi-frame image \(15 frames"),
    "examples_palette.dcm": ("skipped", r"colour image \(PhotometricInterpretation PALETTE COLOR"),
    "badVR.dcm": ("skipped", r"cannot decode .* pixel data, corrupt or unsupported \(invalid literal"),
    "no_meta.dcm": ("skipped", r"not a DICOM file"),
    "ExplVR_BigEndNoMeta.dcm": ("skipped", r"not a DICOM file \(no DICM preamble and no image header\)"),
    "meta_missing_tsyntax.dcm": ("skipped", r"no PhotometricInterpretation"),
    "waveform_ecg.dcm": ("skipped", r"no pixel data: not an image \(12-lead ECG Waveform Storage\)"),
    "test-SR.dcm": ("skipped", r"no pixel data: not an image \(Comprehensive SR Storage\)"),
}


def _edited(good: Path, target: Path, edit) -> None:
    ds = pydicom.dcmread(good)
    edit(ds)
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[target.name])  # each its own image
    ds.save_as(target, enforce_file_format=False)


def _set(**values):
    def edit(ds):
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return edit


def _delete(keyword):
    return lambda ds: delattr(ds, keyword)


def _garbage_in(syntax):
    def edit(ds):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData[:5000]])
    return edit


def _tiny(rows, cols):
    def edit(ds):
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = np.full((rows, cols), 1000, np.uint16).tobytes()
    return edit


def _bad_spacing(ds):
    ds["PixelSpacing"] = pydicom.DataElement(0x00280030, "LO", "abc\\x")


def build_corpus(root: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Write the corpus under ``root/in``; returns (folder, {relative path: (outcome, reason regex)})."""
    good = write_synthetic_mammogram(root / "src" / "good.dcm", size=SIZE, seed=1)
    data = good.read_bytes()
    c = root / "in"
    c.mkdir()
    expected: dict[str, tuple[str, str]] = {}
    for name, outcome in PYDICOM_FILES.items():
        shutil.copy(get_testdata_file(name, download=False), c / f"ref_{name}")
        expected[f"ref_{name}"] = outcome
    damaged = {
        "bits_allocated_8.dcm": (_set(BitsAllocated=8, BitsStored=8, HighBit=7), r"single grey-level frame"),
        "bits_allocated_12.dcm": (_set(BitsAllocated=12), r"'Bits Allocated' value of '12' is invalid"),
        "bits_stored_20.dcm": (_set(BitsStored=20), r"'Bits Stored' value of '20' is invalid"),
        "missing_rows.dcm": (_delete("Rows"), r"bad image size 0x192 \(Rows/Columns missing or zero\)"),
        "zero_rows.dcm": (_set(Rows=0), r"bad image size 0x192"),
        "rgb.dcm": (_set(PhotometricInterpretation="RGB", SamplesPerPixel=3), r"colour image"),
        "two_frames.dcm": (_set(NumberOfFrames=2), r"multi-frame image \(2 frames"),
        "no_photometric.dcm": (_delete("PhotometricInterpretation"), r"no PhotometricInterpretation"),
        "window_width_0.dcm": (_set(WindowWidth=0), r"bad Modality/VOI LUT or window .*Window Width"),
        "jpeg_syntax_native_data.dcm": (_garbage_in(pydicom.uid.JPEGBaseline8Bit),
                                        r"cannot decode JPEG Baseline \(Process 1\) pixel data"),
        "rle_syntax_native_data.dcm": (_garbage_in(pydicom.uid.RLELossless), r"cannot decode RLE Lossless pixel"),
        "declares_16384x16384.dcm": (_set(Rows=16384, Columns=16384),
                                     r"declares 16384x16384 = 268,435,456 pixels, more than the limit of "
                                     r"100,000,000; not decoded \(raise the limit with --max-pixels"),
        "one_by_one.dcm": (_tiny(1, 1), r"image is 1x1 pixels, smaller than one 64x64 patch"),
        "sixteen_by_sixteen.dcm": (_tiny(16, 16), r"image is 16x16 pixels, smaller than one 64x64 patch"),
        "no_patient_id.dcm": (_delete("PatientID"), r"no PatientID; the image was given its own patient pseudonym"),
        "unparseable_spacing.dcm": (_bad_spacing, ""),
    }
    for name, (edit, reason) in damaged.items():
        _edited(good, c / name, edit)
        outcome = "used" if not reason else "warning" if "PatientID" in reason else "skipped"
        expected[name] = (outcome, reason)
    shutil.copy(good, c / "good.dcm")
    expected["good.dcm"] = ("used", "")
    raw = {
        "trunc_pixels.dcm": (data[: int(len(data) * 0.6)], r"pixel data truncated: \d+ of 98304 bytes"),
        "trunc_header.dcm": (data[:300], r"file truncated or corrupt"),
        "text.dcm": (b"this is not a DICOM file\n", r"not a DICOM file"),
        "empty.dcm": (b"", r"empty file \(0 bytes\)"),
        "random.dcm": (np.random.default_rng(0).bytes(4000), r"not a DICOM file"),
        "dicm_magic_only.dcm": (b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff", r"truncated or corrupt"),
        "gzipped.dcm": (Path(get_testdata_file("zipMR.gz", download=False)).read_bytes(), r"not a DICOM file"),
        LATIN1_BROKEN: (b"", r"empty file \(0 bytes\)"),
    }
    for name, (payload, reason) in raw.items():
        (c / name).write_bytes(payload)
        expected[name] = ("skipped", reason)
    (c / "broken_link.dcm").symlink_to(c / "does_not_exist.dcm")
    expected["broken_link.dcm"] = ("skipped", r"broken symbolic link: its target .*does_not_exist\.dcm does not exist")
    (c / "loop_a.dcm").symlink_to(c / "loop_b.dcm")
    (c / "loop_b.dcm").symlink_to(c / "loop_a.dcm")
    expected["loop_a.dcm"] = expected["loop_b.dcm"] = ("skipped", r"symbolic link loop")
    write_synthetic_mammogram(root / "elsewhere" / "linked.dcm", size=SIZE, seed=2, patient_id="P2")
    (c / "linked_folder").symlink_to(root / "elsewhere", target_is_directory=True)
    expected["linked_folder/linked.dcm"] = ("used", "")
    (c / "link_to_good.dcm").symlink_to(c / "good.dcm")
    expected["link_to_good.dcm"] = ("warning", r"same file as .*/in/good\.dcm \(reached through a link\); read once")
    (c / "zz_copy_of_good.dcm").write_bytes(data)
    expected["zz_copy_of_good.dcm"] = ("warning", r"same image \(SOPInstanceUID\) as .*/in/good\.dcm; not written")
    (c / "dir_loop").mkdir()
    (c / "dir_loop" / "up").symlink_to(c, target_is_directory=True)
    expected["dir_loop/up"] = ("warning", r"folder link leads into a folder already searched")
    write_synthetic_mammogram(c / LATIN1, size=SIZE, seed=3, patient_id="P3")
    expected[LATIN1] = ("used", "")
    write_synthetic_mammogram(c / "DICOMDIR", size=SIZE, seed=4)  # a media index, never an image: not listed
    return c, expected


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    if get_testdata_file("CT_small.dcm", download=False) is None:
        pytest.skip("pydicom's bundled test files are not installed")
    root = tmp_path_factory.mktemp("corpus")
    folder, expected = build_corpus(root)
    out = root / "out.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dagan_gn.cli", "extract-patches", str(folder), "--out", str(out), "--patch-size",
         str(S), "--per-image", "2", "--salt", "corpus", "--allow-modality", "*", "--workers", "2", "--quiet"],
        capture_output=True, env=env, timeout=300,
    )
    report = json.loads(Path(str(out) + ".report.json").read_text(encoding="utf-8"))
    return folder, expected, proc, report


def _printable(relative: str) -> str:
    return os.fsencode(relative).decode("utf-8", "backslashreplace")


@pytest.mark.slow
def test_every_malformed_file_is_named_with_its_reason_and_nothing_else_reaches_stderr(corpus_run):
    folder, expected, proc, report = corpus_run
    stderr = proc.stderr.decode("utf-8")  # valid UTF-8: odd names are printed as \xe9 escapes
    assert proc.returncode == 3, stderr[-3000:]
    assert "Traceback" not in stderr
    # only the job's own lines, each naming a file of the corpus (pydicom's records would start "WARNING The ...")
    own_line = re.compile(rf"^WARNING (skipped )?{re.escape(str(folder))}/|^warning: \d+ file\(s\) skipped")
    for line in filter(None, stderr.splitlines()):
        assert own_line.match(line), line
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    warned: dict[str, list[str]] = {}
    for w in report["warnings"]:
        warned.setdefault(w["file"], []).append(w["warning"])
    handled = []
    for relative, (outcome, reason) in expected.items():
        name = _printable(str(folder / relative))
        if outcome == "skipped":
            assert name in skipped and re.search(reason, skipped[name]), (relative, skipped.get(name))
            assert f"WARNING skipped {name}: {skipped[name]}" in stderr, relative
        else:
            assert name not in skipped, (relative, skipped.get(name))
        if outcome == "warning":
            assert any(re.search(reason, w) for w in warned.get(name, [])), (relative, warned.get(name))
            assert any(f"WARNING {name}: {w}" in stderr for w in warned[name]), relative
        handled.append(relative)
    assert not [f for f in skipped if f not in {_printable(str(folder / r)) for r in expected}]  # nothing unnamed
    assert "DICOMDIR" not in json.dumps(report)
    tried = len(expected)
    n_skipped = sum(o == "skipped" for o, _ in expected.values())
    assert (tried, len(handled), n_skipped, report["files_skipped"]) == (48, 48, 38, 38)
    # used: the 5 good ones and the 2 used with a warning (no PatientID, no patch); the copy is written once
    used = [r for r, (o, why) in expected.items() if o == "used" or "PatientID" in why or "no patch" in why]
    assert report["files_used"] == len(used) == 7 and report["files_duplicate"] == 1
