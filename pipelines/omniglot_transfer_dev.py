"""Omniglot transfer dev set: how a trained DAGAN's variants of *never-seen* characters trade identity for diversity.

The few-shot protocol (``pipelines/omniglot_fewshot.py``) has a dev task drawn from the DAGAN's own training
characters, where identity is optimistic (0.41 there against 0.02 on the held-out Greek and Latin test task,
docs/augment.md). Settings that matter for *new* characters — the sampling noise bound (``dagan augment
--truncation``) above all — need held-out characters that are not the test task. Lake et al.'s one-shot runs
(``all_runs.zip`` in the shared Omniglot data: 20 runs × 20 characters of the *evaluation* alphabets, two drawings
each) are exactly that: none of their alphabets is a training or a test alphabet of the protocol.

For a DAGAN run (``--reuse-dagan``: a run folder or checkpoint) and each ``--truncations`` bound, this script writes
``--n`` variants of all 800 drawings and measures them as the few-shot report does (``dagan_gn.jobs.demo
.variant_diversity``: pixel diversity and distance-to-source ratios on two-drawing pairs; identity = the share of
variants whose nearest drawing among all 800 is their own source), plus the same identity per run (40 drawings, the
size of a 20-way two-shot task). Output: ``OUT/transfer_dev.{md,json}``, one contact sheet per bound.

    python pipelines/omniglot_transfer_dev.py --reuse-dagan runs/omniglot/dagan --out runs/transfer_dev \\
        --truncations 0,1,0.5,0.25,0.1

Choose a bound here, then run the test protocol once with it (``omniglot_fewshot.py --truncation``).
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def _float_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--truncations: expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--truncations: expected numbers >= 0, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reuse-dagan", required=True, type=Path, help="a trained DAGAN run folder or checkpoint")
    p.add_argument("--out", required=True, type=Path, help="work folder")
    p.add_argument("--runs", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "omniglot" / "all_runs.zip",
                   help="Lake et al.'s one-shot runs (all_runs.zip: runNN/training/classNN.png, runNN/test/itemNN.png, "
                        "runNN/class_labels.txt)")
    p.add_argument("--truncations", type=_float_list, default=[0.0, 1.0, 0.5, 0.25, 0.1],
                   help="noise truncation bounds to compare (0: none, as the few-shot protocol samples)")
    p.add_argument("--n", type=int, default=10, help="variants per drawing")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (the DAGAN's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the variants and the real-pair sample")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def unpack_runs(runs_zip: Path, tree: Path) -> Path:
    """The runs as an image folder ``tree/runNN/classNN/{training,test}.png`` (one class per character of a run,
    its test drawing found through ``class_labels.txt``), so the project's ``read_image_folder`` reads them."""
    if (tree / ".complete").is_file():
        return tree
    with zipfile.ZipFile(runs_zip) as z:
        names = set(z.namelist())
        runs = sorted({n.split("/")[0] for n in names if n.endswith("class_labels.txt")})
        if not runs:
            raise SystemExit(f"{runs_zip}: no runNN/class_labels.txt inside (not Lake's all_runs.zip?)")
        for run in runs:
            for line in z.read(f"{run}/class_labels.txt").decode().split("\n"):
                if not line.strip():
                    continue
                test_item, train_item = line.split()
                cls = Path(train_item).stem
                folder = tree / run / cls
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "training.png").write_bytes(z.read(train_item))
                (folder / "test.png").write_bytes(z.read(test_item))
    (tree / ".complete").write_text("")
    return tree


def per_run_identity(task_file: Path, variants_file: Path) -> float:
    """Identity as in a 20-way task: each variant's nearest drawing among its own run's 40 (pixel L1)."""
    import torch

    from dagan_gn.metrics.diversity import source_identity
    from dagan_gn.store.patch_file import PatchFile

    with PatchFile(task_file) as pf:
        real = torch.from_numpy(pf.read_patches(np.arange(len(pf)), signed=True))
        labels = pf.labels
        names = list(pf.class_names)
    with PatchFile(variants_file) as syn:
        source = syn.provenance("source_index")
        variants = torch.from_numpy(syn.read_patches(np.arange(len(syn)), signed=True))
    run_of_class = np.array([n.split("/")[0] for n in names])
    shares, weights = [], []
    for run in np.unique(run_of_class):
        sources = np.flatnonzero(run_of_class[labels] == run)
        rows = np.flatnonzero(np.isin(source, sources))
        order = np.argsort(source[rows], kind="stable")
        rows = rows[order]
        counts = np.bincount(np.searchsorted(sources, source[rows]), minlength=len(sources))
        v = int(counts.min())
        if v == 0:
            continue
        grouped = np.stack([rows[np.searchsorted(source[rows], s):][:v] for s in sources])
        var = variants[torch.from_numpy(grouped.reshape(-1))].view(len(sources), v, *real.shape[1:])
        result = source_identity(real[torch.from_numpy(sources)], var, labels[sources], p=1.0)
        shares.append(float(result["nearest_is_source"].float().mean()))
        weights.append(len(sources))
    return float(np.average(shares, weights=weights))


