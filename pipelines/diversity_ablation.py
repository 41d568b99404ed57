"""Do the DAGAN's variants of one source differ? Train the demo-sized DAGAN under named settings and measure.

For each setting: train the demo's DAGAN (``dagan_gn.jobs.demo.demo_train_config``: ``tiny`` preset, the demo's
optimiser settings) on a patch file for ``--steps`` generator steps with the setting's overrides, draw ``--variants``
variants of every training patch with ``augment``'s per-variant noise seeds, and report

* **pixel diversity ratio**: mean |a − b| ([0, 1] scale) between two variants of the same source, divided by the
  mean |a − b| between two real training patches of the source's class, averaged over sources (1 = as varied as
  real data, 0 = copies);
* **blurred diversity ratio**: the same after a 4×4 mean pool — a generator whose variants differ only by
  pixel noise or a checkerboard texture scores high on the first ratio and near 0 on this one;
* **centred diversity ratio**: the same with each image's mean intensity removed — differences of structure rather
  than of overall brightness (a brightness shift is what classical augmentation already gives);
* **distance-to-source ratio**: mean |variant − source| over the same real same-class distance (0 = copies of the
  source; ~1 = as far from the source as another real patch of its class);
* **identity**: the share of variants whose nearest training patch (pixel L1, among all sources) is their own
  source — the demo's and ``dagan assess``'s definition;
* wall and CPU time of training (the budget; on a shared machine the CPU seconds of the process are the fairer
  comparison), and a contact sheet per setting.

::

    python pipelines/diversity_ablation.py --data /tmp/base/demo/patches.h5 --steps 150 --out /tmp/div \\
        --setting base= --setting ms1=loss.mode_seeking=1.0 \\
        --setting da=loss.diffaugment=translation,cutout --setting noires="model.g_kwargs={input_residual: false}"

``--truncations 0,0.5,0.6`` measures the same trained run at several noise bounds (``dagan augment --truncation``),
one row each. A setting is ``name=override;override;...`` (``;`` separates overrides, since values may hold commas). Each result
is appended as one JSON line to ``--log`` (default ``pipelines/results/diversity_log.jsonl``) and printed as a
Markdown table row. A setting whose run folder already holds a finished checkpoint is measured without retraining.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def blurred_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``pixel_l1`` after a 4×4 mean pool: differences of structure bigger than a few pixels."""
    from dagan_gn.metrics.diversity import pixel_l1

    return pixel_l1(F.avg_pool2d(a.float(), 4), F.avg_pool2d(b.float(), 4))


