"""The DAGAN family's training steps: the identity terms (critic class head, reconstruction) and paired rotations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from training_testutils import CIFAR_TINY, TinyImages, TinyPairs, make_cfg

from dagan_gn.config import ConfigError
from dagan_gn.datasets.registry import DataError
from dagan_gn.training.checkpoint import latest_checkpoint
from dagan_gn.training.families import get_family
from dagan_gn.training.trainer import Trainer

IDENTITY = ("model.critic_classes=-1", "loss.class_weight=1.0", "loss.reconstruction=0.5")


def _steps(*overrides: str):
    cfg = make_cfg(*overrides)
    family = get_family(cfg.model.name)
    torch.manual_seed(0)
    generator, critic = family.build_networks(cfg.model)
    model = family.train_steps(generator, critic, model_cfg=cfg.model, loss_cfg=cfg.loss,
                               rotate90=cfg.data.rotate90)
    return model, generator, critic


def _batch(n: int = 6, k: int = 3) -> dict:
    ds = TinyPairs(n=n, k=k)
    items = [ds[i] for i in range(n)]
    return {"image": torch.stack([it["image"] for it in items]), "pair": torch.stack([it["pair"] for it in items]),
            "label": torch.tensor([it["label"] for it in items])}


def test_critic_class_head_reads_one_image_as_a_self_pair():
    model, _, critic = _steps("model.critic_classes=3", "loss.class_weight=1.0")
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    scores, logits = critic(x, x, with_logits=True)
    assert scores.shape == (5,) and logits.shape == (5, 3)
    # the same features as the score: the head is a linear layer on the pooled features of (x, x)
    assert torch.allclose(scores, critic(x, x), atol=1e-6)
    with pytest.raises(ValueError, match="class head"):
        _steps()[2](x, x, with_logits=True)


def test_generator_class_loss_is_the_heads_cross_entropy_of_each_variant_with_its_sources_class():
    model, generator, critic = _steps("model.critic_classes=3", "loss.class_weight=1.0")
    batch = _batch()
    torch.manual_seed(1)
    _, logs = model.generator_step(batch)
    # recomputed by hand: the same noise draw, the variant read as a self-pair, labels of the sources
    torch.manual_seed(1)
    z = torch.randn(6, generator.z_dim)
    with torch.no_grad():
        fake = generator(batch["image"], z)
        _, logits = critic(fake, fake, with_logits=True)
        adversarial = -critic(batch["image"], fake).mean()
    expected = nn.functional.cross_entropy(logits, batch["label"])
    assert torch.allclose(logs["loss/generator_class"], expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(logs["loss/generator"], adversarial + expected, rtol=1e-4, atol=1e-5)
    # a wrong label makes it another number: the loss really reads the source's class
    wrong = dict(batch, label=(batch["label"] + 1) % 3)
    torch.manual_seed(1)
    _, logs_wrong = model.generator_step(wrong)
    assert not torch.allclose(logs_wrong["loss/generator_class"], expected, rtol=1e-3)


def test_critic_class_loss_trains_the_head_on_real_images():
    # With the gradient penalty on, as the critic trains: without it the unbounded WGAN term swings the shared
    # features (the class loss then spikes from ~0 to >0.7 at whichever step the test happens to stop).
    model, _, critic = _steps("model.critic_classes=3", "loss.class_weight=1.0")
    batch = _batch(n=12)
    # classes told apart by their mean intensity, as real classes differ by content
    shade = (batch["label"].float() - 1).view(-1, 1, 1, 1) * 0.6
    batch = dict(batch, image=batch["image"] * 0.2 + shade, pair=batch["pair"] * 0.2 + shade)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss, logs = model.critic_step(batch)
        loss.backward()
        opt.step()
        first = float(logs["loss/critic_class"]) if first is None else first
    assert float(logs["loss/critic_class"]) < 0.3 * first
    assert float(logs["critic/class_accuracy_real"]) == 1.0


def test_reconstruction_is_l1_of_the_generator_at_zero_noise_and_gradients_reach_it():
    model, generator, _ = _steps("loss.reconstruction=0.5")
    batch = _batch()
    torch.manual_seed(2)
    loss, logs = model.generator_step(batch)
    with torch.no_grad():
        expected = (generator(batch["image"], torch.zeros(6, generator.z_dim)) - batch["image"]).abs().mean()
    assert torch.allclose(logs["loss/reconstruction"], expected, rtol=1e-4, atol=1e-6)
    generator.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in generator.parameters() if p.requires_grad)
    # without the term, no reconstruction is computed or logged
    assert "loss/reconstruction" not in _steps()[0].generator_step(batch)[1]


def test_rotate90_turns_both_images_of_a_pair_by_the_same_quarter_turns():
    model, _, _ = _steps("data.rotate90=1.0")
    batch = _batch(n=32)
    torch.manual_seed(3)
    out = model.prepare(batch)
    seen = set()
    for i in range(32):
        turns = [k for k in range(4) if torch.equal(out["image"][i], torch.rot90(batch["image"][i], k, (-2, -1)))]
        assert len(turns) == 1 and turns[0] != 0, f"sample {i} is not turned (p = 1)"
        assert torch.equal(out["pair"][i], torch.rot90(batch["pair"][i], turns[0], (-2, -1)))
        seen.add(turns[0])
    assert seen == {1, 2, 3}
    assert torch.equal(out["label"], batch["label"])
    unturned = _steps()[0].prepare(batch)
    assert torch.equal(unturned["image"], batch["image"]) and torch.equal(unturned["pair"], batch["pair"])


def test_critic_classes_from_the_data_is_resolved_saved_and_resumable(tmp_path):
    cfg = make_cfg("train.steps=2", *IDENTITY)
    trainer = Trainer(cfg, tmp_path, dataset=TinyPairs(k=3), log=lambda m: None)
    assert trainer.cfg.model.critic_classes == 3 and trainer.d_bare.class_head.out_features == 3
    trainer.fit()
    trainer.close()
    assert "critic_classes: 3" in (tmp_path / "config.yaml").read_text()
    resumed = Trainer(make_cfg("train.steps=3", *IDENTITY), tmp_path, resume=True, dataset=TinyPairs(k=3),
                      log=lambda m: None)
    assert resumed.step == 2
    resumed.close()


def test_labels_beyond_the_class_head_and_bad_keys_are_refused(tmp_path):
    with pytest.raises(DataError, match="model.critic_classes=2"):
        Trainer(make_cfg("model.critic_classes=2", "loss.class_weight=1"), tmp_path, dataset=TinyPairs(k=3),
                log=lambda m: None)
    with pytest.raises(ConfigError, match="model.critic_classes"):
        make_cfg("loss.class_weight=1")
    with pytest.raises(ConfigError, match="data.rotate90"):
        make_cfg("data.rotate90=1.5")
    with pytest.raises(ConfigError, match="identity terms"):
        Trainer(make_cfg("loss.reconstruction=0.1", model=CIFAR_TINY), tmp_path / "c", dataset=TinyImages(size=32,
                channels=3), log=lambda m: None)


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_with_identity_terms_rotations_and_warp_is_bit_for_bit(tmp_path):
    cfg = make_cfg("train.steps=4", "train.checkpoint_every=1", "data.rotate90=0.5", "loss.mode_seeking=0.1",
                   "loss.mode_seeking_target=0.3", "loss.diffaugment=translation,cutout",
                   "model.g_kwargs={warp: 0.1, warp_grid: 4}", *IDENTITY)

    def run(folder, resume=False, stop_at=None):
        trainer = Trainer(cfg, folder, resume=resume, dataset=TinyPairs(k=3), log=lambda m: None)
        trainer.fit(stop_at=stop_at)
        trainer.close()
        return trainer

    straight = run(tmp_path / "a")
    assert straight.g_bare.warp == 0.1 and straight.g_bare.flow_channels == 2
    run(tmp_path / "b", stop_at=2)
    assert latest_checkpoint(tmp_path / "b").name == "step_0000002.pt"
    resumed = run(tmp_path / "b", resume=True)
    for a, b in ((straight.g_bare, resumed.g_bare), (straight.d_bare, resumed.d_bare)):
        pa, pb = _params(a), _params(b)
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
