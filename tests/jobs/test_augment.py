"""Tests of dagan_gn/jobs/augment.py on a tiny trained DAGAN checkpoint and a small patch file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import dagan_gn.jobs.augment as augment_mod
from dagan_gn.jobs.augment import AugmentError, augment, noise_seed, sample_noise
from dagan_gn.store.patch_file import PatchFile, partial_path

from factories import CLASSES, SIZE, make_checkpoint, make_patch_file  # tests/ is on pythonpath


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory):
    return make_patch_file(tmp_path_factory.mktemp("real") / "patches.h5")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, patch_file):
    return make_checkpoint(tmp_path_factory.mktemp("run") / "run", patch_file)


def read_all(path):
    with h5py.File(path, "r") as f:
        return f["patches"][:], {k: v[:] for k, v in f["provenance"].items()}, f["labels"][:]


def test_augment_shapes_counts_provenance(patch_file, run_dir, tmp_path):
    out = tmp_path / "syn.h5"
    sheet = tmp_path / "sheet.png"
    rep = augment(patch_file, run_dir, out, n=3, batch_size=4, device="cpu", seed=1, contact_sheet=sheet,
                  progress=False)
    assert rep.n_sources == 6 and rep.n_written == 18 and rep.used_ema and rep.n_resumed_sources == 0
    assert rep.class_counts == {"normal": 6, "benign": 6, "malignant": 6}
    assert not partial_path(out).exists()
    with PatchFile(out) as pf, PatchFile(patch_file) as real:
        assert len(pf) == 18 and pf.patches.shape == (18, 1, SIZE, SIZE) and pf.patches.dtype == np.uint16
        assert pf.synthetic and pf.class_names == CLASSES and pf.patch_size == SIZE
        attrs = pf.attrs
        assert len(attrs["checkpoint_sha256"]) == 64 and '"image_size": 64' in attrs["generator_config"]
        src = pf.provenance("source_index")
        assert np.bincount(src).tolist() == [3] * 6  # N per source, sources are the train rows 0..5
        assert pf.provenance("variant").tolist() == [0, 1, 2] * 6
        assert np.array_equal(pf.labels, real.labels[src])  # the source's class
        assert list(pf.provenance("patient_pseudonym")) == list(real.provenance("patient_pseudonym")[src])
        assert set(pf.split.tolist()) == {0}
        seeds = pf.provenance("noise_seed")
        assert seeds[4] == noise_seed(1, src[4], 1) and len(set(seeds.tolist())) == 18
        assert pf.parameters["n_per_source"] == 3
        patches = pf.patches[:]
    assert patches.std() > 0  # not a constant image
    assert sheet.is_file() and sheet.stat().st_size > 0
    from PIL import Image

    w, h = Image.open(sheet).size
    assert (w, h) == (4 * (SIZE + 2) + 2, 6 * (SIZE + 2) + 2)  # 6 rows of source + 3 variants


def test_deterministic_and_batch_size_independent_noise(patch_file, run_dir, tmp_path):
    a = augment(patch_file, run_dir, tmp_path / "a.h5", n=2, batch_size=4, device="cpu", seed=7, progress=False)
    b = augment(patch_file, run_dir, tmp_path / "b.h5", n=2, batch_size=4, device="cpu", seed=7, progress=False)
    c = augment(patch_file, run_dir, tmp_path / "c.h5", n=2, batch_size=3, device="cpu", seed=7, progress=False)
    d = augment(patch_file, run_dir, tmp_path / "d.h5", n=2, batch_size=4, device="cpu", seed=8, progress=False)
    pa, prov_a, _ = read_all(a.out_path)
    pb, prov_b, _ = read_all(b.out_path)
    pc, prov_c, _ = read_all(c.out_path)
    pd, _, _ = read_all(d.out_path)
    assert pa.tobytes() == pb.tobytes()
    assert np.array_equal(prov_a["noise_seed"], prov_c["noise_seed"])
    assert np.abs(pa.astype(np.int64) - pc.astype(np.int64)).max() <= 2  # only float rounding differs
    assert not np.array_equal(pa, pd)


def test_sample_noise_rows_independent():
    z = sample_noise([5, 6, 7], 16)
    assert torch.equal(sample_noise([6], 16)[0], z[1])
    zt = sample_noise([5, 6, 7], 64, truncation=0.5)
    assert zt.abs().max() <= 0.5


def test_classes_selection_and_conditional_labels(patch_file, run_dir, tmp_path):
    seen = []
    real_generate = augment_mod.generate_variants

    def spy(generator, x, seeds, y=None, **kw):
        seen.append(y.clone())
        return real_generate(generator, x, seeds, y, **kw)

    augment_mod.generate_variants = spy
    try:
        rep = augment(patch_file, run_dir, tmp_path / "m.h5", n=2, classes=["malignant"], device="cpu",
                      progress=False)
    finally:
        augment_mod.generate_variants = real_generate
    assert rep.n_sources == 2 and rep.class_counts == {"malignant": 4}
    assert torch.cat(seen).tolist() == [2, 2, 2, 2]  # the generator got the source class
    with PatchFile(tmp_path / "m.h5") as pf:
        assert set(pf.labels.tolist()) == {2} and set(pf.provenance("source_index").tolist()) == {2, 5}


def test_split_guard(patch_file, run_dir, tmp_path):
    with pytest.raises(AugmentError, match="leak"):
        augment(patch_file, run_dir, tmp_path / "t.h5", split="test", device="cpu", progress=False)
    rep = augment(patch_file, run_dir, tmp_path / "t.h5", n=1, split="test", allow_eval_split=True, device="cpu",
                  progress=False)
    with PatchFile(tmp_path / "t.h5") as pf:
        assert rep.n_sources == 2 and set(pf.provenance("source_index").tolist()) == {8, 9}


def test_resume_after_kill(patch_file, run_dir, tmp_path, monkeypatch):
    full = augment(patch_file, run_dir, tmp_path / "full.h5", n=2, batch_size=2, device="cpu", seed=3,
                   progress=False)
    out = tmp_path / "killed.h5"
    calls = {"n": 0}
    real_generate = augment_mod.generate_variants

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        result = real_generate(*args, **kwargs)
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while the 3rd batch is generated: batches 1-2 are committed
        return result

    monkeypatch.setattr(augment_mod, "generate_variants", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        augment(patch_file, run_dir, out, n=2, batch_size=2, device="cpu", seed=3, progress=False, commit_seconds=0)
    assert not out.exists() and partial_path(out).exists()
    # half-written rows of an uncommitted batch in the partial file must not survive the resume
    with h5py.File(partial_path(out), "r") as f:
        assert f["patches"].shape[0] == 4
    monkeypatch.setattr(augment_mod, "generate_variants", real_generate)
    # different arguments refuse to mix with the interrupted run
    with pytest.raises(AugmentError, match="different arguments"):
        augment(patch_file, run_dir, out, n=2, batch_size=2, device="cpu", seed=4, progress=False)
    rep = augment(patch_file, run_dir, out, n=2, batch_size=2, device="cpu", seed=3, progress=False)
    assert rep.n_resumed_sources == 2 and rep.n_written == 12
    pf_full, prov_full, lab_full = read_all(full.out_path)
    pf_res, prov_res, lab_res = read_all(out)
    assert pf_res.tobytes() == pf_full.tobytes()  # no duplicates, no gaps, same bytes
    assert np.array_equal(prov_res["source_index"], prov_full["source_index"])
    assert np.array_equal(lab_res, lab_full)


def test_errors(patch_file, run_dir, tmp_path):
    kw = dict(device="cpu", progress=False)
    with pytest.raises(AugmentError, match="known classes: normal, benign, malignant"):
        augment(patch_file, run_dir, tmp_path / "e.h5", classes=["cancer"], **kw)
    with pytest.raises(AugmentError, match="no split 'holdout'"):
        augment(patch_file, run_dir, tmp_path / "e.h5", split="holdout", **kw)
    empty = make_patch_file(tmp_path / "noval.h5", n_train=3, n_val=0, n_test=0)
    with pytest.raises(AugmentError, match="'val' split .* is empty"):
        augment(empty, run_dir, tmp_path / "e.h5", split="val", allow_eval_split=True, **kw)
    small = make_patch_file(tmp_path / "p32.h5", size=32)
    with pytest.raises(AugmentError, match="patch-size mismatch.*64px.*32px"):
        augment(small, run_dir, tmp_path / "e.h5", **kw)
    rgb = make_patch_file(tmp_path / "rgb.h5", channels=3)
    with pytest.raises(AugmentError, match="channel mismatch"):
        augment(rgb, run_dir, tmp_path / "e.h5", **kw)
    two = make_patch_file(tmp_path / "two.h5", classes=["a", "b"])
    with pytest.raises(AugmentError, match="3 classes"):
        augment(two, run_dir, tmp_path / "e.h5", **kw)
    with pytest.raises(AugmentError, match="no such patch file"):
        augment(tmp_path / "missing.h5", run_dir, tmp_path / "e.h5", **kw)
    with pytest.raises(AugmentError, match="neither a checkpoint file nor a run folder"):
        augment(patch_file, tmp_path / "norun", tmp_path / "e.h5", **kw)
    (tmp_path / "exists.h5").write_bytes(b"x")
    with pytest.raises(AugmentError, match="--overwrite"):
        augment(patch_file, run_dir, tmp_path / "exists.h5", **kw)
    assert not (tmp_path / "e.h5").exists()


def test_contact_sheet_rgb(tmp_path):
    from PIL import Image

    from dagan_gn.jobs.augment import write_contact_sheet

    src = torch.full((2, 3, 8, 8), -1.0)
    var = torch.ones(2, 3, 3, 8, 8)
    path = write_contact_sheet(src, var, tmp_path / "s.png", padding=1)
    img = np.asarray(Image.open(path))
    assert img.shape == (2 * 9 + 1, 4 * 9 + 1, 3)
    assert img[1, 1].tolist() == [0, 0, 0] and img[1, 10].tolist() == [255, 255, 255]


def test_rerun_of_a_finished_identical_job_is_complete_and_writes_a_missing_sheet(patch_file, run_dir, tmp_path):
    """Issue 13 item 10: re-running a finished job (e.g. killed after its final rename) used to exit 2 ('already
    exists'); it now says the output is complete, generates nothing, and writes a contact sheet that is missing."""
    out, sheet = tmp_path / "syn.h5", tmp_path / "sheet.png"
    first = augment(patch_file, run_dir, out, n=2, device="cpu", seed=4, progress=False)
    before = out.read_bytes()
    again = augment(patch_file, run_dir, out, n=2, device="cpu", seed=4, progress=False, contact_sheet=sheet)
    assert again.already_complete and not first.already_complete
    assert again.n_written == first.n_written == 12 and "already complete" in again.summary()
    assert out.read_bytes() == before and sheet.is_file()
    with pytest.raises(AugmentError, match=r"made with other arguments: n_per_source, n_sources|--overwrite"):
        augment(patch_file, run_dir, out, n=3, device="cpu", seed=4, progress=False)
    with pytest.raises(AugmentError, match=r"made with other arguments: seed.*--overwrite"):
        augment(patch_file, run_dir, out, n=2, device="cpu", seed=5, progress=False)


def test_unwritable_contact_sheet_is_refused_before_the_work(patch_file, run_dir, tmp_path):
    (tmp_path / "sheet.png").mkdir()
    with pytest.raises(AugmentError, match="--contact-sheet .*sheet.png is a folder"):
        augment(patch_file, run_dir, tmp_path / "syn.h5", n=2, device="cpu", progress=False,
                contact_sheet=tmp_path / "sheet.png")
    assert not (tmp_path / "syn.h5").exists() and not partial_path(tmp_path / "syn.h5").exists()


def test_contact_sheet_failing_at_the_end_is_finished_by_the_same_command(patch_file, run_dir, tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    from dagan_gn.cli import app
    from dagan_gn.fileio import output_error

    out, sheet = tmp_path / "syn.h5", tmp_path / "sheet.png"

    def disk_full(sources, variants, path, **kw):
        raise output_error(path, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(augment_mod, "write_contact_sheet", disk_full)
    args = ["augment", "--in", str(patch_file), "--checkpoint", str(run_dir), "--out", str(out), "--n", "2",
            "--contact-sheet", str(sheet), "--device", "cpu", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "sheet.png: no space left on device" in result.output
    assert out.is_file() and not sheet.exists()
    monkeypatch.undo()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output and sheet.is_file()


def test_checkpoint_is_loaded_once_and_output_names_no_path(patch_file, run_dir, tmp_path, monkeypatch):
    import json

    import dagan_gn.training.checkpoint as ckpt_mod

    calls = []
    real_load = ckpt_mod.load_checkpoint
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    augment(patch_file, run_dir, tmp_path / "syn.h5", n=1, device="cpu", progress=False)
    assert len(calls) == 1
    with PatchFile(tmp_path / "syn.h5") as pf:
        config = json.loads(pf.attrs["generator_config"])
        assert config["data"]["path"] == patch_file.name and pf.attrs["source_file"] == patch_file.name
        assert pf.attrs["checkpoint_step"] == 2


def test_reject_off_class_drops_exactly_the_variants_the_critic_head_puts_elsewhere(patch_file, tmp_path):
    import torch

    from dagan_gn.jobs.augment import AugmentError, off_class_variants
    from dagan_gn.training.checkpoint import latest_checkpoint, load_checkpoint
    from dagan_gn.training.families import build_networks
    from dagan_gn.config import config_from_dict

    run = make_checkpoint(tmp_path / "run_head", patch_file, critic_classes=3)
    full = augment(patch_file, run, tmp_path / "all.h5", n=4, seed=0, device="cpu", progress=False)
    kept = augment(patch_file, run, tmp_path / "kept.h5", n=4, seed=0, device="cpu", progress=False,
                   reject_off_class=True, contact_sheet=tmp_path / "sheet.png")
    state = load_checkpoint(latest_checkpoint(run))
    _, critic = build_networks(config_from_dict(state["config"]).model)
    critic.load_state_dict(state["critic"])
    critic.eval()
    with PatchFile(tmp_path / "all.h5") as pf:
        images, labels = torch.from_numpy(pf.read_patches(np.arange(len(pf)), signed=True)), pf.labels
        # the factory's DAGAN is class-conditional: its critic also takes the labels (same class table here)
        off = off_class_variants(critic, images, torch.as_tensor(labels), torch.as_tensor(labels)).numpy()
        expected = pf.read_patches(np.flatnonzero(~off))
    assert 0 < off.sum() < len(off)  # a 2-step critic's head: some variants in, some out
    with PatchFile(tmp_path / "kept.h5") as pf:
        assert np.array_equal(pf.read_patches(np.arange(len(pf))), expected)
        assert float(pf.attrs["rejected_share"]) == pytest.approx(off.mean())
    assert kept.rejected_share == pytest.approx(off.mean()) and kept.n_written == int((~off).sum())
    assert "rejected as off-class" in kept.summary() and full.rejected_share is None
    assert (tmp_path / "sheet.png").is_file()
    again = augment(patch_file, run, tmp_path / "kept.h5", n=4, seed=0, device="cpu", progress=False,
                    reject_off_class=True)
    assert again.already_complete and again.rejected_share == pytest.approx(off.mean())
    # without a class head there is nothing to judge with: one clear error
    plain = make_checkpoint(tmp_path / "run_plain", patch_file)
    with pytest.raises(AugmentError, match="critic class head"):
        augment(patch_file, plain, tmp_path / "x.h5", n=2, device="cpu", progress=False, reject_off_class=True)
