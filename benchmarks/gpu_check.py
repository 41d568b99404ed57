"""The GPU check (issues 12 and 19): every CUDA path of dagan-gn run, timed and checked by one command that leaves a
report, with the stages ordered by what a short GPU loan is worth.

    python3 benchmarks/gpu_check.py --out OUT [--budget-s 540] [--stages 1,2,3,4,5,6] [--seed 0] [--workdir DIR]
    python benchmarks/gpu_check.py --cpu-dry-run --out OUT --omniglot-dir DIR   # every stage at toy sizes (CI)

Stages, in order; each is timed, and one that fails records its error (one line, and the traceback in the JSON) and
the next one runs:

1. **environment** — Python/torch/CUDA/cuDNN versions, the device, TF32 settings, and the measured dense matmul rate
   in bf16, fp16 and fp32 (``benchmarks/train_step.matmul_rate``).
2. **omniglot dagan** — the Omniglot few-shot protocol's DAGAN (``configs/dagan_omniglot_32.yaml``, the chosen
   identity-keeping recipe: deformation output, frozen identity embedding, reconstruction) at reference scale: the
   protocol's training file and the embedding trained on the CPU (``prepare_gpu_bundle.py``: the GPU machine has no
   albumentations), bf16 autocast, the training split in memory; a short calibration run measures steps/s and the
   run takes as many generator steps as fit (up to :attr:`Sizes.omniglot_steps`), its linear LR decay aimed at them;
   a watchdog stops it with a checkpoint if time runs out. The checkpoint and ``metrics.jsonl`` come back under
   ``OUT/omniglot_dagan/``, the run folder ``pipelines/omniglot_fewshot.py --reuse-dagan`` takes on the CPU.
3. **quality** — the CIFAR ResNet WGAN-GP with a group-norm, a layer-norm and a no-norm critic
   (``jobs.cifar10_study``'s cell config, bf16), the same steps and seed, trained on the CIFAR-10 test zip, FID/KID of a few thousand samples
   (``metrics.fidelity.compute_fidelity``, torch-fidelity's Inception from the bundle's fp16 weights); steps are sized
   to the time left by a calibration run. No IS: the FID Inception that travels has no classifier.
4. **training step** — ``benchmarks/train_step.bench_model`` for DAGAN 64 (batch 64), DAGAN 256 (batch 32) and the
   CIFAR ResNet (batch 64): the reference loop (fp32) and the engine in fp32, bf16, bf16 with
   ``cudnn.benchmark``, and bf16 with ``torch.compile`` (inductor), channels_last: seconds per iteration, images/s,
   percentage of the measured bf16 (and fp32) matmul rate, speed-up over the reference timed in the same run.
5. **augment throughput** — ``benchmarks/augment.forward_sweep`` of the default 256-px generator (fp32 as ``augment``
   runs it, and bf16 channels_last), patches/s and peak GPU memory, and one whole ``augment()`` job (HDF5 in and
   out); goal ≥ 5,000 patches/s on an H100.
6. **correctness** — a synthetic DICOM archive made there (``phantom.make_demo_archive``) → ``extract_patches`` (64
   px) → ``jobs.train.train`` of DAGAN-64 (``configs/dagan_mammo_64.yaml``, conditional) in bf16 and in fp16: the
   critic's convolutions run in the autocast dtype while the gradient penalty and the master weights are fp32, the
   GradScaler is on for fp16 only, losses are finite, checkpoints are written; with
   ``torch.use_deterministic_algorithms`` a run stopped half-way and resumed equals the straight run (the max absolute
   difference is recorded when it is not bit-equal); then ``jobs.augment.augment`` from that checkpoint, and the mean
   diversity ratio of its variants.

``OUT/gpu_check.json`` (every measurement, each check with pass/fail, timings, errors) and ``OUT/gpu_check.md`` (the
tables) are rewritten atomically after every stage and every training-step row, so a run killed at its time limit
still leaves a report; the tables are printed at the end. What comes back stays within the device tool's limits
(at most 8 files, 2 folders down): the two reports, the Omniglot checkpoint and log, ``cifar_samples.png`` and
``contact_sheet.png``. Exit status: 0 when every stage ran and every check passed, 1 otherwise, 2 for bad arguments.

Budget: ``--budget-s`` (default 540 s: one command inside the device tool's 10 minutes) is shared out over the
selected stages in proportion to :data:`STAGE_WEIGHTS`; time a stage leaves unused goes to the later ones. A stage
(and each training-step row) starts only if its share allows, else it is recorded as skipped with a note.

``--cpu-dry-run`` runs the same stages with the same code on the CPU at toy sizes (tiny widths, a few steps,
``train.amp_on_cpu`` for the mixed-precision paths, the ``tiny`` feature extractor for FID/KID); only what needs CUDA
kernels differs: no ``torch.compile`` rows (inductor's CPU build takes minutes) and no reference UResNet forward.

How to send it to a GPU machine and what goes with it: ``docs/performance.md``, "The GPU check".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# The one sys.path edit left in benchmarks/: on the GPU machine this file runs from a copy of the repository where
# dagan_gn is not installed (docs/performance.md), so the repository root goes first; and the stages import the
# scripts beside it (train_step, augment, prepare_gpu_bundle, and their _timing), whose folder is not on sys.path when
# the file is run through runpy (tests/benchmarks/gpu_machine_python.py).
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
# Before CUDA initialises: cuBLAS needs a fixed workspace for the correctness stage's deterministic comparison.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

STAGE_NAMES = {1: "environment", 2: "omniglot dagan", 3: "quality", 4: "training step", 5: "augment throughput",
               6: "correctness"}
#: Share of the budget of each stage (renormalised over the selected stages that are still to run), by value (issue
#: 19): of 540 s, about 10 s environment, 300 s the Omniglot DAGAN, 145 s the CIFAR critics, then the speed rows.
STAGE_WEIGHTS = {1: 0.02, 2: 0.55, 3: 0.27, 4: 0.08, 5: 0.03, 6: 0.05}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Sizes:
    """Everything a stage sizes: the GPU run (:data:`FULL`) and the CPU dry run (:data:`DRY`)."""

    matmul_n: int
    # omniglot dagan
    omniglot_overrides: tuple[str, ...]
    #: (fewest worth running, most) generator steps; equal: fixed (the dry run).
    omniglot_steps: tuple[int, int]
    omniglot_calibration_steps: int
    #: Seconds kept for copying the run back and the stage's checks after training.
    omniglot_reserve_s: float
    # training step
    train_models: tuple[tuple[str, int], ...]
    #: Models that get every row; the others get one fp32 engine row (the dry run's CPU time).
    train_full_models: tuple[str, ...]
    train_iters: int
    train_n_critic: int
    train_overrides: dict[str, tuple[str, ...]]
    cudnn_benchmark_rows: bool
    compile_rows: bool
    compile_estimate_s: float
    # correctness
    demo_patients: int
    demo_size: tuple[int, int]
    per_image: int
    per_lesion: int
    extract_workers: int
    dagan_batch: int
    dagan_overrides: tuple[str, ...]
    correctness_steps: int
    log_every: int
    augment_n: int
    augment_batch: int
    # augment throughput
    sweep_batches: tuple[int, ...]
    sweep_repeats: int
    sweep_reference: bool
    job_sources: int
    job_n: int
    job_batch: int
    # quality
    cifar_preset: str
    cifar_overrides: tuple[str, ...]
    cifar_limit_per_class: int
    cifar_steps: tuple[int, int]  # (min, max) generator steps per arm
    cifar_num_workers: int
    fid_samples: int
    kid_subset: int
    metric_reserve_s: float
    calibration_steps: int


#: The GPU run. Extraction decodes in this process (``extract_workers=1``): no fork of a process holding a CUDA
#: context, and 24 small images take a second or two.
FULL = Sizes(
    matmul_n=8192,
    omniglot_overrides=(), omniglot_steps=(2_000, 60_000), omniglot_calibration_steps=300, omniglot_reserve_s=15.0,
    train_models=(("dagan64", 64), ("dagan256", 32), ("cifar_resnet", 64)),
    train_full_models=("dagan64", "dagan256", "cifar_resnet"), train_iters=5, train_n_critic=5,
    train_overrides={}, cudnn_benchmark_rows=True, compile_rows=True, compile_estimate_s=60.0,
    demo_patients=6, demo_size=(768, 512), per_image=24, per_lesion=6, extract_workers=1, dagan_batch=64,
    dagan_overrides=(), correctness_steps=100, log_every=10, augment_n=8, augment_batch=256,
    sweep_batches=(32, 128, 256), sweep_repeats=5, sweep_reference=True, job_sources=256, job_n=8, job_batch=256,
    cifar_preset="seed-10k", cifar_overrides=(), cifar_limit_per_class=0, cifar_steps=(100, 20_000),
    cifar_num_workers=4, fid_samples=5000, kid_subset=1000, metric_reserve_s=60.0, calibration_steps=20,
)
_TOY_DAGAN = ("model.g_width=8", "model.d_width=8", "model.z_dim=8")
DRY = Sizes(
    matmul_n=256,
    omniglot_overrides=(*_TOY_DAGAN, "data.batch_size=8", "loss.embedding_steps=2", "train.ema_start=0"),
    omniglot_steps=(4, 4), omniglot_calibration_steps=0, omniglot_reserve_s=0.0,
    # DAGAN 256 differs from DAGAN 64 by its config file only, and costs seconds per toy iteration on a CPU.
    train_models=(("dagan64", 1), ("cifar_resnet", 1)), train_full_models=("dagan64",),
    train_iters=1, train_n_critic=1,
    train_overrides={
        "dagan64": _TOY_DAGAN,
        "cifar_resnet": ("model.g_width=16", "model.d_width=16", "model.z_dim=8"),
    },
    cudnn_benchmark_rows=False, compile_rows=False, compile_estimate_s=0.0,
    demo_patients=3, demo_size=(384, 256), per_image=6, per_lesion=2, extract_workers=1, dagan_batch=4,
    dagan_overrides=(*_TOY_DAGAN, "optim.n_critic=1"), correctness_steps=2, log_every=2, augment_n=2,
    augment_batch=8,
    sweep_batches=(1,), sweep_repeats=1, sweep_reference=False, job_sources=1, job_n=2, job_batch=4,
    cifar_preset="smoke", cifar_overrides=("optim.n_critic=1",), cifar_limit_per_class=3, cifar_steps=(2, 2),
    cifar_num_workers=0, fid_samples=24, kid_subset=12, metric_reserve_s=0.0, calibration_steps=0,
)


class StageSkipped(Exception):
    """Raised inside a stage that cannot start (budget spent, a prerequisite missing); the message is the note."""


class Terminated(Exception):
    """SIGTERM (e.g. from ``timeout``) arrived: the current stage is recorded as failed and no further stage runs."""


# ============================================================================================ the report
def _plain(value: Any) -> Any:
    """JSON-safe copy: non-finite floats → null, paths/dtypes → strings, numpy scalars → Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, type(None), str, int)):
        return value
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.{digits - 1}e}"
        return f"{value:,.{digits}f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


