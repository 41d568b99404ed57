"""The CIFAR-10 normalization study: architecture × critic norm × generator norm × seed, one command.

    run_study("cifar-10-python.tar.gz", "results/", preset="seed-10k")

Every *cell* (one architecture, critic norm, generator norm and seed) is trained with
:func:`dagan_gn.training.trainer.train` (WGAN-GP) into ``OUT/cells/<cell>/run``, then scored: FID, KID and (when the
Inception weights have a classifier) IS against training images via torch-fidelity, and the Xiang & Li test-set
reconstruction error. A cell is done when ``OUT/cells/<cell>/result.json`` exists; a killed cell resumes from its
newest checkpoint, so re-running the same command finishes the sweep. The folder then holds:

* ``results.md`` — the table (mean ± std over seeds) beside the seed study's published Inception Scores;
* ``results.json`` — every cell's numbers;
* ``fid_vs_step.png`` — FID during training for each cell (when the preset evaluates during training);
* ``grids/<cell>.png`` — 8×8 sample grids.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from dagan_gn.errors import DaganError
from dagan_gn.config import ExperimentConfig, config_from_dict, config_to_dict
from dagan_gn.fileio import atomic_write_text, save_figure

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI can list the presets without it
    import torch

__all__ = [
    "ARCHS",
    "CRITIC_NORMS",
    "GENERATOR_NORMS",
    "PUBLISHED_IS",
    "StudyPreset",
    "PRESETS",
    "Cell",
    "StudyError",
    "plan_cells",
    "cell_config",
    "run_cell",
    "run_study",
    "write_report",
]

#: Study architecture name → ``ModelConfig.name`` (the family's name without ``cifar_``; the seed study calls the
#: DCGAN-style network "Simple-CNN").
ARCHS = {"resnet": "cifar_resnet", "dcgan": "cifar_dcgan"}
CRITIC_NORMS = ("none", "batch", "layer", "instance", "group", "weight", "spectral")
GENERATOR_NORMS = ("batch", "group")
#: The seed study's Inception Scores (ResNet/Simple-CNN WGAN-GP on CIFAR-10, 10k steps), keyed by
#: (architecture, critic norm). The seed names "Simple-CNN" without a norm; we read that as no critic norm.
PUBLISHED_IS = {
    ("resnet", "layer"): 3.632,
    ("resnet", "group"): 3.841,
    ("dcgan", "none"): 3.261,
    ("dcgan", "group"): 3.324,
}


class StudyError(DaganError, RuntimeError):
    """A study option is invalid (unknown preset, architecture or norm); the message lists the choices."""


@dataclass(frozen=True)
class StudyPreset:
    """Steps, sizes and sample counts of a sweep."""

    name: str
    steps: int
    batch_size: int
    #: Network widths per architecture: {arch: (g_width, d_width)}.
    widths: dict
    z_dim: int
    n_critic: int
    lr: float
    ema_decay: float
    ema_start: int
    #: Generated (and reference) images for the final FID/KID/IS.
    num_samples: int
    kid_subset_size: int
    #: FID during training every this many steps (0: never) on this many samples (FID-vs-step curves).
    eval_every: int
    eval_samples: int
    #: Held-out test images for the reconstruction error, and latent-search steps.
    recon_images: int
    recon_steps: int
    #: Training images per class (0: all 5,000).
    limit_per_class: int
    archs: tuple = ("resnet", "dcgan")
    critic_norms: tuple = CRITIC_NORMS
    generator_norms: tuple = GENERATOR_NORMS
    seeds: tuple = (0,)
    checkpoint_every: int = 1000
    sample_every: int = 1000
    log_every: int = 100
    num_workers: int = 2


PRESETS: dict[str, StudyPreset] = {
    # Minutes on a 2-core CPU: tiny nets, a handful of steps, two critic norms, small sample counts (KID suits small
    # n). Checks the machinery end to end; its numbers say nothing about the norms.
    "smoke": StudyPreset(
        name="smoke", steps=4, batch_size=16, widths={"resnet": (16, 16), "dcgan": (16, 16)}, z_dim=32,
        n_critic=2, lr=2e-4, ema_decay=0.0, ema_start=0, num_samples=64, kid_subset_size=32, eval_every=2,
        eval_samples=32, recon_images=16, recon_steps=50, limit_per_class=20, critic_norms=("layer", "group"),
        generator_norms=("group",), checkpoint_every=2, sample_every=4, log_every=1, num_workers=0,
    ),
    # The seed study's protocol: 10k generator steps, Gulrajani widths, 10k samples (GPU).
    "seed-10k": StudyPreset(
        name="seed-10k", steps=10_000, batch_size=64, widths={"resnet": (128, 128), "dcgan": (64, 64)},
        z_dim=128, n_critic=5, lr=2e-4, ema_decay=0.999, ema_start=1000, num_samples=10_000, kid_subset_size=1000,
        eval_every=1000, eval_samples=5000, recon_images=1000, recon_steps=50, limit_per_class=0, seeds=(0, 1, 2),
    ),
    # The WGAN-GP paper's length: 100k generator steps, 50k samples for FID (GPU, hours per cell).
    "full-100k": StudyPreset(
        name="full-100k", steps=100_000, batch_size=64, widths={"resnet": (128, 128), "dcgan": (64, 64)},
        z_dim=128, n_critic=5, lr=2e-4, ema_decay=0.9999, ema_start=5000, num_samples=50_000, kid_subset_size=1000,
        eval_every=5000, eval_samples=10_000, recon_images=1000, recon_steps=50, limit_per_class=0,
        checkpoint_every=5000, sample_every=5000,
    ),
}


@dataclass(frozen=True)
class Cell:
    arch: str
    critic_norm: str
    generator_norm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch}-D{self.critic_norm}-G{self.generator_norm}-s{self.seed}"

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.arch, self.critic_norm, self.generator_norm)


def _check_choices(values: Sequence[str], allowed: Sequence[str], what: str) -> tuple:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise StudyError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    if not values:
        raise StudyError(f"no {what} selected")
    return tuple(values)


def get_preset(name: str) -> StudyPreset:
    if name not in PRESETS:
        raise StudyError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def plan_cells(
    preset: StudyPreset,
    archs: Sequence[str] | None = None,
    critic_norms: Sequence[str] | None = None,
    generator_norms: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Cell]:
    """The sweep's cells (preset defaults for anything not given), in a stable order."""
    archs = _check_choices(archs or preset.archs, tuple(ARCHS), "architecture(s)")
    dn = _check_choices(critic_norms or preset.critic_norms, CRITIC_NORMS, "critic norm(s)")
    gn = _check_choices(generator_norms or preset.generator_norms, GENERATOR_NORMS, "generator norm(s)")
    seeds = tuple(int(s) for s in (seeds if seeds is not None and len(seeds) else preset.seeds))
    return [Cell(a, d, g, s) for a in archs for d in dn for g in gn for s in seeds]


