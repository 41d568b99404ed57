"""Low-data CIFAR-10: does DAGAN augmentation help a classifier trained on 50 or 100 images per class?

The check in the spirit of the DAGAN paper (Antoniou et al. 2017: Omniglot 69 % → 82 %), on data anyone can get:

1. keep ``--per-class`` training images per class (seeded) and ``--test-per-class`` test images, and write them as a
   patch file (3 channels, 32 px; train/test splits) so the standard tools apply unchanged;
2. train a class-conditional DAGAN on those training images only (``dagan_gn.training.trainer.train``) with
   ``--config`` (default ``configs/dagan_cifar10_lowdata.yaml``) and any ``section.key=value`` overrides;
3. ``augment``: ``--n`` variants per training image;
4. ``check_memorization_files``: are the variants copies of the few training images?
5. ``assess``: diversity and distance to source (pixel, MS-SSIM, classifier features), class consistency and KID
   against the test images (``--assess-sources`` sources, ``--assess-heldout`` test images: Inception on a CPU is
   slow);
6. ``evaluate_augmentation_files``: the same small MONAI ResNet under real / +albumentations / +DAGAN / +both over
   ``--seeds`` seeds, accuracy and AUC on the test images with 95 % CIs (Markdown table and PNG bar chart).

    python pipelines/cifar10_lowdata.py --train-data ../shared/data/cifar10/cifar10-jpeg-train.zip \\
        --test-data ../shared/data/cifar10/cifar10-jpeg-test.zip --per-class 50 --out work/cifar_lowdata
    python pipelines/cifar10_lowdata.py ... --smoke      # minutes on a CPU: tiny nets, few steps (plumbing check)
    python pipelines/cifar10_lowdata.py ... loss.mode_seeking=0 loss.diffaugment=   # an ablation

Every step is skipped when its output exists, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np


def write_cifar_patch_file(train_path: str, test_path: str, out: Path, per_class: int, test_per_class: int,
                           seed: int) -> Path:
    """The low-data subset as a patch file: uint8 → the uint16 intensity scale, 3×32×32, splits train/test."""
    from dagan_gn.datasets.cifar10 import load_cifar10
    from dagan_gn.store.patch_file import PatchWriter, to_uint16

    if out.exists():
        return out
    tr_x, tr_y, names = load_cifar10(train_path, "train", limit_per_class=per_class, seed=seed)
    te_x, te_y, te_names = load_cifar10(test_path, "test", limit_per_class=test_per_class, seed=seed)
    if list(te_names) != list(names):
        raise SystemExit(f"train and test class lists differ: {names} vs {te_names}")
    images = np.concatenate([tr_x, te_x]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    labels = np.concatenate([tr_y, te_y])
    split = ["train"] * len(tr_y) + ["test"] * len(te_y)
    with PatchWriter(out, patch_size=32, channels=3, class_names=names, provenance={"cifar_index": "int64"},
                     parameters={"per_class": per_class, "test_per_class": test_per_class, "seed": seed}) as w:
        w.append(to_uint16(images), labels, split, {"cifar_index": np.arange(len(labels))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="DAGAN config overrides")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" /
                        "dagan_cifar10_lowdata.yaml", help="DAGAN YAML config")
    parser.add_argument("--train-data", required=True, help="CIFAR-10 archive/folder/zip holding the train split")
    parser.add_argument("--test-data", default=None, help="... holding the test split (default: --train-data)")
    parser.add_argument("--out", type=Path, required=True, help="work folder")
    parser.add_argument("--per-class", type=int, default=50, help="training images per class (low-data regime)")
    parser.add_argument("--test-per-class", type=int, default=200, help="test images per class")
    parser.add_argument("--steps", type=int, default=None, help="DAGAN generator steps (default: the config's)")
    parser.add_argument("--n", type=int, default=10, help="synthetic variants per training image")
    parser.add_argument("--epochs", type=int, default=30, help="classifier passes over the real training images")
    parser.add_argument("--width", type=int, default=16, help="classifier width")
    parser.add_argument("--seeds", type=int, default=5, help="classifier seeds per regime")
    parser.add_argument("--synthetic-ratio", default="0.5", help="synthetic fraction, or 'balance'")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--assess-sources", type=int, default=50, help="sources assessed (their variants: KID)")
    parser.add_argument("--assess-heldout", type=int, default=500, help="test images for KID and class consistency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny everything: checks the plumbing in minutes")
    args = parser.parse_args()

    from dagan_gn.config import load_config
    from dagan_gn.jobs.assess import assess
    from dagan_gn.jobs.augment import augment
    from dagan_gn.jobs.downstream import evaluate_augmentation_files
    from dagan_gn.metrics.downstream import DownstreamConfig
    from dagan_gn.jobs.memorization import check_memorization_files
    from dagan_gn.jobs.train import train_unless_finished

    if args.smoke:
        args.per_class, args.test_per_class, args.steps, args.n = min(args.per_class, 10), 10, 4, 2
        args.assess_sources, args.assess_heldout = 10, 50
        args.epochs, args.width, args.seeds = 1, 4, 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    patches = write_cifar_patch_file(args.train_data, args.test_data or args.train_data, out / "patches.h5",
                                     args.per_class, args.test_per_class, args.seed)
    print(f"[1/6] {patches}: {args.per_class} train and {args.test_per_class} test images per class")

    smoke = ["model.z_dim=16", "model.g_width=8", "model.d_width=8", "data.batch_size=8", "optim.n_critic=1"]
    cfg = load_config(args.config, [*(smoke if args.smoke else []), *args.overrides])
    steps = args.steps or cfg.train.steps
    cfg.data = dataclasses.replace(cfg.data, kind="patches", path=str(patches), split="train")
    cfg.train = dataclasses.replace(cfg.train, steps=steps, seed=args.seed, device=args.device,
                                    ema_start=min(cfg.train.ema_start, steps // 4),
                                    checkpoint_every=max(1, steps // 10), sample_every=max(1, steps // 10))
    run = out / "run"
    train_unless_finished(cfg, run)
    print(f"[2/6] DAGAN trained on {args.per_class} images per class: {run}")

    synthetic = out / "synthetic.h5"
    if not synthetic.exists():
        rep = augment(patches, run, synthetic, n=args.n, seed=args.seed, device=args.device,
                      contact_sheet=out / "contact_sheet.png")
        print(rep.summary())
    print(f"[3/6] synthetic variants: {synthetic}")

    mem = check_memorization_files(patches, synthetic, out / "reports", heldout_splits=("test",), seed=args.seed,
                                   device=args.device)
    print(f"[4/6] memorization: {'PASSED' if mem.passed() else 'FAILED'} (see {out / 'reports' / 'memorization.md'})")

    if not (out / "assess" / "assess.json").exists():
        rep_a = assess(patches, synthetic, out / "assess", max_sources=args.assess_sources,
                       max_heldout=args.assess_heldout, feature_extractor="tiny" if args.smoke else "inception",
                       device=args.device, seed=args.seed)
        print(rep_a.summary_table())
    print(f"[5/6] assessment: {out / 'assess' / 'assess.md'}")

    ratio = args.synthetic_ratio if args.synthetic_ratio == "balance" else float(args.synthetic_ratio)
    dcfg = DownstreamConfig(width=args.width, epochs=args.epochs, seeds=list(range(args.seed, args.seed + args.seeds)),
                            augmentation="natural", synthetic_ratio=ratio, device=args.device)
    report = evaluate_augmentation_files(patches, synthetic, out / "reports", config=dcfg)
    print("[6/6]")
    print(report.to_markdown())


if __name__ == "__main__":
    main()
