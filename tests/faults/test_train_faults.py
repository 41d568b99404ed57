"""Fault injection on ``dagan train`` checkpoints (dagan_gn/training/checkpoint.py): a full disk (real and injected)
during a save, and kill -9 at random instants (several seeds) with ``--resume``. The previous checkpoint must stay
intact, no temporary file may survive the next save, and the resumed run must end with exactly the tensors of a
straight run (``torch.equal`` on every generator, critic, EMA and optimizer tensor)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dagan_gn.cli import app
from dagan_gn.jobs.train import train
from dagan_gn.training.families import build_networks
from dagan_gn.training.checkpoint import CheckpointError, checkpoint_path, latest_checkpoint, load_checkpoint, \
    save_checkpoint

from factories import make_patch_file  # tests/ is on pythonpath
from fault_testutils import assert_one_line_error, inject, kill_until_done, small_disk  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # the training tests' tiny data/configs
from training_testutils import TinyPairs, make_cfg  # noqa: E402

runner = CliRunner()
STEPS = 6


def _tensors(state, prefix=""):
    """Every tensor of a (nested) checkpoint dict, by dotted key; the RNG and config are left out."""
    out = {}
    for key, value in state.items():
        if key in ("rng", "config"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_tensors(value, name + "."))
    return out


def assert_same_training_state(a, b) -> None:
    ta, tb = _tensors(load_checkpoint(a)), _tensors(load_checkpoint(b))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ after the faults: {different[:5]}"


def _cfg():
    return make_cfg(f"train.steps={STEPS}", "train.checkpoint_every=1", "train.keep_checkpoints=2")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The straight run's last checkpoint and how long the run took (kill instants are drawn within it)."""
    root = tmp_path_factory.mktemp("straight")
    train(_cfg(), root / "warm-up", dataset=TinyPairs())  # the first run pays for lazy imports; time the second
    start = time.perf_counter()
    train(_cfg(), root / "run", dataset=TinyPairs())
    return latest_checkpoint(root / "run"), time.perf_counter() - start


@pytest.fixture(scope="module")
def straight(straight_run):
    return straight_run[0]


def _small_state():
    cfg = make_cfg()
    g, d = build_networks(cfg.model)
    return cfg, g, d


def test_save_on_a_real_full_disk_keeps_the_previous_checkpoint(small_disk, tmp_path):
    cfg, g, d = _small_state()
    size = save_checkpoint(tmp_path / "probe.pt", step=1, generator=g, critic=d, config=cfg).stat().st_size
    disk = small_disk(f"{int(size * 1.5) // 1024}k")
    first = save_checkpoint(checkpoint_path(disk.path, 1), step=1, generator=g, critic=d, config=cfg)
    with torch.no_grad():
        next(g.parameters()).add_(1.0)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(checkpoint_path(disk.path, 2), step=2, generator=g, critic=d, config=cfg)
    message = str(info.value)
    assert "no space left on device" in message and "step_0000002.pt" in message and "\n" not in message
    assert sorted(p.name for p in first.parent.iterdir()) == ["step_0000001.pt"]  # no temporary file left
    assert load_checkpoint(first)["step"] == 1
    disk.grow()
    second = save_checkpoint(checkpoint_path(disk.path, 2), step=2, generator=g, critic=d, config=cfg)
    assert torch.equal(load_checkpoint(second)["generator"][next(iter(g.state_dict()))],
                       next(iter(g.state_dict().values())))


@pytest.mark.parametrize("k", [1, 3])
def test_injected_enospc_in_a_save_then_resume_equals_straight_run(tmp_path, monkeypatch, straight, k):
    run = tmp_path / "run"
    failing = inject(monkeypatch, torch, "save", k)
    with pytest.raises(CheckpointError, match=f"cannot write .*step_{k:07d}.pt: no space left on device"):
        train(_cfg(), run, dataset=TinyPairs())
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step_{s:07d}.pt" for s in range(max(1, k - 2), k)]  # the last good ones, nothing else
    failing.armed = False
    train(_cfg(), run, resume=True, dataset=TinyPairs())
    assert_same_training_state(latest_checkpoint(run), straight)


def test_cli_reports_a_full_disk_during_a_save_in_one_line(tmp_path, monkeypatch):
    patches = make_patch_file(tmp_path / "patches.h5", n_train=6)
    inject(monkeypatch, torch, "save", 2)
    result = runner.invoke(app, [
        "train", "--data", str(patches), "--out", str(tmp_path / "run"), "--steps", "3", "--device", "cpu", "-q",
        "model.image_size=64", "model.g_width=8", "model.d_width=8", "model.z_dim=8", "data.batch_size=4",
        "data.num_workers=0", "optim.n_critic=1", "train.checkpoint_every=1", "train.sample_every=0",
    ])
    assert_one_line_error(result.exit_code, result.output, "step_0000002.pt", "no space left on device",
                          "previous checkpoints are unchanged")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000001.pt")["step"] == 1


def _train_job(run) -> None:
    train(_cfg(), run, resume=True, dataset=TinyPairs())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_random_instants_then_resume_equals_straight_run(tmp_path, straight_run, seed):
    straight, seconds = straight_run
    run = tmp_path / "run"
    # the first kill right after a checkpoint's torch.save (before its rename), the later ones at random instants
    kills = kill_until_done(_train_job, (run,), seed, low=0.2 * seconds, high=0.9 * seconds, max_kills=3,
                            first_kill=(torch, "save", STEPS - 1))
    assert kills >= 1  # never a straight run that only looks like a resume
    if latest_checkpoint(run) is None or load_checkpoint(latest_checkpoint(run))["step"] < STEPS:
        train(_cfg(), run, resume=True, dataset=TinyPairs())
    assert_same_training_state(latest_checkpoint(run), straight)
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files survived the next save: {leftovers}"


def test_stale_temporary_file_is_removed_by_the_next_save(tmp_path):
    cfg, g, d = _small_state()
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".step_0000004.pt.k3j9x.tmp").write_bytes(b"x" * 1000)  # a save killed half-way
    (folder / "notes.tmp").write_text("not ours")
    save_checkpoint(folder / "step_0000005.pt", step=5, generator=g, critic=d, config=cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.tmp", "step_0000005.pt"]
