"""dagan_gn.ingest.dicom (the package): display pipeline, metadata, clear per-file errors, resampling, file discovery."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000, JPEGLSLossless, RLELossless

from dagan_gn.ingest.dicom import (
    DEFAULT_MAX_PIXELS,
    DicomImage,
    DicomReadError,
    ImageMeta,
    canonical_patient_id,
    find_dicom_files,
    list_dicom_files,
    parse_laterality_view,
    read_dicom,
    read_dicom_meta,
    read_dicom_raw,
    resample_to_spacing,
    spacing_scales,
)
from dagan_gn.phantom.mammogram import breast_region, render_mammogram, write_synthetic_mammogram

SIZE = (192, 128)  # small synthetic images keep these tests fast


def pydicom_file(name: str) -> str:
    """A file that ships with pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return path


def synth(tmp_path, name="img.dcm", **kwargs) -> str:
    kwargs.setdefault("size", SIZE)
    return str(write_synthetic_mammogram(tmp_path / name, **kwargs))


# --------------------------------------------------------------------------------------------------------------------
# Display pipeline


def test_read_dicom_returns_float_image_in_unit_range_with_tissue_bright(tmp_path):
    image = read_dicom(synth(tmp_path, seed=3))
    assert isinstance(image, DicomImage) and isinstance(image.meta, ImageMeta)
    assert image.pixels.shape == SIZE and image.pixels.dtype == np.float32
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    tissue = breast_region(SIZE, "L", "CC")
    assert image.pixels[tissue].mean() > image.pixels[~tissue].mean() + 0.3


def test_window_reproduces_the_rendered_image(tmp_path):
    expected = render_mammogram(seed=5, size=SIZE)
    got = read_dicom(synth(tmp_path, seed=5)).pixels
    np.testing.assert_allclose(got, expected, atol=2e-4)  # 16-bit quantisation of 80 % of the range


def test_monochrome1_and_monochrome2_give_the_same_image(tmp_path):
    m2 = read_dicom(synth(tmp_path, "m2.dcm", seed=1, photometric="MONOCHROME2")).pixels
    m1 = read_dicom(synth(tmp_path, "m1.dcm", seed=1, photometric="MONOCHROME1"))
    assert m1.meta.photometric == "MONOCHROME1"
    raw = pydicom.dcmread(synth(tmp_path, "m1b.dcm", seed=1, photometric="MONOCHROME1")).pixel_array
    tissue = breast_region(SIZE, "L", "CC")
    assert raw[tissue].mean() < raw[~tissue].mean()  # stored inverted: tissue has low values
    np.testing.assert_allclose(m1.pixels, m2, atol=1e-4)


def test_monochrome1_without_window_is_still_tissue_bright(tmp_path):
    m2 = read_dicom(synth(tmp_path, "m2.dcm", seed=2, window=False)).pixels
    m1 = read_dicom(synth(tmp_path, "m1.dcm", seed=2, window=False, photometric="MONOCHROME1")).pixels
    tissue = breast_region(SIZE, "L", "CC")
    assert m1[tissue].mean() > m1[~tissue].mean() + 0.3
    np.testing.assert_allclose(m1, m2, atol=0.02)


@pytest.mark.parametrize("bits", [12, 14])
def test_bits_stored_is_honoured(tmp_path, bits):
    ref = read_dicom(synth(tmp_path, "16.dcm", seed=4, bits_stored=16)).pixels
    low = read_dicom(synth(tmp_path, f"{bits}.dcm", seed=4, bits_stored=bits))
    assert low.meta.bits_stored == bits
    np.testing.assert_allclose(low.pixels, ref, atol=1.5 / ((1 << bits) * 0.8))


def test_unused_high_bits_are_ignored(tmp_path):
    """Bits above BitsStored may hold overlays: they must not change the image."""
    path = synth(tmp_path, "12.dcm", seed=4, bits_stored=12)
    clean = read_dicom(path).pixels
    ds = pydicom.dcmread(path)
    stored = np.frombuffer(ds.PixelData, dtype="<u2").reshape(SIZE)
    ds.PixelData = (stored | np.uint16(0xA000)).astype("<u2").tobytes()  # garbage in bits 13 and 15
    dirty_path = tmp_path / "12_dirty.dcm"
    ds.save_as(dirty_path)
    np.testing.assert_array_equal(read_dicom(dirty_path).pixels, clean)


