"""The built-in demo: synthetic DICOM archive → patches → a small conditional DAGAN → synthetic variants.

It runs the same library functions a hospital pipeline calls (``extract_patches``, ``train``, ``augment``,
``memorization_report``), on data it generates itself, small enough to finish on a laptop CPU in a few minutes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from dagan_gn.config import ExperimentConfig

__all__ = ["DemoResult", "run_demo", "demo_train_config", "DEMO_TRAIN_OVERRIDES"]


#: The demo's training settings on top of the ``tiny`` preset, chosen by measurement (docs/augment.md, "Making the
#: variants differ"; ``pipelines/diversity_ablation.py``): without mode seeking the 4 variants of a source are
#: near-copies of each other (pixel diversity ratio 0.12), the unbounded MSGAN term overshoots (> 1: brightness swings)
#: and the PixelShuffle output draws a checkerboard unless it is smoothed.
DEMO_TRAIN_OVERRIDES: tuple[str, ...] = (
    "train.ema_start=0",
    "train.ema_decay=0.9",
    "data.batch_size=16",
    "data.num_workers=0",
    "optim.n_critic=2",
    "optim.g_lr=2e-4",
    "optim.d_lr=2e-4",
    "loss.mode_seeking=0.3",
    "loss.mode_seeking_target=0.6",
    "model.g_kwargs={smooth_output: true}",
    # Identity terms (docs/augment.md "Identity-keeping"): the critic's class head over the demo's classes and a
    # strong reconstruction L1(G(x, 0), x), so that the noise moves a variant *around* its source; with the noise
    # truncated at sampling (DEMO_TRUNCATION) the variants stay recognisably their source.
    "model.critic_classes=-1",
    "loss.class_weight=1.0",
    "loss.reconstruction=5.0",
)

#: Noise truncation of the demo's variants: the dial between identity and diversity. On the demo's patches (seed 0,
#: 150 steps) 0 gives pixel diversity 0.74 but only 12 % of the variants nearest their own source; 0.6 gives 0.26 and
#: 78 %; 0.5 gives 0.22 and 86 % (docs/augment.md "Identity-keeping").
DEMO_TRUNCATION = 0.6


#: The pseudonym salt of the demo's *synthetic* patients. A hospital's salt is random and secret; the demo's is fixed
#: because the patient-level split is a function of the pseudonyms: with a fresh random salt every run the demo's
#: train/val/test split (and so every figure it prints) changed from run to run (with 6 patients, a quarter of the
#: runs put all of them in train). With this salt and seed 0: 4 / 1 / 1 patients.
DEMO_SALT = "dagan demo (synthetic patients)"


@dataclass
class DemoResult:
    out_dir: Path
    dicom_dir: Path
    labels_csv: Path
    patches: Path
    run_dir: Path
    synthetic: Path
    contact_sheet: Path
    summary: dict = field(default_factory=dict)


def run_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_patients: int = 6,
    patch_size: int = 64,
    steps: int = 150,
    n_variants: int = 4,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole pipeline on a synthetic archive written under ``out_dir`` and return the produced paths.

    Every stage is seeded by ``seed``; the DAGAN uses the ``tiny`` preset (a few hundred MFLOP per patch) so the
    training stage takes about a minute on two CPU cores. Real training uses ``configs/dagan_mammo_256.yaml`` on a GPU.
    """
    from dagan_gn.jobs.augment import augment
    from dagan_gn.jobs.extract_patches import ExtractionOptions, extract_patches
    from dagan_gn.phantom.mammogram import make_demo_archive
    from dagan_gn.jobs.train import train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    log(f"[1/4] writing a synthetic DICOM archive of {n_patients} patients to {out_dir / 'archive'}")
    dicom_dir, labels_csv = make_demo_archive(out_dir / "archive", n_patients=n_patients, seed=seed)

    patches = out_dir / "patches.h5"
    log(f"[2/4] extracting {patch_size}x{patch_size} patches to {patches}")
    extraction = extract_patches(
        [dicom_dir], patches,
        ExtractionOptions(patch_size=patch_size, per_image=6, min_tissue=0.8, seed=seed, workers=1),
        labels_csv=labels_csv, progress=progress, salt=DEMO_SALT,
    )

    cfg = demo_train_config(patches, patch_size=patch_size, steps=steps, seed=seed, device=device,
                            progress=progress)
    run_dir = out_dir / "run"
    log(f"[3/4] training a tiny conditional DAGAN for {steps} generator steps in {run_dir}")
    train(cfg, run_dir)

    synthetic = out_dir / "synthetic.h5"
    contact_sheet = out_dir / "contact_sheet.png"
    log(f"[4/4] writing {n_variants} synthetic variants per training patch to {synthetic}")
    report = augment(
        patches, run_dir, synthetic, n=n_variants, seed=seed, device=device, contact_sheet=contact_sheet,
        progress=progress, truncation=DEMO_TRUNCATION,
    )

    pixel_diversity, pixel_distance, pixel_identity = variant_diversity(patches, synthetic, seed=seed)
    log(f"variants of one patch differ by {pixel_diversity:.2f}x what two real patches of its class differ "
        f"(pixel diversity ratio; 1 = as varied as real data, 0 = copies) and sit at {pixel_distance:.2f}x that "
        f"distance from their source; {pixel_identity:.0%} of them are nearer their own source than any other "
        f"training patch (identity); the full report: dagan assess --real {patches} --synthetic {synthetic} "
        f"--out {out_dir / 'assess'}")

    from dagan_gn.runtime import environment_info

    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "extraction": _as_dict(extraction),
        "augment": _as_dict(report),
        "pixel_diversity_ratio": pixel_diversity,
        "pixel_source_distance_ratio": pixel_distance,
        "pixel_identity": pixel_identity,
        "environment": environment_info(device),
    }
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"done in {summary['seconds']} s: patches {patches}, run {run_dir}, synthetic {synthetic}, "
        f"contact sheet {contact_sheet}")
    return DemoResult(out_dir, dicom_dir, labels_csv, patches, run_dir, synthetic, contact_sheet, summary)