class Report:
    """``gpu_check.json`` + ``gpu_check.md`` under ``out``, rewritten atomically by :meth:`save`."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {"meta": meta, "stages": {}}

    def stage(self, number: int) -> dict[str, Any]:
        return self.data["stages"].setdefault(str(number), {
            "name": STAGE_NAMES[number], "status": "pending", "seconds": None, "allotted_s": None, "notes": [],
            "error": None, "traceback": None, "measurements": {}, "checks": [], "goals": [], "tables": [],
        })

    def save(self) -> None:
        from dagan_gn.fileio import atomic_write_text

        self.data["meta"]["elapsed_s"] = time.perf_counter() - self.t0
        self.data["meta"]["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        plain = _plain(self.data)
        atomic_write_text(self.out / "gpu_check.json", json.dumps(plain, indent=2, allow_nan=False) + "\n")
        atomic_write_text(self.out / "gpu_check.md", render_markdown(plain))


def render_markdown(data: dict[str, Any]) -> str:
    """The report's tables as Markdown (from the JSON-safe data)."""
    meta = data["meta"]
    lines = [f"# GPU check — {meta.get('device', '?')}", "",
             f"{'CPU dry run (toy sizes), ' if meta.get('dry_run') else ''}started {meta.get('started')}, "
             f"budget {meta.get('budget_s')} s, elapsed {_fmt(meta.get('elapsed_s'), 1)} s, seed {meta.get('seed')}, "
             f"commit {meta.get('commit')}; command: `{meta.get('command')}`", "",
             "| stage | status | seconds | allotted s | checks passed | note |", "| --- | --- | ---: | ---: | --- | --- |"]
    for key, st in data["stages"].items():
        checks = st["checks"]
        passed = f"{sum(bool(c['passed']) for c in checks)}/{len(checks)}" if checks else ""
        note = st["error"] or "; ".join(st["notes"][:1])
        lines.append(f"| {key}. {st['name']} | {st['status']} | {_fmt(st['seconds'], 1)} | "
                     f"{_fmt(st['allotted_s'], 0)} | {passed} | {note} |")
    for key, st in data["stages"].items():
        lines += ["", f"## {key}. {st['name']} — {st['status']}", ""]
        if st["error"]:
            lines += [f"**error:** `{st['error']}`", ""]
        lines += [f"- {n}" for n in st["notes"]]
        for table in st["tables"]:
            lines += ["", f"**{table['title']}**", "", "| " + " | ".join(table["header"]) + " |",
                      "|" + " --- |" * len(table["header"])]
            lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table["rows"]]
        if st["checks"]:
            lines += ["", "| check | passed | value | criterion |", "| --- | --- | --- | --- |"]
            lines += [f"| {c['name']} | {'PASS' if c['passed'] else 'FAIL'} | {_fmt(c['value'])} | {c['criterion']} |"
                      for c in st["checks"]]
        if st["goals"]:
            lines += ["", "| goal | met | value | target |", "| --- | --- | --- | --- |"]
            lines += [f"| {g['name']} | {_fmt(g['met']) if g['met'] is not None else 'n/a (CPU)'} | {_fmt(g['value'])} "
                      f"| {g['target']} |" for g in st["goals"]]
    return "\n".join(lines) + "\n"


def check(st: dict, name: str, passed: bool, value: Any, criterion: str) -> bool:
    """Record one correctness assertion of a stage (it never raises: the stage goes on and the report says)."""
    st["checks"].append({"name": name, "passed": bool(passed), "value": value, "criterion": criterion})
    return bool(passed)


def goal(ctx: "Context", st: dict, name: str, value: float, target: float, unit: str) -> None:
    """Record a performance goal (met or not; not applicable on the CPU dry run)."""
    met = None if ctx.device.type != "cuda" else bool(value >= target)
    st["goals"].append({"name": name, "met": met, "value": value, "target": f"≥ {target:g} {unit}"})


# ============================================================================================ run context
@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    work: Path
    out: Path
    report: Report
    #: Results later stages use (matmul rates, engine step times).
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def dry(self) -> bool:
        return self.device.type != "cuda"

    def amp_overrides(self, precision: str) -> tuple[str, ...]:
        """Config overrides that train in ``precision`` on this device (autocast on the CPU too in a dry run)."""
        if precision == "fp32":
            return ("train.amp=none",)
        return (f"train.amp={precision}",) + (("train.amp_on_cpu=true",) if self.dry else ())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet(msg: str) -> None:
    """Trainer messages go to stderr with a prefix (the report holds what matters)."""
    print(f"  [train] {msg}", file=sys.stderr, flush=True)