def test_without_window_the_image_range_is_stretched_to_unit(tmp_path):
    img = read_dicom(synth(tmp_path, seed=6, window=False)).pixels
    windowed = read_dicom(synth(tmp_path, "w.dcm", seed=6)).pixels
    assert img.min() == 0.0 and img.max() == 1.0
    assert np.corrcoef(img.ravel(), windowed.ravel())[0, 1] > 0.999


def test_rle_lossless_decodes_equal_to_uncompressed(tmp_path):
    plain = read_dicom(synth(tmp_path, "plain.dcm", seed=7, bits_stored=12))
    rle = read_dicom(synth(tmp_path, "rle.dcm", seed=7, bits_stored=12, rle=True))
    assert rle.meta.transfer_syntax == RLELossless
    assert rle.meta.transfer_syntax_name == "RLE Lossless"
    np.testing.assert_array_equal(rle.pixels, plain.pixels)


def test_modality_lut_is_applied_before_the_window(tmp_path):
    path = synth(tmp_path, seed=8)
    ref = read_dicom(path).pixels
    ds = pydicom.dcmread(path)
    slope, intercept = 2.0, -1000.0
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)
    # Same window expressed in rescaled units (DICOM linear window: centre - 0.5, width - 1).
    ds.WindowCenter = str((center - 0.5) * slope + intercept + 0.5)
    ds.WindowWidth = str((width - 1) * slope + 1)
    ds.save_as(tmp_path / "rescaled.dcm")
    np.testing.assert_allclose(read_dicom(tmp_path / "rescaled.dcm").pixels, ref, atol=1e-3)


def test_voi_lut_sequence_is_applied(tmp_path):
    path = synth(tmp_path, seed=9, bits_stored=12)
    ref = read_dicom(path).pixels
    ds = pydicom.dcmread(path)
    lo, hi = round(0.1 * 4095), round(0.9 * 4095)  # the synthetic file's stored range
    n = hi - lo + 1
    lut = np.round(np.linspace(0, 4095, n)).astype("<u2")  # a 12-bit linear LUT over the stored range
    item = pydicom.Dataset()
    item.LUTDescriptor = [n, lo, 12]
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data (ambiguous US/OW: say US)
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "voi.dcm")
    np.testing.assert_allclose(read_dicom(tmp_path / "voi.dcm").pixels, ref, atol=1e-3)


def _nonlinear_voi_lut_file(tmp_path, size) -> str:
    path = synth(tmp_path, "gamma_src.dcm", seed=10, bits_stored=12, size=size)
    ds = pydicom.dcmread(path)
    lo, hi = round(0.1 * 4095), round(0.9 * 4095)
    n = hi - lo + 1
    lut = np.round(4095 * np.linspace(0, 1, n) ** 0.6).astype("<u2")  # not a straight line: lookup path
    item = pydicom.Dataset()
    item.LUTDescriptor = [n, lo, 12]
    item.add_new(0x00283006, "US", lut.tolist())
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "gamma.dcm")
    return str(tmp_path / "gamma.dcm")


@pytest.mark.parametrize("case", ["window", "no_window", "voi_lut", "small"])
def test_read_dicom_raw_display_is_elementwise_and_matches_read_dicom(tmp_path, case):
    big = (384, 256)  # above the per-grey-level table threshold
    path = {
        "window": lambda: synth(tmp_path, seed=12, size=big),
        "no_window": lambda: synth(tmp_path, seed=12, size=big, window=False, photometric="MONOCHROME1"),
        "voi_lut": lambda: _nonlinear_voi_lut_file(tmp_path, big),
        "small": lambda: synth(tmp_path, seed=12),
    }[case]()
    ref = read_dicom(path)
    raw = read_dicom_raw(path)
    assert raw.meta == ref.meta and raw.values.shape == ref.pixels.shape
    np.testing.assert_array_equal(raw.to_image().pixels, ref.pixels)
    part = raw.display(raw.values[40:104, 30:94])
    assert part.dtype == np.float32
    np.testing.assert_array_equal(part, ref.pixels[40:104, 30:94])
    if raw.values.dtype.kind in "iu":  # grey levels: a float (a block mean) between two levels is interpolated
        a, b = raw.values[50, 50], raw.values[60, 60]
        mid = raw.display(np.array([(float(a) + float(b)) / 2], np.float32))[0]
        lo, hi = sorted((float(ref.pixels[50, 50]), float(ref.pixels[60, 60])))
        assert lo - 1e-6 <= mid <= hi + 1e-6


