"""The release card (dagan_gn/jobs/report.py, ``dagan report``): one self-contained page whose text holds no path
and none of the identifiers planted in the DICOM headers and folder names; rendered in headless Chromium when the
Debian package is installed."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from factories import make_checkpoint  # tests/ is on pythonpath

from dagan_gn.cli import app
from dagan_gn.jobs.report import ReportError, release_card

PATIENT_FOLDER = "Doe_Jane_19570312"  # as tests/faults/test_shareable_outputs.py
PLANTED = {  # as tests/jobs/test_extract_patches.py::test_no_identifier_reaches_the_output
    "PatientName": "Smithers^Johanna",
    "StudyDate": "19870623",
    "AccessionNumber": "ACCX99812",
    "InstitutionName": "Saint Elsewhere Clinic",
    "PatientBirthDate": "19450817",
}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A demo archive under a patient-named folder, every DICOM header carrying planted identifiers; its patch file,
    a tiny DAGAN, its variants and the release card."""
    import pydicom

    from dagan_gn.jobs.augment import augment
    from dagan_gn.jobs.extract_patches import extract_patches
    from dagan_gn.phantom.mammogram import make_demo_archive

    root = tmp_path_factory.mktemp("operator") / PATIENT_FOLDER
    dicom_dir, labels = make_demo_archive(root, n_patients=6, seed=0, size=(512, 384))
    strings = set(PLANTED.values()) | {"Smithers", "Johanna", PATIENT_FOLDER, str(root)}
    for k, f in enumerate(sorted(p for p in dicom_dir.rglob("*") if p.is_file())):
        ds = pydicom.dcmread(f)
        patient = f"ZQPATIENT{4711 + sorted(dicom_dir.iterdir()).index(f.parent)}"
        for tag, value in {**PLANTED, "PatientID": patient}.items():
            setattr(ds, tag, value)
        ds.save_as(f)
        strings |= {patient, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), f.name}
    patches = root / "patches.h5"
    report = extract_patches([dicom_dir], patches, labels_csv=labels, patch_size=64, per_image=4, salt="s",
                             split=(0.4, 0.3, 0.3),
                             progress=False)
    assert report.exit_code == 0
    run = make_checkpoint(root / "run", patches)
    synthetic = root / "synthetic.h5"
    augment(patches, run, synthetic, n=2, device="cpu", seed=0, progress=False)
    card = release_card(patches, synthetic, root / "card", checkpoint=run, seed=0, n_bootstrap=50)
    from dagan_gn.store.patch_file import PatchFile

    with PatchFile(patches) as pf:
        pseudonyms = set(pf.provenance("patient_pseudonym")) | set(pf.provenance("image_pseudonym"))
    return {"root": root, "patches": patches, "run": run, "synthetic": synthetic, "card": card,
            "strings": strings, "pseudonyms": pseudonyms}