# ============================================================================================ environment
def stage_environment(ctx: Context, st: dict, deadline: float) -> None:
    from importlib import metadata

    from train_step import matmul_rate

    dev = ctx.device
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    for pkg in ("numpy", "scipy", "h5py", "scikit-image", "matplotlib", "triton", "torchvision", "torch-fidelity",
                "pydicom", "monai"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count)
    else:
        env["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    st["measurements"]["environment"] = env
    rates = {}
    for name in ("bf16", "fp16", "fp32"):
        rates[name] = matmul_rate(dev, PRECISIONS[name], n=ctx.sizes.matmul_n)
    st["measurements"]["matmul_tflops"] = {k: v / 1e12 for k, v in rates.items()}
    ctx.shared["peak"] = rates
    ctx.report.data["meta"]["device"] = env["device"]
    st["tables"].append({"title": "Environment", "header": ["key", "value"],
                         "rows": [[k, v] for k, v in env.items()]})
    st["tables"].append({"title": f"Dense matmul rate ({ctx.sizes.matmul_n}² × {ctx.sizes.matmul_n}², best of 5)",
                         "header": ["dtype", "TFLOP/s"], "rows": [[k, v / 1e12] for k, v in rates.items()]})
    check(st, "matmul rates finite and positive", all(math.isfinite(v) and v > 0 for v in rates.values()),
          min(rates.values()) / 1e12, "> 0 TFLOP/s")


# ============================================================================================ omniglot dagan
#: Where the Omniglot run comes back: ``OUT/omniglot_dagan/checkpoints/step_N.pt`` (two folders down, as the device tool
#: returns) and ``metrics.jsonl``; the folder is what ``omniglot_fewshot.py --reuse-dagan`` takes.
OMNIGLOT_RUN = "omniglot_dagan"


def _omniglot_inputs(ctx: Context) -> tuple[Path, Path]:
    """(the protocol's DAGAN training file, the CPU-trained identity embedding): ``--omniglot-dir``, else the
    bundle's."""
    from prepare_gpu_bundle import BUNDLE_DIR, OMNIGLOT_DIR, OMNIGLOT_EMBEDDING, OMNIGLOT_TRAIN

    folder = ctx.args.omniglot_dir or BUNDLE_DIR / OMNIGLOT_DIR
    files = (Path(folder) / OMNIGLOT_TRAIN, Path(folder) / OMNIGLOT_EMBEDDING)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise StageSkipped(f"no {missing[0]}: run benchmarks/prepare_gpu_bundle.py (or pass --omniglot-dir)")
    return files


def _omniglot_config(ctx: Context, train_file: Path, embedding: Path, steps: int):
    """The protocol's own DAGAN config (``omniglot_fewshot.dagan_config``: ``configs/dagan_omniglot_32.yaml`` and its
    fixed keys) for ``steps`` generator steps on this device, in bf16, with the bundle's embedding and the training
    split in memory; ``data.classes`` lists the training characters, so the CPU's ``--reuse-dagan`` can tell that it
    never saw a test character without the training file."""
    from prepare_gpu_bundle import omniglot_pipeline

    from dagan_gn.store.patch_file import PatchFile

    fewshot = omniglot_pipeline()
    log_every = min(steps, max(50, steps // 100))  # each log syncs the GPU: not every step
    args = fewshot.parse_args([
        *ctx.sizes.omniglot_overrides, f"loss.embedding_file={embedding}", *ctx.amp_overrides("bf16"),
        "data.in_memory=true", "data.num_workers=0", f"train.log_every={log_every}",
        f"train.checkpoint_every={max(1, steps // 5)}", "train.keep_checkpoints=1", f"train.sample_every={steps}",
        "--out", str(ctx.work / "omniglot"), "--device", ctx.device.type, "--seed", str(ctx.args.seed), "--quiet",
        "--steps", str(steps),
    ])
    cfg = fewshot.dagan_config(args, train_file)
    with PatchFile(train_file) as pf:
        classes = list(pf.class_names)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, classes=classes))


def _return_run(run: Path, dest: Path) -> dict[str, Any]:
    """Copy a run's newest checkpoint and its ``metrics.jsonl`` to ``dest`` (atomically, the older copy replaced)."""
    import shutil

    from dagan_gn.fileio import atomic_path, sha256_file
    from dagan_gn.training.checkpoint import checkpoint_dir, latest_checkpoint

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return {}
    for old in checkpoint_dir(dest).glob("step_*.pt") if checkpoint_dir(dest).is_dir() else ():
        if old.name != ckpt.name:
            old.unlink()
    copies = {"checkpoint": (ckpt, checkpoint_dir(dest) / ckpt.name), "metrics": (run / "metrics.jsonl",
                                                                               dest / "metrics.jsonl")}
    for src, dst in copies.values():
        if src.is_file():
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
    back = copies["checkpoint"][1]
    return {"checkpoint": str(back.relative_to(dest.parent)), "bytes": back.stat().st_size,
            "sha256": sha256_file(back)}


def stage_omniglot(ctx: Context, st: dict, deadline: float) -> None:
    import threading

    from dagan_gn.fileio import sha256_file
    from dagan_gn.training.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
    from dagan_gn.training.families import generator_from_state
    from dagan_gn.training.run_log import read_metrics
    from dagan_gn.training.trainer import Trainer

    s, dev = ctx.sizes, ctx.device
    train_file, embedding = _omniglot_inputs(ctx)
    st["measurements"]["inputs"] = {"train_file_sha256": sha256_file(train_file),
                                    "embedding": torch.load(embedding, weights_only=True).get("meta", {})}
    lo, hi = s.omniglot_steps
    if lo == hi:
        steps, how, rate = lo, "fixed (dry run)", None
    else:
        # A short run of the same config: its steps/s (from the start of its loop, so warm-up included) and the
        # seconds it took to start (data, nets, embedding) size the real run.
        calibration = _omniglot_config(ctx, train_file, embedding, s.omniglot_calibration_steps)
        seconds = _train_run(calibration, ctx.work / "omniglot_calibration")
        rates = [r["steps_per_s"] for r in read_metrics(ctx.work / "omniglot_calibration" / "metrics.jsonl")
                 if r.get("steps_per_s")]
        rate = rates[-1] if rates else s.omniglot_calibration_steps / seconds
        startup = max(0.0, seconds - s.omniglot_calibration_steps / rate)
        left = deadline - time.perf_counter() - s.omniglot_reserve_s - startup
        # The calibration's rate already holds the data, EMA and logging: 5 % more for the checkpoints.
        steps = steps_for_budget(left, 1 / rate, 1, lo, hi, overhead=1.05, multiple=1000)
        how = (f"a {s.omniglot_calibration_steps}-step calibration run: {rate:.1f} steps/s, {startup:.1f} s to "
               f"start, {max(left, 0):.0f} s left")
        st["measurements"].update(calibration_steps_per_s=rate, calibration_seconds=seconds)
        if steps == 0:
            raise StageSkipped(f"{how}: fewer than {lo} steps fit")
    cfg = _omniglot_config(ctx, train_file, embedding, steps)
    run = ctx.work / OMNIGLOT_RUN
    st["measurements"].update(steps_planned=steps, steps_sized_by=how, batch_size=cfg.data.batch_size,
                              characters=len(cfg.data.classes), config="configs/dagan_omniglot_32.yaml")
    st["notes"].append(f"{steps} generator steps planned (sized by {how}); batch {cfg.data.batch_size}, "
                       f"n_critic {cfg.optim.n_critic}, bf16, seed {ctx.args.seed}, {len(cfg.data.classes)} training "
                       "characters, the identity embedding trained on the CPU (prepare_gpu_bundle.py)")
    ctx.report.save()
    trainer = Trainer(cfg, run, log=_quiet)
    # The watchdog: if the stage's time runs out, the run stops after its current step with a checkpoint (its LR
    # schedule still aimed at the planned steps) and that checkpoint comes back.
    watchdog = threading.Timer(max(0.0, deadline - time.perf_counter() - s.omniglot_reserve_s), trainer.stops.request)
    watchdog.daemon = True
    t0 = time.perf_counter()
    watchdog.start()
    try:
        trainer.fit()
    finally:
        watchdog.cancel()
        trainer.close()
        _sync(dev)
        seconds = time.perf_counter() - t0
        returned = _return_run(run, ctx.out / OMNIGLOT_RUN)
        st["measurements"]["returned"] = returned
        ctx.report.save()
    ckpt = latest_checkpoint(run)
    reached = checkpoint_step(ckpt) if ckpt is not None else 0
    finite, last, n_logged = _finite_losses(run)
    st["measurements"].update(steps_reached=reached, seconds=seconds, steps_per_s=reached / seconds,
                              final_losses=last, stopped_by_watchdog=reached < steps)
    st["tables"].append({"title": "Omniglot DAGAN (configs/dagan_omniglot_32.yaml) at reference scale", "header": [
        "steps planned", "steps reached", "train s", "steps/s", "final critic loss", "final generator loss",
        "checkpoint MiB"], "rows": [[steps, reached, seconds, reached / seconds, last.get("loss/critic"),
                                     last.get("loss/generator"), returned.get("bytes", 0) / 2**20]]})
    check(st, "omniglot: losses finite", finite, n_logged, "every logged loss finite")
    check(st, "omniglot: the planned steps were trained", reached == steps, reached,
          f"step {steps} (less: the watchdog stopped the run at the stage's time)")
    check(st, "omniglot: checkpoint back under OUT, ≤ 16 MiB", 0 < returned.get("bytes", 0) <= 16 * 2**20,
          returned.get("bytes"), "the device tool returns files of at most 16 MiB")
    # What the CPU's --reuse-dagan will do first: the checkpoint loads as a generator that makes finite variants.
    state = load_checkpoint(ctx.out / returned["checkpoint"])
    generator, _ = generator_from_state(state, ctx.out / returned["checkpoint"], device="cpu", use_ema=True)
    sources = trainer.dataset[0]["image"].unsqueeze(0).repeat(4, 1, 1, 1)
    with torch.no_grad():
        z = torch.randn(4, cfg.model.z_dim, generator=torch.Generator().manual_seed(ctx.args.seed))
        variants = generator(sources, z)
    spread = float((variants[0] - variants[1]).abs().mean())
    check(st, "omniglot: the returned checkpoint's generator makes finite, differing variants",
          bool(torch.isfinite(variants).all()) and spread > 0, spread, "finite, mean |v0 − v1| > 0")
    st["notes"].append(f"on the CPU: python pipelines/omniglot_fewshot.py --out runs/omniglot_gpu --seeds 0,1,2,3,4 "
                       f"--threads 2 --workers 2 --quiet --reuse-dagan <OUT>/{OMNIGLOT_RUN}")


# ============================================================================================ training step
def _train_step_plan(sizes: Sizes) -> list[dict[str, Any]]:
    """Rows of the training-step stage: every model eagerly (fp32 with the reference and the literal-net engine, then
    the engine in bf16 and bf16 + cudnn.benchmark), then the compiled engine rows last (the costliest, first to go
    when time is short). Models not in ``train_full_models`` get one fp32 engine row only."""
    rows = []
    for model, batch in sizes.train_models:
        if model not in sizes.train_full_models:
            rows.append(dict(model=model, batch=batch, precision="fp32", compile=False, cudnn_benchmark=False,
                             sides=("engine",)))
            continue
        rows.append(dict(model=model, batch=batch, precision="fp32", compile=False, cudnn_benchmark=False,
                         sides=("reference", "engine, literal nets", "engine")))
        rows.append(dict(model=model, batch=batch, precision="bf16", compile=False, cudnn_benchmark=False,
                         sides=("engine",)))
        if sizes.cudnn_benchmark_rows:
            rows.append(dict(model=model, batch=batch, precision="bf16", compile=False, cudnn_benchmark=True,
                             sides=("engine",)))
    if sizes.compile_rows:
        rows += [dict(model=model, batch=batch, precision="bf16", compile=True, cudnn_benchmark=False,
                      sides=("engine",)) for model, batch in sizes.train_models if model in sizes.train_full_models]
    return rows


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def stage_train_step(ctx: Context, st: dict, deadline: float) -> None:
    import train_step

    sizes, dev = ctx.sizes, ctx.device
    peak = ctx.shared.get("peak") or {k: train_step.matmul_rate(dev, PRECISIONS[k], n=sizes.matmul_n)
                                      for k in ("bf16", "fp32")}
    if not sizes.compile_rows:
        st["notes"].append("torch.compile and cudnn.benchmark rows run on CUDA only (inductor's CPU build takes "
                           "minutes; cuDNN is CUDA's)")
    st["notes"].append(f"iteration = {sizes.train_n_critic} critic updates + 1 generator update; best of "
                       f"{sizes.train_iters} after a warm-up; engine channels_last={dev.type == 'cuda'}; "
                       "% columns: FLOPs (FlopCounterMode) per second over the measured matmul rate")
    rows_out: list[dict] = st["measurements"].setdefault("rows", [])
    table = {"title": "Training-step throughput", "header": [
        "model", "batch", "side", "precision", "compile", "cudnn.benchmark", "s / iteration", "images/s",
        "GFLOP / iteration", "% of bf16 matmul", "% of fp32 matmul", "speed-up vs reference", "note"], "rows": []}
    st["tables"].append(table)
    reference_s: dict[str, float] = {}
    eager_flops: dict[tuple[str, str], float] = {}
    last_cost: dict[tuple[str, bool], float] = {}
    for plan in _train_step_plan(sizes):
        key = (plan["model"], plan["compile"])
        # A compiled row costs about what the last compiled row did (inductor's build dominates), whatever the net.
        compiled = [c for (_, comp), c in last_cost.items() if comp]
        fallback = max(compiled, default=sizes.compile_estimate_s) if plan["compile"] else 0.0
        estimate = last_cost.get(key, fallback)
        label = (plan["model"], plan["batch"], ", ".join(plan["sides"]), plan["precision"], plan["compile"],
                 plan["cudnn_benchmark"])
        if time.perf_counter() + estimate > deadline:
            table["rows"].append([*label, None, None, None, None, None, None,
                                  f"skipped: ~{estimate:.0f} s needed, stage time spent"])
            rows_out.append({**plan, "status": "skipped"})
            continue
        args = types.SimpleNamespace(batch_size=plan["batch"], n_critic=sizes.train_n_critic,
                                     amp="none" if plan["precision"] == "fp32" else plan["precision"],
                                     channels_last=dev.type == "cuda", compile=plan["compile"], iters=sizes.train_iters)
        overrides = (*sizes.train_overrides.get(plan["model"], ()), *ctx.amp_overrides(plan["precision"]))
        t0 = time.perf_counter()
        try:
            with _cudnn_benchmark(plan["cudnn_benchmark"]):
                result = train_step.bench_model(plan["model"], args, dev, peak["bf16"], sides=plan["sides"],
                                                overrides=overrides, count_flops=not plan["compile"])
        except Exception as exc:  # noqa: BLE001 - one row failing (e.g. inductor) must not stop the others
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            table["rows"].append([*label, None, None, None, None, None, None, f"failed: {err}"])
            rows_out.append({**plan, "status": "failed", "error": err, "traceback": traceback.format_exc()})
            last_cost[key] = time.perf_counter() - t0
            ctx.report.save()
            continue
        finally:
            _free_memory()
        cost = time.perf_counter() - t0
        last_cost[key] = cost
        for row in train_step.side_rows(result, sizes.train_n_critic, reference_s.get(plan["model"])):
            if row["side"] == "reference":
                reference_s[plan["model"]] = row["s_per_iteration"]
            side_precision = "fp32" if row["side"] == "reference" else plan["precision"]  # the reference is fp32
            flops_key = (plan["model"], side_precision)
            if plan["compile"]:  # same FLOPs as the eager engine in that precision
                gflop = eager_flops.get(flops_key, float("nan"))
                row.update(gflop_per_iteration=gflop, gflop_per_s=gflop / row["s_per_iteration"],
                           fraction_of_peak=gflop * 1e9 / row["s_per_iteration"] / peak["bf16"])
            elif row["side"] == "engine":
                eager_flops[flops_key] = row["gflop_per_iteration"]
            row.update(precision=side_precision, compile=plan["compile"], cudnn_benchmark=plan["cudnn_benchmark"],
                       fraction_of_fp32_peak=row["gflop_per_s"] * 1e9 / peak["fp32"], status="ok",
                       wall_s_of_row=cost)
            rows_out.append(row)
            table["rows"].append([row["model"], row["batch"], row["side"], side_precision, plan["compile"],
                                  plan["cudnn_benchmark"], row["s_per_iteration"], row["images_per_s"],
                                  row["gflop_per_iteration"], 100 * row["fraction_of_peak"],
                                  100 * row["fraction_of_fp32_peak"], row["speedup"], ""])
            if row["side"] == "engine":
                ctx.shared.setdefault("engine_s", {})[(plan["model"], row["batch"], side_precision,
                                                       plan["compile"], plan["cudnn_benchmark"])] = row["s_per_iteration"]
        ctx.report.save()
    ok = [r for r in rows_out if r.get("status") == "ok"]
    check(st, "every row that ran gave a finite time", bool(ok) and all(
        math.isfinite(r["s_per_iteration"]) and r["s_per_iteration"] > 0 for r in ok), len(ok), "> 0 s per iteration")
    failed = [r for r in rows_out if r.get("status") == "failed"]
    check(st, "no training-step row failed", not failed, len(failed), "0 failed rows")
    bf16 = [r for r in ok if r["side"] == "engine" and r["precision"] == "bf16"]
    if bf16:
        best = max(bf16, key=lambda r: r["fraction_of_peak"])
        goal(ctx, st, f"engine bf16, best row ({best['model']}, compile={best['compile']})",
             100 * best["fraction_of_peak"], 35, "% of the measured bf16 matmul rate")


# ============================================================================================ correctness
@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` with cuDNN deterministic and not benchmarking;
    yields the list of warnings raised inside (the non-deterministic ops met, if any); restores the settings."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


def _make_patch_file(ctx: Context, st: dict) -> Path:
    """A 64-px patch file from a synthetic DICOM archive written here: the demo's archive → ``extract_patches``."""
    from dagan_gn.jobs.extract_patches import extract_patches
    from dagan_gn.phantom.mammogram import make_demo_archive

    t0 = time.perf_counter()
    dicom_dir, labels_csv = make_demo_archive(ctx.work / "archive", n_patients=ctx.sizes.demo_patients,
                                              seed=ctx.args.seed, size=ctx.sizes.demo_size)
    patches = ctx.work / "patches64.h5"
    rep = extract_patches([dicom_dir], patches, labels_csv=labels_csv, patch_size=64, per_image=ctx.sizes.per_image,
                          per_lesion=ctx.sizes.per_lesion, min_tissue=0.8, seed=ctx.args.seed,
                          workers=ctx.sizes.extract_workers, progress=False)
    st["measurements"]["patches"] = {"seconds": time.perf_counter() - t0, "by_class": rep.patches_by_class,
                                     "by_split": rep.patches_by_split, "files": rep.files_used}
    check(st, "patch file extracted from the synthetic archive", rep.patches_by_split.get("train", 0) >= 2,
          rep.patches_by_split.get("train", 0), "≥ 2 train patches")
    return patches


def _dagan_config(ctx: Context, patches: Path, precision: str, steps: int):
    from dagan_gn.config import load_config
    from dagan_gn.store.patch_file import PatchFile

    with PatchFile(patches) as pf:
        num_classes = len(pf.class_names)
    s = ctx.sizes
    return load_config(ROOT / "configs" / "dagan_mammo_64.yaml", [
        f"data.path={patches}", f"model.num_classes={num_classes}", f"data.batch_size={s.dagan_batch}",
        "data.num_workers=0", f"train.steps={steps}", f"train.seed={ctx.args.seed}",
        f"train.device={ctx.device.type}", "train.progress=false", f"train.log_every={s.log_every}",
        f"train.checkpoint_every={steps}", f"train.sample_every={steps}",  # a stopped run checkpoints anyway
        f"train.ema_start={steps // 4}", f"train.channels_last={str(ctx.device.type == 'cuda').lower()}",
        *ctx.amp_overrides(precision), *s.dagan_overrides,
    ])


def _probe_precision(ctx: Context, st: dict, cfg, precision: str) -> None:
    """One critic and one generator update of a fresh trainer, watching the dtypes: the critic's convolutions in
    the autocast dtype, the gradient penalty and the master weights in fp32, the scaler on for fp16 only."""
    from dagan_gn.training.trainer import Trainer

    trainer = Trainer(cfg, ctx.work / f"probe_{precision}", log=_quiet)
    try:
        seen: list[torch.dtype] = []
        handles = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
                   for m in trainer.d_bare.modules() if isinstance(m, torch.nn.Conv2d)]
        batch = trainer.model.prepare(next(trainer.data))
        scale_before = trainer.scaler_d.get_scale() if trainer.scaler_d.is_enabled() else 1.0
        d_logs, _ = trainer._critic_update(batch, want_norm=True)
        scale_after = trainer.scaler_d.get_scale() if trainer.scaler_d.is_enabled() else 1.0
        for h in handles:
            h.remove()
        g_logs, _ = trainer._generator_update(batch, want_norm=True)
        want = PRECISIONS[precision]
        check(st, f"{precision}: critic convolutions run in {precision}", bool(seen) and set(seen) == {want},
              ", ".join(sorted({str(d)[6:] for d in seen})), f"all {len(seen)} conv outputs {precision}")
        gp = d_logs["loss/gradient_penalty"]
        check(st, f"{precision}: gradient penalty computed in fp32", gp.dtype == torch.float32,
              str(gp.dtype)[6:], "float32")
        values = {k: float(v) for k, v in {**d_logs, **g_logs}.items()}
        finite = all(map(math.isfinite, values.values()))
        skipped = scale_after < scale_before  # the GradScaler found inf/NaN gradients and skipped this update
        st["measurements"][f"{precision}_first_update"] = {"values": values, "scale_before": scale_before,
                                                           "scale_after": scale_after, "scaler_skipped": skipped}
        if skipped:
            st["notes"].append(f"{precision}: the first critic update overflowed at the GradScaler's initial scale "
                               f"{scale_before:g} and was skipped (scale now {scale_after:g}), as the scaler is "
                               "meant to; its logged penalty is non-finite")
        check(st, f"{precision}: first update finite, or skipped by the GradScaler", finite or skipped,
              values.get("loss/critic"), "finite values, or an overflow the scaler skipped (scale halved)")
        check(st, f"{precision}: weights finite after the first updates", all(
            bool(torch.isfinite(p).all()) for net in (trainer.g_bare, trainer.d_bare) for p in net.parameters()),
            "finite", "every parameter finite")
        check(st, f"{precision}: master weights stay fp32", all(
            p.dtype == torch.float32 for net in (trainer.g_bare, trainer.d_bare) for p in net.parameters()),
            "float32", "float32")
        check(st, f"{precision}: GradScaler {'on' if precision == 'fp16' else 'off'}",
              trainer.scaler_d.is_enabled() == (precision == "fp16"), trainer.scaler_d.is_enabled(),
              "on for fp16 only")
    finally:
        trainer.close()


def _finite_losses(run: Path) -> tuple[bool, dict[str, float], int]:
    from dagan_gn.training.run_log import read_metrics

    records = read_metrics(run / "metrics.jsonl")
    finite = bool(records)
    for rec in records:
        if rec.get("amp/critic_step_skipped", 0) > 0 or rec.get("amp/generator_step_skipped", 0) > 0:
            continue  # an fp16 overflow the GradScaler skipped: its non-finite loss is expected
        for k, v in rec.items():
            if k.startswith(("loss/", "critic/", "wasserstein")) and not (isinstance(v, (int, float))
                                                                            and math.isfinite(v)):
                finite = False
    training = [rec for rec in records if "loss/critic" in rec]  # sample-grid metrics are records of their own
    last = {k: v for k, v in (training[-1] if training else {}).items() if k.startswith("loss/")}
    return finite, last, len(records)


def _state_difference(a: dict, b: dict) -> tuple[bool, float]:
    """(bit-equal?, max absolute difference) over the generator, critic and EMA tensors of two checkpoints."""
    equal, worst = True, 0.0
    for part in ("generator", "critic", "ema"):
        if a.get(part) is None and b.get(part) is None:
            continue
        for name, ta in a[part].items():
            tb = b[part][name]
            if not torch.equal(ta, tb):
                equal = False
                if ta.is_floating_point():
                    worst = max(worst, float((ta.double() - tb.double()).abs().max()))
    return equal, worst


def _train_run(cfg, run: Path, **kwargs) -> float:
    from dagan_gn.jobs.train import train

    t0 = time.perf_counter()
    train(cfg, run, **kwargs)
    _sync(torch.device(cfg.train.device))
    return time.perf_counter() - t0


def stage_correctness(ctx: Context, st: dict, deadline: float) -> None:
    from dagan_gn.training.checkpoint import latest_checkpoint, load_checkpoint

    steps = ctx.sizes.correctness_steps
    patches = _make_patch_file(ctx, st)
    ctx.report.save()
    runs: dict[str, Any] = st["measurements"].setdefault("runs", {})
    table = {"title": f"DAGAN-64 on the synthetic patches ({steps} generator steps)",
             "header": ["run", "precision", "seconds", "steps/s", "final critic loss", "final generator loss"],
             "rows": []}
    st["tables"].append(table)

    def record(name: str, precision: str, run: Path, seconds: float, n_steps: int) -> None:
        finite, last, n_logged = _finite_losses(run)
        runs[name] = {"precision": precision, "seconds": seconds, "steps_per_s": n_steps / seconds,
                      "final_losses": last, "records": n_logged}
        table["rows"].append([name, precision, seconds, n_steps / seconds, last.get("loss/critic"),
                              last.get("loss/generator")])
        check(st, f"{name}: losses finite", finite, n_logged, "every logged loss finite")
        check(st, f"{name}: checkpoint written", latest_checkpoint(run) is not None,
              latest_checkpoint(run).name if latest_checkpoint(run) else None, f"checkpoints/step_{steps:07d}.pt")
        ctx.report.save()

    # bf16: dtypes, then a straight run and a stopped-and-resumed one under deterministic algorithms.
    cfg = _dagan_config(ctx, patches, "bf16", steps)
    _probe_precision(ctx, st, cfg, "bf16")
    straight, split = ctx.work / "bf16_straight", ctx.work / "bf16_resumed"
    with deterministic_algorithms() as caught:
        seconds = _train_run(cfg, straight)
        record("bf16 straight (deterministic)", "bf16", straight, seconds, steps)
        if time.perf_counter() + seconds > deadline:
            st["notes"].append("resume check skipped: stage time spent")
        else:
            half = _train_run(cfg, split, stop_at=steps // 2)
            rest = _train_run(cfg, split, resume=True)
            record("bf16 stopped at half, resumed", "bf16", split, half + rest, steps)
            a, b = (load_checkpoint(latest_checkpoint(r)) for r in (straight, split))
            check(st, "bf16: resumed run continued to the last step", int(b["step"]) == steps, int(b["step"]),
                  f"step {steps}")
            equal, worst = _state_difference(a, b)
            st["measurements"]["resume_max_abs_diff"] = worst
            check(st, "bf16: resume == straight run (deterministic algorithms)", equal, worst,
                  "bit-equal weights (value: max |difference|)")
    nondeterministic = sorted({str(w.message).split("\n")[0] for w in caught if "determinis" in str(w.message)})
    st["measurements"]["nondeterministic_ops"] = nondeterministic
    if nondeterministic:
        st["notes"].append(f"ops without a deterministic implementation met: {nondeterministic}")

    # fp16 with GradScalers (default, non-deterministic algorithms: what a real run uses).
    st["notes"].append(f"runs log every {ctx.sizes.log_every} steps; a logged non-finite loss of a step the fp16 "
                       "GradScaler skipped (an overflow while it calibrates its scale) does not stop the run "
                       "(amp/*_step_skipped in metrics.jsonl)")
    if time.perf_counter() + seconds > deadline:
        st["notes"].append("fp16 run skipped: stage time spent")
    else:
        cfg16 = _dagan_config(ctx, patches, "fp16", steps)
        _probe_precision(ctx, st, cfg16, "fp16")
        run16 = ctx.work / "fp16"
        record("fp16 (GradScaler)", "fp16", run16, _train_run(cfg16, run16), steps)
        scaler = load_checkpoint(latest_checkpoint(run16))["scaler"]
        scales = {k: float(v["scale"]) for k, v in scaler.items()}
        st["measurements"]["fp16_scales"] = scales
        check(st, "fp16: GradScaler states checkpointed, scales finite > 0",
              set(scales) == {"g", "d"} and all(math.isfinite(v) and v > 0 for v in scales.values()),
              scales.get("d"), "scale of g and d in (0, inf)")

    # augment from the bf16 checkpoint.
    from dagan_gn.jobs.augment import augment
    from dagan_gn.store.patch_file import PatchFile, uint16_to_signed

    synthetic = ctx.work / "synthetic64.h5"
    rep = augment(patches, straight, synthetic, n=ctx.sizes.augment_n, batch_size=ctx.sizes.augment_batch,
                  device=str(ctx.device), seed=ctx.args.seed, contact_sheet=ctx.out / "contact_sheet.png",
                  progress=False)
    with PatchFile(synthetic) as pf:
        images = uint16_to_signed(pf.patches[: 2 * ctx.sizes.augment_n])
        variant = pf.provenance("variant")[: 2 * ctx.sizes.augment_n]
    st["measurements"]["augment"] = {"n_written": rep.n_written, "n_sources": rep.n_sources,
                                     "patches_per_s": rep.patches_per_second, "seconds": rep.seconds,
                                     "used_ema": rep.used_ema}
    check(st, "augment wrote n variants per train patch", rep.n_written == rep.n_sources * ctx.sizes.augment_n,
          rep.n_written, f"{rep.n_sources} × {ctx.sizes.augment_n}")
    first, second = images[variant == 0][0], images[variant == 1][0]
    check(st, "augment: variants of one source differ (the noise is used)",
          float(np.abs(first - second).mean()) > 0, float(np.abs(first - second).mean()), "> 0 mean |difference|")
    check(st, "augment: synthetic patches not constant", float(images.std()) > 1e-3, float(images.std()), "std > 1e-3")
    ctx.shared.update(patches=patches, synthetic=synthetic)
    try:
        _diversity(ctx, st)
    except Exception as exc:  # noqa: BLE001 - a metric's failure must not cost the checks above
        st["measurements"]["diversity"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        check(st, "diversity ratio computed", False, f"{type(exc).__name__}", "dagan_gn.metrics.diversity ran")


# ============================================================================================ augment throughput
def stage_augment_throughput(ctx: Context, st: dict, deadline: float) -> None:
    import augment as augment_bench  # benchmarks/augment.py

    s, dev = ctx.sizes, str(ctx.device)
    rows = augment_bench.forward_sweep(list(s.sweep_batches), s.sweep_repeats, dev, reference=s.sweep_reference)
    _free_memory()
    rows += augment_bench.forward_sweep(list(s.sweep_batches), s.sweep_repeats, dev, reference=False,
                                        autocast=torch.bfloat16, channels_last=True)
    _free_memory()
    if not s.sweep_reference:
        st["notes"].append("reference UResNet forward runs on CUDA only (seconds per patch on a CPU)")
    st["measurements"]["forward"] = rows
    st["tables"].append({"title": "256-px generator forward (torch.inference_mode)", "header": [
        "network", "dtype", "channels_last", "batch", "patches/s", "peak GPU MiB"],
        "rows": [[r["network"], r["dtype"], r["channels_last"], r["batch"], r["patches_per_s"], r["cuda_peak_mib"]]
                 for r in rows]})
    if time.perf_counter() > deadline:
        st["notes"].append("whole augment() job skipped: stage time spent")
        return
    root = ctx.work / "augment256"
    root.mkdir(exist_ok=True)
    patches, run = augment_bench.make_inputs(root, s.job_sources)
    job = augment_bench.timed_augment(patches, run, root / "synthetic256.h5", n=s.job_n, batch_size=s.job_batch,
                                      device=dev)
    st["measurements"]["job"] = {**job, "sources": s.job_sources, "n": s.job_n, "batch_size": s.job_batch}
    st["tables"].append({"title": "Whole augment() job at 256 px (HDF5 read, generator fp32, gzip write)",
                         "header": ["sources", "n per source", "batch", "patches", "seconds", "patches/s",
                                    "peak GPU MiB"],
                         "rows": [[s.job_sources, s.job_n, s.job_batch, job["n_out"], job["seconds"],
                                   job["patches_per_s"], job["cuda_peak_mib"]]]})
    dagan = [r for r in rows if r["network"].startswith("DAGAN") and r["dtype"] == "float32"]
    check(st, "forward rates finite", all(math.isfinite(r["patches_per_s"]) and r["patches_per_s"] > 0 for r in rows),
          len(rows), "> 0 patches/s")
    check(st, "augment job wrote every patch", job["n_out"] == s.job_sources * s.job_n, job["n_out"],
          f"{s.job_sources} × {s.job_n}")
    best = max(dagan, key=lambda r: r["patches_per_s"])
    goal(ctx, st, f"DAGAN 256 forward, fp32 as augment runs it (batch {best['batch']})", best["patches_per_s"],
         5000, "patches/s on an H100")


# ============================================================================================ quality
def _cifar_zip(ctx: Context) -> Path:
    """The CIFAR-10 test zip: ``--cifar-zip``, the bundle's copy, ../shared's; in a dry run without any, a tiny
    synthetic zip of the same layout."""
    from prepare_gpu_bundle import BUNDLE_DIR, CIFAR_ZIP, default_cifar_zip

    for candidate in (ctx.args.cifar_zip, BUNDLE_DIR / CIFAR_ZIP, default_cifar_zip()):
        if candidate is not None and Path(candidate).is_file():
            return Path(candidate)
    if not ctx.dry:
        raise StageSkipped(f"no CIFAR-10 test zip (pass --cifar-zip, or run benchmarks/prepare_gpu_bundle.py "
                           f"to put it in {BUNDLE_DIR / CIFAR_ZIP})")
    import io
    import zipfile

    from PIL import Image

    from dagan_gn.datasets.cifar10 import CIFAR10_CLASSES

    path = ctx.work / "cifar10-synthetic-test.zip"
    rng = np.random.default_rng(ctx.args.seed)
    with zipfile.ZipFile(path, "w") as zf:
        for name in CIFAR10_CLASSES:
            for i in range(ctx.sizes.cifar_limit_per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
                zf.writestr(f"test/{name}/{i:04d}.jpg", buf.getvalue())
    ctx.report.stage(3)["notes"].append("no CIFAR-10 zip here: a synthetic 32×32 zip of the same layout was used")
    return path


def _inception_weights(ctx: Context) -> tuple[str, str | None]:
    """(feature extractor, weights file): the bundle's fp16 Inception unpacked to fp32 on the GPU; ``tiny`` in a dry
    run (Inception on a CPU is ~3 images/s)."""
    if ctx.dry:
        return "tiny", None
    if ctx.args.inception_weights:
        return "inception", str(ctx.args.inception_weights)
    from prepare_gpu_bundle import BUNDLE_DIR, INCEPTION_FP16, unpack_inception_fp16

    packed = BUNDLE_DIR / INCEPTION_FP16
    if not packed.is_file():
        raise StageSkipped(f"no Inception weights: {packed} is missing (run benchmarks/prepare_gpu_bundle.py) and "
                           "no --inception-weights was given")
    return "inception", str(unpack_inception_fp16(packed, ctx.work / "inception-v3-compat-fp32.pth"))


def _diversity(ctx: Context, st: dict) -> None:
    """Mean diversity ratio of the correctness stage's variants (``dagan_gn.metrics.diversity``, when that module
    exists)."""
    try:
        from dagan_gn.metrics.diversity import diversity_ratios
    except ModuleNotFoundError:
        st["measurements"]["diversity"] = "skipped: dagan_gn.metrics.diversity not present"
        st["notes"].append("diversity ratio skipped: dagan_gn.metrics.diversity not present")
        return
    if "synthetic" not in ctx.shared:
        st["notes"].append("diversity ratio skipped: no synthetic file was made")
        return
    from dagan_gn.store.patch_file import PatchFile, uint16_to_signed

    with PatchFile(ctx.shared["synthetic"]) as syn, PatchFile(ctx.shared["patches"]) as real:
        order = np.lexsort((syn.provenance("variant"), syn.provenance("source_index")))
        n = ctx.sizes.augment_n
        variants = uint16_to_signed(syn.patches[:])[order]
        variants = variants.reshape(-1, n, *variants.shape[1:])
        source_labels = syn.labels[:][order][::n]
        rows = real.split_indices("train")
        real_images, real_labels = uint16_to_signed(real.patches[:])[rows], real.labels[:][rows]
    result = diversity_ratios(torch.from_numpy(variants), torch.from_numpy(source_labels),
                              torch.from_numpy(real_images), torch.from_numpy(real_labels))
    values = result.get("ratio", result.get("ratios", result)) if isinstance(result, dict) else result
    if isinstance(values, dict):
        values = list(values.values())
    mean = float(np.nanmean(np.asarray(torch.as_tensor(values, dtype=torch.float64))))
    st["measurements"]["diversity"] = {"mean_ratio": mean, "sources": int(len(variants)), "variants": n}
    check(st, "diversity ratio finite", math.isfinite(mean), mean, "finite")


def steps_for_budget(seconds: float, s_per_step: float, arms: int, lo: int, hi: int, *, overhead: float = 1.25,
                     multiple: int = 10) -> int:
    """Generator steps per arm that fit ``seconds`` for ``arms`` runs at ``s_per_step`` times ``overhead`` (what the
    timing left out: data loading, EMA, logging, checkpoints), a multiple of ``multiple`` capped at ``hi``; 0 when
    fewer than ``lo`` fit."""
    steps = int(max(seconds, 0.0) / arms / (overhead * s_per_step)) // multiple * multiple
    return 0 if steps < lo else min(steps, hi)


#: The critic norms compared (issue 19: group vs layer vs none), and the sample rows of each in cifar_samples.png.
QUALITY_ARMS, SAMPLE_ROWS = ("group", "layer", "none"), 2


def stage_quality(ctx: Context, st: dict, deadline: float) -> None:
    from dagan_gn.config import apply_overrides
    from dagan_gn.datasets.cifar10 import CIFAR10Dataset
    from dagan_gn.jobs.cifar10_study import PRESETS, Cell, cell_config
    from dagan_gn.metrics.fidelity import compute_fidelity
    from dagan_gn.training.families import load_generator
    from dagan_gn.training.families import get_family
    from dagan_gn.training.run_log import save_image_grid

    s, dev, seed = ctx.sizes, ctx.device, ctx.args.seed
    extractor, weights = _inception_weights(ctx)
    data = _cifar_zip(ctx)
    dataset = CIFAR10Dataset(data, "test", limit_per_class=s.cifar_limit_per_class, seed=seed,
                             cache_dir=ctx.work / "cache" / "cifar10")
    preset = PRESETS[s.cifar_preset]
    arms = QUALITY_ARMS

    def config(norm: str, steps: int, folder: str):
        p = dataclasses.replace(preset, steps=steps, eval_every=0, num_workers=s.cifar_num_workers,
                                checkpoint_every=steps, sample_every=steps, log_every=max(1, steps // 20),
                                ema_start=min(preset.ema_start, steps // 2))
        cfg = cell_config(Cell("resnet", norm, "batch", seed), p, data, device=dev.type, feature_extractor=extractor,
                          inception_weights=weights or "")
        return apply_overrides(cfg, [*ctx.amp_overrides("bf16"), f"train.channels_last={str(not ctx.dry).lower()}",
                                     *s.cifar_overrides]), ctx.work / folder

    # Size the steps to the time left: the training-step stage's engine time for this net, batch and precision when
    # it ran first (+25 % for data loading, EMA and logging), else a short calibration run.
    lo, hi = s.cifar_steps
    if lo == hi:
        steps, how = lo, "fixed (dry run)"
    else:
        s_it = ctx.shared.get("engine_s", {}).get(("cifar_resnet", preset.batch_size, "bf16", False, False))
        how = "the training-step stage's engine bf16 time × 1.25"
        if s_it is None:
            cfg, run = config("group", s.calibration_steps, "cifar_calibration")
            s_it = _train_run(cfg, run, dataset=dataset) / s.calibration_steps
            how = f"a {s.calibration_steps}-step calibration run × 1.25"
        train_time = deadline - time.perf_counter() - s.metric_reserve_s
        steps = steps_for_budget(train_time, s_it, len(arms), lo, hi)
        if steps == 0:
            raise StageSkipped(f"only {max(train_time, 0):.0f} s left for training: fewer than {lo} steps per arm")
    st["measurements"].update(steps=steps, steps_sized_by=how, training_images=len(dataset),
                              feature_extractor=extractor, fid_samples=s.fid_samples, kid_subset=s.kid_subset)
    st["notes"].append(f"{steps} generator steps per arm (sized by {how}), batch {preset.batch_size}, bf16, "
                       f"seed {seed}; trained and scored against the {len(dataset)} CIFAR-10 test images; "
                       f"{s.fid_samples} samples per arm; one seed per arm, so no interval across training runs "
                       "(KID ± is the std over subsets)")
    st["notes"].append("no IS: the Inception weights that travel are torch-fidelity's FID network, whose 1008-way "
                       "classifier is not part of them, so the seed project's IS table cannot be recomputed here")
    st["notes"].append(f"cifar_samples.png: {SAMPLE_ROWS} rows of 8 EMA samples per arm, arms top to bottom in the "
                       f"order {', '.join(arms)}")
    table = {"title": "CIFAR ResNet WGAN-GP: group-norm vs layer-norm vs no-norm critic", "header": [
        "critic norm", "steps", "train s", "steps/s", "FID", "KID", "KID std", "final critic loss"], "rows": []}
    st["tables"].append(table)
    arms_out = st["measurements"].setdefault("arms", {})
    shown: list[torch.Tensor] = []
    for norm in arms:
        cfg, run = config(norm, steps, f"cifar_{norm}")
        seconds = _train_run(cfg, run, dataset=dataset)
        finite, last, _ = _finite_losses(run)
        check(st, f"{norm} critic: losses finite", finite, last.get("loss/critic"), "every logged loss finite")
        generator, _, _ = load_generator(run, device=dev, use_ema=True)
        fake = get_family(cfg.model.name).sample(generator, s.fid_samples, torch.Generator().manual_seed(10_000 + seed),
                                                 batch_size=500, device=dev)
        shown.append(fake[: SAMPLE_ROWS * 8].cpu())
        save_image_grid(torch.cat(shown), ctx.out / "cifar_samples.png", 8)  # one file: the device returns 8
        scores = compute_fidelity(fake, dataset.images_uint8, metrics=("fid", "kid"), inception_weights=weights,
                                  feature_extractor=extractor, device=dev, kid_subset_size=s.kid_subset,
                                  cache_key=f"gpu-check-cifar10-test-{len(dataset)}", cache_dir=ctx.work / "cache")
        del generator
        _free_memory()
        arms_out[norm] = {"seconds": seconds, "steps_per_s": steps / seconds, "final_losses": last, **scores}
        table["rows"].append([norm, steps, seconds, steps / seconds, scores.get("fid"), scores.get("kid_mean"),
                              scores.get("kid_std"), last.get("loss/critic")])
        check(st, f"{norm} critic: FID and KID finite", all(
            math.isfinite(float(scores.get(k, float("nan")))) for k in ("fid", "kid_mean")), scores.get("fid"),
            "finite")
        ctx.report.save()
    for other in ("layer", "none"):
        if "group" in arms_out and other in arms_out:
            st["measurements"][f"fid_group_minus_{other}"] = arms_out["group"]["fid"] - arms_out[other]["fid"]


STAGES: dict[int, Callable[[Context, dict, float], None]] = {
    1: stage_environment, 2: stage_omniglot, 3: stage_quality, 4: stage_train_step, 5: stage_augment_throughput,
    6: stage_correctness,
}


# ============================================================================================ main
def _commit() -> str:
    """The checkout's commit; where git or .git is absent (the GPU machine), the one the bundle was made at."""
    from prepare_gpu_bundle import BUNDLE_DIR, git_commit

    commit = git_commit()
    if commit:
        return commit
    try:
        return "bundle " + json.loads((BUNDLE_DIR / "manifest.json").read_text())["commit"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md and the PNGs")
    p.add_argument("--cpu-dry-run", action="store_true", help="every stage at toy sizes on the CPU (CI)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-time budget of all stages (default 540)")
    p.add_argument("--stages", default="1,2,3,4,5,6", help="comma-separated stage numbers (default 1,2,3,4,5,6)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch folder for archives, patch files and runs (default: a new temporary folder; it is "
                        "not under --out, whose files are what comes back from the GPU machine)")
    p.add_argument("--cifar-zip", type=Path, default=None,
                   help="CIFAR-10 test zip for the quality stage (default: .gpu_bundle/ or ../shared/data/cifar10/)")
    p.add_argument("--omniglot-dir", type=Path, default=None,
                   help="folder with the Omniglot stage's dagan_train.h5 and identity_embedding.pt (default: "
                        ".gpu_bundle/omniglot/, made by benchmarks/prepare_gpu_bundle.py)")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="torch-fidelity Inception weights (default: .gpu_bundle/inception-fp16.pt, unpacked)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")
    args = p.parse_args(argv)
    try:
        args.stage_list = sorted({int(x) for x in args.stages.split(",") if x.strip()})
    except ValueError:
        p.error(f"--stages {args.stages!r}: give stage numbers like 1,2,5")
    if not args.stage_list or not set(args.stage_list) <= set(STAGES):
        p.error(f"--stages {args.stages!r}: choose among {', '.join(map(str, STAGES))}")
    if args.budget_s < 0:
        p.error("--budget-s must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_dry_run:
        device, sizes = torch.device("cpu"), DRY
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), FULL
    else:
        print("gpu_check: no CUDA device here; use --cpu-dry-run for the CPU dry run", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DAGAN_GN_CACHE", str(work / "cache"))  # converted weights, decoded CIFAR, FID statistics
    torch.manual_seed(args.seed)
    report = Report(out, {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.cpu_dry_run, "budget_s": args.budget_s,
        "seed": args.seed, "stages": args.stage_list, "commit": _commit(), "device": str(device),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "workdir": str(work),
    })
    ctx = Context(args=args, sizes=sizes, device=device, work=work, out=out, report=report)
    for number in args.stage_list:
        report.stage(number)
    report.save()

    def on_sigterm(signum, frame):
        raise Terminated(f"signal {signum} (time limit?)")

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    end = time.perf_counter() + args.budget_s
    terminated = False
    try:
        for i, number in enumerate(args.stage_list):
            st = report.stage(number)
            now = time.perf_counter()
            later = sum(STAGE_WEIGHTS[n] for n in args.stage_list[i:])
            allotted = max(0.0, end - now) * STAGE_WEIGHTS[number] / later
            st["allotted_s"] = allotted
            if terminated or end - now <= 0:
                st["status"] = "skipped"
                st["notes"].append("terminated before this stage" if terminated else "budget spent before this stage")
                report.save()
                continue
            print(f"gpu_check: stage {number} ({STAGE_NAMES[number]}), {allotted:.0f} s allotted", file=sys.stderr,
                  flush=True)
            st["status"] = "running"
            report.save()
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                STAGES[number](ctx, st, now + allotted)
                st["status"] = "ok"
            except StageSkipped as exc:
                st["status"] = "skipped"
                st["notes"].append(str(exc))
            except (Exception, Terminated) as exc:  # noqa: BLE001 - a failed stage is recorded, the next one runs
                st["status"] = "failed"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                st["error"] = f"{type(exc).__name__}: {first}"
                st["traceback"] = traceback.format_exc()
                print(f"gpu_check: stage {number} failed: {st['error']}", file=sys.stderr, flush=True)
                terminated = isinstance(exc, Terminated)
            finally:
                st["seconds"], st["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - cpu0
                _free_memory()
                report.save()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print(render_markdown(_plain(report.data)))
    stages = report.data["stages"].values()
    ok = all(st["status"] == "ok" and all(c["passed"] for c in st["checks"]) for st in stages)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
