"""dagan_gn/training/identity.py: the frozen identity embedding and its generator term, in a run and on resume."""

from __future__ import annotations

import pytest
import torch
from training_testutils import TinyPairs, make_cfg

from dagan_gn.training import identity
from dagan_gn.training.checkpoint import latest_checkpoint, load_checkpoint
from dagan_gn.training.identity import IdentityEmbedding, embedding_identity_loss, train_identity_embedding
from dagan_gn.training.trainer import Trainer

EMBEDDING = ("loss.embedding_identity=1.0", "loss.embedding_steps=3")


class ShadedPairs(TinyPairs):
    """TinyPairs whose classes differ in brightness, so a classifier can learn them in a few steps."""

    def __init__(self, n: int = 24, k: int = 3) -> None:
        super().__init__(n=n, k=k)
        self.images = self.images * 0.3 + (self.labels.float() - 1).view(-1, 1, 1, 1) * 0.6


def test_embedding_is_frozen_centred_and_stays_in_eval_mode():
    emb = train_identity_embedding(ShadedPairs(), 3, channels=1, image_size=32, steps=20, augmentation="", seed=0)
    assert isinstance(emb, IdentityEmbedding)
    assert not any(p.requires_grad for p in emb.parameters())
    emb.train()
    assert not emb.training and not emb.net.training  # the trainer's .train() never turns batch norm on
    images = ShadedPairs().images
    # the centre is the mean raw embedding of the training images: the centred embeddings average to ~0
    assert emb(images).mean(0).abs().max() < 1e-4 * (1 + emb.center.abs().max())
    # the same seed trains the same embedding, and the global RNG is left as it was
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    again = train_identity_embedding(ShadedPairs(), 3, channels=1, image_size=32, steps=20, augmentation="", seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(a, b) for a, b in zip(emb.state_dict().values(), again.state_dict().values()))


def test_identity_loss_is_zero_for_copies_and_its_gradient_reaches_the_variants():
    emb = train_identity_embedding(ShadedPairs(), 3, channels=1, image_size=32, steps=10, augmentation="", seed=0)
    sources = ShadedPairs().images[:4]
    assert float(embedding_identity_loss(emb, sources.repeat(2, 1, 1, 1), sources)) == pytest.approx(0, abs=1e-5)
    variants = (sources.repeat(2, 1, 1, 1) + 0.5 * torch.randn(8, 1, 32, 32)).requires_grad_(True)
    loss = embedding_identity_loss(emb, variants, sources)
    assert 0 < float(loss.detach()) <= 2
    loss.backward()
    assert variants.grad is not None and variants.grad.abs().sum() > 0
    # another class's images as "variants" are further away than noisy copies
    others = ShadedPairs().images[[1, 2, 4, 5]]  # labels 1, 2, 1, 2 vs the sources' 0, 1, 2, 0
    assert float(embedding_identity_loss(emb, others, sources)) > float(loss.detach())


def test_run_checkpoints_the_embedding_and_a_resume_does_not_retrain_it(tmp_path, monkeypatch):
    cfg = make_cfg("train.steps=3", "train.checkpoint_every=1", *EMBEDDING)

    def run(folder, resume=False, stop_at=None):
        trainer = Trainer(cfg, folder, resume=resume, dataset=ShadedPairs(), log=lambda m: None)
        trainer.fit(stop_at=stop_at)
        trainer.close()
        return trainer

    straight = run(tmp_path / "a")
    assert straight.model.identity_embedding is not None
    state = load_checkpoint(latest_checkpoint(tmp_path / "a"))["train_model"]["identity_embedding"]
    assert torch.equal(state["center"], straight.model.identity_embedding.center)
    run(tmp_path / "b", stop_at=1)

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run must load the checkpoint's embedding, not train a new one")

    monkeypatch.setattr(identity, "train_identity_embedding", refuse)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.step == 3
    pa, pb = straight.g_bare.state_dict(), resumed.g_bare.state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_embedding_file_round_trips_and_a_run_uses_it_without_training(tmp_path, monkeypatch):
    emb = train_identity_embedding(ShadedPairs(), 3, channels=1, image_size=32, steps=5, augmentation="", seed=0)
    path = identity.save_identity_embedding(emb, tmp_path / "emb.pt", channels=1, image_size=32,
                                            meta={"steps": 5, "classes": 3})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == identity.EMBEDDING_FORMAT and raw["meta"] == {"steps": 5, "classes": 3}
    loaded = identity.load_identity_embedding(path, channels=1, image_size=32)
    images = ShadedPairs().images
    assert torch.equal(loaded(images), emb(images))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training

    def refuse(*args, **kwargs):
        raise AssertionError("loss.embedding_file given: nothing is trained")

    monkeypatch.setattr(identity, "train_identity_embedding", refuse)
    cfg = make_cfg("train.steps=2", "train.checkpoint_every=2", *EMBEDDING, f"loss.embedding_file={path}")
    trainer = Trainer(cfg, tmp_path / "run", dataset=ShadedPairs(), log=lambda m: None)
    trainer.fit()
    trainer.close()
    assert torch.equal(trainer.model.identity_embedding(images), emb(images))
    # a run's checkpoint is itself an embedding file for the next run
    ckpt = latest_checkpoint(tmp_path / "run")
    assert torch.equal(identity.load_identity_embedding(ckpt, channels=1, image_size=32)(images), emb(images))


def test_unusable_embedding_files_are_refused_naming_the_file(tmp_path):
    emb = train_identity_embedding(ShadedPairs(), 3, channels=1, image_size=32, steps=2, augmentation="", seed=0)
    path = identity.save_identity_embedding(emb, tmp_path / "emb.pt", channels=1, image_size=32)
    with pytest.raises(identity.IdentityEmbeddingError, match=r"emb\.pt: made for 1×32px images, the run has 3×32px"):
        identity.load_identity_embedding(path, channels=3, image_size=32)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(identity.IdentityEmbeddingError, match=r"junk\.pt: cannot read it"):
        identity.load_identity_embedding(tmp_path / "junk.pt", channels=1, image_size=32)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(identity.IdentityEmbeddingError, match=r"other\.pt: not an embedding file"):
        identity.load_identity_embedding(tmp_path / "other.pt", channels=1, image_size=32)
    with pytest.raises(identity.IdentityEmbeddingError, match=r"missing\.pt: no such file"):
        identity.load_identity_embedding(tmp_path / "missing.pt", channels=1, image_size=32)
    cfg = make_cfg("train.steps=1", "train.checkpoint_every=1")  # a run without the embedding term
    trainer = Trainer(cfg, tmp_path / "plain", dataset=ShadedPairs(), log=lambda m: None)
    trainer.fit()
    trainer.close()
    with pytest.raises(identity.IdentityEmbeddingError, match="had no identity embedding"):
        identity.load_identity_embedding(latest_checkpoint(tmp_path / "plain"), channels=1, image_size=32)
