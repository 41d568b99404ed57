"""Tests of dagan_gn/cli/assess.py: `dagan assess` on a factory patch file and the variants of a tiny trained DAGAN,
and one `error:` line per bad input."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dagan_gn.cli import app
from dagan_gn.store.patch_file import PatchFile, PatchWriter
from factories import make_checkpoint, make_patch_file

runner = CliRunner()
FAST = ["--feature-extractor", "tiny", "--classifier-width", "4", "--classifier-epochs", "2", "--n-pairs", "50",
        "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from dagan_gn.jobs.augment import augment

    root = tmp_path_factory.mktemp("assess_cli")
    patches = make_patch_file(root / "patches.h5", n_train=9, n_val=3, n_test=3)
    run = make_checkpoint(root / "run", patches)
    synthetic = root / "synthetic.h5"
    augment(patches, run, synthetic, n=3, device="cpu", seed=0, progress=False)
    return root, patches, synthetic


def _copy_synthetic(src, dst, **changes):
    """Rewrite a synthetic file with some columns/labels/class names changed."""
    with PatchFile(src) as pf:
        prov = {name: pf.provenance(name) for name in pf.provenance_columns}
        prov.update(changes.get("provenance", {}))
        with PatchWriter(dst, patch_size=pf.patch_size, class_names=changes.get("class_names", pf.class_names),
                         provenance=pf.provenance_specs(), synthetic=True) as w:
            w.append(pf.patches[:], pf.labels, pf.split, prov)
    return dst


def test_assess_writes_the_four_files_and_prints_the_table(files, tmp_path):
    _, patches, synthetic = files
    out = tmp_path / "assess"
    result = runner.invoke(app, ["assess", "--real", str(patches), "--synthetic", str(synthetic), "--out", str(out),
                                 "--seed", "1", *FAST])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"assess.json", "assess.md", "contact_sheet.png", "diversity_hist.png"}
    lines = result.output.splitlines()
    assert lines[0].startswith("synthetic.h5 vs patches.h5: 9 sources × 3 variants")
    for label in ("pixel L1", "1 − MS-SSIM", "classifier features (L2)"):
        row = next(line for line in lines if line.startswith(label))
        cells = row[len(label):].split()
        assert cells[0] != "n/a" and float(cells[0]) >= 0  # diversity mean
    assert any(line.startswith("class consistency: accuracy on variants") for line in lines)
    assert any(line.startswith("KID vs held-out: variants") and "real floor" in line for line in lines)


def test_assess_bad_inputs_give_one_error_line_naming_the_file(files, tmp_path):
    root, patches, synthetic = files

    def run(real, syn):
        result = runner.invoke(app, ["assess", "--real", str(real), "--synthetic", str(syn), "--out",
                                     str(tmp_path / "out"), *FAST])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        return errors[0]

    assert "patches.h5: not a synthetic patch file" in run(patches, patches)
    with PatchFile(synthetic) as pf:
        far = pf.provenance("source_index") + 1000
    outside = _copy_synthetic(synthetic, tmp_path / "outside.h5", provenance={"source_index": far})
    assert "outside.h5" in (line := run(patches, outside)) and "not in patches.h5" in line
    renamed = _copy_synthetic(synthetic, tmp_path / "renamed.h5", class_names=["a", "b", "c"])
    assert "renamed.h5 has classes ['a', 'b', 'c']" in run(patches, renamed)
    assert "nothing.h5: no such patch file" in run(patches, tmp_path / "nothing.h5")
    assert not (tmp_path / "out").exists()  # nothing written for a refused input


def test_assess_option_checks():
    result = runner.invoke(app, ["assess", "--real", "a.h5", "--synthetic", "b.h5", "--out", "o",
                                 "--feature-extractor", "clip"])
    assert result.exit_code == 2 and "error: --feature-extractor must be inception or tiny" in result.output
    help_text = runner.invoke(app, ["assess", "-h"])
    assert help_text.exit_code == 0 and "--seed" in help_text.output and "--heldout-split" in help_text.output
