"""The frozen identity embedding of the DAGAN's ``loss.embedding_identity`` term.

A variant should look like *its* source, not merely like its class. Before the GAN trains, a small MONAI classifier
(:func:`~dagan_gn.metrics.downstream.build_classifier`) learns the *training* classes with classical augmentation;
its penultimate layer, frozen, is the identity embedding ``e``. The generator then pays
``weight · (1 − cos(e(G(x, z)), e(x)))``: a variant must embed where its source does. Unlike a class head trained
jointly with the critic, the signal is there from the first generator step, and it compares a variant with its
own source (not with a class label), so it means the same for classes the generator never saw.

The classifier's weights travel in the checkpoint (the training steps' ``train_model`` state), so a resumed run
uses the same embedding without retraining it, and the training draws from a forked RNG, so the run's own random
stream is the same with or without the term.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = ["IdentityEmbedding", "train_identity_embedding", "build_identity_embedding", "embedding_identity_loss",
           "identity_embedding_for_run"]

#: The classifier behind the embedding: MONAI ResNet width 8, layers 1-1-1-1 (0.08 M parameters, 8 MFLOP per
#: 32-px image), AdamW 1e-3, batch 64: about a CPU-minute for 600 steps at 32 px.
_WIDTH, _BATCH, _LR = 8, 64, 1e-3


class IdentityEmbedding(nn.Module):
    """A classifier's penultimate features, differentiable with respect to the input, weights frozen, in eval mode
    (batch norm with its running statistics, so an image's embedding does not depend on its batch)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        fc = getattr(classifier, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ValueError(f"{type(classifier).__name__} has no final linear layer 'fc' to take the embedding before")
        self.dim = int(fc.in_features)
        classifier.fc = nn.Identity()
        self.net = classifier
        # The mean embedding of the training images, subtracted before the cosine: the pooled post-ReLU features of
        # any two images point the same way (cosine ~0.99), so uncentred cosines barely tell drawings apart.
        self.register_buffer("center", torch.zeros(self.dim))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "IdentityEmbedding":
        # Always eval: the trainer's .train() calls must not switch batch norm to batch statistics.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten(1).float() - self.center

    @torch.no_grad()
    def fit_center(self, images: torch.Tensor, batch_size: int = 256) -> None:
        """Set :attr:`center` to the mean raw embedding of ``images`` (the training data)."""
        self.center.zero_()
        device = self.center.device
        total = sum(self.net(images[a : a + batch_size].to(device)).flatten(1).float().sum(0)
                    for a in range(0, len(images), batch_size))
        self.center.copy_(total / len(images))


def build_identity_embedding(num_classes: int, channels: int, image_size: int) -> IdentityEmbedding:
    """The untrained architecture (to load a checkpoint's weights into)."""
    from dagan_gn.metrics.downstream import build_classifier

    return IdentityEmbedding(build_classifier(num_classes, channels, image_size, width=_WIDTH))


def train_identity_embedding(
    dataset: Dataset, num_classes: int, *, channels: int, image_size: int, steps: int, augmentation: str,
    seed: int, device: torch.device | str = "cpu",
) -> IdentityEmbedding:
    """Train the classifier on ``dataset`` (dict items with ``image`` in [-1, 1] and ``label``) for ``steps`` AdamW
    steps with the albumentations preset ``augmentation`` (empty: none), then freeze its penultimate layer. Seeded by
    ``seed``; the global RNG is restored afterwards."""
    from dagan_gn.datasets.mixing import MixedRealSyntheticDataset
    from dagan_gn.metrics.downstream import DownstreamConfig, classical_augmentation, train_classifier

    image_only = _ImagesAndLabels(dataset)
    transform = classical_augmentation(augmentation, image_size) if augmentation else None
    data = MixedRealSyntheticDataset(image_only, None, synthetic_ratio=0.0, transform=transform, seed=seed)
    config = DownstreamConfig(width=_WIDTH, batch_size=_BATCH, lr=_LR, augmentation=augmentation or "mammo")
    with torch.random.fork_rng(devices=[]):
        classifier = train_classifier(data, num_classes, steps=steps, config=config, seed=seed,
                                      image_size=image_size, in_channels=channels, device=torch.device(device))
    embedding = IdentityEmbedding(classifier).to(device)
    base = getattr(dataset, "base", dataset)
    count = min(len(base), 2048)  # type: ignore[arg-type]
    picks = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))[:count]  # type: ignore[arg-type]
    embedding.fit_center(torch.stack([base[int(i)]["image"] for i in picks]))
    return embedding


def embedding_identity_loss(embedding: nn.Module, variants: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """``mean(1 − cos(e(variant), e(source)))`` with ``variants`` ``[k·B, ...]`` made from ``sources`` ``[B, ...]``
    repeated ``k`` times (the mode-seeking pairs); the sources' embeddings carry no gradient."""
    with torch.no_grad():
        target = embedding(sources.float())
    target = target.repeat(variants.shape[0] // sources.shape[0], 1)
    return (1 - nn.functional.cosine_similarity(embedding(variants.float()), target, dim=1)).mean()


class _ImagesAndLabels(Dataset):
    """Only ``image`` and ``label`` of each item (pairs are not needed to learn classes)."""

    def __init__(self, dataset: Dataset) -> None:
        # A pair dataset's base (its items without the pair partner, which would be read for nothing).
        self.dataset = getattr(dataset, "base", dataset)
        self.class_names = getattr(dataset, "class_names", None)
        self.labels = getattr(dataset, "labels", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        return {"image": item["image"], "label": int(item["label"]), "index": i}


def identity_embedding_for_run(cfg: Any, dataset: Dataset, state: dict[str, Any] | None, device: torch.device,
                               say: Callable[[str], None] = print) -> IdentityEmbedding:
    """The frozen embedding of a run's ``loss.embedding_identity``: trained on the training data for a new run; for a
    resumed one (``state`` holds the training steps' ``identity_embedding``) only its architecture, which loading the
    checkpoint's ``train_model`` state fills with the saved weights, so nothing is retrained."""
    from dagan_gn.datasets.loader import data_class_count

    classes = data_class_count(dataset)
    saved = ((state or {}).get("train_model") or {}).get("identity_embedding")
    if saved is not None:
        return build_identity_embedding(classes, cfg.model.channels, cfg.model.image_size).to(device)
    say(f"training the identity embedding: {classes} classes, {cfg.loss.embedding_steps} steps")
    return train_identity_embedding(
        dataset, classes, channels=cfg.model.channels, image_size=cfg.model.image_size,
        steps=cfg.loss.embedding_steps, augmentation=cfg.loss.embedding_augmentation, seed=cfg.train.seed,
        device=device)
