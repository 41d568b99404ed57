"""Does DAGAN augmentation help? Train the same small classifier under four data regimes and compare.

Regimes (:data:`REGIMES`), all trained on the *train* split only and evaluated on the held-out *test* split (other
patients):

- ``real``                 real patches only;
- ``real+albumentations``  real patches with classical augmentation (albumentations: flips, 90° rotations, small
                            affine and brightness/contrast changes);
- ``real+dagan``           real patches mixed with DAGAN variants (:class:`~dagan_gn.datasets.mixing.MixedRealSyntheticDataset`);
- ``real+both``            the mix, with the albumentations transform on top.

Every regime trains the same MONAI classifier (``resnet``: ``monai.networks.nets.ResNet`` with basic blocks, or
``densenet``: ``DenseNet121``; 1 input channel for mammograms; a configurable width so it runs on a CPU) for the same
number of optimizer steps (``epochs`` passes over the *real* training set), for several seeds. Accuracy and AUC
(one-vs-rest, macro-averaged over the classes present in the test set, via ``monai.metrics.compute_roc_auc``) are
reported as mean ± 95 % confidence interval (Student t over seeds) in a Markdown table and a PNG bar chart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dagan_gn.errors import DaganError
from dagan_gn.metrics.prototypes import off_class_mask

__all__ = [
    "DownstreamError",
    "REGIMES",
    "CLASSIFIER_ARCHS",
    "AUGMENTATION_PRESETS",
    "recalibrate_batch_norm",
    "DownstreamConfig",
    "DownstreamReport",
    "build_classifier",
    "classical_augmentation",
    "train_classifier",
    "evaluate_classifier",
    "predict_logits",
    "evaluate_augmentation",
    "mean_ci",
]


class DownstreamError(DaganError, ValueError):
    """A downstream evaluation that cannot run as asked (unknown regime, classifier or preset, missing data)."""

REGIMES: tuple[str, ...] = ("real", "real+albumentations", "real+dagan", "real+both")
#: ``DownstreamConfig.arch`` values (:func:`build_classifier`).
CLASSIFIER_ARCHS: tuple[str, ...] = ("resnet", "densenet")
#: ``DownstreamConfig.augmentation`` presets (:func:`classical_augmentation`; also ``strokes:S``: ranges × S).
AUGMENTATION_PRESETS: tuple[str, ...] = ("mammo", "natural", "strokes")


@dataclass
class DownstreamConfig:
    """How the downstream classifier is built and trained."""

    #: ``resnet`` (MONAI ResNet with basic blocks) or ``densenet`` (MONAI DenseNet121).
    arch: str = "resnet"
    #: Base width: ResNet stage widths ``[w, 2w, 4w, 8w]``; DenseNet ``init_features=2w``, ``growth_rate=w``.
    width: int = 16
    #: ResNet blocks per stage (``[2, 2, 2, 2]`` is ResNet-18).
    layers: list = field(default_factory=lambda: [1, 1, 1, 1])
    #: Passes over the real training set; every regime gets the same number of optimizer steps.
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: Fraction of synthetic items in the DAGAN regimes, or ``"balance"`` for per-class balancing.
    synthetic_ratio: Any = 0.5
    #: Classical augmentation preset: ``mammo`` (flips, 90° rotations, affine, brightness/contrast) or ``natural``
    #: (horizontal flip, small shifts: for CIFAR-10-like images).
    augmentation: str = "mammo"
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    device: str = "auto"
    num_workers: int = 0
    #: After training, batch-norm statistics are recomputed on this many batches of the training data ("precise
    #: BN"; 0 keeps the running averages). The running averages lag behind weights that still move fast at the end
    #: of a short run: on Omniglot (k = 5, real+both) they left a classifier at 6 % test accuracy (and 6 % on its own
    #: training drawings) that scores 75 % with recomputed statistics (docs/augment.md, "Omniglot few-shot").
    bn_recalibration_batches: int = 50
    #: Weight of a synthetic item's loss relative to a real item's (1: the same; < 1 trusts variants less).
    synthetic_weight: float = 1.0
    #: Drop the variants whose embedding lies nearest another class's prototype before mixing: the embedding is the
    #: penultimate layer of a classifier trained on the real training items with classical augmentation (the
    #: ``real+albumentations`` run of the same seed when it ran), the prototypes are the classes' mean real
    #: embeddings. The share dropped is reported per run (``rejected_share``).
    reject_off_class: bool = False


def classical_augmentation(preset: str = "mammo", image_size: int = 64) -> Any:
    """The albumentations pipeline of the ``+albumentations`` regimes.

    Presets: ``mammo`` (flips, 90° turns, small affine, brightness/contrast), ``natural`` (CIFAR-10: horizontal flip,
    small shifts), ``strokes`` (handwriting such as Omniglot, bright strokes on a dark background: a random affine
    with rotation ±10°, shear ±10°, scale 0.9–1.1 and shifts of ±10 % on every image, no flips — a mirrored
    character can be another character). ``strokes:S`` scales those ranges by ``S`` (``strokes:0.5`` is gentler).
    """
    import albumentations as A

    name, _, strength_text = preset.partition(":")
    if name == "strokes":
        try:
            s = float(strength_text) if strength_text else 1.0
        except ValueError:
            raise DownstreamError(f"augmentation preset {preset!r}: the strength after ':' must be a number") from None
        if not 0.0 <= s <= 4.0:
            raise DownstreamError(f"augmentation preset {preset!r}: strength must be in [0, 4], got {s}")
        # Constant zero border: outside the drawing is background (dark after inverting Omniglot's white paper).
        return A.Compose([
            A.Affine(rotate=(-10 * s, 10 * s), shear=(-10 * s, 10 * s), scale=(1 - 0.1 * s, 1 + 0.1 * s),
                     translate_percent=(-0.1 * s, 0.1 * s), border_mode=0, fill=0, p=1.0),
        ])
    if strength_text:
        raise DownstreamError(f"augmentation preset {preset!r}: only 'strokes' takes a strength")
    if preset == "mammo":
        # Patches have no canonical orientation (left/right breasts, CC/MLO views): flips and 90° turns are
        # label-preserving; small affine and contrast changes mimic positioning and exposure differences.
        return A.Compose([
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-15, 15), border_mode=2, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ])
    if preset == "natural":
        pad = max(1, image_size // 8)
        return A.Compose([
            A.HorizontalFlip(p=0.5),
            A.Affine(translate_px=(-pad, pad), border_mode=2, p=0.5),
        ])
    raise DownstreamError(f"unknown augmentation preset {preset!r}; choose from {', '.join(AUGMENTATION_PRESETS)}")


def build_classifier(
    num_classes: int, in_channels: int = 1, image_size: int = 64, *, arch: str = "resnet", width: int = 16,
    layers: Sequence[int] = (1, 1, 1, 1),
) -> nn.Module:
    """A 2-D MONAI classifier producing logits ``[B, num_classes]``."""
    if num_classes < 2:
        raise DownstreamError(f"a classifier needs at least 2 classes, got {num_classes}")
    if arch == "resnet":
        from monai.networks.nets import ResNet

        return ResNet(
            block="basic", layers=list(layers), block_inplanes=[width, 2 * width, 4 * width, 8 * width],
            spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes,
            # Small images keep full resolution in the stem; large patches halve it first.
            conv1_t_size=7 if image_size >= 128 else 3, conv1_t_stride=2 if image_size >= 128 else 1,
            no_max_pool=image_size < 64,
        )
    if arch == "densenet":
        from monai.networks.nets import DenseNet121

        return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                           init_features=2 * width, growth_rate=width)
    raise DownstreamError(f"unknown classifier {arch!r}; choose from {', '.join(CLASSIFIER_ARCHS)}")


def _forever(loader: DataLoader, dataset: Dataset) -> Any:
    epoch = 0
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_classifier(
    train_set: Dataset,
    num_classes: int,
    *,
    steps: int,
    config: DownstreamConfig,
    seed: int,
    image_size: int,
    in_channels: int,
    device: torch.device,
) -> nn.Module:
    """Train a fresh :func:`build_classifier` for ``steps`` Adam steps on ``train_set`` (dict items with ``image``
    and ``label``), seeded by ``seed`` (weights and batch order)."""
    torch.manual_seed(seed)
    model = build_classifier(num_classes, in_channels, image_size, arch=config.arch, width=config.width,
                             layers=config.layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    batch = min(config.batch_size, len(train_set))
    loader = DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=True, generator=gen,
                        num_workers=config.num_workers)
    model.train()
    for _, item in zip(range(steps), _forever(loader, train_set)):
        x = item["image"].to(device, torch.float32)
        y = torch.as_tensor(item["label"]).to(device)
        if config.synthetic_weight != 1.0 and "synthetic" in item:
            weight = torch.where(torch.as_tensor(item["synthetic"]).to(device), config.synthetic_weight, 1.0)
            loss = (nn.functional.cross_entropy(model(x), y, reduction="none") * weight).sum() / weight.sum()
        else:
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    recalibrate_batch_norm(model, train_set, batches=config.bn_recalibration_batches, batch_size=batch,
                           seed=seed, device=device, num_workers=config.num_workers)
    return model.eval()


def recalibrate_batch_norm(model: nn.Module, dataset: Dataset, *, batches: int, batch_size: int, seed: int,
                           device: torch.device, num_workers: int = 0) -> bool:
    """Replace the batch-norm running statistics of ``model`` by their average over ``batches`` batches of
    ``dataset`` (dict items with ``image``; seeded order, cycling over epochs as needed) with the weights fixed:
    ``torch.optim.swa_utils.update_bn``. Returns False (model untouched) when it has no batch norm or
    ``batches`` is 0."""
    from torch.optim.swa_utils import update_bn

    if batches <= 0 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed + 1), num_workers=num_workers)
    images = (item["image"].to(device, torch.float32) for _, item in zip(range(batches), _forever(loader, dataset)))
    update_bn(images, model)
    return True


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], *, device: torch.device,
                   batch_size: int = 256) -> torch.Tensor:
    """The one batched prediction: float32 logits ``[N, K]`` on the CPU of images (a tensor, cut into
    ``batch_size`` batches, or an iterable of batches). Leaves the model's train/eval mode alone."""
    batches = ([images[i : i + batch_size] for i in range(0, len(images), batch_size)]
               if isinstance(images, torch.Tensor) else images)
    return torch.cat([model(x.to(device, torch.float32)).float().cpu() for x in batches] or [torch.zeros(0, 0)])


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, test_set: Dataset, num_classes: int, *, device: torch.device, batch_size: int = 128
) -> dict[str, float]:
    """Accuracy and AUC (binary, or one-vs-rest macro-averaged over the classes present) on ``test_set``."""
    from monai.metrics import compute_roc_auc

    logits, labels = [], []
    for item in DataLoader(test_set, batch_size=batch_size, shuffle=False):
        logits.append(predict_logits(model, item["image"], device=device, batch_size=batch_size))
        labels.append(torch.as_tensor(item["label"]))
    p, y = torch.softmax(torch.cat(logits), 1), torch.cat(labels).long()
    acc = float((p.argmax(1) == y).float().mean())
    present = torch.unique(y)
    if len(present) < 2:
        auc = float("nan")  # AUC is undefined with a single class in the test set
    elif num_classes == 2:
        auc = float(compute_roc_auc(p[:, 1], y))
    else:
        per_class = []
        onehot = nn.functional.one_hot(y, num_classes)
        for c in present.tolist():
            per_class.append(float(compute_roc_auc(p[:, c], onehot[:, c])))
        auc = float(np.mean(per_class))
    return {"accuracy": acc, "auc": auc}