def _reusable(variants: Path, ckpt_sha: str, n: int, seed: int, truncation: float) -> bool:
    """Whether an earlier invocation's variants file was made by this checkpoint with these settings."""
    from dagan_gn.store.patch_file import PatchFile

    if not variants.is_file():
        return False
    with PatchFile(variants) as syn:
        p = syn.parameters
    return (p.get("checkpoint_sha256") == ckpt_sha and p.get("n_per_source") == n and p.get("seed") == seed
            and float(p.get("truncation", 0.0)) == truncation)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Omniglot transfer dev set: identity vs diversity of variants of never-seen characters",
        "",
        f"DAGAN: `{report['dagan']}` (sha256 {report['checkpoint_sha256'][:12]}…); {report['sources']} drawings of "
        f"{report['characters']} characters (Lake et al.'s one-shot runs, evaluation alphabets), {report['n']} "
        f"variants each, seed {report['seed']}, {report['size']} px.",
        "",
        "Diversity and distance are ratios to two real drawings of one character (1 = as far apart); identity = the "
        "share of variants whose nearest real drawing (pixel L1) is their own source, among all drawings / among "
        "their run's 40.",
        "",
        "| truncation | diversity | distance to source | identity (all 800) | identity (per run, 40) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        t = "none" if row["truncation"] == 0 else f"{row['truncation']:g}"
        lines.append(f"| {t} | {row['diversity']:.3f} | {row['distance_to_source']:.3f} | {row['identity']:.1%} | "
                     f"{row['identity_per_run']:.1%} |")
    lines += ["", f"Command: `{report['command']}`; {report['seconds']:.0f} s; {report['environment']}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import sys

    from dagan_gn.datasets.image_folder import read_image_folder
    from dagan_gn.fileio import sha256_file
    from dagan_gn.jobs.augment import augment
    from dagan_gn.jobs.demo import variant_diversity
    from dagan_gn.jobs.import_images import write_images
    from dagan_gn.runtime import environment_info
    from dagan_gn.training.checkpoint import resolve_checkpoint

    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tree = unpack_runs(args.runs, out / "runs_tree")
    data = read_image_folder(tree, size=args.size, invert=True, progress=not args.quiet)
    task_file = out / "drawings.h5"
    if not task_file.is_file():
        write_images(task_file, data, ["train"] * len(data.labels), salt=b"omniglot-transfer-dev",
                     parameters={"job": "omniglot-transfer-dev", "size": args.size})
    ckpt = resolve_checkpoint(args.reuse_dagan)
    sha = sha256_file(ckpt)
    rows = []
    for t in args.truncations:
        variants = out / f"variants_t{t:g}.h5"
        if not _reusable(variants, sha, args.n, args.seed, t):
            augment(task_file, ckpt, variants, n=args.n, split="train", seed=args.seed, device=args.device,
                    truncation=t, overwrite=True, contact_sheet=out / f"variants_t{t:g}.png",
                    progress=not args.quiet)
        diversity, distance, identity = variant_diversity(task_file, variants, seed=args.seed)
        row = {"truncation": t, "diversity": diversity, "distance_to_source": distance, "identity": identity,
               "identity_per_run": per_run_identity(task_file, variants)}
        rows.append(row)
        if not args.quiet:
            print(json.dumps(row))
    report = {"dagan": Path(args.reuse_dagan).name, "checkpoint_sha256": sha, "sources": int(len(data.labels)),
              "characters": len(data.class_names), "n": args.n, "seed": args.seed, "size": args.size, "rows": rows,
              "command": "python pipelines/omniglot_transfer_dev.py " + " ".join(sys.argv[1:] if argv is None
                                                                                 else argv),
              "seconds": time.perf_counter() - started, "environment": environment_info(args.device)}
    (out / "transfer_dev.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "transfer_dev.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
