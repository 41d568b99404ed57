"""FLOPs, parameters and CPU throughput of the DAGAN presets against a reference UResNet, plus the CIFAR nets.

    python benchmarks/nets_flops.py [--threads 1 2] [--batch 8] [--repeats 3] [--sizes 64 128 256]

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (one multiply-add = 2 FLOPs, convs and matmuls only) on
the timed batch, per patch (the resampling convolutions fold only for large enough batches, so the count depends on
the batch, ``dagan_gn/modules/resample.py``); throughput is generator forwards under ``torch.inference_mode`` with ``--batch`` patches and
each of ``--threads`` intra-op thread counts, best of ``--repeats`` after one warm-up. Both 1 and 2 threads are
timed because on a shared 2-core machine two OpenMP threads collapse (4× slower) as soon as another process holds a
core, while one thread does not; the speed-up column compares the best setting of each network. The *reference UResNet* is the DAGAN ports'
generator shape (Antoniou et al.'s UResNet: densely connected 3×3 conv stages of widths 64-64-128-128 starting at full
resolution, mirrored decoder with skips); it is the baseline of the speed-up column, measured in the same run.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _timing import best_seconds

from dagan_gn.config import ModelConfig
from dagan_gn.nets import dagan_preset
from dagan_gn.training.families import build_networks


class _DenseStage(nn.Module):
    """``inner`` densely connected conv3×3 → norm → LeakyReLU layers (each sees the stage input and all earlier
    outputs), as in the DAGAN UResNet stages."""

    def __init__(self, in_ch: int, width: int, inner: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(in_ch + i * width, width, 3, padding=1) for i in range(inner))
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv, norm in zip(self.convs, self.norms):
            feats.append(F.leaky_relu(norm(conv(torch.cat(feats, 1))), 0.2))
        return feats[-1]


class ReferenceUResNet(nn.Module):
    """Baseline: the DAGAN ports' UResNet generator (widths 64-64-128-128 from full resolution, 3 dense layers per
    stage, stride-2 conv down, nearest-upsample + conv up, encoder skips, noise map at the bottleneck)."""

    def __init__(self, channels: int = 1, widths: tuple[int, ...] = (64, 64, 128, 128), inner: int = 3,
                 z_dim: int = 128, image_size: int = 256) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        prev = widths[0]
        for i, w in enumerate(widths):
            self.enc.append(_DenseStage(prev, w, inner))
            nxt = widths[i + 1] if i + 1 < len(widths) else w
            self.down.append(nn.Conv2d(w, nxt, 3, stride=2, padding=1))
            prev = nxt
        low = image_size // 2 ** len(widths)
        self.low = low
        self.z_proj = nn.Linear(z_dim, 8 * low * low)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        prev = widths[-1] + 8
        for w in reversed(widths):
            self.up.append(nn.Conv2d(prev, w, 3, padding=1))
            self.dec.append(_DenseStage(2 * w, w, inner))
            prev = w
        self.out = nn.Conv2d(widths[0], channels, 3, padding=1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skips = []
        for enc, down in zip(self.enc, self.down):
            h = enc(h)
            skips.append(h)
            h = down(h)
        h = torch.cat([h, self.z_proj(z).view(x.shape[0], 8, self.low, self.low)], 1)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            h = F.leaky_relu(up(F.interpolate(h, scale_factor=2, mode="nearest")), 0.2)
            h = dec(torch.cat([h, skip], 1))
        return torch.tanh(self.out(h))


def flops_per_patch(fn) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def throughput(fn, batch: int, repeats: int) -> float:
    with torch.inference_mode():
        return batch / best_seconds(fn, repeats)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rates(fn, batch: int, repeats: int, threads: list[int]) -> list[float]:
    rates = []
    for n in threads:
        torch.set_num_threads(n)
        rates.append(throughput(fn, batch, repeats))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference UResNet timing")
    args = parser.parse_args()
    torch.manual_seed(0)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"batch={args.batch} best of {args.repeats}; GFLOP per patch (generator forward; critic per pair); "
          f"load average at start {load:.1f} (throughput is only meaningful on an otherwise idle machine)")
    rate_cols = "".join(f"{f'p/s {n}thr':>11}" for n in args.threads)
    header = f"{'network':<22}{'size':>5}{'G params':>11}{'G GFLOP':>9}{'D params':>11}{'D GFLOP':>9}" \
             f"{rate_cols}{'speed-up':>10}"
    print(header)
    print("-" * len(header))

    def rates_text(rates: list[float]) -> str:
        return "".join(f"{r:>11.2f}" for r in rates)

    presets = ["tiny"] + [str(s) for s in args.sizes]
    for size in args.sizes:
        ref_rate = None
        if not args.no_reference:
            ref = ReferenceUResNet(image_size=size).eval()
            xb, zb = torch.randn(args.batch, 1, size, size), torch.randn(args.batch, ref.z_dim)
            gf = flops_per_patch(lambda: ref(xb, zb)) / args.batch / 1e9
            rates = _rates(lambda: ref(xb, zb), args.batch, max(1, args.repeats - 1), args.threads)
            ref_rate = max(rates)
            print(f"{'reference UResNet':<22}{size:>5}{count_params(ref) / 1e6:>10.2f}M{gf:>9.2f}{'':>11}{'':>9}"
                  f"{rates_text(rates)}{'1.0x':>10}")
        for preset in presets:
            cfg = ModelConfig(name="dagan", **dagan_preset(preset))
            if cfg.image_size != size:
                continue
            g, d = build_networks(cfg)
            g.eval()
            d.eval()
            xb, zb = torch.randn(args.batch, 1, size, size), torch.randn(args.batch, cfg.z_dim)
            g_gf = flops_per_patch(lambda: g(xb, zb)) / args.batch / 1e9
            d_gf = flops_per_patch(lambda: d(xb, xb)) / args.batch / 1e9
            rates = _rates(lambda: g(xb, zb), args.batch, args.repeats, args.threads)
            speed = f"{max(rates) / ref_rate:.1f}x" if ref_rate else "-"
            print(f"{'dagan ' + preset:<22}{size:>5}{count_params(g) / 1e6:>10.2f}M{g_gf:>9.2f}"
                  f"{count_params(d) / 1e6:>10.2f}M{d_gf:>9.3f}{rates_text(rates)}{speed:>10}")
    for name, width in (("cifar_resnet", 128), ("cifar_dcgan", 64)):
        cfg = ModelConfig(name=name, image_size=32, channels=3, g_width=width, d_width=width, g_norm="batch",
                          d_norm="layer")
        g, d = build_networks(cfg)
        g.eval()
        zb = torch.randn(args.batch, cfg.z_dim)
        g_gf = flops_per_patch(lambda: g(zb)) / args.batch / 1e9
        d_gf = flops_per_patch(lambda: d(torch.zeros(args.batch, 3, 32, 32))) / args.batch / 1e9
        rates = _rates(lambda: g(zb), args.batch, args.repeats, args.threads)
        print(f"{name:<22}{32:>5}{count_params(g) / 1e6:>10.3f}M{g_gf:>9.3f}{count_params(d) / 1e6:>10.3f}M"
              f"{d_gf:>9.3f}{rates_text(rates)}{'-':>10}")


if __name__ == "__main__":
    main()
