"""Tests for dagan_gn/cli/images.py: ``dagan import-images`` exit codes and messages."""

from __future__ import annotations

import zipfile

from typer.testing import CliRunner

from factories import make_omniglot_zip

from dagan_gn.cli import app
from dagan_gn.store.patch_file import PatchFile

runner = CliRunner()


def _invoke(args):
    result = runner.invoke(app, args)
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_import_two_zips_with_prefix_filter(tmp_path):
    z1 = make_omniglot_zip(tmp_path / "s1.zip", {"Greek": 2, "Korean": 1}, drawings=2, top="s1")
    z2 = make_omniglot_zip(tmp_path / "s2.zip", {"Greek": 2, "Tagalog": 1}, drawings=2, top="s2")
    result, out = _invoke(["import-images", str(z1), str(z2), "--out", str(tmp_path / "g.h5"), "--size", "8",
                           "--invert", "--classes-prefix", "Greek,Tagalog", "--seed", "1", "--salt", "k", "-q"])
    assert result.exit_code == 0, out
    assert "wrote 6 images of 3 classes" in out and "4 duplicate(s)" in out
    with PatchFile(tmp_path / "g.h5") as pf:
        assert pf.class_names == ["Greek/character01", "Greek/character02", "Tagalog/character01"]


def test_skipped_image_exit_3_and_not_a_zip_exit_2(tmp_path):
    z = make_omniglot_zip(tmp_path / "o.zip", {"A": 1}, drawings=2)
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("images_background_small1/A/character01/bad.png", b"not a png")
    result, out = _invoke(["import-images", str(z), "--out", str(tmp_path / "o.h5"), "--salt", "k", "-q"])
    assert result.exit_code == 3, out
    assert "1 image(s) skipped" in out and (tmp_path / "o.h5").is_file()
    (tmp_path / "fake.zip").write_text("plain text")
    result, out = _invoke(["import-images", str(tmp_path / "fake.zip"), "--out", str(tmp_path / "f.h5")])
    assert result.exit_code == 2
    assert out.strip().splitlines()[-1].startswith("error: ") and "fake.zip: not a zip archive" in out
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.salt").exists()