def cell_config(
    cell: Cell,
    preset: StudyPreset,
    data: str | os.PathLike,
    *,
    device: str = "auto",
    feature_extractor: str = "inception",
    inception_weights: str = "",
    progress: bool = False,
) -> ExperimentConfig:
    """The :class:`ExperimentConfig` that trains one cell (WGAN-GP, Adam(0, 0.9), linear decay)."""
    g_width, d_width = preset.widths[cell.arch]
    cfg = ExperimentConfig()
    cfg.model = dataclasses.replace(
        cfg.model, name=ARCHS[cell.arch], image_size=32, channels=3, z_dim=preset.z_dim, g_width=g_width,
        d_width=d_width, g_norm=cell.generator_norm, d_norm=cell.critic_norm, num_classes=0, dropout=0.0,
    )
    cfg.data = dataclasses.replace(
        cfg.data, kind="cifar10", path=str(data), limit_per_class=preset.limit_per_class,
        batch_size=preset.batch_size, num_workers=preset.num_workers, hflip=True,
    )
    cfg.loss = dataclasses.replace(cfg.loss, name="wgan-gp", gp_weight=10.0)
    cfg.optim = dataclasses.replace(
        cfg.optim, g_lr=preset.lr, d_lr=preset.lr, betas=[0.0, 0.9], n_critic=preset.n_critic, lr_decay="linear"
    )
    cfg.train = dataclasses.replace(
        cfg.train, steps=preset.steps, seed=cell.seed, device=device, ema_decay=preset.ema_decay,
        ema_start=preset.ema_start, log_every=preset.log_every, sample_every=preset.sample_every,
        checkpoint_every=preset.checkpoint_every, keep_checkpoints=2, progress=progress,
    )
    cfg.metrics = dataclasses.replace(
        cfg.metrics, eval_every=preset.eval_every, num_samples=preset.eval_samples, metrics=["fid"],
        kid_subset_size=min(preset.kid_subset_size, preset.eval_samples), feature_extractor=feature_extractor,
        inception_weights=inception_weights or "",
    )
    return config_from_dict(config_to_dict(cfg))  # validates types like a YAML config would be


