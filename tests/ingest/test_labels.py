"""Tests for dagan_gn/ingest/labels.py: the lesion labels CSV."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dagan_gn.ingest.labels import LabelsError, Lesion, load_labels

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "labels.csv"


def _meta(uid="", pid="", lat="", view=""):
    return SimpleNamespace(sop_instance_uid=uid, patient_id=pid, laterality=lat, view=view)


def test_no_csv_means_tissue():
    table = load_labels(None)
    assert table.class_names == ["tissue"] and not table.has_labels
    assert table.lookup("x.dcm", _meta()) == []


def test_image_path_uid_and_patient_view(tmp_path):
    (tmp_path / "p1").mkdir()
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "image,patient_id,laterality,view,class,center_x,center_y,radius\n"
        "p1/a.dcm,,,,malignant,100,50,12\n"
        f"{tmp_path / 'p1' / 'a.dcm'},,,,benign,10,20,3\n"
        "1.2.826.0.1.3680043.8.498.1,,,,benign,5,6,7\n"
        ",PAT-9,left,mlo,benign,30,40,5\n"
        "\n"
        "p1/b.dcm,,,,normal,,,\n"
    )
    table = load_labels(csv)
    assert table.class_names == ["normal", "benign", "malignant"]
    found = table.lookup(tmp_path / "p1" / "a.dcm", _meta())
    assert [(les.class_name, les.center_yx, les.radius) for les in found] == [
        ("malignant", (50.0, 100.0), 12.0), ("benign", (20.0, 10.0), 3.0)]
    assert found[0].source == f"{csv}:2"
    assert [les.center_yx for les in table.lookup("elsewhere.dcm", _meta(uid="1.2.826.0.1.3680043.8.498.1"))] == [
        (6.0, 5.0)]
    assert [les.radius for les in table.lookup("x.dcm", _meta(pid="PAT-9", lat="L", view="MLO"))] == [5.0]
    assert table.lookup("x.dcm", _meta(pid="PAT-9", lat="R", view="MLO")) == []
    assert table.lookup(tmp_path / "p1" / "b.dcm", _meta()) == []  # explicitly normal


@pytest.mark.parametrize(
    "row, message",
    [
        ("a.dcm,benign,abc,20,3", r"labels.csv:3: column 'center_x' must be a number, got 'abc'"),
        ("a.dcm,benign,10,20,-1", r"labels.csv:3: radius must be positive"),
        ("a.dcm,,10,20,3", r"labels.csv:3: empty 'class'"),
        (",benign,10,20,3", r"labels.csv:3: no image reference"),
        ("a.dcm,benign,,,", r"labels.csv:3: lesion of class 'benign' needs roi_mask"),
        ("a.dcm,benign,1,2,3,4", r"labels.csv:3: more fields"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, row, message):
    csv = tmp_path / "labels.csv"
    csv.write_text("image,class,center_x,center_y,radius\nb.dcm,benign,1,2,3\n" + row + "\n")
    with pytest.raises(LabelsError, match=message):
        load_labels(csv)


def test_bad_header_and_missing_file(tmp_path):
    with pytest.raises(LabelsError, match="does not exist"):
        load_labels(tmp_path / "nope.csv")
    bad = tmp_path / "h.csv"
    bad.write_text("file,class,center_x,center_y,radius\n")
    with pytest.raises(LabelsError, match=r"h.csv:1: header needs an 'image' column"):
        load_labels(bad)
    bad.write_text("image,class\n")
    with pytest.raises(LabelsError, match="roi_mask"):
        load_labels(bad)
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LabelsError, match="h.csv"):
        load_labels(bad)


def test_roi_mask_png_and_dicom(tmp_path):
    from skimage import io as skio
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[10:21, 30:41] = 255  # centre (15, 35)
    skio.imsave(str(tmp_path / "m.png"), mask, check_contrast=False)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 40, 60, 8, 8, 7
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = (mask // 255).tobytes()
    pydicom.dcmwrite(tmp_path / "m.dcm", ds, enforce_file_format=True)
    csv = tmp_path / "labels.csv"
    csv.write_text("image,class,roi_mask\na.dcm,mass,m.png\nb.dcm,calcification,m.dcm\n")
    table = load_labels(csv)
    assert table.class_names == ["normal", "calcification", "mass"]
    for name in ("a.dcm", "b.dcm"):
        (les,) = table.lookup(tmp_path / name, _meta())
        resolved = les.resolve((40, 60))
        assert resolved.center_yx == pytest.approx((15.0, 35.0))
        assert 7.0 < resolved.radius < 8.5
    with pytest.raises(LabelsError, match=r"labels.csv:2: ROI mask m.png is 60x40 but the image is 50x40"):
        table.lookup(tmp_path / "a.dcm", _meta())[0].resolve((40, 50))
    csv.write_text("image,class,roi_mask\na.dcm,mass,missing.png\n")
    with pytest.raises(LabelsError, match=r"labels.csv:2: ROI mask file missing.png does not exist"):
        load_labels(csv)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(LabelsError, match="cannot read ROI mask"):
        Lesion("mass", roi_mask=tmp_path / "empty.png", source="x:2").resolve()


def test_example_file_parses():
    if not EXAMPLE.exists():
        pytest.skip("examples/labels.csv not written yet")
    table = load_labels(EXAMPLE)
    assert table.class_names[0] == "normal" and len(table.class_names) >= 2