def test_read_dicom_raw_errors_like_read_dicom(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(DicomReadError):
        read_dicom_raw(tmp_path / "empty.dcm")


# --------------------------------------------------------------------------------------------------------------------
# Metadata


def test_meta_fields_from_a_synthetic_file(tmp_path):
    path = synth(
        tmp_path,
        seed=11,
        laterality="R",
        view="MLO",
        patient_id="PAT-42",
        patient_name="Roe^Rita",
        pixel_spacing_mm=0.085,
        study_date="20200102",
        accession="ACC999",
        bits_stored=14,
        photometric="MONOCHROME1",
    )
    meta = read_dicom_meta(path)
    assert (meta.patient_id, meta.raw_patient_id, meta.patient_name) == ("PAT-42", "PAT-42", "Roe^Rita")
    assert (meta.laterality, meta.view, meta.modality) == ("R", "MLO", "MG")
    assert meta.pixel_spacing_mm == pytest.approx((0.085, 0.085))
    assert (meta.rows, meta.cols, meta.bits_stored, meta.photometric) == (*SIZE, 14, "MONOCHROME1")
    assert (meta.study_date, meta.accession) == ("20200102", "ACC999")
    assert meta.sop_instance_uid and meta.study_uid and meta.series_uid
    assert meta.transfer_syntax == pydicom.uid.ExplicitVRLittleEndian
    assert meta.manufacturer == "dagan-gn synthetic"
    assert read_dicom(path).meta == meta


def test_imager_pixel_spacing_is_the_fallback_and_missing_spacing_is_none(tmp_path):
    path = synth(tmp_path, pixel_spacing_mm=0.07)
    ds = pydicom.dcmread(path)
    del ds.PixelSpacing
    ds.save_as(tmp_path / "imager.dcm")
    assert read_dicom_meta(tmp_path / "imager.dcm").pixel_spacing_mm == pytest.approx((0.07, 0.07))
    assert read_dicom_meta(synth(tmp_path, "none.dcm", pixel_spacing_mm=None)).pixel_spacing_mm is None


def test_laterality_and_view_fall_back_to_patient_id_like_cbis_ddsm(tmp_path):
    path = synth(tmp_path, laterality="L", view="CC", patient_id="Mass-Test_P_00173_RIGHT_MLO")
    ds = pydicom.dcmread(path)
    del ds.ImageLaterality, ds.ViewPosition, ds.SeriesDescription
    ds.save_as(tmp_path / "cbis.dcm")
    meta = read_dicom_meta(tmp_path / "cbis.dcm")
    assert (meta.laterality, meta.view) == ("R", "MLO")
    assert meta.patient_id == "P_00173" and meta.raw_patient_id == "Mass-Test_P_00173_RIGHT_MLO"


def test_laterality_tag_is_used_when_image_laterality_is_missing(tmp_path):
    ds = pydicom.dcmread(synth(tmp_path, laterality="L"))
    del ds.ImageLaterality
    ds.Laterality = "R"
    ds.save_as(tmp_path / "lat.dcm")
    assert read_dicom_meta(tmp_path / "lat.dcm").laterality == "R"


@pytest.mark.parametrize(
    "texts, expected",
    [
        (("Mass-Test_P_00173_LEFT_CC",), ("L", "CC")),
        (("Calc-Training_P_01234_RIGHT_MLO_1",), ("R", "MLO")),
        (("", "L CC"), ("L", "CC")),
        (("12345", "RMLO screening"), ("R", "MLO")),
        (("Left breast", "XCCL"), ("L", "XCCL")),
        (("ACCESSION-CC7", "breast"), ("", "")),  # "CC" inside a token is not a view
        (("L",), ("", "")),  # a lone letter is not a laterality
    ],
)
def test_parse_laterality_view(texts, expected):
    assert parse_laterality_view(*texts) == expected


@pytest.mark.parametrize(
    "raw, patient",
    [
        ("Mass-Test_P_00173_LEFT_CC", "P_00173"),
        ("Calc-Training_P_00173_RIGHT_MLO_1", "P_00173"),
        ("P_00820_LEFT_MLO", "P_00820"),
        ("  12345  ", "12345"),
        ("SYNTH-001", "SYNTH-001"),
    ],
)
def test_canonical_patient_id_groups_all_images_of_a_patient(raw, patient):
    assert canonical_patient_id(raw) == patient


# --------------------------------------------------------------------------------------------------------------------
# Errors: every bad file gives DicomReadError naming the file and the problem


def assert_read_error(path, *words, allow_modalities=("MG",), readers=(read_dicom_meta, read_dicom)):
    for reader in readers:
        with pytest.raises(DicomReadError) as info:
            reader(path, allow_modalities=allow_modalities)
        err = info.value
        assert err.path == str(path)
        assert str(err) == f"{path}: {err.reason}"
        for word in words:
            assert word.lower() in err.reason.lower(), (reader.__name__, err.reason)
    return err


def test_error_is_picklable_for_worker_processes():
    err = pickle.loads(pickle.dumps(DicomReadError("/x/y.dcm", "empty file (0 bytes)")))
    assert (err.path, err.reason, str(err)) == ("/x/y.dcm", "empty file (0 bytes)", "/x/y.dcm: empty file (0 bytes)")


def test_wrong_modality_is_refused_unless_allowed():
    ct = pydicom_file("CT_small.dcm")
    assert_read_error(ct, "modality CT is not MG", "--allow-modality CT")
    image = read_dicom(ct, allow_modalities=("MG", "CT"))
    assert image.meta.modality == "CT" and image.pixels.dtype == np.float32
    assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0
    assert read_dicom_meta(ct, allow_modalities=("*",)).modality == "CT"
    assert read_dicom_meta(ct, allow_modalities=None).modality == "CT"


def test_synthetic_non_mg_modality_is_refused(tmp_path):
    assert_read_error(synth(tmp_path, modality="CR"), "modality CR is not MG")


@pytest.mark.parametrize("name", ["rtplan.dcm", "reportsi.dcm"])
def test_file_without_pixel_data(name):
    assert_read_error(pydicom_file(name), "no pixel data", allow_modalities=None)


def test_multi_frame_and_colour_are_refused():
    assert_read_error(pydicom_file("rtdose.dcm"), "multi-frame", allow_modalities=None)
    assert_read_error(pydicom_file("SC_rgb_rle.dcm"), "colour", allow_modalities=None)


@pytest.mark.parametrize(
    "name, uid, syntax_words, packages",
    [
        ("JPEG2000.dcm", JPEG2000, "JPEG 2000", ("pylibjpeg-openjpeg", "python-gdcm")),
        ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, "JPEG-LS", ("pyjpegls", "pylibjpeg-libjpeg")),
    ],
)
def test_compressed_syntax_decodes_with_a_plugin_or_names_the_missing_decoder(name, uid, syntax_words, packages):
    path = pydicom_file(name)
    if get_decoder(uid).is_available:  # e.g. Pillow decodes JPEG 2000
        image = read_dicom(path, allow_modalities=None)
        assert image.pixels.ndim == 2 and 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0
    else:
        assert read_dicom_meta(path, allow_modalities=None).transfer_syntax == uid  # the header is fine
        err = assert_read_error(path, syntax_words, "no decoder installed", allow_modalities=None, readers=[read_dicom])
        for package in packages:
            assert package in err.reason