def _stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    return (torch.stack([torch.as_tensor(it["image"]) for it in items]).float(),
            torch.as_tensor([int(it["label"]) for it in items]))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval (NaN half-width for fewer than 2 values)."""
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


@dataclass
class DownstreamReport:
    """Per-seed results and their summary."""

    #: One row per (regime, seed): ``{"regime", "seed", "accuracy", "auc", "train_items", "synthetic_items"}``.
    runs: list[dict[str, Any]]
    class_names: list[str]
    n_train: int
    n_test: int
    n_synthetic: int
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def regimes(self) -> list[str]:
        return list(dict.fromkeys(r["regime"] for r in self.runs))

    def summary(self) -> dict[str, dict[str, tuple[float, float]]]:
        """Regime → metric → (mean, 95 % CI half-width)."""
        out: dict[str, dict[str, tuple[float, float]]] = {}
        for regime in self.regimes:
            rows = [r for r in self.runs if r["regime"] == regime]
            out[regime] = {m: mean_ci([r[m] for r in rows]) for m in ("accuracy", "auc")}
        return out

    def to_markdown(self) -> str:
        def fmt(mean: float, half: float) -> str:
            if not np.isfinite(mean):
                return "n/a"
            return f"{mean:.3f} ± {half:.3f}" if np.isfinite(half) else f"{mean:.3f}"

        seeds = sorted({r["seed"] for r in self.runs})
        lines = [
            "# Downstream classifier: does augmentation help?",
            "",
            f"Classifier `{self.config.get('arch')}` (width {self.config.get('width')}), "
            f"{self.config.get('epochs')} epochs over {self.n_train} real training patches; evaluated on "
            f"{self.n_test} held-out test patches; {len(self.class_names)} classes ({', '.join(self.class_names)}); "
            f"{self.n_synthetic} synthetic patches available. Mean ± 95 % CI over {len(seeds)} seed(s) {seeds}.",
            "",
            "| regime | accuracy | AUC |",
            "| --- | ---: | ---: |",
        ]
        for regime, m in self.summary().items():
            lines.append(f"| {regime} | {fmt(*m['accuracy'])} | {fmt(*m['auc'])} |")
        identity = [r["synthetic_class_identity"] for r in self.runs if "synthetic_class_identity" in r]
        if identity:
            lines += ["", f"Class identity of the synthetic patches: {fmt(*mean_ci(identity))} of them lie nearest "
                      "their own class's prototype in the real+albumentations classifier's features (a classifier "
                      "that never saw one; 1 − the share `--reject-off-class` drops)."]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = {k: {m: list(v) for m, v in ms.items()} for k, ms in self.summary().items()}
        return d

    def plot(self, path: str | os.PathLike) -> Path:
        """Grouped bar chart (accuracy and AUC per regime, 95 % CI error bars) as a PNG, written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from dagan_gn.fileio import save_figure

        summ = self.summary()
        regimes = list(summ)
        xs = np.arange(len(regimes))
        fig, ax = plt.subplots(figsize=(1.6 * len(regimes) + 2, 3.6))
        for k, (metric, label) in enumerate((("accuracy", "accuracy"), ("auc", "AUC"))):
            means = [summ[r][metric][0] for r in regimes]
            halves = [summ[r][metric][1] if np.isfinite(summ[r][metric][1]) else 0.0 for r in regimes]
            ax.bar(xs + (k - 0.5) * 0.38, np.nan_to_num(means), 0.38, yerr=halves, capsize=3, label=label)
        ax.set_xticks(xs, regimes, rotation=15)
        ax.set_ylim(0, 1)
        ax.set_ylabel("test score (mean ± 95 % CI)")
        ax.legend(loc="lower right")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        return save_figure(fig, path, dpi=120)


