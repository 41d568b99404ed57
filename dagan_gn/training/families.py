"""Model families: one registry entry per kind of GAN, the only place that knows how a family is built, trained and
sampled.

    family = get_family(cfg.model.name)             # "dagan", "cifar_resnet", "cifar_dcgan"
    generator, critic = family.build_networks(cfg.model)
    images = family.sample(generator, 1000, torch.Generator().manual_seed(0), dataset=patches, num_classes=3)

An entry holds the network builder (:mod:`dagan_gn.nets`), the training-step class (:mod:`dagan_gn.training.models`)
and the size of the periodic sample grid; its kind says how the generator is called:

* :class:`ImageToImageFamily` — ``G(x, z, y)`` makes a variant of a real image ``x`` (the DAGAN): it trains on
  same-class pairs, samples over the images of a dataset, and its grid shows each fixed source beside its variants.
* :class:`NoiseToImageFamily` — ``G(z, y)`` (the CIFAR-10 GANs): samples need noise (and labels) only.

The family also says what it trains on (:meth:`ModelFamily.training_dataset`: the images of the ``data.kind``'s
source, :mod:`dagan_gn.datasets.registry`, as same-class pairs for image-to-image families) and rebuilds a saved
generator (:func:`generator_from_state`, :func:`load_generator`).

Every generator forward outside training goes through :meth:`ModelFamily.generate` (eval mode, no gradients,
optional autocast, batched, float32 in [-1, 1] on the CPU): the trainer's grids and FID samples, ``dagan evaluate``,
the CIFAR-10 study and ``augment`` all sample through it. Adding a family is one :func:`register_family` call.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset

from dagan_gn.config import ConfigError, ExperimentConfig, ModelConfig, config_from_dict
from dagan_gn.datasets.registry import DataError, get_data_source, training_images
from dagan_gn.training.checkpoint import CheckpointError, first_line, load_checkpoint, resolve_checkpoint
from dagan_gn.training.models import DAGANModel, GANModel, UnconditionalGANModel, truncated_noise

if TYPE_CHECKING:  # pragma: no cover
    from dagan_gn.training.handlers import GridMetric

__all__ = [
    "ModelFamily",
    "ImageToImageFamily",
    "NoiseToImageFamily",
    "SampleInputs",
    "SampleGrid",
    "FixedGrid",
    "FAMILIES",
    "register_family",
    "get_family",
    "build_networks",
    "build_dataset",
    "generator_from_state",
    "load_generator",
    "eval_mode",
]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode (dropout off, norm running statistics) and restore its previous mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@dataclass
class SampleInputs:
    """Generator inputs, one row per image to make: ``noise [N, z_dim]``, ``sources [N, C, S, S]`` in [-1, 1] for
    image-to-image families (else None), ``labels [N]`` for class-conditional generators (else None)."""

    noise: torch.Tensor
    sources: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def __getitem__(self, rows: slice) -> "SampleInputs":
        return SampleInputs(self.noise[rows], None if self.sources is None else self.sources[rows],
                            None if self.labels is None else self.labels[rows])


@dataclass
class SampleGrid:
    """A drawn sample grid: ``images`` in display order (``nrow`` per row) and the ``generated`` images alone;
    for image-to-image families also the ``sources`` and the ``variants_per_source`` (``generated`` holds source
    ``i``'s variants at rows ``i * v ... i * v + v - 1``)."""

    images: torch.Tensor
    nrow: int
    generated: torch.Tensor
    sources: torch.Tensor | None = None
    variants_per_source: int | None = None
    #: Image-to-image families: the class of each source (whether or not the generator is class-conditional).
    source_labels: torch.Tensor | None = None


@dataclass
class FixedGrid:
    """The fixed inputs of the periodic sample grids (drawn once per run from the run's seed)."""

    inputs: SampleInputs
    #: Images per grid row.
    nrow: int
    #: Image-to-image families: the distinct source images (``inputs.sources`` repeats each one per variant).
    sources: torch.Tensor | None = None
    variants_per_source: int | None = None
    source_labels: torch.Tensor | None = None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class ModelFamily:
    """One kind of GAN: how to build its networks, which step class trains it, and how to sample it.

    Args:
        name: the ``ModelConfig.name`` that selects it.
        build: ``(ModelConfig) -> (generator, critic)``, from :mod:`dagan_gn.nets`.
        steps: the :class:`~dagan_gn.training.models.GANModel` subclass with its critic/generator steps.
        grid_size: images (noise-to-image) or source rows (image-to-image) in the periodic sample grid.
        description: one line for listings and docs.
    """

    #: True when the generator makes a variant of an input image, ``G(x, z, y)``.
    conditions_on_image: bool = False

    def __init__(self, name: str, *, build: Callable[[ModelConfig], tuple[nn.Module, nn.Module]],
                 steps: type[GANModel], grid_size: int, description: str = "") -> None:
        self.name = name
        self.build = build
        self.steps = steps
        self.grid_size = int(grid_size)
        self.description = description

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, steps={self.steps.__name__})"

    # ------------------------------------------------------------------ building
    def build_networks(self, model_cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
        """``(generator, critic)`` for ``model_cfg``; config problems are :class:`ConfigError` s naming the key."""
        return self.build(model_cfg)

    def train_steps(self, generator: nn.Module, critic: nn.Module, **kwargs: Any) -> GANModel:
        """The training-step object over the networks (arguments of :class:`GANModel`)."""
        return self.steps(generator, critic, **kwargs)

    # ------------------------------------------------------------------ data
    def training_dataset(self, cfg: ExperimentConfig) -> Dataset:
        """What this family trains on for ``cfg``: the training images of ``cfg.data``'s source (a
        :class:`~dagan_gn.datasets.registry.DataError` when they cannot be read)."""
        return training_images(cfg)

    def check_training_item(self, item: dict[str, Any]) -> None:
        """Refuse a training item this family cannot train on (a :class:`DataError` saying why)."""

    def evaluation_sources(self, cfg: ExperimentConfig, split: str | None) -> tuple[Dataset | None, str]:
        """What ``dagan evaluate`` samples over, and the split its real reference comes from: noise-to-image
        families sample from noise alone (None) and compare with the data source's reference images."""
        return None, "train"

    # ------------------------------------------------------------------ the one generator forward
    def generator_args(self, inputs: SampleInputs) -> tuple[torch.Tensor | None, ...]:
        """The positional arguments of this family's generator for ``inputs``."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self,
        generator: nn.Module,
        inputs: SampleInputs,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """Run ``generator`` on ``inputs`` in eval mode: ``[N, C, H, W]`` float32 in [-1, 1] on the CPU.

        Args:
            batch_size: rows per forward pass (default: all at once).
            device: where to run (default: the generator's device).
            amp_dtype: autocast dtype (the trainer's ``train.amp``), or None for full precision.
            channels_last: feed image inputs in NHWC (the trainer's ``train.channels_last``).
        """
        dev = torch.device(device) if device is not None else _module_device(generator)
        step = int(batch_size or len(inputs)) or 1
        out = []
        with eval_mode(generator):
            for start in range(0, len(inputs), step):
                args = []
                for value in self.generator_args(inputs[start : start + step]):
                    if value is not None:
                        value = value.to(dev, non_blocking=True)
                        if channels_last and value.dim() == 4:
                            value = value.contiguous(memory_format=torch.channels_last)
                    args.append(value)
                with _autocast(dev, amp_dtype):
                    out.append(generator(*args).float().clamp(-1, 1).cpu())
        if not out:
            raise ValueError("generate: no inputs")
        return torch.cat(out)

    # ------------------------------------------------------------------ random samples
    def sample(
        self,
        generator: nn.Module,
        n: int,
        rng: torch.Generator,
        *,
        dataset: Dataset | None = None,
        num_classes: int = 0,
        truncation: float = 0.0,
        batch_size: int = 64,
        device: torch.device | str | None = None,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """``n`` random samples ``[n, C, H, W]`` in [-1, 1] on the CPU, every random draw from ``rng`` (the same
        ``rng`` state and arguments give the same images; the global RNGs are not touched).

        Args:
            dataset: image-to-image families: the real images to make variants of (items with ``"image"`` and
                ``"label"``), taken in a random order from ``rng`` (cycling when ``n`` exceeds the dataset).
            num_classes: > 0 for a class-conditional generator: labels are the sources' (image-to-image) or drawn
                uniformly (noise-to-image).
            truncation: noise truncation bound (0: plain normal noise).
            batch_size: images drawn and generated per forward pass (it sets the order of the draws, so it is part
                of what a seeded sample depends on).
        """
        if n < 1:
            raise ValueError(f"sample: n must be >= 1, got {n}")
        out = [self.generate(generator, inputs, device=device, amp_dtype=amp_dtype, channels_last=channels_last)
               for inputs in self._random_inputs(generator, n, rng, dataset=dataset, num_classes=num_classes,
                                                 truncation=truncation, batch_size=int(batch_size))]
        return torch.cat(out)

    def _random_inputs(self, generator: nn.Module, n: int, rng: torch.Generator, *, dataset: Dataset | None,
                       num_classes: int, truncation: float, batch_size: int) -> Iterator[SampleInputs]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the periodic grid
    def grid_metrics(self, dataset: Dataset, seed: int) -> dict[str, "GridMetric"]:
        """Scalars of the periodic sample grid that the trainer logs as ``samples/<name>`` (none by default)."""
        return {}

    def fixed_grid(self, generator: nn.Module, dataset: Dataset, seed: int, *, num_classes: int = 0,
                   truncation: float = 0.0) -> FixedGrid:
        """The inputs of a run's sample grids, drawn once from ``seed`` (a private generator)."""
        raise NotImplementedError

    def sample_grid(self, generator: nn.Module, fixed: FixedGrid, **generate_kwargs: Any) -> SampleGrid:
        """The grid of ``fixed`` (arguments of :meth:`generate` in ``generate_kwargs``)."""
        raise NotImplementedError


class ImageToImageFamily(ModelFamily):
    """``G(x, z, y) -> x'``: variants of real images (the DAGAN)."""

    conditions_on_image = True

    def training_dataset(self, cfg: ExperimentConfig) -> Dataset:
        """Same-class pairs of the training images (a class with a single image is a :class:`DataError`)."""
        from dagan_gn.datasets.loader import same_class_pairs

        return same_class_pairs(training_images(cfg), cfg.train.seed, where=str(cfg.data.path), split=cfg.data.split)

    def evaluation_sources(self, cfg: ExperimentConfig, split: str | None) -> tuple[Dataset | None, str]:
        """The real images of ``split`` (default: the run's training split): variants are made of them and they are
        the reference they are compared with."""
        name = split or cfg.data.split
        source = get_data_source(cfg.data.kind)
        if source.split is None and name == cfg.data.split:  # a kind without splits: the images it trains on
            return training_images(cfg), name
        return source.split_images(cfg, name), name

    def check_training_item(self, item: dict[str, Any]) -> None:
        if "pair" not in item:
            raise DataError(f"model '{self.name}' needs same-class pairs: the dataset items have no 'pair' "
                            f"(SameClassPairDataset)")

    def generator_args(self, inputs: SampleInputs) -> tuple[torch.Tensor | None, ...]:
        if inputs.sources is None:
            raise ValueError(f"model '{self.name}' makes variants of images: the inputs need sources")
        return inputs.sources, inputs.noise, inputs.labels

    def _random_inputs(self, generator, n, rng, *, dataset, num_classes, truncation, batch_size):
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"model '{self.name}' samples variants of real images: pass a non-empty dataset")
        order = torch.randperm(len(dataset), generator=rng)
        z_dim = int(generator.z_dim)
        for start in range(0, n, batch_size):
            items = [dataset[int(order[i % len(order)])] for i in range(start, min(start + batch_size, n))]
            sources = torch.stack([it["image"] for it in items])
            labels = torch.tensor([int(it["label"]) for it in items]) if num_classes > 0 else None
            noise = truncated_noise(len(items), z_dim, truncation, generator=rng)
            yield SampleInputs(noise, sources, labels)

    def fixed_grid(self, generator, dataset, seed, *, num_classes=0, truncation=0.0, variants: int = 7):
        """``grid_size`` fixed sources, each with the same ``variants`` fixed noise vectors."""
        g = torch.Generator().manual_seed(seed + 12345)
        idx = torch.randperm(len(dataset), generator=g)[: min(self.grid_size, len(dataset))].tolist()
        items = [dataset[i] for i in idx]
        sources = torch.stack([it["image"] for it in items])
        labels = torch.tensor([int(it["label"]) for it in items])
        noise = truncated_noise(variants, int(generator.z_dim), truncation, generator=g)
        s = sources.shape[0]
        inputs = SampleInputs(noise.repeat(s, 1), sources.repeat_interleave(variants, dim=0),
                              labels.repeat_interleave(variants, dim=0) if num_classes > 0 else None)
        return FixedGrid(inputs, variants + 1, sources, variants, labels)

    def sample_grid(self, generator, fixed, **generate_kwargs):
        """Rows: a source followed by its variants, one per fixed noise vector."""
        sources, v = fixed.sources, int(fixed.variants_per_source)
        fakes = self.generate(generator, fixed.inputs, **generate_kwargs)
        rows = torch.cat([sources.unsqueeze(1), fakes.view(sources.shape[0], v, *sources.shape[1:])], dim=1)
        return SampleGrid(rows.reshape(-1, *sources.shape[1:]), fixed.nrow, fakes, sources, v, fixed.source_labels)

    def grid_metrics(self, dataset: Dataset, seed: int, *, max_real: int = 512) -> dict[str, "GridMetric"]:
        """``pixel_diversity_ratio``: the mean over the grid's sources of the pixel-L1 distance between a source's
        variants over that of random real same-class pairs (:func:`dagan_gn.metrics.diversity.diversity_ratios`;
        1 = as varied as real data, ~0 = the noise is ignored), so a run whose variants collapse shows it in
        TensorBoard while it trains. The real-pair scale is computed once, from up to ``max_real`` images of
        ``dataset`` chosen by ``seed``."""
        from dagan_gn.datasets.mixing import dataset_labels
        from dagan_gn.metrics.diversity import diversity_ratios, pixel_l1, same_class_real_pairs

        g = torch.Generator().manual_seed(seed + 54321)
        rows = torch.randperm(len(dataset), generator=g)[:max_real].tolist()
        all_labels = dataset_labels(dataset)
        labels = torch.as_tensor([int(all_labels[i]) for i in rows])
        images = torch.stack([dataset[i]["image"] for i in rows])
        reference = same_class_real_pairs(images, labels, pixel_l1, n_pairs=1000, seed=seed)

        def pixel_diversity_ratio(grid: SampleGrid) -> float:
            v = int(grid.variants_per_source)
            variants = grid.generated.view(grid.sources.shape[0], v, *grid.sources.shape[1:])
            ratios = diversity_ratios(variants, grid.source_labels, None, None, reference=reference)
            finite = ratios[torch.isfinite(ratios)]
            return float(finite.mean()) if len(finite) else float("nan")

        return {"pixel_diversity_ratio": pixel_diversity_ratio}


class NoiseToImageFamily(ModelFamily):
    """``G(z, y) -> image`` (the CIFAR-10 GANs), optionally class-conditional."""

    def generator_args(self, inputs: SampleInputs) -> tuple[torch.Tensor | None, ...]:
        return inputs.noise, inputs.labels

    def _random_inputs(self, generator, n, rng, *, dataset, num_classes, truncation, batch_size):
        z_dim = int(generator.z_dim)
        for start in range(0, n, batch_size):
            k = min(batch_size, n - start)
            noise = truncated_noise(k, z_dim, truncation, generator=rng)
            labels = torch.randint(num_classes, (k,), generator=rng) if num_classes > 0 else None
            yield SampleInputs(noise, None, labels)

    def fixed_grid(self, generator, dataset, seed, *, num_classes=0, truncation=0.0):
        """``grid_size`` fixed noise vectors; with classes, the labels cycle through them and each column is one
        class (when the classes fit in a row), else the grid is square."""
        n = self.grid_size
        g = torch.Generator().manual_seed(seed + 12345)
        noise = truncated_noise(n, int(generator.z_dim), truncation, generator=g)
        labels = torch.arange(n) % num_classes if num_classes > 0 else None
        nrow = num_classes if 0 < num_classes <= n else int(n**0.5)
        return FixedGrid(SampleInputs(noise, None, labels), max(1, nrow))

    def sample_grid(self, generator, fixed, **generate_kwargs):
        images = self.generate(generator, fixed.inputs, **generate_kwargs)
        return SampleGrid(images, fixed.nrow, images)


#: ``ModelConfig.name`` → its family.
FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add (or replace) a family under ``family.name``; returns it."""
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name`` (a :class:`ConfigError` listing the known ones otherwise)."""
    try:
        return FAMILIES[str(name)]
    except KeyError:
        raise ConfigError(f"unknown model '{name}' (config key model.name); choose one of: "
                          f"{', '.join(FAMILIES)}") from None


def build_networks(model_cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """``(generator, critic)`` of ``model_cfg``'s family.

    Raises:
        ConfigError: unknown ``model_cfg.name``, an unknown ``g_kwargs``/``d_kwargs`` key or an architecture the
            network cannot build; :class:`~dagan_gn.modules.norms.NormSpecError` for a bad norm spec (both
            :class:`~dagan_gn.errors.DaganError` s and ``ValueError`` s).
    """
    return get_family(model_cfg.name).build_networks(model_cfg)


def build_dataset(cfg: ExperimentConfig) -> Dataset:
    """The training Dataset of a config: its ``data.kind``'s images as its model family trains on them (same-class
    pairs for the DAGAN). Raises :class:`~dagan_gn.datasets.registry.DataError` (and :class:`ConfigError` for an
    unknown model)."""
    return get_family(cfg.model.name).training_dataset(cfg)


# ------------------------------------------------------------------ saved generators
def generator_from_state(
    state: dict[str, Any], path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, ExperimentConfig]:
    """The generator of an already loaded checkpoint (``path`` is only for messages), in eval mode on ``device``,
    with the EMA weights when ``use_ema`` and the checkpoint has them; and the run's config.

    Raises:
        CheckpointError: the stored config is invalid or the weights do not fit the generator it describes.
    """
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {exc}") from exc
    generator, _ = build_networks(cfg.model)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["generator"]
    try:
        generator.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit the generator built from its config: {first_line(exc)}"
        ) from exc
    generator.to(device).eval()
    return generator, cfg


def load_generator(
    run_dir_or_file: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, ExperimentConfig, Path]:
    """Rebuild the generator of a run from a checkpoint file or a run folder (its newest step checkpoint).

    Returns ``(generator in eval mode on device, the run's ExperimentConfig, checkpoint path)``; the EMA weights are
    used when ``use_ema`` and the checkpoint has them.
    """
    path = resolve_checkpoint(run_dir_or_file)
    generator, cfg = generator_from_state(load_checkpoint(path), path, device, use_ema)
    return generator, cfg, path


def _register_builtin_families() -> None:
    from dagan_gn.nets import build_cifar_dcgan, build_cifar_resnet, build_dagan

    register_family(ImageToImageFamily(
        "dagan", build=build_dagan, steps=DAGANModel, grid_size=8,
        description="conditional DAGAN: U-Net generator G(x, z, y) and pair critic D(x, x_other, y)"))
    register_family(NoiseToImageFamily(
        "cifar_resnet", build=build_cifar_resnet, steps=UnconditionalGANModel, grid_size=64,
        description="CIFAR-10 ResNet G(z, y) / D(x, y) (Gulrajani et al. 2017)"))
    register_family(NoiseToImageFamily(
        "cifar_dcgan", build=build_cifar_dcgan, steps=UnconditionalGANModel, grid_size=64,
        description="CIFAR-10 DCGAN-style G(z, y) / D(x, y) (the seed study's Simple-CNN)"))


_register_builtin_families()