def test_zero_size_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    assert_read_error(path, "empty file")


def test_missing_file_and_directory(tmp_path):
    assert_read_error(tmp_path / "absent.dcm", "not found")
    assert_read_error(tmp_path, "directory")


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.dcm"
    path.write_bytes(rng.bytes(4096))
    assert_read_error(path, "not a DICOM file")
    with_preamble = tmp_path / "noise_dicm.dcm"
    with_preamble.write_bytes(b"\0" * 128 + b"DICM" + rng.bytes(4096))
    assert_read_error(with_preamble)  # corrupt header: any clear reason, never another exception


def test_pydicom_truncated_file():
    assert_read_error(pydicom_file("MR_truncated.dcm"), "pixel data truncated", allow_modalities=None)


@pytest.mark.parametrize("rle", [False, True])
def test_truncated_pixel_data(tmp_path, rle):
    data = open(synth(tmp_path, rle=rle), "rb").read()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * 0.6)])
    readers = (read_dicom_meta, read_dicom) if not rle else (read_dicom,)  # header-only cannot see RLE fragments
    assert_read_error(path, "pixel data truncated", readers=readers)


@pytest.mark.parametrize("keep", [200, 700, 1100])
def test_truncated_header(tmp_path, keep):
    data = open(synth(tmp_path), "rb").read()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:keep])
    err = assert_read_error(path)
    assert any(word in err.reason for word in ("truncated", "not a DICOM", "corrupt")), err.reason


