"""The training loop: bit-for-bit resume, resume guard, overfitting sanity check, loss variants, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from training_testutils import CIFAR_TINY, TinyImages, TinyPairs, make_cfg

from dagan_gn.training.checkpoint import latest_checkpoint, load_checkpoint
from dagan_gn.jobs.train import train
from dagan_gn.datasets.loader import InfiniteBatches
from dagan_gn.datasets.registry import DataError
from dagan_gn.training.trainer import Trainer, TrainingError


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _run(cfg, run_dir, dataset, *, resume=False, stop_at=None) -> Trainer:
    trainer = Trainer(cfg, run_dir, resume=resume, dataset=dataset, log=lambda m: None)
    trainer.fit(stop_at=stop_at)
    trainer.close()
    return trainer


def test_resume_is_bit_for_bit(tmp_path):
    # 16 images / batch 4 = 4 batches per epoch, 2 critic batches per step: 6 steps cross epoch boundaries,
    # and the interruption at step 3 falls in the middle of an epoch. hflip and EMA are on; LR decays linearly.
    cfg = make_cfg("train.steps=6", "data.hflip=true", "optim.lr_decay=linear")
    straight = _run(cfg, tmp_path / "a", TinyPairs())
    first = _run(cfg, tmp_path / "b", TinyPairs(), stop_at=3)
    assert first.step == 3 and latest_checkpoint(tmp_path / "b").name == "step_0000003.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path / "b"))["data"] == {"epoch": 1, "position": 2}
    resumed = _run(cfg, tmp_path / "b", TinyPairs(), resume=True)
    assert resumed.step == 6
    for name, (a, b) in {
        "generator": (straight.g_bare, resumed.g_bare),
        "critic": (straight.d_bare, resumed.d_bare),
        "ema": (straight.ema.module, resumed.ema.module),
    }.items():
        pa, pb = _params(a), _params(b)
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), f"{name}.{k} differs after resume"
    sa, sb = straight.opt_d.state_dict()["state"], resumed.opt_d.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    # the resumed run's metrics.jsonl has each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_config_naming_keys(tmp_path):
    cfg = make_cfg("train.steps=1")
    _run(cfg, tmp_path, TinyPairs())
    changed = make_cfg("train.steps=2", "optim.g_lr=0.001", "model.g_norm=group:2")
    with pytest.raises(TrainingError, match=r"differs in model\.g_norm, optim\.g_lr"):
        Trainer(changed, tmp_path, resume=True, dataset=TinyPairs(), log=lambda m: None)
    # train.steps is resume-safe: more steps continue the run
    t = _run(make_cfg("train.steps=2"), tmp_path, TinyPairs(), resume=True)
    assert t.step == 2


def test_existing_run_needs_resume(tmp_path):
    _run(make_cfg("train.steps=1"), tmp_path, TinyPairs())
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(make_cfg("train.steps=1"), tmp_path, dataset=TinyPairs())


def test_run_folder_contents_and_logs(tmp_path):
    cfg = make_cfg("train.steps=2", "train.sample_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=1")
    run = train(cfg, tmp_path, dataset=TinyPairs())
    assert (run / "config.yaml").is_file() and (run / "loss_curves.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002.pt"]
    assert {p.name for p in (run / "samples").iterdir()} == {"step_0000000.png", "step_0000001.png",
                                                             "step_0000002.png"}
    assert any((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in records if "loss/critic" in r][-1]  # the sample grid's metrics are records of their own
    assert [r["step"] for r in records if "samples/pixel_diversity_ratio" in r] == [0, 1, 2]
    for key in ("loss/critic", "loss/generator", "loss/gradient_penalty", "wasserstein_estimate",
                "grad_norm/critic", "grad_norm/generator", "lr"):
        assert key in rec and isinstance(rec[key], float), key
    import matplotlib.image

    grid = matplotlib.image.imread(run / "samples" / "step_0000002.png")
    # DAGAN grid: 8 source rows x (1 source + 7 variants) of 32 px with 2 px padding
    assert grid.shape[:2] == (8 * 34 + 2, 8 * 34 + 2)


@pytest.mark.parametrize("loss", ["wgan-clip", "hinge", "ns"])
def test_other_losses_and_options_run(tmp_path, loss):
    cfg = make_cfg("train.steps=2", f"loss.name={loss}", "optim.ortho_reg=1e-4", "loss.drift=1e-3",
                   "loss.clip_value=0.05")
    t = _run(cfg, tmp_path, TinyPairs())
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(isinstance(v, (int, float)) for v in rec.values())
    assert "loss/orthogonal_reg" in rec and "loss/drift" in rec
    if loss == "wgan-clip":
        assert max(p.abs().max().item() for p in t.d_bare.parameters()) <= 0.05 + 1e-7


def test_class_conditional_cifar_model(tmp_path):
    cfg = make_cfg("train.steps=1", "model.num_classes=2", "model.g_norm=conditional_batch", model=CIFAR_TINY)
    t = _run(cfg, tmp_path, TinyImages(channels=3, k=2))
    assert t.step == 1


def test_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="fewer than one batch of 32.*data.batch_size"):
        Trainer(make_cfg("data.batch_size=32"), tmp_path / "a", dataset=TinyPairs())
    with pytest.raises(DataError, match=r"expects \[1, 64, 64\]"):
        Trainer(make_cfg("model.image_size=64"), tmp_path / "b", dataset=TinyPairs())
    with pytest.raises(DataError, match="same-class pairs"):
        Trainer(make_cfg(), tmp_path / "c", dataset=TinyImages())
    with pytest.raises(Exception, match="unknown loss 'foo'"):
        Trainer(make_cfg("loss.name=foo"), tmp_path / "d", dataset=TinyPairs())
    with pytest.raises(ValueError, match="num_groups must divide"):
        Trainer(make_cfg("model.g_norm=group:3"), tmp_path / "e", dataset=TinyPairs())
    with pytest.raises(DataError, match="no training data"):
        Trainer(make_cfg(), tmp_path / "f")


def test_infinite_batches_resume_position():
    ds = TinyImages(n=10)
    a = InfiniteBatches(ds, 3, seed=1)
    seq = [next(a)["index"].tolist() for _ in range(7)]  # 3 batches per epoch (10 // 3, drop_last)
    b = InfiniteBatches(ds, 3, seed=1)
    [next(b) for _ in range(4)]
    state = b.state_dict()
    assert state == {"epoch": 1, "position": 1}
    c = InfiniteBatches(ds, 3, seed=1)
    c.load_state_dict(state)
    assert [next(c)["index"].tolist() for _ in range(3)] == seq[4:]
    assert sorted(sum(seq[:3], [])) != sorted(sum(seq[3:6], [])) or seq[:3] != seq[3:6]  # reshuffled per epoch


class _TinyG(nn.Module):
    z_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64), nn.Tanh())

    def forward(self, z, y=None):
        return self.net(z).view(-1, 1, 8, 8)


class _TinyD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))

    def forward(self, x, y=None):
        return self.net(x).squeeze(1)


class _FourImages(torch.utils.data.Dataset):
    def __init__(self) -> None:
        imgs = torch.zeros(4, 1, 8, 8)
        imgs[0, :, :4] = 1
        imgs[1, :, 4:] = 1
        imgs[2, :, :, :4] = 1
        imgs[3, :, :, 4:] = 1
        self.images = imgs * 2 - 1

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": self.images[i], "label": 0, "index": i}


def test_overfits_four_images(tmp_path):
    """Sanity check of the whole loop: a tiny generator learns to reproduce a fixed 4-image set (its samples'
    distance to the nearest training image drops far below the initial value) in a bounded number of steps."""
    ds = _FourImages()
    g, d = _TinyG(), _TinyD()

    def nn_error() -> float:
        with torch.no_grad():
            fakes = g(torch.randn(256, 8, generator=torch.Generator().manual_seed(1))).view(256, 1, -1)
            return ((fakes - ds.images.view(1, 4, -1)) ** 2).mean(-1).min(1).values.mean().item()

    cfg = make_cfg("loss.name=hinge", "optim.g_lr=1e-3", "optim.d_lr=1e-3", "optim.lr_decay=none", "train.steps=150",
                   "train.ema_decay=0", "data.hflip=false", "train.log_every=0", "model.image_size=8",
                   model=["model.name=cifar_dcgan", "model.channels=1", "model.z_dim=8"])
    trainer = Trainer(cfg, tmp_path, dataset=ds, networks=(g, d), log=lambda m: None)
    before = nn_error()
    trainer.fit()
    after = nn_error()
    assert after < 0.35 * before, (before, after)


def test_periodic_evaluation_keeps_best_checkpoint(tmp_path):
    calls = []

    def evaluator(sample_fn, step):
        images = sample_fn(6)
        assert images.shape == (6, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
        calls.append(step)
        return {"fid": {1: 50.0, 2: 40.0, 3: 45.0}[step], "kid_mean": 0.1}

    cfg = make_cfg("train.steps=3", "metrics.eval_every=1")
    trainer = Trainer(cfg, tmp_path, dataset=TinyPairs(), evaluator=evaluator, log=lambda m: None)
    trainer.fit()
    assert calls == [1, 2, 3]
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == 2 and best["best_fid"] == 40.0
    assert latest_checkpoint(tmp_path).name == "step_0000003.pt"  # best.pt is not a resume point
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/fid"] for r in records if "eval/fid" in r] == [50.0, 40.0, 45.0]


def test_sigterm_finishes_the_step_and_checkpoints(tmp_path):
    import os
    import signal

    def evaluator(sample_fn, step):  # runs inside the loop: deliver SIGTERM to ourselves at step 2
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    previous = signal.getsignal(signal.SIGTERM)
    cfg = make_cfg("train.steps=10", "metrics.eval_every=1")
    trainer = Trainer(cfg, tmp_path, dataset=TinyPairs(), evaluator=evaluator, log=lambda m: None)
    trainer.fit()
    assert trainer.step == 2
    assert latest_checkpoint(tmp_path).name == "step_0000002.pt"
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    resumed = Trainer(make_cfg("train.steps=3", "metrics.eval_every=1"), tmp_path, resume=True, dataset=TinyPairs(),
                      evaluator=lambda f, s: {}, log=lambda m: None)
    resumed.fit()
    assert resumed.step == 3


def test_compiled_generator_trains_and_matches_eager(tmp_path, monkeypatch):
    """``train.compile=true``: the compiled generator makes the critic's fakes and takes the generator step, the
    losses stay finite, its outputs match the eager network's, and the checkpoint holds plain (eager) parameter
    names. Dynamo graph capture and AOT autograd run as in a real compile; the ``aot_eager`` backend skips inductor's
    C++ code generation, which takes two minutes on two cores (the same test with inductor passes, run by hand)."""
    compile_fn = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_fn(model, backend="aot_eager", **kw))
    cfg = make_cfg("train.steps=1", "optim.n_critic=1", "train.compile=true", "train.ema_decay=0",
                   "train.checkpoint_every=1")
    trainer = Trainer(cfg, tmp_path, dataset=TinyPairs(), log=lambda m: None)
    assert isinstance(trainer.model.G, torch._dynamo.eval_frame.OptimizedModule)
    trainer.fit()
    trainer.close()
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logs and all(torch.isfinite(torch.tensor(v)) for k, v in logs[-1].items() if k.startswith("loss/"))
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # the no-grad graph the critic steps compiled
        torch.testing.assert_close(trainer.model.G(x, z), trainer.g_bare(x, z), rtol=1e-4, atol=1e-5)
    saved = load_checkpoint(latest_checkpoint(tmp_path))["generator"]
    assert saved.keys() == trainer.g_bare.state_dict().keys() and not any("_orig_mod" in k for k in saved)


@pytest.mark.parametrize("model, data", [(None, TinyPairs), (CIFAR_TINY, lambda: TinyImages(channels=3))])
def test_channels_last_gives_the_same_critic_update(tmp_path, model, data):
    """``train.channels_last``: networks and batches in NHWC (the CUDA default of the DAGAN configs), the same
    losses and gradient penalty as NCHW up to rounding, and the run still trains and checkpoints."""
    extra = {} if model is None else {"model": model}
    logs = {}
    for layout in ("false", "true"):
        cfg = make_cfg("train.steps=1", f"train.channels_last={layout}", "train.checkpoint_every=1", **extra)
        trainer = Trainer(cfg, tmp_path / layout, dataset=data(), log=lambda m: None)
        batch = trainer.model.prepare(next(iter(trainer.data)))
        if layout == "true":
            assert batch["image"].is_contiguous(memory_format=torch.channels_last)
            conv = next(m for m in trainer.d_bare.modules() if isinstance(m, nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        logs[layout], _ = trainer._critic_update(batch, want_norm=False)
        trainer.fit()
        trainer.close()
        assert latest_checkpoint(tmp_path / layout) is not None
    for key in ("loss/critic", "loss/gradient_penalty", "wasserstein_estimate"):
        torch.testing.assert_close(logs["true"][key], logs["false"][key], rtol=1e-4, atol=1e-5)
