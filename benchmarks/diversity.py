"""Cost of the diversity core (``dagan_gn/metrics/diversity.py``) at the sizes it is used at.

    python benchmarks/diversity.py [--threads 1] [--repeats 20]

Rows: ``diversity_ratios`` with ``pixel_l1`` on the training sample grid (8 sources × 7 variants, 64 px) with the
real-pair scale recomputed from 256 real images (1000 pairs per class, 3 classes) and with a precomputed
``reference``; ``ms_ssim_distance`` per 1000 pairs at 64 and 256 px. Best of ``--repeats`` after a warm-up.

Target (issue 10 §1): the training-grid call < 50 ms on a CPU, so ``dagan train`` can log it every sample step.
"""

from __future__ import annotations

import argparse

import torch
from _timing import best_seconds

from dagan_gn.metrics.diversity import diversity_ratios, ms_ssim_distance, pixel_l1, same_class_real_pairs


def best_ms(fn, repeats: int) -> float:
    return 1000 * best_seconds(fn, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    variants = torch.rand(8, 7, 1, 64, 64, generator=g) * 2 - 1
    labels = torch.arange(8) % 3
    real = torch.rand(256, 1, 64, 64, generator=g) * 2 - 1
    real_labels = torch.arange(256) % 3
    ref = same_class_real_pairs(real, real_labels, pixel_l1)
    rows = [
        ("diversity_ratios, pixel_l1, 8×7 @64 px, real pairs recomputed (3×1000)",
         best_ms(lambda: diversity_ratios(variants, labels, real, real_labels), args.repeats)),
        ("diversity_ratios, pixel_l1, 8×7 @64 px, precomputed reference",
         best_ms(lambda: diversity_ratios(variants, labels, None, None, reference=ref), args.repeats)),
    ]
    for size in (64, 256):
        a = torch.rand(250, 1, size, size, generator=g) * 2 - 1
        b = torch.rand(250, 1, size, size, generator=g) * 2 - 1
        rows.append((f"ms_ssim_distance, 1000 pairs @{size} px",
                     4 * best_ms(lambda: ms_ssim_distance(a, b), max(1, args.repeats // 10))))
    print(f"threads={args.threads}, best of {args.repeats}\n")
    print("| what | ms |\n| --- | ---: |")
    for what, ms in rows:
        print(f"| {what} | {ms:.1f} |")


if __name__ == "__main__":
    main()