def test_dataset_without_preamble_is_read(tmp_path):
    ds = pydicom.dcmread(synth(tmp_path, seed=12))
    ds.preamble = None
    path = tmp_path / "bare"
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    assert open(path, "rb").read()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_dicom(path).pixels, read_dicom(tmp_path / "img.dcm").pixels)


# --------------------------------------------------------------------------------------------------------------------
# Resampling


def test_resample_halves_the_image_and_reports_scale():
    pixels = render_mammogram(seed=0, size=SIZE)
    out, scale = resample_to_spacing(pixels, (0.1, 0.1), 0.2)
    assert out.shape == (96, 64) and out.dtype == np.float32 and scale == pytest.approx(0.5)
    assert out.mean() == pytest.approx(pixels.mean(), abs=0.01)


def test_resample_is_anti_aliased():
    checker = (np.indices((128, 128)).sum(axis=0) % 2).astype(np.float32)
    out, _ = resample_to_spacing(checker, (0.05, 0.05), 0.2)
    assert out.shape == (32, 32)
    assert np.abs(out - 0.5).max() < 0.1  # naive subsampling would give all 0 or all 1


def test_resample_no_op_cases():
    pixels = np.zeros((10, 10), np.float32)
    for spacing, target in [(None, 0.2), ((0.1, 0.1), None), ((0.3, 0.3), 0.2)]:
        out, scale = resample_to_spacing(pixels, spacing, target)
        assert out is pixels and scale == 1.0
    assert spacing_scales((0.1, 0.05), 0.2) == (0.5, 0.25)
    with pytest.raises(ValueError):
        spacing_scales((0.1, 0.1), 0.0)


# --------------------------------------------------------------------------------------------------------------------
# File discovery


def test_list_dicom_files(tmp_path):
    root = tmp_path / "archive"
    a = synth(root / "p1", "a.dcm")
    b = synth(root / "p1" / "study", "IM0001")  # no suffix: found by its DICM preamble
    c = synth(root / "p2", "c.DCM")
    broken = root / "p2" / "broken.dcm"
    broken.write_bytes(b"")  # named DICOM but broken: kept so the job can report it
    (root / "p2" / "notes.txt").write_text("not dicom")
    (root / "p2" / "noise").write_bytes(os.urandom(300))
    synth(root / ".hidden", "h.dcm")
    synth(root / "p1", ".h.dcm")
    synth(root, "DICOMDIR")
    other = synth(tmp_path / "single", "x.dcm")
    found = list_dicom_files([root, other])
    assert found == sorted(found, key=lambda p: p.as_posix())
    assert {str(p) for p in found} == {a, b, c, str(broken), other}
    assert list_dicom_files(str(root)) == list_dicom_files([root])  # one path or a list, deterministic
    with pytest.raises(FileNotFoundError):
        list_dicom_files([tmp_path / "nope"])


