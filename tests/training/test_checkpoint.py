"""Checkpoints: weights_only loading, RNG round trip, newest-K pruning, load_generator, clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from training_testutils import TinyPairs, make_cfg

from dagan_gn.config import config_to_dict
from dagan_gn.training.families import build_networks
from dagan_gn.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from dagan_gn.training.families import load_generator
from dagan_gn.training.trainer import Trainer, TrainingError


def _save(run, step, cfg, g, d, **kw):
    return save_checkpoint(checkpoint_path(run, step), step=step, generator=g, critic=d, config=cfg, **kw)


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(state)
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_save_load_weights_only_prune_and_load_generator(tmp_path):
    cfg = make_cfg()
    g, d = build_networks(cfg.model)
    opt = torch.optim.Adam(g.parameters())
    g(torch.zeros(2, 1, 32, 32), torch.zeros(2, 8)).mean().backward()
    opt.step()
    ema = {k: v + 1 for k, v in g.state_dict().items() if v.is_floating_point()}
    ema.update({k: v for k, v in g.state_dict().items() if not v.is_floating_point()})
    for step in (1, 2, 3):
        _save(tmp_path, step, cfg, g, d, optim_g=opt, ema=ema if step == 3 else None, rng=capture_rng_state())
    (tmp_path / "checkpoints" / "best.pt").write_bytes((tmp_path / "checkpoints" / "step_0000001.pt").read_bytes())
    state = torch.load(tmp_path / "checkpoints" / "step_0000003.pt", weights_only=True)  # the contract
    assert state["format_version"] == 1 and state["step"] == 3 and state["config"] == config_to_dict(cfg)
    assert state["optim_g"]["state"] and isinstance(state["rng"]["torch"], torch.Tensor)
    assert latest_checkpoint(tmp_path).name == "step_0000003.pt"
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.pt", "step_0000002.pt", "step_0000003.pt"]
    G, loaded_cfg, path = load_generator(tmp_path)
    assert path.name == "step_0000003.pt" and loaded_cfg == cfg and not G.training
    name = next(k for k in ema if ema[k].is_floating_point())
    assert torch.equal(G.state_dict()[name], ema[name])  # EMA weights by default
    G_raw, _, _ = load_generator(path, use_ema=False)
    assert torch.equal(G_raw.state_dict()[name], g.state_dict()[name])
    G2, _, p2 = load_generator(tmp_path / "checkpoints" / "step_0000002.pt")  # no EMA stored: raw weights
    assert p2.name == "step_0000002.pt" and torch.equal(G2.state_dict()[name], g.state_dict()[name])


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        load_generator(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dagan-gn training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    assert latest_checkpoint(tmp_path / "missing") is None


def test_oom_becomes_batch_size_hint(tmp_path, monkeypatch):
    trainer = Trainer(make_cfg("train.steps=1", "data.batch_size=4"), tmp_path, dataset=TinyPairs(),
                      log=lambda m: None)

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.model, "critic_step", boom)
    with pytest.raises(TrainingError, match=r"out of memory.*data.batch_size=4.*data.batch_size=2"):
        trainer.fit()


def test_stored_config_keeps_base_names_and_a_failed_save_is_one_line(tmp_path, monkeypatch):
    import errno

    from dagan_gn.training.families import generator_from_state

    cfg = make_cfg("data.path=/hospital/Doe_Jane/patches.h5", "metrics.inception_weights=/opt/w/inception.pth")
    g, d = build_networks(cfg.model)
    path = _save(tmp_path, 1, cfg, g, d)
    state = load_checkpoint(path)
    assert state["config"]["data"]["path"] == "patches.h5"
    assert state["config"]["metrics"]["inception_weights"] == "inception.pth"
    assert b"Doe_Jane" not in path.read_bytes()
    generator, loaded = generator_from_state(state, path)
    assert loaded.model == cfg.model and not generator.training

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*step_0000002.pt: no space left on device; the "
                                              r"previous checkpoints are unchanged"):
        _save(tmp_path, 2, cfg, g, d)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001.pt"]