def evaluate_augmentation(
    real_train: Dataset,
    test: Dataset,
    synthetic: Dataset | None,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    config: DownstreamConfig | None = None,
    regimes: Sequence[str] = REGIMES,
    progress: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> DownstreamReport:
    """Train and evaluate the classifier under ``regimes`` × ``config.seeds``.

    Args:
        real_train: real training items (dicts with ``image`` in [-1, 1] and ``label``), e.g. ``PatchDataset``.
        test: held-out items, same classes.
        synthetic: synthetic items (``dagan augment`` output) for the DAGAN regimes; required when those are asked.
        num_classes: number of classes (labels are ``0..num_classes-1``).
        class_names: for the report.
        config: classifier and training settings.
        regimes: subset of :data:`REGIMES`.
        progress: tqdm bar over the runs.
        on_run: called with each finished run's row (e.g. to log it).
    """
    from tqdm.auto import tqdm

    from dagan_gn.datasets.mixing import MixedRealSyntheticDataset
    from dagan_gn.runtime import resolve_device

    config = config or DownstreamConfig()
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise DownstreamError(f"unknown regime(s) {unknown}; choose from {list(REGIMES)}")
    if synthetic is None and any("dagan" in r or "both" in r for r in regimes):
        raise DownstreamError("the real+dagan / real+both regimes need a synthetic dataset (dagan augment output)")
    if len(real_train) == 0 or len(test) == 0:
        raise DownstreamError(f"need real training and test items (got {len(real_train)} and {len(test)})")
    ratio = config.synthetic_ratio
    if not (ratio == "balance" or (isinstance(ratio, (int, float)) and 0.0 <= float(ratio) <= 1.0)):
        raise DownstreamError(f"synthetic_ratio must be a number in [0, 1] or 'balance', got {ratio!r}")
    device = resolve_device(config.device)
    sample = real_train[0]["image"]
    in_channels, image_size = int(sample.shape[0]), int(sample.shape[-1])
    steps = config.epochs * max(1, len(real_train) // min(config.batch_size, len(real_train)))
    runs: list[dict[str, Any]] = []
    bar = tqdm(total=len(regimes) * len(config.seeds), desc="evaluate-augmentation", unit="run",
               disable=not progress)
    classical_models: dict[int, nn.Module] = {}  # seed → the real+albumentations classifier (rejection embedding)
    off_class: dict[int, torch.Tensor] = {}  # seed → per synthetic item: nearest another class's prototype
    stacked: list[tuple[torch.Tensor, torch.Tensor]] = []  # real and synthetic items as tensors, read once

    def off_class_for(seed: int) -> torch.Tensor:
        """:func:`off_class_mask` of the synthetic items in the seed's ``real+albumentations`` classifier's features
        (trained here first when that regime has not run yet): a classifier that never saw a variant."""
        if seed not in off_class:
            from dagan_gn.metrics.diversity import PenultimateFeatures

            model = classical_models.get(seed)
            if model is None:
                tf = classical_augmentation(config.augmentation, image_size)
                model = train_classifier(
                    MixedRealSyntheticDataset(real_train, None, synthetic_ratio=0.0, transform=tf, seed=seed),
                    num_classes, steps=steps, config=config, seed=seed, image_size=image_size,
                    in_channels=in_channels, device=device)
            features = PenultimateFeatures(model)
            if not stacked:
                stacked.extend((_stack(real_train), _stack(synthetic)))
            (real_x, real_y), (syn_x, syn_y) = stacked
            off_class[seed] = off_class_mask(lambda x: features(x.to(device)), real_x, real_y, syn_x, syn_y)
        return off_class[seed]

    def synthetic_for(seed: int) -> tuple[Dataset | None, float | None]:
        """The synthetic items of the DAGAN regimes for ``seed``: all, or those ``reject_off_class`` keeps."""
        if not config.reject_off_class or synthetic is None:
            return synthetic, None
        reject = off_class_for(seed)
        keep = torch.nonzero(~reject).flatten().tolist()
        if not keep:
            raise DownstreamError(f"seed {seed}: every synthetic item lies nearest another class's prototype")
        return torch.utils.data.Subset(synthetic, keep), float(reject.float().mean())

    for regime in regimes:
        for seed in config.seeds:
            tf = classical_augmentation(config.augmentation, image_size) if regime in (
                "real+albumentations", "real+both") else None
            use_syn = regime in ("real+dagan", "real+both")
            syn_data, rejected = synthetic_for(int(seed)) if use_syn else (None, None)
            try:
                data = MixedRealSyntheticDataset(real_train, syn_data if use_syn else None,
                                                 synthetic_ratio=config.synthetic_ratio if use_syn else 0.0,
                                                 transform=tf, seed=int(seed))
            except ValueError as exc:  # e.g. a class the synthetic data lacks for per-class balancing
                raise DownstreamError(f"regime {regime}: {exc}") from exc
            model = train_classifier(data, num_classes, steps=steps, config=config, seed=int(seed),
                                     image_size=image_size, in_channels=in_channels, device=device)
            row = {"regime": regime, "seed": int(seed),
                   **evaluate_classifier(model, test, num_classes, device=device),
                   "train_items": len(data), "synthetic_items": data.num_synthetic, "steps": steps}
            if regime == "real+albumentations":
                classical_models[int(seed)] = model
                if synthetic is not None:
                    # Class identity of the variants as a classifier that never saw one tells it.
                    row["synthetic_class_identity"] = 1.0 - float(off_class_for(int(seed)).float().mean())
            if rejected is not None:
                row["rejected_share"] = rejected
            runs.append(row)
            if on_run is not None:
                on_run(row)
            bar.update(1)
    bar.close()
    return DownstreamReport(
        runs=runs, class_names=list(class_names or [str(i) for i in range(num_classes)]), n_train=len(real_train),
        n_test=len(test), n_synthetic=0 if synthetic is None else len(synthetic), config=asdict(config),
    )

