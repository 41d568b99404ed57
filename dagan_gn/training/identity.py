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

``loss.embedding_file`` gives a run an embedding trained elsewhere instead: a file written by
:func:`save_identity_embedding`, or a training checkpoint of a run that had one. Several runs (an ablation) then share
one embedding, and a machine without albumentations (the GPU check's, ``benchmarks/prepare_gpu_bundle.py``) trains
with the embedding the recipe trains on the CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from dagan_gn.errors import DaganError

__all__ = ["IdentityEmbedding", "IdentityEmbeddingError", "train_identity_embedding", "build_identity_embedding",
           "embedding_identity_loss", "identity_embedding_for_run", "save_identity_embedding",
           "load_identity_embedding"]

#: The ``format`` string of an embedding file (:func:`save_identity_embedding`).
EMBEDDING_FORMAT = "dagan-gn identity embedding v1"


class IdentityEmbeddingError(DaganError, ValueError):
    """An embedding file cannot be used; one line naming the file and the problem."""

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
    """The untrained architecture (to load a checkpoint's weights into). ``num_classes`` sizes only the classifier's
    final layer, which the embedding drops: any count builds the same embedding."""
    from dagan_gn.metrics.downstream import build_classifier

    return IdentityEmbedding(build_classifier(num_classes, channels, image_size, width=_WIDTH))


def save_identity_embedding(embedding: IdentityEmbedding, path: str | os.PathLike, *, channels: int, image_size: int,
                            meta: dict[str, Any] | None = None) -> Path:
    """Write ``embedding`` (weights and centre, on the CPU) with its input shape and ``meta`` (plain values: how it
    was trained) atomically to ``path``, for ``loss.embedding_file``."""
    from dagan_gn.fileio import atomic_path

    state = {k: v.detach().cpu() for k, v in embedding.state_dict().items()}
    payload = {"format": EMBEDDING_FORMAT, "channels": int(channels), "image_size": int(image_size),
               "dim": int(embedding.dim), "state": state, "meta": dict(meta or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_identity_embedding(path: str | os.PathLike, *, channels: int, image_size: int,
                            device: torch.device | str = "cpu") -> IdentityEmbedding:
    """The frozen embedding in ``path``: a :func:`save_identity_embedding` file, or a training checkpoint whose run
    had ``loss.embedding_identity`` on. Loaded with ``weights_only=True``.

    Raises:
        IdentityEmbeddingError: missing or unreadable, neither kind of file, made for other images than
            ``channels`` × ``image_size`` px, or weights that do not fit the architecture.
    """
    from dagan_gn.training.checkpoint import CheckpointError, check_checkpoint, first_line

    path = Path(path)
    if not path.is_file():
        raise IdentityEmbeddingError(f"identity embedding {path}: no such file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, or objects other than tensors
        raise IdentityEmbeddingError(f"identity embedding {path}: cannot read it ({type(exc).__name__}: "
                                     f"{first_line(exc)})") from exc
    if isinstance(raw, dict) and raw.get("format") == EMBEDDING_FORMAT:
        state, shape = raw.get("state"), (raw.get("channels"), raw.get("image_size"))
    elif isinstance(raw, dict) and "format_version" in raw:
        try:
            ckpt = check_checkpoint(raw, path)  # already read: the checkpoint's own checks, not a second read
        except CheckpointError as exc:
            raise IdentityEmbeddingError(f"identity embedding {path}: {exc}") from exc
        state = (ckpt.get("train_model") or {}).get("identity_embedding")
        if state is None:
            raise IdentityEmbeddingError(f"identity embedding {path}: this checkpoint's run had no identity "
                                         "embedding (loss.embedding_identity was 0)")
        model = ckpt["config"].get("model", {})
        shape = (model.get("channels"), model.get("image_size"))
    else:
        raise IdentityEmbeddingError(f"identity embedding {path}: not an embedding file or a dagan-gn checkpoint")
    if shape != (channels, image_size):
        raise IdentityEmbeddingError(f"identity embedding {path}: made for {shape[0]}×{shape[1]}px images, the run "
                                     f"has {channels}×{image_size}px")
    embedding = build_identity_embedding(2, channels, image_size)
    try:
        embedding.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise IdentityEmbeddingError(f"identity embedding {path}: its weights do not fit the embedding "
                                     f"({first_line(exc)})") from exc
    return embedding.to(device)


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
    """The frozen embedding of a run's ``loss.embedding_identity``: for a resumed run (``state`` holds the training
    steps' ``identity_embedding``) only its architecture, which loading the checkpoint's ``train_model`` state fills
    with the saved weights, so nothing is retrained; else ``loss.embedding_file``'s when set; else one trained on the
    training data."""
    from dagan_gn.datasets.loader import data_class_count

    saved = ((state or {}).get("train_model") or {}).get("identity_embedding")
    if saved is not None:
        return build_identity_embedding(2, cfg.model.channels, cfg.model.image_size).to(device)
    if cfg.loss.embedding_file:
        say(f"identity embedding from {cfg.loss.embedding_file}")
        return load_identity_embedding(cfg.loss.embedding_file, channels=cfg.model.channels,
                                       image_size=cfg.model.image_size, device=device)
    classes = data_class_count(dataset)
    say(f"training the identity embedding: {classes} classes, {cfg.loss.embedding_steps} steps")
    return train_identity_embedding(
        dataset, classes, channels=cfg.model.channels, image_size=cfg.model.image_size,
        steps=cfg.loss.embedding_steps, augmentation=cfg.loss.embedding_augmentation, seed=cfg.train.seed,
        device=device)