def _fid_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    from dagan_gn.training.run_log import read_metrics

    curve = {}
    for rec in read_metrics(path):
        v = rec.get("eval/fid")
        if isinstance(v, (int, float)) and math.isfinite(v):
            curve[int(rec["step"])] = float(v)
    return sorted(curve.items())


def _start_step(run_dir: Path) -> int:
    """The step the newest checkpoint of ``run_dir`` reached (0 when there is none yet)."""
    from dagan_gn.training.checkpoint import checkpoint_step, latest_checkpoint

    latest = latest_checkpoint(run_dir)
    return checkpoint_step(latest) if latest is not None else 0


def run_cell(
    cell: Cell,
    preset: StudyPreset,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    device: str = "auto",
    feature_extractor: str = "inception",
    inception_weights: str = "",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict:
    """Train (or resume) one cell and score it; writes ``cells/<cell>/result.json`` and ``grids/<cell>.png`` and
    returns the result. A cell whose ``result.json`` exists is loaded, not recomputed."""
    import torch

    from dagan_gn.datasets.cifar10 import CIFAR10Dataset
    from dagan_gn.metrics.fidelity import compute_fidelity, reference_images_for_config
    from dagan_gn.metrics.reconstruction import reconstruction_error
    from dagan_gn.runtime import environment_info, resolve_device, seed_everything
    from dagan_gn.training.families import load_generator
    from dagan_gn.training.families import get_family
    from dagan_gn.training.run_log import save_image_grid
    from dagan_gn.jobs.train import train

    out = Path(out)
    cell_dir = out / "cells" / cell.name
    result_path = cell_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    cfg = cell_config(
        cell, preset, data, device=device, feature_extractor=feature_extractor,
        inception_weights=inception_weights, progress=progress,
    )
    run_dir = cell_dir / "run"
    start = _start_step(run_dir)
    seed_everything(cell.seed)
    t0 = time.perf_counter()
    train(cfg, run_dir, resume=True)
    wall = time.perf_counter() - t0
    dev = resolve_device(device)

    generator, _, ckpt = load_generator(run_dir, device=dev, use_ema=True)
    fake = get_family(cfg.model.name).sample(generator, preset.num_samples,
                                             torch.Generator().manual_seed(10_000 + cell.seed), batch_size=500,
                                             device=dev)
    reference, ref_key = reference_images_for_config(cfg, preset.num_samples)
    wanted = ("fid", "kid", "isc")
    scores = compute_fidelity(
        fake, reference, metrics=wanted, inception_weights=inception_weights or None,
        feature_extractor=feature_extractor, device=dev, kid_subset_size=preset.kid_subset_size,
        cache_key=ref_key, cache_dir=cache_dir,
    )
    test = CIFAR10Dataset(data, "test", limit_per_class=max(1, math.ceil(preset.recon_images / 10)), seed=0)
    test_images = test.images_uint8[: preset.recon_images].float() / 255.0
    recon = reconstruction_error(generator, test_images, steps=preset.recon_steps, device=dev)

    grid_path = save_image_grid(fake[:64], out / "grids" / f"{cell.name}.png", nrow=8)
    trained = max(preset.steps - start, 0)
    result = {
        "cell": cell.name,
        **dataclasses.asdict(cell),
        "preset": preset.name,
        "steps": preset.steps,
        "checkpoint": str(ckpt.relative_to(out)) if ckpt.is_relative_to(out) else str(ckpt),
        **{k: v for k, v in scores.items()},
        "recon_mse": recon.mean,
        "wall_s": wall,
        "steps_trained_this_call": trained,
        "it_per_s": trained / wall if wall > 0 and trained else float("nan"),
        "fid_curve": _fid_curve(run_dir),
        "device": _device_name(dev),
        "environment": environment_info(dev),
        "feature_extractor": feature_extractor,
        "grid": str(grid_path.relative_to(out)),
    }
    atomic_write_text(result_path, json.dumps(result, indent=2, default=float))
    return result


def _device_name(dev: "torch.device") -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------------------- the report


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals)) if len(vals) > 1 else 0.0