def centred_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``pixel_l1`` of the images minus their mean intensity: differences of structure, not of brightness."""
    from dagan_gn.metrics.diversity import pixel_l1

    def centre(t: torch.Tensor) -> torch.Tensor:
        return t.float() - t.float().mean(dim=(1, 2, 3), keepdim=True)

    return pixel_l1(centre(a), centre(b))


def diversity_figures(sources: torch.Tensor, variants: torch.Tensor, labels: np.ndarray, real: torch.Tensor,
                      real_labels: np.ndarray) -> dict[str, float]:
    """Mean diversity and distance-to-source ratios (``dagan_gn.metrics.diversity``, the definitions of ``dagan
    assess``) of ``variants`` [S, V, C, H, W] of ``sources`` [S, C, H, W], in the three distances above."""
    from dagan_gn.metrics.diversity import diversity_ratios, pixel_l1, source_distance_ratios

    out: dict[str, float] = {}
    for prefix, distance in (("", pixel_l1), ("blurred_", blurred_l1), ("centred_", centred_l1)):
        out[f"{prefix}diversity_ratio"] = float(
            diversity_ratios(variants, labels, real, real_labels, distance).nanmean())
        out[f"{prefix}source_distance_ratio"] = float(
            source_distance_ratios(sources, variants, labels, real, real_labels, distance).nanmean())
    return out


def measure(run_dir: Path, patches: Path, variants: int, seed: int, sheets: dict[float, Path]
            ) -> dict[float, dict[str, float]]:
    """Variants of every training patch (``augment``'s noise seeds), truncated at each bound of ``sheets`` (bound →
    contact sheet path), and their diversity and identity figures per bound. The generator and the patches are read
    once for all bounds."""
    from dagan_gn.metrics.diversity import source_identity
    from dagan_gn.datasets.patches import PatchDataset
    from dagan_gn.jobs.augment import generate_variants, noise_seed, write_contact_sheet
    from dagan_gn.training.families import load_generator

    generator, cfg, _ = load_generator(run_dir, device="cpu")
    ds = PatchDataset(patches, split="train")
    real = torch.stack([ds.read_image(i) for i in range(len(ds))])
    labels = ds.labels
    x = real.repeat_interleave(variants, dim=0)
    seeds = [noise_seed(seed, int(row), k) for row in ds.rows for k in range(variants)]
    y = torch.as_tensor(labels).repeat_interleave(variants) if cfg.model.num_classes > 0 else None
    figures: dict[float, dict[str, float]] = {}
    for truncation, sheet in sheets.items():
        fakes = generate_variants(generator, x, seeds, y, truncation=truncation).view(len(ds), variants,
                                                                                      *real.shape[1:])
        write_contact_sheet(real[:8], fakes[:8], sheet)
        identity = source_identity(real, fakes, labels, p=1.0)["nearest_is_source"]
        figures[truncation] = {**diversity_figures(real, fakes, labels, real, labels),
                               "identity": float(identity.float().mean())}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/base/demo/patches.h5"), help="HDF5 patch file")
    parser.add_argument("--out", type=Path, required=True, help="work folder (one run folder per setting)")
    parser.add_argument("--steps", type=int, default=150, help="DAGAN generator steps")
    parser.add_argument("--variants", type=int, default=4, help="variants per training patch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setting", action="append", default=[], help="name=override;override;... (repeatable)")
    parser.add_argument("--log", type=Path, default=Path(__file__).parent / "results" / "diversity_log.jsonl")
    parser.add_argument("--truncations", default="0",
                        help="comma-separated noise bounds to sample each run at (0: untruncated)")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    args = parser.parse_args()
    truncations = [float(t) for t in args.truncations.split(",")]

    from dagan_gn.jobs.demo import demo_train_config
    from dagan_gn.config import parse_setting
    from dagan_gn.jobs.train import train_unless_finished
    from dagan_gn.runtime import environment_info

    torch.set_num_threads(1)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    print("| setting | steps | train s (CPU s) | truncation | diversity | blurred | centred | dist. to source | "
          "identity | overrides |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for spec in args.setting or ["base="]:
        name, overrides = parse_setting(spec)
        run = args.out / name
        cfg = demo_train_config(args.data, steps=args.steps, seed=args.seed, progress=args.progress,
                                overrides=overrides)
        t0, c0 = time.perf_counter(), time.process_time()
        trained = train_unless_finished(cfg, run).trained_here
        seconds, cpu_seconds = ((time.perf_counter() - t0, time.process_time() - c0) if trained
                                else (float("nan"), float("nan")))
        sheets = {t: args.out / f"{name}{f'_t{t:g}' if t else ''}_contact_sheet.png" for t in truncations}
        for truncation, figures in measure(run, args.data, args.variants, args.seed, sheets).items():
            record = {"setting": name, "overrides": overrides, "steps": args.steps, "seed": args.seed,
                      "data": str(args.data), "variants": args.variants, "truncation": truncation,
                      "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1), **figures,
                      "time": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment_info(cfg.train.device)}
            with args.log.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(f"| {name} | {args.steps} | {seconds:.0f} ({cpu_seconds:.0f}) | {truncation:g} | "
                  f"{figures['diversity_ratio']:.3f} | {figures['blurred_diversity_ratio']:.3f} | "
                  f"{figures['centred_diversity_ratio']:.3f} | {figures['source_distance_ratio']:.3f} | "
                  f"{figures['identity']:.2f} | {'; '.join(overrides)} |", flush=True)


if __name__ == "__main__":
    main()
