"""dagan_gn.phantom.mammogram: realistic synthetic DICOM mammograms and the demo archive."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dagan_gn.ingest.dicom import list_dicom_files, read_dicom, read_dicom_meta
from dagan_gn.phantom.mammogram import (
    DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION,
    LABELS_CSV_HEADER,
    breast_region,
    make_demo_archive,
    render_mammogram,
    text_region,
    write_synthetic_mammogram,
)

SIZE = (256, 192)


def test_written_file_is_a_proper_mammography_dicom(tmp_path):
    path = write_synthetic_mammogram(
        tmp_path / "a" / "img.dcm", size=SIZE, laterality="R", view="MLO", bits_stored=12, pixel_spacing_mm=0.07
    )
    assert path == tmp_path / "a" / "img.dcm" and path.exists()
    ds = pydicom.dcmread(path)
    assert ds.preamble is not None and open(path, "rb").read()[128:132] == b"DICM"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "MG" and ds.ImageLaterality == "R" and ds.ViewPosition == "MLO"
    assert [float(v) for v in ds.PixelSpacing] == [0.07, 0.07]
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (*SIZE, 16, 12, 11)
    assert ds.PixelRepresentation == 0 and ds.SamplesPerPixel == 1
    assert ds.pixel_array.max() <= 4095
    assert "WindowCenter" in ds and "WindowWidth" in ds
    assert ds.BurnedInAnnotation == "YES"


def test_identifiers_are_planted(tmp_path):
    ds = pydicom.dcmread(
        write_synthetic_mammogram(
            tmp_path / "x.dcm", size=SIZE, patient_id="PID-7", patient_name="Doe^Jane", accession="A-1",
            study_date="19991231",
        )
    )
    assert (ds.PatientID, str(ds.PatientName), ds.AccessionNumber, ds.StudyDate) == (
        "PID-7", "Doe^Jane", "A-1", "19991231",
    )
    assert ds.PatientBirthDate and ds.InstitutionName and ds.StudyInstanceUID and ds.SeriesInstanceUID


def test_rle_option_compresses_losslessly(tmp_path):
    plain = write_synthetic_mammogram(tmp_path / "p.dcm", size=SIZE, seed=2)
    rle = write_synthetic_mammogram(tmp_path / "r.dcm", size=SIZE, seed=2, rle=True)
    ds = pydicom.dcmread(rle)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(plain).pixel_array)


def test_monochrome1_stores_inverted_values(tmp_path):
    m1 = pydicom.dcmread(write_synthetic_mammogram(tmp_path / "1.dcm", size=SIZE, photometric="MONOCHROME1"))
    m2 = pydicom.dcmread(write_synthetic_mammogram(tmp_path / "2.dcm", size=SIZE, photometric="MONOCHROME2"))
    assert m1.PhotometricInterpretation == "MONOCHROME1"
    total = round(0.1 * 65535) + round(0.9 * 65535)
    np.testing.assert_allclose(m1.pixel_array.astype(int) + m2.pixel_array.astype(int), total, atol=1)


def test_deterministic_given_seed(tmp_path):
    a = write_synthetic_mammogram(tmp_path / "a.dcm", size=SIZE, seed=4)
    b = write_synthetic_mammogram(tmp_path / "b.dcm", size=SIZE, seed=4)
    c = write_synthetic_mammogram(tmp_path / "c.dcm", size=SIZE, seed=5)
    assert a.read_bytes() == b.read_bytes()
    assert pydicom.dcmread(a).PixelData != pydicom.dcmread(c).PixelData
    assert pydicom.dcmread(a).SOPInstanceUID != pydicom.dcmread(c).SOPInstanceUID


@pytest.mark.parametrize("laterality, view", [("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")])
def test_breast_is_a_half_ellipse_on_the_chest_wall_side_and_text_is_apart(laterality, view):
    region = breast_region(SIZE, laterality, view)
    chest, far = (0, -1) if laterality == "L" else (-1, 0)
    assert region[:, chest].sum() > 0.6 * SIZE[0]  # against the chest wall
    assert not region[:, far].any()
    assert 0.25 < region.mean() < 0.6
    img = render_mammogram(seed=1, size=SIZE, laterality=laterality, view=view, burned_in_text="R MLO")
    top, left, bottom, right = text_region(SIZE, laterality, "R MLO")
    box = np.zeros(SIZE, bool)
    box[top:bottom, left:right] = True
    assert img[box].max() > 0.9  # bright burned-in text
    gap = 4
    near_text = np.zeros(SIZE, bool)
    near_text[max(0, top - gap) : bottom + gap, max(0, left - gap) : right + gap] = True
    assert not (region & near_text).any()  # a separate component, away from the breast
    assert img[~region & ~box].max() < 0.1  # dark, flat background
    assert img[region].mean() > 0.4


def test_mlo_has_a_bright_pectoral_muscle():
    img = render_mammogram(seed=0, size=SIZE, laterality="L", view="MLO", burned_in_text="")
    h, w = SIZE
    pectoral = img[int(0.12 * h) : int(0.2 * h), 1 : int(0.1 * w)].mean()
    below = img[int(0.6 * h) : int(0.7 * h), 1 : int(0.1 * w)].mean()
    assert pectoral > below + 0.05


@pytest.mark.parametrize("class_name", ["benign", "malignant", "calcification"])
def test_lesions_are_brighter_than_surrounding_tissue(class_name):
    cy, cx, r = 128, 50, 12
    base = render_mammogram(seed=3, size=SIZE, burned_in_text="")
    img = render_mammogram(seed=3, size=SIZE, lesions=[(cy, cx, r, class_name)], burned_in_text="")
    yy, xx = np.indices(SIZE)
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    assert (img - base)[disk].mean() > 0.03
    assert np.abs(img - base)[((yy - cy) ** 2 + (xx - cx) ** 2 > (2.2 * r) ** 2)].max() < 1e-3  # soft edges only


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="laterality"):
        write_synthetic_mammogram(tmp_path / "x.dcm", laterality="B")
    with pytest.raises(ValueError, match="photometric"):
        write_synthetic_mammogram(tmp_path / "x.dcm", photometric="RGB")
    with pytest.raises(ValueError, match="bits_stored"):
        write_synthetic_mammogram(tmp_path / "x.dcm", bits_stored=20)


def read_labels(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_demo_archive(tmp_path):
    dicom_dir, labels_csv = make_demo_archive(tmp_path / "demo", n_patients=6, seed=0, size=SIZE)
    assert dicom_dir == tmp_path / "demo" / "dicom" and labels_csv == tmp_path / "demo" / "labels.csv"
    files = list_dicom_files([dicom_dir])
    assert len(files) == 24
    assert any(f.suffix == "" for f in files) and any(f.suffix == ".dcm" for f in files)
    metas = {f: read_dicom_meta(f) for f in files}
    assert len({m.patient_id for m in metas.values()}) == 6
    assert {m.photometric for m in metas.values()} == {"MONOCHROME1", "MONOCHROME2"}
    assert {m.bits_stored for m in metas.values()} == {12, 16}
    syntaxes = Counter(m.transfer_syntax for m in metas.values())
    assert syntaxes[RLELossless] >= 2 and syntaxes[ExplicitVRLittleEndian] >= 2
    assert Counter((m.laterality, m.view) for m in metas.values()) == {
        ("L", "CC"): 6, ("L", "MLO"): 6, ("R", "CC"): 6, ("R", "MLO"): 6,
    }

    with open(labels_csv, newline="") as fh:
        assert next(csv.reader(fh)) == list(LABELS_CSV_HEADER)
    rows = read_labels(labels_csv)
    assert {r["class"] for r in rows} == {"benign", "malignant"}
    lesion_images = {r["image"] for r in rows}
    assert 0.3 <= len(lesion_images) / 24 <= 0.7  # about half the images carry lesions
    lesion_patients = {metas[labels_csv.parent / image].patient_id for image in lesion_images}
    assert 1 <= 6 - len(lesion_patients) <= 3  # some normal patients
    for row in rows:
        path = labels_csv.parent / row["image"]
        assert path in metas
        meta = metas[path]
        cx, cy, r = int(row["center_x"]), int(row["center_y"]), int(row["radius"])
        region = breast_region((meta.rows, meta.cols), meta.laterality, meta.view)
        assert region[cy, cx] and 3 <= r <= 0.05 * meta.rows
        assert r <= cx < meta.cols - r and r <= cy < meta.rows - r
        pixels = read_dicom(path).pixels
        yy, xx = np.indices(pixels.shape)
        lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        ring = ((yy - cy) ** 2 + (xx - cx) ** 2 > (2.5 * r) ** 2) & ((yy - cy) ** 2 + (xx - cx) ** 2 <= (3.5 * r) ** 2)
        assert pixels[lesion].max() > pixels[ring & region].mean()


def test_demo_archive_is_deterministic(tmp_path):
    _, labels_a = make_demo_archive(tmp_path / "a", n_patients=3, seed=1, size=(128, 96))
    _, labels_b = make_demo_archive(tmp_path / "b", n_patients=3, seed=1, size=(128, 96))
    _, labels_c = make_demo_archive(tmp_path / "c", n_patients=3, seed=2, size=(128, 96))
    assert labels_a.read_text() == labels_b.read_text()
    files_a = list_dicom_files([tmp_path / "a"])
    files_b = list_dicom_files([tmp_path / "b"])
    assert [f.relative_to(tmp_path / "a") for f in files_a] == [f.relative_to(tmp_path / "b") for f in files_b]
    assert all(fa.read_bytes() == fb.read_bytes() for fa, fb in zip(files_a, files_b))
    files_c = list_dicom_files([tmp_path / "c"])
    assert files_a[0].read_bytes() != files_c[0].read_bytes()
    with pytest.raises(ValueError):
        make_demo_archive(tmp_path / "d", n_patients=0)