def _page_text(page: str) -> str:
    """The text a reader sees: tags and embedded images removed, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)))


def test_card_sections_verdicts_and_json(planted):
    card = planted["card"]
    assert set(card.verdicts) == {"what", "looks", "quality", "usefulness", "privacy"}
    for v in card.verdicts.values():
        assert v["status"] and v["text"] and v["threshold"]
    assert card.verdicts["quality"]["status"] == "not measured"  # no --assess given
    data = json.loads(card.files["json"].read_text())
    assert data["what"]["tool"]["versions"]["torch"] and data["what"]["tool"]["device"].startswith("cpu")
    assert data["what"]["checkpoint"]["sha256"] == data["what"]["checkpoint"]["given_sha256"]
    attacks = data["sections"]["privacy"]["membership"]["attacks"]
    assert {a["attack"] for a in attacks} >= {"distance"}
    for a in attacks:
        assert 0 <= a["auc"] <= 1 and a["ci_low"] <= a["auc"] <= a["ci_high"]
    page = card.files["html"].read_text()
    for heading in ("What it is", "Looks", "Quality", "Usefulness", "Privacy", "Membership inference"):
        assert f"<h2>{heading}</h2>" in page or f"<h3>{heading}</h3>" in page
    assert page.count("data:image/png;base64,") >= 4  # contact sheets, tiles, pairs, histogram


def test_page_is_self_contained(planted):
    page = planted["card"].files["html"].read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"https?:|ftp:|//[a-z]|url\(|@import|<script|<link|<iframe", without_images, re.IGNORECASE)


def test_page_and_json_hold_no_identifier_path_or_pseudonym(planted):
    card = planted["card"]
    for path in (card.files["html"], card.files["json"]):
        raw = path.read_text()
        for text in (raw, _page_text(raw)):
            found = [s for s in planted["strings"] | planted["pseudonyms"] if s in text]
            assert not found, f"{path.name} holds {found}"


def test_rejected_share_is_shown_when_the_file_records_it(planted, tmp_path):
    import h5py

    syn = tmp_path / "synthetic.h5"
    shutil.copy(planted["synthetic"], syn)
    with h5py.File(syn, "r+") as f:
        f.attrs["rejected_share"] = 0.125
    card = release_card(planted["patches"], syn, tmp_path / "card", seed=0, n_bootstrap=20)
    assert card.data["what"]["synthetic"]["rejected_share"] == 0.125
    assert "12.5 % of generated variants" in card.html


def test_cli_and_errors(planted, tmp_path):
    runner = CliRunner()
    out = tmp_path / "card"
    result = runner.invoke(app, ["report", "--real", str(planted["patches"]), "--synthetic", str(planted["synthetic"]),
                                 "--out", str(out), "--bootstrap", "20", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "card.html").is_file() and "privacy" in result.output
    result = runner.invoke(app, ["report", "--real", str(planted["synthetic"]), "--synthetic",
                                 str(planted["patches"]), "--out", str(out)])
    assert result.exit_code == 2 and "not a synthetic patch file" in result.output
    bad = tmp_path / "assess.json"
    bad.write_text("{not json")
    with pytest.raises(ReportError, match="--assess"):
        release_card(planted["patches"], planted["synthetic"], out, assess_json=bad)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium (Debian package 'chromium') is not installed")
def test_renders_in_headless_chromium_without_network(planted, tmp_path):
    page = planted["card"].files["html"]
    # Every host resolves to nothing: a page that needed the network would show broken images.
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND"]
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Synthetic data release card" in dom.stdout and "Membership inference" in dom.stdout
    refs = re.findall(r"""(?:src|href)="([^"]*)\"""", dom.stdout)
    assert refs and all(r.startswith("data:image/png") for r in refs)
    text = _page_text(dom.stdout)
    assert not [s for s in planted["strings"] | planted["pseudonyms"] if s in text]
    shot = tmp_path / "card.png"
    run = subprocess.run([str(CHROMIUM), *flags, "--window-size=1000,1400", f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert pixels.shape == (1400, 1000) and pixels.std() > 10  # text and images, not a blank page


def test_a_patient_copy_is_counted_then_indexed_and_shown_first(planted, tmp_path):
    import h5py

    from dagan_gn.store.patch_file import PatchFile

    syn = tmp_path / "synthetic.h5"
    shutil.copy(planted["synthetic"], syn)
    with PatchFile(planted["patches"]) as real, PatchFile(syn) as pf:
        train = real.split_indices("train")
        patients = real.provenance("patient_pseudonym")
        source = int(pf.provenance("source_index")[3])
        other = int(next(r for r in train if patients[r] != patients[source]))
        copy = real.read_patches([other])[0]
    with h5py.File(syn, "r+") as f:
        f["patches"][3] = copy  # synthetic row 3 is now another patient's training patch, byte for byte
    card = release_card(planted["patches"], syn, tmp_path / "card", seed=0, n_bootstrap=20)
    mem = card.data["sections"]["privacy"]["memorization"]
    assert card.verdicts["privacy"]["status"] == "fail" and not mem["passed"]
    assert any(f.startswith("pixel: 1 synthetic patch(es) copying another training patient (synthetic index 3)")
               for f in mem["failures"])
    first = mem["closest_pairs"][0]
    assert first == {"synthetic_row": 3, "train_row": other, "space": first["space"], "distance": first["distance"],
                     "patient_copy": True}
    assert "(patient copy)" in card.html and "synthetic index 3" in card.html