def _fmt(ms: tuple[float, float] | None, digits: int = 3, n: int = 1, scale: float = 1.0) -> str:
    if ms is None:
        return "—"
    m, s = ms[0] * scale, ms[1] * scale
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def write_report(results: list[dict], out: str | os.PathLike, preset: StudyPreset) -> Path:
    """Write ``results.md``, ``results.json`` and ``fid_vs_step.png`` for ``results`` (one dict per cell)."""
    out = Path(out)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["arch"], r["critic_norm"], r["generator_norm"]), []).append(r)
    devices = sorted({r.get("device", "?") for r in results})
    extractors = sorted({r.get("feature_extractor", "?") for r in results})
    isc_note = next((r["isc_unavailable"] for r in results if r.get("isc_unavailable")), None)
    lines = [
        f"# CIFAR-10 normalization study — preset `{preset.name}`",
        "",
        f"{preset.steps} generator steps, batch {preset.batch_size}, n_critic {preset.n_critic}, "
        f"{preset.num_samples} samples for FID/KID/IS against {preset.num_samples} training images, "
        f"reconstruction error on {preset.recon_images} test images ({preset.recon_steps} RMSprop steps).",
        f"Device: {', '.join(devices)}. Feature extractor: {', '.join(extractors)}.",
        "",
    ]
    if preset.name == "smoke":
        lines += ["**Smoke preset: tiny networks and a handful of steps. These numbers check the machinery; they say "
                  "nothing about the norms.**", ""]
    if "tiny" in extractors:
        lines += ["FID/KID/IS here use the *tiny* random-conv feature extractor: not comparable to Inception numbers.", ""]
    lines += [
        "| architecture | critic norm | generator norm | seeds | IS | FID | KID ×10³ | recon MSE | wall time (s) | it/s "
        "| seed study IS (10k steps) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (arch, dn, gn), rs in sorted(groups.items()):
        n = len(rs)
        isc = _mean_std([r.get("isc_mean", float("nan")) for r in rs])
        fid = _mean_std([r.get("fid", float("nan")) for r in rs])
        if n > 1:
            kid = _fmt(_mean_std([r.get("kid_mean", float("nan")) for r in rs]), 2, n, 1e3)
        else:
            k = rs[0]
            kid = (f"{k['kid_mean'] * 1e3:.2f} ± {k.get('kid_std', 0) * 1e3:.2f}"
                   if isinstance(k.get("kid_mean"), (int, float)) else "—")
        recon = _mean_std([r.get("recon_mse", float("nan")) for r in rs])
        wall = _mean_std([r.get("wall_s", float("nan")) for r in rs])
        its = _mean_std([r.get("it_per_s", float("nan")) for r in rs])
        pub = PUBLISHED_IS.get((arch, dn))
        lines.append(
            f"| {arch} | {dn} | {gn} | {n} | {_fmt(isc, 3, n) if isc else 'n/a'} | {_fmt(fid, 2, n)} | {kid} | "
            f"{_fmt(recon, 4, n)} | {_fmt(wall, 1, n)} | {_fmt(its, 2, n)} | {pub if pub is not None else ''} |"
        )
    lines += [
        "",
        "KID: mean ± std over seeds (with one seed: ± std over KID subsets). IS: n/a when the Inception weights have "
        "no classifier head.",
    ]
    if isc_note:
        lines += ["", f"IS: {isc_note}."]
    lines += [
        "",
        "Seed study (published, ResNet/Simple-CNN WGAN-GP, 10k steps): ResNet+LN IS 3.632, ResNet+GN IS 3.841, "
        "Simple-CNN 3.261, Simple-CNN+GN 3.324 (read here as critic norms; 'Simple-CNN' is our 'dcgan' with no critic "
        "norm).",
        "",
    ]
    curve = _plot_curves(results, out / "fid_vs_step.png")
    if curve is not None:
        lines += ["![FID vs step](fid_vs_step.png)", ""]
    lines += ["Sample grids:", ""] + [f"- [{r['cell']}]({r['grid']})" for r in results if r.get("grid")]
    report = out / "results.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _plot_curves(results: list[dict], path: Path) -> Path | None:
    curves = [(r["cell"], r.get("fid_curve") or []) for r in results]
    curves = [(name, c) for name, c in curves if c]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, c in curves:
        steps, fids = zip(*c)
        ax.plot(steps, fids, marker="o", markersize=3, label=name)
    ax.set_xlabel("generator step")
    ax.set_ylabel("FID (during training)")
    ax.set_title("FID vs step")
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


# --------------------------------------------------------------------------------------------- the sweep


def run_study(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str = "smoke",
    archs: Sequence[str] | None = None,
    critic_norms: Sequence[str] | None = None,
    generator_norms: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    device: str = "auto",
    feature_extractor: str = "inception",
    inception_weights: str = "",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or finish) the sweep and write the report; returns ``OUT/results.md``.

    Cells already done (``result.json``) are skipped; a killed cell resumes from its newest checkpoint.
    """
    from tqdm.auto import tqdm

    from dagan_gn.datasets.cifar10 import load_cifar10

    p = get_preset(preset)
    cells = plan_cells(p, archs, critic_norms, generator_norms, seeds)
    # Fail on bad data or missing weights before the first cell trains.
    load_cifar10(data, "test", limit_per_class=1)
    if feature_extractor in ("inception", "inception-v3-compat"):
        from dagan_gn.metrics.inception import resolve_inception_weights

        resolve_inception_weights(inception_weights or None, cache_dir=cache_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / "study.json",
        json.dumps({"preset": dataclasses.asdict(p), "cells": [c.name for c in cells], "data": str(data),
                    "feature_extractor": feature_extractor}, indent=2, default=list),
    )
    results = []
    for cell in tqdm(cells, desc="cells", unit="cell", disable=not progress):
        done = (out / "cells" / cell.name / "result.json").is_file()
        log(f"{'skip (done)' if done else 'run'} {cell.name}")
        results.append(
            run_cell(cell, p, data, out, device=device, feature_extractor=feature_extractor,
                     inception_weights=inception_weights, cache_dir=cache_dir, progress=False)
        )
        write_report(results, out, p)  # a partial report after every cell
    return write_report(results, out, p)