def variant_diversity(patches: str | Path, synthetic: str | Path, *, seed: int = 0) -> tuple[float, float, float]:
    """Mean pixel diversity ratio, distance-to-source ratio and identity of the variants in ``synthetic`` (the
    definitions of ``dagan assess``, :mod:`dagan_gn.metrics.diversity`, on the train split's same-class real pairs;
    identity: the share of variants whose nearest source, in pixel L1 among every source of the file, is their own).
    Unlike ``dagan assess`` it needs no held-out split (a demo seed may put every synthetic patient in train) and no
    MONAI."""
    import numpy as np
    import torch

    from dagan_gn.metrics.diversity import (diversity_ratios, group_by_source, pixel_l1, source_distance_ratios,
                                            source_identity)
    from dagan_gn.store.patch_file import PatchFile

    with PatchFile(patches) as pf:
        train_rows = pf.split_indices("train")
        real_labels = pf.labels[train_rows]
        real_images = torch.from_numpy(pf.read_patches(train_rows, signed=True))
    with PatchFile(synthetic) as pf:
        sources, groups = group_by_source(pf.provenance("source_index"), pf.provenance("variant"))
        v = min(len(g) for g in groups)
        variant_rows = np.stack([g[:v] for g in groups])
        variants = torch.from_numpy(pf.read_patches(variant_rows, signed=True)).view(*variant_rows.shape,
                                                                                    *real_images.shape[1:])
    picked = np.minimum(np.searchsorted(train_rows, sources), len(train_rows) - 1)
    if not np.array_equal(train_rows[picked], sources):
        raise ValueError(f"{synthetic}: holds variants of patches outside the train split of {patches}")
    labels = real_labels[picked]
    diversity = diversity_ratios(variants, labels, real_images, real_labels, pixel_l1, seed=seed)
    distance = source_distance_ratios(real_images[picked], variants, labels, real_images, real_labels, pixel_l1,
                                      seed=seed)
    identity = source_identity(real_images[picked], variants, labels, p=1.0)["nearest_is_source"]
    return float(diversity.nanmean()), float(distance.nanmean()), float(identity.float().mean())


def demo_train_config(patches: str | Path, *, patch_size: int = 64, steps: int = 150, seed: int = 0,
                      device: str = "cpu", progress: bool = True, overrides: Sequence[str] = ()) -> "ExperimentConfig":
    """The demo's DAGAN training config: the ``tiny`` preset, :data:`DEMO_TRAIN_OVERRIDES`, the run's size/steps/seed
    and any further ``overrides`` (``pipelines/diversity_ablation.py`` measures alternatives with them)."""
    from dagan_gn.config import load_config
    from dagan_gn.nets.dagan import dagan_preset

    preset = [f"model.{k}={_yaml_value(v)}" for k, v in dagan_preset("tiny").items()]
    run = [
        f"model.image_size={patch_size}",
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"train.device={device}",
        f"train.progress={str(progress).lower()}",
        f"train.sample_every={max(1, steps // 3)}",
        f"train.log_every={max(1, steps // 30)}",
        f"train.checkpoint_every={max(1, steps // 2)}",
        f"data.path={patches}",
    ]
    return load_config(None, [*preset, *DEMO_TRAIN_OVERRIDES, *run, *overrides])


def _yaml_value(value: object) -> str:
    """Render a preset value for a ``key=value`` override (YAML flow style keeps lists and dicts intact)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _as_dict(obj: object) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return obj
    return {"value": str(obj)}