def test_reading_never_quotes_header_values_in_warnings(tmp_path):
    """pydicom warns about invalid values by quoting them: identifiers must not reach logs that way."""
    ds = pydicom.dcmread(synth(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly complains here too
        ds.StudyInstanceUID = "1.2.ZQSECRET"  # an invalid UI value holding an identifier
        ds.PatientName = "ZQSECRET^\x01"
        ds.save_as(tmp_path / "odd.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = read_dicom_meta(tmp_path / "odd.dcm")
        read_dicom(tmp_path / "odd.dcm")
    assert meta.study_uid == "1.2.ZQSECRET"
    assert not [w for w in caught if "ZQSECRET" in str(w.message)]


def test_find_dicom_files_follows_folder_links_once_and_reports_broken_and_looping_links(tmp_path):
    root = tmp_path / "archive"
    good = synth(root, "good.dcm")
    outside = synth(tmp_path / "elsewhere", "linked.dcm", seed=1)
    (root / "linked_folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "broken.dcm").symlink_to(root / "gone.dcm")
    (root / "noext").symlink_to(root / "gone")  # no suffix: could be DICOM, so reported too
    (root / "notes.txt").symlink_to(root / "gone.txt")  # not DICOM by name: ignored
    (root / "loop_a.dcm").symlink_to(root / "loop_b.dcm")
    (root / "loop_b.dcm").symlink_to(root / "loop_a.dcm")
    (root / "again.dcm").symlink_to(good)
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a folder loop
    found = find_dicom_files(root)
    assert [str(p) for p in found.files] == [good, str(root / "linked_folder" / "linked.dcm")]
    assert os.path.samefile(found.files[1], outside)
    reasons = {p.name: r for p, r in found.unreadable}
    assert set(reasons) == {"broken.dcm", "noext", "loop_a.dcm", "loop_b.dcm"}
    assert "broken symbolic link" in reasons["broken.dcm"] and "gone.dcm" in reasons["broken.dcm"]
    assert "symbolic link loop" in reasons["loop_a.dcm"]
    notes = {p.name: n for p, n in found.notes}
    assert set(notes) == {"again.dcm", "up"}
    assert "same file as" in notes["again.dcm"] and "good.dcm" in notes["again.dcm"]
    assert "already searched" in notes["up"]
    assert list_dicom_files(root) == found.files


def _declaring(tmp_path, name, rows, cols, **extra):
    """A real mammogram file whose header is edited to declare another image size (the pixel data stays small)."""
    ds = pydicom.dcmread(synth(tmp_path, f"src_{name}"))
    ds.Rows, ds.Columns = rows, cols
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.save_as(tmp_path / name, enforce_file_format=False)
    return tmp_path / name


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    bomb = _declaring(tmp_path, "bomb.dcm", 16384, 16384)
    for read in (read_dicom, read_dicom_raw, read_dicom_meta):
        with pytest.raises(DicomReadError, match=r"declares 16384x16384 = 268,435,456 pixels, more than the limit of "
                                                 r"100,000,000; not decoded \(raise the limit with --max-pixels"):
            read(bomb)
    with pytest.raises(DicomReadError, match="pixel data truncated"):  # without a limit it gets as far as decoding
        read_dicom(bomb, max_pixels=None)
    small = synth(tmp_path, "small.dcm")  # 192 x 128 = 24,576 pixels
    assert read_dicom(small, max_pixels=24_576).pixels.shape == SIZE
    with pytest.raises(DicomReadError, match="24,576 pixels, more than the limit of 24,575"):
        read_dicom(small, max_pixels=24_575)
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_missing_photometric_interpretation_is_named(tmp_path):
    ds = pydicom.dcmread(synth(tmp_path))
    del ds.PhotometricInterpretation
    ds.save_as(tmp_path / "nophoto.dcm", enforce_file_format=False)
    with pytest.raises(DicomReadError, match="no PhotometricInterpretation"):
        read_dicom(tmp_path / "nophoto.dcm")


def test_pydicom_log_records_and_tracebacks_stay_off_the_console(tmp_path, caplog, capfd):
    """pydicom logs decoder tracebacks at ERROR (and invalid values at WARNING), without the file name."""
    import logging

    ds = pydicom.dcmread(synth(tmp_path))
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData[:4000]])  # garbage where RLE segments should be
    ds.save_as(tmp_path / "bad_rle.dcm", enforce_file_format=False)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DicomReadError, match="cannot decode RLE Lossless pixel data"):
            read_dicom(tmp_path / "bad_rle.dcm")
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    held_back = [r.getMessage() for r in caplog.records if r.name == "dagan_gn.ingest.dicom"]
    assert held_back and all(m.startswith(f"{tmp_path / 'bad_rle.dcm'}: pydicom: ") for m in held_back)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "dagan_gn.ingest.dicom")
    assert "Traceback" not in capfd.readouterr().err
    assert logging.getLogger("pydicom").propagate  # restored


def test_a_non_utf8_file_name_is_read_and_named_printably(tmp_path):
    name = os.fsdecode(b"caf\xe9_latin1.dcm")
    path = tmp_path / name
    path.write_bytes(open(synth(tmp_path), "rb").read())
    assert read_dicom(path).pixels.shape == SIZE
    assert [p.name for p in find_dicom_files(tmp_path).files] == ["caf\udce9_latin1.dcm", "img.dcm"]
    (tmp_path / os.fsdecode(b"bad\xe9.dcm")).write_bytes(b"")
    with pytest.raises(DicomReadError) as err:
        read_dicom(tmp_path / os.fsdecode(b"bad\xe9.dcm"))
    assert str(err.value).endswith("bad\\xe9.dcm: empty file (0 bytes)")
    str(err.value).encode("utf-8")  # printable: no lone surrogates left
