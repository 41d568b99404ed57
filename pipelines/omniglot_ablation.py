"""Omniglot ablations of the diversity settings: DiffAugment, mode seeking, input residual on/off, one table.

For each named setting (overrides on top of ``configs/dagan_omniglot_32.yaml``) this runs
``pipelines/omniglot_fewshot.py`` with a shorter DAGAN budget (``--steps``) on the held-out Greek + Latin task at
``--shots`` (default 2, 3) under the regimes real and real+dagan, then measures the pixel diversity ratio and the
distance-to-source ratio of the variants of the held-out shots (``dagan_gn.jobs.demo.variant_diversity``: the
definitions of ``dagan assess``, on the pool drawings' same-character pairs), averaged over the task seeds. The table
(Markdown and JSON) goes to ``--report``.

    python pipelines/omniglot_ablation.py --out /tmp/omni_abl --steps 500 \\
        --setting full= --setting no_mode_seeking=loss.mode_seeking=0 --setting no_diffaugment=loss.diffaugment= \\
        --setting no_input_residual="model.g_kwargs={smooth_output: true, input_residual: false}"

A setting is ``name=override;override;...``. Every stage of the harness resumes, so an interrupted ablation continues.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_setting(out: Path, overrides: list[str], args: argparse.Namespace) -> dict:
    """One harness run; returns its summary with the variants' diversity figures."""
    from dagan_gn.jobs.demo import variant_diversity

    cmd = [sys.executable, str(HERE / "omniglot_fewshot.py"), "--out", str(out), "--steps", str(args.steps),
           "--shots", args.shots, "--regimes", args.regimes, "--seeds", args.seeds, "--workers", str(args.workers),
           "--threads", "1", "--quiet", *(["--smoke"] if args.smoke else []), *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    report = json.loads((out / "omniglot_fewshot.json").read_text())
    diversity, distance = [], []
    for seed_dir in sorted((out / "test").glob("seed*")):
        d, s, _ = variant_diversity(seed_dir / "shots.h5", seed_dir / "variants.h5")
        diversity.append(d)
        distance.append(s)
    return {"overrides": overrides, "steps": args.steps, "seconds": round(seconds, 1),
            "diversity_ratio": sum(diversity) / len(diversity), "source_distance_ratio": sum(distance) / len(distance),
            "diversity_per_seed": diversity, "table": report["summary"]["table"], "gains": report["summary"]["gains"],
            "environment": report.get("environment")}


def markdown(results: dict[str, dict], shots: list[str]) -> str:
    head = ["setting", "pixel diversity", "dist. to source"]
    for k in shots:
        head += [f"k={k} real", f"k={k} +DAGAN", f"k={k} gain (paired)"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]

    def cell(entry: dict) -> str:
        return f"{100 * entry['mean']:.1f} ± {100 * entry['ci95']:.1f}"

    for name, r in results.items():
        row = [f"{name} (`{'; '.join(r['overrides']) or 'config as is'}`)", f"{r['diversity_ratio']:.3f}",
               f"{r['source_distance_ratio']:.3f}"]
        for k in shots:
            t, g = r["table"][k], r["gains"][k]
            row += [cell(t["real"]), cell(t["real+dagan"]), cell(g["dagan_minus_real"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="work folder (one harness folder per setting)")
    parser.add_argument("--setting", action="append", default=[], help="name=override;override;... (repeatable)")
    parser.add_argument("--steps", type=int, default=500, help="DAGAN generator steps of every setting")
    parser.add_argument("--shots", default="2,3")
    parser.add_argument("--regimes", default="real,real+dagan")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="the harness's --smoke (plumbing check)")
    parser.add_argument("--report", type=Path, default=HERE / "results" / "omniglot_ablation")
    args = parser.parse_args()

    results: dict[str, dict] = {}
    report_json = args.report.with_suffix(".json")
    if report_json.exists():
        results = json.loads(report_json.read_text())
    from dagan_gn.config import parse_setting

    for spec in args.setting:
        name, overrides = parse_setting(spec)
        results[name] = run_setting(args.out / name, overrides, args)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(json.dumps(results, indent=1))
        table = markdown(results, args.shots.split(","))
        args.report.with_suffix(".md").write_text(
            f"# Omniglot ablations ({args.steps} DAGAN steps, held-out Greek + Latin, 50-way, seeds {args.seeds}; "
            f"accuracy % mean ± 95 % CI)\n\n{table}\n")
        print(table, flush=True)


if __name__ == "__main__":
    main()
