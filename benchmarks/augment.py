"""Throughput and memory of ``dagan augment`` at 256 px, against the reference UResNet generator forward.

    python benchmarks/augment.py [--threads 2] [--batches 1 4 8 16 32] [--sizes-n 16 64 256] [--n 4]

Three tables, all measured in the same run (``--in-loop`` prints only the fourth):

1. **Generator forward, batch-size sweep** — patches/s of the default 256-px DAGAN generator (preset ``256``,
   class-conditional) under ``torch.inference_mode`` for each batch size, next to the reference UResNet (the DAGAN
   ports' 64-64-128-128 full-resolution generator, ``benchmarks/nets_flops.py``) at batch 1 and 8; best of
   ``--repeats`` after a warm-up. On CUDA (when present) the same sweep runs on the GPU too.
2. **The whole job** — ``augment()`` end to end (HDF5 read, noise, generator, uint16, gzip write, commits) on a
   synthetic 256-px patch file: patches/s for each output size N = sources × ``--n``.
3. **Peak memory vs N** — each job runs in a fresh child process; the RSS after imports and model load, and the peak
   RSS during the job (Linux ``VmHWM`` reset before the job) are reported. Flat in N means the job streams.

4. **In-loop augmentation** — ``DAGANAugmenter`` on a training batch (``[B, 1, S, S]`` and labels on ``--device``)
   for p = 0.25, 0.5, 1: batches/s and variants/s, next to the bare generator forward on the same number of rows
   (``G(x, z, y)`` under ``inference_mode``, the cost no augmenter can avoid) as the baseline.

Targets (issue 5): ≥ 10 patches/s on the 2-core CPU with the default 256-px generator, memory flat in N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import best_seconds


def _reference_uresnet(image_size: int):
    try:
        from nets_flops import ReferenceUResNet  # the nets engineer's reference, when present
    except ImportError:  # pragma: no cover - fallback keeps the benchmark self-contained
        raise SystemExit("benchmarks/nets_flops.py (ReferenceUResNet) is required for the baseline")
    return ReferenceUResNet(image_size=image_size).eval()


def _default_cfg(num_classes: int = 2):
    from dagan_gn.config import ExperimentConfig
    from dagan_gn.nets.dagan import dagan_preset

    cfg = ExperimentConfig()
    cfg.model = dataclasses.replace(cfg.model, name="dagan", num_classes=num_classes, **dagan_preset("256"))
    return cfg


def _rate(fn, batch: int, repeats: int, sync=lambda: None) -> float:
    with torch.inference_mode():
        return batch / best_seconds(fn, repeats, sync)


def forward_sweep(batches: list[int], repeats: int, device: str, reference: bool, *,
                  autocast: torch.dtype | None = None, channels_last: bool = False) -> list[dict]:
    """Patches/s of the default 256-px generator for each batch size (and of the reference UResNet at batch 1 and 8
    when ``reference``); on CUDA also the peak allocated memory of each batch. ``autocast`` (e.g. ``torch.bfloat16``)
    and ``channels_last`` apply to the DAGAN generator only; ``augment`` itself runs fp32, NCHW."""
    from dagan_gn.training.families import build_networks

    cfg = _default_cfg()
    g, _ = build_networks(cfg.model)
    g = g.to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    g = g.to(memory_format=memory_format)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    dtype = str(autocast).removeprefix("torch.") if autocast is not None else "float32"
    rows = []
    for b in batches:
        x = torch.randn(b, 1, 256, 256, device=device).contiguous(memory_format=memory_format)
        z = torch.randn(b, g.z_dim, device=device)
        y = torch.zeros(b, dtype=torch.long, device=device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        def forward():
            with torch.autocast(device.split(":")[0], dtype=autocast, enabled=autocast is not None):
                return g(x, z, y)

        rate = _rate(forward, b, repeats, sync)
        mem = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
        rows.append({"network": "DAGAN 256 (default)", "device": device, "batch": b, "patches_per_s": rate,
                     "cuda_peak_mib": mem, "dtype": dtype, "channels_last": channels_last})
    if reference:
        ref = _reference_uresnet(256).to(device)
        for b in sorted({1, min(8, max(batches))}):
            x = torch.randn(b, 1, 256, 256, device=device)
            z = torch.randn(b, ref.z_dim, device=device)
            rate = _rate(lambda: ref(x, z), b, max(1, repeats - 1), sync)
            rows.append({"network": "reference UResNet", "device": device, "batch": b, "patches_per_s": rate,
                         "cuda_peak_mib": float("nan"), "dtype": "float32", "channels_last": False})
    return rows


def make_inputs(root: Path, n_sources: int) -> tuple[Path, Path]:
    """A 256-px patch file with ``n_sources`` train patches and an (untrained) default-generator checkpoint: speed
    does not depend on the weights."""
    from dagan_gn.store.patch_file import PatchWriter, to_uint16
    from dagan_gn.training.families import build_networks
    from dagan_gn.training.checkpoint import checkpoint_path, save_checkpoint

    patches = root / f"real_{n_sources}.h5"
    if not patches.exists():
        rng = np.random.default_rng(0)
        with PatchWriter(patches, patch_size=256, class_names=["normal", "mass"],
                         provenance={"patient_pseudonym": "str"}) as w:
            for s in range(0, n_sources, 64):
                k = min(64, n_sources - s)
                imgs = rng.random((k, 1, 256, 256), dtype=np.float32)
                w.append(to_uint16(imgs), np.arange(s, s + k) % 2, ["train"] * k,
                         {"patient_pseudonym": [f"p{i}" for i in range(s, s + k)]})
    run = root / "run"
    if not run.exists():
        cfg = _default_cfg()
        g, d = build_networks(cfg.model)
        save_checkpoint(checkpoint_path(run, 1), step=1, generator=g, critic=d, config=cfg, ema=g)
    return patches, run


def timed_augment(patches: Path, run: Path, out: Path, *, n: int, batch_size: int, device: str) -> dict:
    """One ``augment()`` job in this process: patches written, seconds, patches/s and, on CUDA, the peak allocated
    GPU memory of the job (MiB; NaN on the CPU)."""
    from dagan_gn.jobs.augment import augment

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rep = augment(patches, run, out, n=n, batch_size=batch_size, device=device, progress=False)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return {"n_out": rep.n_written, "seconds": dt, "patches_per_s": rep.n_written / dt, "cuda_peak_mib": peak}


def in_loop_table(size: int, batch: int, repeats: int, device: str) -> None:
    """Table 4: DAGANAugmenter batches/s against the bare generator forward on the rows it replaces."""
    from dagan_gn.nets.dagan import dagan_preset
    from dagan_gn.training.augmenter import DAGANAugmenter
    from dagan_gn.training.families import build_networks

    cfg = _default_cfg()
    if size != 256:
        cfg.model = dataclasses.replace(cfg.model, **{**dagan_preset("tiny"), "image_size": size})
    g, _ = build_networks(cfg.model)
    g = g.to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    x = torch.rand(batch, 1, size, size, device=device) * 2 - 1
    y = torch.arange(batch, device=device) % cfg.model.num_classes
    print(f"\n## in-loop augmentation: DAGANAugmenter on a batch of {batch} × 1 × {size} px on {device} "
          f"(untrained generator, best of {repeats})")
    print("| what | rows generated per batch | batches/s | generated rows/s | vs bare forward of those rows |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for p in (0.25, 0.5, 1.0):
        aug = DAGANAugmenter(p=p, seed=0, device=device, batch_size=batch, generator=g, config=cfg)
        k = max(1, round(p * batch))
        xz, zz, yz = x[:k], torch.randn(k, g.z_dim, device=device), y[:k]
        bare = _rate(lambda: g(xz, zz, yz), 1, repeats, sync)  # forwards/s of the k rows
        rate = _rate(lambda: aug(x, y), 1, repeats, sync)  # batches/s (k rows on average)
        print(f"| bare G forward, {k} rows | {k} | {bare:.2f} | {bare * k:.1f} | 1.00x |")
        print(f"| DAGANAugmenter p={p} | ~{k} | {rate:.2f} | {rate * k:.1f} | {rate / bare:.2f}x |")


def child(args: argparse.Namespace) -> None:
    """One augment job in this (fresh) process; prints a JSON line with timing and memory."""
    torch.set_num_threads(args.threads)
    from dagan_gn.training.families import load_generator

    load_generator(args.run)  # warm the imports and the model build before the baseline RSS
    base = _rss_mib()["VmRSS"]
    _reset_peak_rss()
    m = timed_augment(args.patches, args.run, args.out, n=args.n, batch_size=args.batch_size, device=args.device)
    peak = _rss_mib()["VmHWM"] if _PEAK_RESETTABLE else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n_out": m["n_out"], "seconds": m["seconds"], "patches_per_s": m["patches_per_s"],
                      "peak_rss_mib": peak, "baseline_rss_mib": base}))


_PEAK_RESETTABLE = False


def _rss_mib() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process in MiB (Linux)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = float(value.split()[0]) / 1024
    return out


def _reset_peak_rss() -> None:
    """Reset the peak-RSS mark (Linux: ``echo 5 > /proc/self/clear_refs``) so it measures the job alone."""
    global _PEAK_RESETTABLE
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _PEAK_RESETTABLE = True
    except OSError:
        _PEAK_RESETTABLE = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes-n", type=int, nargs="+", default=[16, 64, 256],
                        help="numbers of source patches for the whole-job/memory table")
    parser.add_argument("--n", type=int, default=4, help="variants per source in the whole-job table")
    parser.add_argument("--batch-size", type=int, default=16, help="augment batch size in the whole-job table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--in-loop", action="store_true", help="only table 4 (DAGANAugmenter)")
    parser.add_argument("--in-loop-size", type=int, default=64, help="patch size of table 4 (64: tiny preset; "
                        "256: the default generator)")
    parser.add_argument("--in-loop-batch", type=int, default=32, help="training batch of table 4")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--patches", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.in_loop:
        in_loop_table(args.in_loop_size, args.in_loop_batch, args.repeats, args.device)
        return

    print(f"## generator forward at 256 px (threads={args.threads}, best of {args.repeats})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        rows += forward_sweep(args.batches, args.repeats, dev, reference=not args.no_reference)
    ref = {(r["device"], r["batch"]): r["patches_per_s"] for r in rows if r["network"] == "reference UResNet"}
    print("| network | device | batch | patches/s | vs reference (same device, batch 8 or max) | CUDA peak MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        base = ref.get((r["device"], min(8, max(args.batches))))
        ratio = f"{r['patches_per_s'] / base:.1f}x" if base else "n/a"
        mem = "" if np.isnan(r["cuda_peak_mib"]) else f"{r['cuda_peak_mib']:.0f}"
        print(f"| {r['network']} | {r['device']} | {r['batch']} | {r['patches_per_s']:.2f} | {ratio} | {mem} |")

    print(f"\n## whole augment job at 256 px (n={args.n} per source, batch {args.batch_size}, device {args.device}, "
          "fresh process each)")
    print("| sources | synthetic patches | seconds | patches/s | peak RSS MiB | RSS over baseline MiB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        for n_src in args.sizes_n:
            patches, run = make_inputs(root, n_src)
            out = root / f"syn_{n_src}.h5"
            cmd = [sys.executable, __file__, "--child", "--patches", str(patches), "--run", str(run), "--out",
                   str(out), "--n", str(args.n), "--batch-size", str(args.batch_size), "--device", args.device,
                   "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                           str(args.threads)})
            if res.returncode != 0:
                print(res.stderr[-2000:])
                raise SystemExit(res.returncode)
            m = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"| {n_src} | {m['n_out']} | {m['seconds']:.1f} | {m['patches_per_s']:.2f} | "
                  f"{m['peak_rss_mib']:.0f} | {m['peak_rss_mib'] - m['baseline_rss_mib']:.0f} |")
    in_loop_table(args.in_loop_size, args.in_loop_batch, args.repeats, args.device)


if __name__ == "__main__":
    main()
