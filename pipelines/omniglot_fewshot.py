"""Omniglot few-shot: does DAGAN augmentation help a classifier trained on 1-5 drawings of unseen characters?

The DAGAN paper's own benchmark (Antoniou et al. 2017), at CPU scale, with the project's jobs (the ones a hospital
runs): ``read_image_folder`` → ``import`` as patch files → ``dagan train`` → ``dagan augment`` →
``evaluate_augmentation`` (the same MONAI classifier under four regimes). Protocol (``docs/augment.md``, "Omniglot
few-shot"):

1. read the Omniglot zips as they are (Greek and Latin are in both small zips: read once), 32×32, inverted (bright
   strokes on black);
2. train an unconditional DAGAN on every drawing of the characters of the six training alphabets (192 characters ×
   20; same-class pairs = two drawings of one character) — ``--config`` (default ``configs/dagan_omniglot_32.yaml``)
   plus any ``section.key=value`` overrides; a killed training resumes;
3. for every seed of ``--seeds``: on the 50 held-out Greek + Latin characters (50-way), draw ``--test-per-class``
   test drawings per character and, from the other drawings, a ranked pool of ``max(--shots)`` shots (the k shots are
   the first k of the pool, so k = 1 ⊂ 2 ⊂ 3 ⊂ 5 and every k of a seed is tested on the same drawings); ``augment``
   the pool with ``--n`` variants per drawing;
4. for every k and seed, train the classifier under ``real``, ``real+albumentations`` (``--augmentation``, default
   ``strokes``: small affine), ``real+dagan`` (variants of the k shots only) and ``real+both``, all for the same
   number of optimizer steps (``--classifier-steps``, the same at every k), and test on the test drawings;
5. report accuracy per k × regime (mean ± 95 % CI, Student t over seeds), the paired gains +DAGAN − real and
   +both − classical with their CIs, the stage times, every setting and seed, in ``OUT/omniglot_fewshot.md`` and
   ``.json``, a chart ``omniglot_fewshot.png`` and a contact sheet of variants of held-out characters.

``--dev`` runs steps 3-5 on a *dev* task instead — ``--dev-classes`` characters of the six training alphabets
(which the DAGAN was trained on: its gains there are optimistic) — to choose classifier settings without ever looking
at Greek or Latin test drawings. ``--reuse-dagan RUN`` skips training (its training characters are checked against
the task's). Every stage skips work whose output exists with the same settings, so a killed run continues.

    python pipelines/omniglot_fewshot.py --out runs/omniglot                                   # the protocol
    python pipelines/omniglot_fewshot.py --out runs/omniglot --dev --seeds 0,1,2 --width 16    # choose settings
    python pipelines/omniglot_fewshot.py --out runs/omniglot2 --config configs/my_dagan.yaml optim.n_critic=2 \\
        --steps 3000 --reuse-dagan runs/omniglot/dagan                                         # variations
    python pipelines/omniglot_fewshot.py --out /tmp/smoke --smoke                               # plumbing, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dagan_gn.errors import DaganError

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_omniglot_dir(repo_root: Path = REPO_ROOT) -> Path:
    """``shared/data/omniglot`` beside the repository (``../shared``), or beside a parent folder for a git worktree
    kept one level deeper; the first candidate when none exists (its absence is reported when it is read)."""
    candidates = [base / "shared" / "data" / "omniglot" for base in (repo_root.parent, repo_root.parent.parent)]
    return next((c for c in candidates if c.is_dir()), candidates[0])


DEFAULT_DATA = tuple(shared_omniglot_dir() / f"images_background_small{i}.zip" for i in (1, 2))
DEFAULT_CONFIG = REPO_ROOT / "configs" / "dagan_omniglot_32.yaml"
TRAIN_ALPHABETS = ("Balinese", "Early_Aramaic", "Korean", "Japanese_(katakana)", "Sanskrit", "Tagalog")
TEST_ALPHABETS = ("Greek", "Latin")
#: amurthy1/dagan_torch README: 100-way classifier on held-out Omniglot characters, accuracy % without → with DAGAN.
REFERENCE = {1: (16.4, 19.2), 2: (29.0, 39.4), 3: (46.5, 52.0), 4: (57.8, 65.3), 5: (67.1, 69.5)}
#: Issue 10 §3 targets: +DAGAN ≥ +5 points over real at these k, and +both above classical augmentation alone.
TARGET_GAIN_PP, TARGET_SHOTS = 5.0, (2, 3)
#: ``--smoke``: a DAGAN that trains in a second (applied before the user's overrides, which win).
SMOKE_OVERRIDES = ("model.z_dim=8", "model.g_width=8", "model.d_width=8", "data.batch_size=8", "optim.n_critic=1",
                   "train.ema_start=0", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
                   "train.progress=false")
STAGES = ("read", "dagan_train", "tasks", "augment", "classifiers", "report")


class ProtocolError(DaganError, ValueError):
    """The data or the settings cannot run the protocol; the message says what to change."""


# ------------------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    """Everything that determines the results (written to the report)."""

    task: str
    data: list[str]
    size: int
    train_alphabets: list[str]
    task_prefixes: list[str]
    shots: list[int]
    test_per_class: int
    seeds: list[int]
    n_variants: int
    seed: int
    dagan_config: str | None
    dagan_overrides: list[str]
    reuse_dagan: str | None
    classifier: dict[str, Any]
    classifier_steps: int
    device: str
    smoke: bool
    dev_classes: int = 0
    threads: int = 0
    workers: int = 1
    task_classes: list[str] = field(default_factory=list)
    regimes: list[str] = field(default_factory=list)
    truncation: float = 0.0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what}: empty list")
    return values


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="omniglot_fewshot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="DAGAN config overrides (after --config; e.g. optim.n_critic=2 model.dropout=0.5)")
    p.add_argument("--out", type=Path, required=True, help="work folder (report, DAGAN run, task files)")
    p.add_argument("--data", type=Path, nargs="+", default=list(DEFAULT_DATA),
                   help="Omniglot zips/folders of <alphabet>/<character>/<drawing>.png (default: the two small "
                        "background zips in ../shared/data/omniglot)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="DAGAN YAML config")
    p.add_argument("--steps", type=int, default=None, help="DAGAN generator steps (default: the config's)")
    p.add_argument("--reuse-dagan", type=Path, default=None, metavar="RUN",
                   help="use this DAGAN run (folder or checkpoint) instead of training one")
    p.add_argument("--train-alphabets", type=_str_list, default=list(TRAIN_ALPHABETS),
                   help="alphabets (class prefixes) the DAGAN trains on")
    p.add_argument("--test-alphabets", type=_str_list, default=list(TEST_ALPHABETS),
                   help="held-out alphabets of the few-shot test task")
    p.add_argument("--dev", action="store_true",
                   help="run the classifier protocol on a dev task of --dev-classes training-alphabet characters")
    p.add_argument("--dev-classes", type=int, default=50, help="characters of the dev task (drawn with --seed)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--shots", type=lambda t: _int_list(t, "--shots"), default=[1, 2, 3, 5],
                   help="drawings per character to train on (comma list)")
    p.add_argument("--test-per-class", type=int, default=10, help="test drawings per character")
    p.add_argument("--seeds", type=lambda t: _int_list(t, "--seeds"), default=[0, 1, 2],
                   help="task/classifier seeds (comma list; at least 2 for a CI, 3 for the protocol)")
    p.add_argument("--n", type=int, default=10, help="DAGAN variants per shot")
    p.add_argument("--truncation", type=float, default=0.0,
                   help="noise truncation bound of the variants (dagan augment --truncation; 0: none); choose it "
                        "on held-out characters that are not the test task (pipelines/omniglot_transfer_dev.py)")
    p.add_argument("--width", type=int, default=16, help="classifier base width (MONAI ResNet, w-2w-4w-8w)")
    p.add_argument("--classifier-steps", type=int, default=450,
                   help="optimizer steps per classifier training (every k and regime)")
    p.add_argument("--batch-size", type=int, default=32, help="classifier batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="classifier AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="classifier AdamW weight decay")
    p.add_argument("--synthetic-ratio", default="0.25",
                   help="fraction of DAGAN variants in the +DAGAN/+both epochs (0.25: chosen on the dev task)")
    p.add_argument("--bn-batches", type=int, default=50,
                   help="batches of training data the classifier's batch-norm statistics are recomputed on after "
                        "training (0: keep the running averages; docs/augment.md)")
    p.add_argument("--synthetic-weight", type=float, default=1.0,
                   help="loss weight of a DAGAN variant relative to a real drawing in the classifier")
    p.add_argument("--reject-off-class", action="store_true",
                   help="drop variants whose embedding lies nearest another character's prototype (reported)")
    p.add_argument("--augmentation", default="strokes",
                   help="classical augmentation preset (strokes, strokes:S to scale its ranges, natural, mammo)")
    p.add_argument("--regimes", type=_str_list, default=None,
                   help="subset of real, real+albumentations, real+dagan, real+both (default: all four)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (DAGAN training, augment, classifiers)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes training classifiers in parallel, one thread each (2 on a 2-core machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the DAGAN training and of the dev characters")
    p.add_argument("--smoke", action="store_true",
                   help="tiny DAGAN, 2 variants, width-4 classifier, 4 steps: checks the plumbing in seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.width, args.classifier_steps = min(args.n, 2), min(args.width, 4), min(args.classifier_steps, 4)
        args.bn_batches = min(args.bn_batches, 2)
        args.steps = 2 if args.steps is None else args.steps
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
    for name in ("size", "test_per_class", "n", "width", "classifier_steps", "batch_size", "dev_classes", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.bn_batches < 0:
        p.error("--bn-batches must be 0 or more")
    if args.truncation < 0:
        p.error("--truncation must be 0 (none) or more")
    if any(k < 1 for k in args.shots):
        p.error("--shots must be positive")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    args.shots = sorted(set(args.shots))
    from dagan_gn.metrics.downstream import REGIMES

    unknown = [r for r in args.regimes or [] if r not in REGIMES]
    if unknown:
        p.error(f"--regimes: unknown {unknown}; choose from {', '.join(REGIMES)}")
    args.regimes = [r for r in REGIMES if r in (args.regimes or REGIMES)]
    return args


# ------------------------------------------------------------------------------------------------------ helpers
def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shown_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (reports stay readable and machine-independent)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _fmt_pct(mean: float, half: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * half:.1f}" if math.isfinite(half) else f"{100 * mean:.1f}"


def _fmt_pp(mean: float, half: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    sign = "+" if mean >= 0 else "−"
    return f"{sign}{abs(100 * mean):.1f} ± {100 * half:.1f}" if math.isfinite(half) else f"{sign}{abs(100 * mean):.1f}"


def classifier_steps_plan(n_real: int, batch_size: int, target_steps: int) -> tuple[int, int]:
    """``(epochs, steps)`` for ``evaluate_augmentation``, which trains ``epochs × (n_real // batch)`` steps: the
    fewest epochs reaching ``target_steps``, so every k gets (about) the same optimisation budget."""
    per_epoch = max(1, n_real // min(batch_size, n_real))
    epochs = max(1, math.ceil(target_steps / per_epoch))
    return epochs, epochs * per_epoch


def draw_task(labels: np.ndarray, num_classes: int, pool: int, test_per_class: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded per-class draw: ``test_per_class`` test drawings and, disjoint from them, a ranked pool of ``pool``
    shots per class. Returns ``(shot_indices, shot_ranks, test_indices)`` (indices into ``labels``); shots are
    ordered by rank, then class, so the first rows are one drawing of each character."""
    rng = np.random.default_rng([int(seed), 20171112])
    shots, tests = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        tests.append(idx[:test_per_class])
        shots.append(idx[test_per_class:test_per_class + pool])
    order = [(r, c) for r in range(pool) for c in range(num_classes)]
    shot_idx = np.asarray([shots[c][r] for r, c in order], dtype=np.int64)
    shot_rank = np.asarray([r for r, _ in order], dtype=np.int32)
    return shot_idx, shot_rank, np.concatenate(tests).astype(np.int64)


# ------------------------------------------------------------------------------------------------------ stages
def _read_drawings(args: argparse.Namespace, alphabets: Sequence[str]) -> tuple[Any, list[str]]:
    """The drawings of ``alphabets`` (32 px, inverted) and the characters of the training alphabets among them."""
    from dagan_gn.datasets.image_folder import class_matches, read_image_folder

    data = read_image_folder(args.data, size=args.size, invert=True, class_prefixes=list(alphabets),
                             progress=not args.quiet)
    return data, [c for c in data.class_names if class_matches(c, args.train_alphabets)]


def read_training_characters(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The training alphabets' drawings alone and their characters: the DAGAN's data, without a task
    (``benchmarks/prepare_gpu_bundle.py``)."""
    return _read_drawings(args, args.train_alphabets)


def read_omniglot(args: argparse.Namespace):
    """Stage 1: the images of the training and task characters; the task's class list."""
    from dagan_gn.datasets.image_folder import class_matches

    prefixes = list(dict.fromkeys([*args.train_alphabets, *([] if args.dev else args.test_alphabets)]))
    data, train_classes = _read_drawings(args, prefixes)
    if args.dev:
        if args.dev_classes > len(train_classes):
            raise ProtocolError(f"--dev-classes {args.dev_classes}: the training alphabets have only "
                                f"{len(train_classes)} characters")
        rng = np.random.default_rng([args.seed, 4242])
        task_classes = sorted(rng.choice(train_classes, size=args.dev_classes, replace=False).tolist())
    else:
        overlap = [a for a in args.test_alphabets if a in args.train_alphabets]
        if overlap:
            raise ProtocolError(f"alphabet(s) {overlap} are both training and test alphabets")
        task_classes = [c for c in data.class_names if class_matches(c, args.test_alphabets)]
    counts = data.counts()
    need = max(args.shots) + args.test_per_class
    short = [c for c in task_classes if counts[c] < need]
    if short:
        raise ProtocolError(f"character {short[0]} has {counts[short[0]]} drawings; --shots up to {max(args.shots)} "
                            f"plus --test-per-class {args.test_per_class} need {need} ({len(short)} such characters)")
    if len(task_classes) < 2:
        raise ProtocolError(f"the task has {len(task_classes)} character(s); a classifier needs at least 2")
    return data, train_classes, task_classes


def _train_file_parameters(data: Any, train_classes: list[str], size: int) -> dict[str, Any]:
    return {"job": "omniglot-dagan-train", "keys": _fingerprint(data.select_classes(train_classes).keys), "size": size}


def same_train_file(path: Path, data: Any, train_classes: list[str], size: int) -> bool:
    """Whether ``path`` is the DAGAN training file of these drawings and characters at this size."""
    from dagan_gn.store.patch_file import PatchFile

    if not path.is_file():
        return False
    with PatchFile(path) as pf:
        return pf.parameters == _train_file_parameters(data, train_classes, size)


def write_dagan_train_file(path: Path, data: Any, train_classes: list[str], size: int, salt: bytes) -> Path:
    """Stage 1's output: every drawing of the training characters as one patch file (split ``train``), the DAGAN's
    training data (callers keep an existing one when :func:`same_train_file` says it is the same). Also what
    ``benchmarks/prepare_gpu_bundle.py`` sends to the GPU machine, so a DAGAN trained there has this protocol's
    data."""
    from dagan_gn.jobs.import_images import write_images

    subset = data.select_classes(train_classes)
    write_images(path, subset, ["train"] * len(subset), salt=salt,
                 parameters=_train_file_parameters(data, train_classes, size))
    return path


def dagan_config(args: argparse.Namespace, train_file: Path):
    """The DAGAN's resolved config: ``--config`` + overrides + the protocol's fixed keys."""
    from dagan_gn.config import load_config

    items = [*args.overrides, f"data.path={train_file}", "data.kind=patches", "data.split=train", "data.classes=[]",
             f"train.seed={args.seed}", f"train.device={args.device}"]
    if args.steps is not None:
        items.append(f"train.steps={args.steps}")
    if args.quiet:
        items.append("train.progress=false")
    cfg = load_config(args.config, items)
    check_dagan_model(cfg, args.size, str(args.config))
    if cfg.model.critic_classes < 0 and train_file.is_file():  # as the trainer resolves it, for the resume check
        from dagan_gn.datasets.loader import resolve_data_keys
        from dagan_gn.training.families import build_dataset

        cfg = resolve_data_keys(cfg, build_dataset(cfg))
    return cfg


def check_dagan_model(cfg: Any, size: int, where: str) -> None:
    if cfg.model.name != "dagan":
        raise ProtocolError(f"{where}: model.name is {cfg.model.name!r}; the protocol needs an image-to-image DAGAN")
    if int(cfg.model.num_classes) != 0:
        raise ProtocolError(f"{where}: model.num_classes={cfg.model.num_classes}; the DAGAN must be unconditional "
                            "(the held-out characters are classes it has never seen)")
    if int(cfg.model.image_size) != size or int(cfg.model.channels) != 1:
        raise ProtocolError(f"{where}: the DAGAN is for {cfg.model.channels}×{cfg.model.image_size}px images; the "
                            f"protocol reads 1×{size}px (--size)")


def dagan_training_classes(cfg: Any) -> list[str] | None:
    """The classes a DAGAN run was trained on (its data file's classes, or ``data.classes``); None if unknown."""
    from dagan_gn.store.patch_file import PatchFile, StoreError

    if cfg.data.classes:
        return [str(c) for c in cfg.data.classes]
    if not cfg.data.path or not Path(cfg.data.path).is_file():
        return None
    try:
        with PatchFile(cfg.data.path) as pf:
            return list(pf.class_names)
    except StoreError:
        return None


def train_or_reuse_dagan(args: argparse.Namespace, train_file: Path) -> dict[str, Any]:
    """Stage 2: train the DAGAN (resuming a killed run), or check the ``--reuse-dagan`` run."""
    from dagan_gn.config import config_from_dict
    from dagan_gn.fileio import sha256_file
    from dagan_gn.jobs.train import train_unless_finished
    from dagan_gn.training.checkpoint import load_checkpoint, resolve_checkpoint
    from dagan_gn.training.trainer import TrainingError

    info: dict[str, Any] = {"trained_here": False, "resumed_from_step": None}
    if args.reuse_dagan is not None:
        ckpt = resolve_checkpoint(args.reuse_dagan)
        cfg = config_from_dict(load_checkpoint(ckpt)["config"])
        check_dagan_model(cfg, args.size, str(ckpt))
    else:
        cfg = dagan_config(args, train_file)
        try:
            outcome = train_unless_finished(cfg, args.out / "dagan")
        except TrainingError as exc:
            raise ProtocolError(f"{exc}, or --reuse-dagan to evaluate that run as it is") from exc
        info.update(trained_here=outcome.trained_here, resumed_from_step=outcome.resumed_from_step)
        ckpt = outcome.checkpoint
    info.update(checkpoint=str(ckpt), checkpoint_sha256=sha256_file(ckpt), step=int(ckpt.stem.split("_")[-1])
                if ckpt.stem.startswith("step_") else -1, config=_plain(cfg))
    metrics = ckpt.parent.parent / "metrics.jsonl"
    if metrics.is_file():
        rates = [json.loads(line).get("steps_per_s") for line in metrics.read_text().splitlines() if line.strip()]
        rates = [r for r in rates if r]
        info["steps_per_s_last"] = rates[-1] if rates else None
    info["training_classes"] = dagan_training_classes(cfg)
    return info


def _plain(cfg: Any) -> dict[str, Any]:
    from dagan_gn.config import config_to_dict

    return config_to_dict(cfg)


def write_task_file(path: Path, data: Any, task_classes: list[str], pool: int, test_per_class: int, seed: int,
                    salt: bytes) -> Path:
    """Stage 3: one seed's task as a patch file: ``train`` = the ranked shot pool (provenance ``shot_rank``),
    ``test`` = the test drawings. Reused when it exists with the same parameters."""
    from dagan_gn.jobs.import_images import write_images
    from dagan_gn.store.patch_file import PatchFile

    task = data.select_classes(task_classes)
    params = {"job": "omniglot-fewshot-task", "classes": _fingerprint(task.class_names), "pool": pool,
              "test_per_class": test_per_class, "seed": seed, "size": task.image_size,
              "keys": _fingerprint(task.keys)}
    if path.is_file():
        with PatchFile(path) as pf:
            if pf.parameters == params:
                return path
    shot_idx, shot_rank, test_idx = draw_task(task.labels, len(task.class_names), pool, test_per_class, seed)
    order = np.concatenate([shot_idx, test_idx])
    rows = task.select(order)
    split = ["train"] * len(shot_idx) + ["test"] * len(test_idx)
    ranks = np.concatenate([shot_rank, np.full(len(test_idx), -1, np.int32)])
    write_images(path, rows, split, salt=salt, parameters=params, extra_columns={"shot_rank": ("int32", ranks)})
    return path


def augment_task(args: argparse.Namespace, task_file: Path, ckpt: Path, ckpt_sha: str, seed: int,
                 contact_sheet: Path | None) -> tuple[Path, bool]:
    """Stage 4: ``augment`` the shot pool with ``--n`` variants each (reused when it matches); returns the variants
    file and whether it was (re)made."""
    from dagan_gn.jobs.augment import augment
    from dagan_gn.store.patch_file import PatchFile

    out = task_file.with_name("variants.h5")
    if out.is_file():
        with PatchFile(out) as syn, PatchFile(task_file) as real:
            p = syn.parameters
            if (p.get("checkpoint_sha256") == ckpt_sha and p.get("n_per_source") == args.n and p.get("seed") == seed
                    and float(p.get("truncation", 0.0)) == args.truncation and p.get("input_created") == str(real.attrs.get("created")) and p.get("input_rows") == len(real)
                    and (contact_sheet is None or contact_sheet.is_file())):
                return out, False
    augment(task_file, ckpt, out, n=args.n, split="train", seed=seed, device=args.device, overwrite=True,
            truncation=args.truncation, contact_sheet=contact_sheet, progress=not args.quiet)
    return out, True


def load_task(task_file: Path, variants_file: Path):
    """The task's arrays: shots (with ranks), test drawings, variants (with their source's rank)."""
    from dagan_gn.store.patch_file import PatchFile

    with PatchFile(task_file) as pf:
        images, labels = pf.patches[:], pf.labels
        ranks = pf.provenance("shot_rank")
        train = pf.split_indices("train")
        test = pf.split_indices("test")
        names = list(pf.class_names)
    with PatchFile(variants_file) as syn:
        syn_images, syn_labels = syn.patches[:], syn.labels
        syn_rank = ranks[syn.provenance("source_index")]
        if list(syn.class_names) != names:
            raise ProtocolError(f"{variants_file} does not belong to {task_file} (class tables differ)")
    return {"images": images, "labels": labels, "ranks": ranks, "train": train, "test": test, "names": names,
            "syn_images": syn_images, "syn_labels": syn_labels, "syn_rank": syn_rank}


class StageTimes:
    """Wall seconds per stage: this invocation's, and for each stage those of the last invocation that did its work
    (kept in ``OUT/timings.json``), so the report of a resumed or re-rendered run still says what each stage cost."""

    def __init__(self, path: Path, tag: str) -> None:
        self.path, self.tag = path, tag
        self.now: dict[str, float] = {}
        self.worked: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        self._t = time.perf_counter()

    def _key(self, stage: str) -> str:
        return stage if stage == "dagan_train" else f"{self.tag}/{stage}"  # one DAGAN serves the test and dev task

    def lap(self, stage: str, worked: bool = True) -> None:
        """Close ``stage`` (the time since the previous lap); ``worked``: it computed something, not just reused."""
        now = time.perf_counter()
        self.now[stage] = self.now.get(stage, 0.0) + now - self._t
        self._t = now
        if worked:
            self.worked[self._key(stage)] = self.now[stage]

    def last_work(self) -> dict[str, float | None]:
        return {stage: self.worked.get(self._key(stage)) for stage in STAGES}

    def save(self) -> None:
        from dagan_gn.fileio import atomic_write_text

        atomic_write_text(self.path, json.dumps(self.worked, indent=2, sort_keys=True))


def classifier_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One seed and k: the regimes ``job["regimes"]`` trained and tested (module level, so worker processes can run
    it). The task is read from its files, so a job is a few paths and numbers."""
    import torch

    from dagan_gn.datasets.image_folder import ImageArrayDataset
    from dagan_gn.metrics.downstream import DownstreamConfig, evaluate_augmentation

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    t = load_task(Path(job["task_file"]), Path(job["variants_file"]))
    k, seed = int(job["k"]), int(job["seed"])
    test = ImageArrayDataset(t["images"][t["test"]], t["labels"][t["test"]], t["names"], t["test"])
    shot_rows = t["train"][t["ranks"][t["train"]] < k]
    real = ImageArrayDataset(t["images"][shot_rows], t["labels"][shot_rows], t["names"], shot_rows)
    syn_rows = np.flatnonzero(t["syn_rank"] < k)
    synthetic = ImageArrayDataset(t["syn_images"][syn_rows], t["syn_labels"][syn_rows], t["names"], syn_rows)
    epochs, _ = classifier_steps_plan(len(real), job["batch_size"], job["classifier_steps"])
    cfg = DownstreamConfig(width=job["width"], epochs=epochs, batch_size=job["batch_size"], lr=job["lr"],
                           weight_decay=job["weight_decay"], synthetic_ratio=job["synthetic_ratio"],
                           augmentation=job["augmentation"], seeds=[seed], device=job["device"],
                           bn_recalibration_batches=job.get("bn_recalibration_batches", 0),
                           synthetic_weight=job.get("synthetic_weight", 1.0),
                           reject_off_class=job.get("reject_off_class", False))
    rows: list[dict[str, Any]] = []
    clock = [time.perf_counter(), time.process_time()]

    def on_run(row: dict[str, Any]) -> None:
        # CPU seconds as well as wall seconds: on a shared machine only the former says what an idle one would take.
        now, cpu = time.perf_counter(), time.process_time()
        row.update(k=k, seed=seed, settings=job["settings"], seconds=round(now - clock[0], 2),
                   cpu_seconds=round(cpu - clock[1], 2), real_items=len(real), synthetic_pool=len(synthetic))
        clock[0], clock[1] = now, cpu
        rows.append(row)

    evaluate_augmentation(real, test, synthetic, num_classes=len(t["names"]), class_names=t["names"], config=cfg,
                          regimes=job["regimes"], progress=False, on_run=on_run)
    return rows


def run_classifiers(args: argparse.Namespace, task_files: dict[int, Path], variant_files: dict[int, Path],
                    runs_file: Path, settings_fp: str) -> tuple[list[dict[str, Any]], int]:
    """Stage 5: every k × seed × regime, in ``--workers`` processes; finished runs are appended to ``runs_file``
    and not redone. Returns every run and how many were trained now."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    from tqdm.auto import tqdm

    done: dict[tuple, dict] = {}
    if runs_file.is_file():
        for line in runs_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("settings") == settings_fp:
                    done[(row["k"], row["seed"], row["regime"])] = row
    ratio: float | str = args.synthetic_ratio if args.synthetic_ratio == "balance" else float(args.synthetic_ratio)
    jobs = []
    for seed in args.seeds:
        for k in args.shots:
            todo = [r for r in args.regimes if (k, seed, r) not in done]
            if todo:
                jobs.append({"task_file": str(task_files[seed]), "variants_file": str(variant_files[seed]), "k": k,
                             "seed": seed, "regimes": todo, "width": args.width, "batch_size": args.batch_size,
                             "classifier_steps": args.classifier_steps, "lr": args.lr,
                             "weight_decay": args.weight_decay, "synthetic_ratio": ratio,
                             "augmentation": args.augmentation, "device": args.device, "settings": settings_fp,
                             "bn_recalibration_batches": args.bn_batches,
                             "synthetic_weight": args.synthetic_weight, "reject_off_class": args.reject_off_class,
                             "threads": 1 if args.workers > 1 else 0})
    total = len(args.shots) * len(args.seeds) * len(args.regimes)
    bar = tqdm(total=total, initial=total - sum(len(j["regimes"]) for j in jobs), desc="classifiers", unit="run",
               disable=args.quiet, dynamic_ncols=True)

    def record(rows: list[dict[str, Any]]) -> None:
        with open(runs_file, "a") as fh:  # one line per finished run: a killed stage resumes from here
            for row in rows:
                fh.write(json.dumps(row) + "\n")
                done[(row["k"], row["seed"], row["regime"])] = row
        bar.update(len(rows))

    if args.workers > 1 and len(jobs) > 1:
        # Spawned workers (no fork of a process that may hold OpenMP threads), one intra-op thread each: on a small
        # CPU, independent trainings in parallel use the cores better than one training on several threads.
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)  # spawned children unpickle classifier_job by importing this module
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(classifier_job, job) for job in jobs]):
                record(future.result())
    else:
        for job in jobs:
            record(classifier_job(job))
    bar.close()
    runs = [done[(k, s, r)] for k in args.shots for s in args.seeds for r in args.regimes]
    return runs, sum(len(j["regimes"]) for j in jobs)


# ------------------------------------------------------------------------------------------------------ report
def variant_diversity(task_file: Path, variants_file: Path) -> dict[str, float]:
    """The variants of a task's shots measured as ``dagan assess`` measures a variant set (pixel space; the real-pair
    scale is two shots of one character): ``diversity`` (variants of a shot vs each other), ``distance_to_source``
    (ratios: 1 = as far apart as two real drawings of the character) and ``identity`` (share of variants whose
    nearest shot, among every shot of the task, is their own) — ``dagan_gn.jobs.demo.variant_diversity``."""
    from dagan_gn.jobs.demo import variant_diversity as measure

    diversity, distance, identity = measure(task_file, variants_file)
    return {"diversity": diversity, "distance_to_source": distance, "identity": identity}


def summarize(runs: list[dict[str, Any]], shots: Sequence[int]) -> dict[str, Any]:
    """Accuracy mean ± CI per k × regime and the paired (same seed: same shots, same test drawings) gains."""
    from dagan_gn.metrics.downstream import REGIMES, mean_ci

    acc = {(r["k"], r["seed"], r["regime"]): r["accuracy"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    table, gains = {}, {}
    for k in shots:
        table[k] = {}
        for regime in REGIMES:
            vals = [acc[(k, s, regime)] for s in seeds if (k, s, regime) in acc]
            m, h = mean_ci(vals)
            table[k][regime] = {"mean": m, "ci95": h, "n": len(vals), "per_seed": vals}
        gains[k] = {}
        for name, a, b in (("dagan_minus_real", "real+dagan", "real"),
                           ("both_minus_classical", "real+both", "real+albumentations"),
                           ("classical_minus_real", "real+albumentations", "real")):
            diffs = [acc[(k, s, a)] - acc[(k, s, b)] for s in seeds if (k, s, a) in acc and (k, s, b) in acc]
            m, h = mean_ci(diffs)
            gains[k][name] = {"mean": m, "ci95": h, "n": len(diffs), "per_seed": diffs}
    # Class identity of the variants of the k shots in the classical classifier's features (a classifier that never
    # saw a variant): the share nearest their own character's prototype.
    class_identity = {}
    for k in shots:
        vals = [r["synthetic_class_identity"] for r in runs
                if r["k"] == k and r["regime"] == "real+albumentations" and "synthetic_class_identity" in r]
        m, h = mean_ci(vals)
        class_identity[k] = {"mean": m, "ci95": h, "n": len(vals), "per_seed": vals}

    def verdict(value: float, passes: bool) -> bool | None:  # None: not measured (regime not run)
        return None if not math.isfinite(value) else bool(passes)

    targets = {}
    for k in TARGET_SHOTS:
        if k in gains:
            g = gains[k]["dagan_minus_real"]["mean"]
            targets[f"dagan_gain_at_least_{TARGET_GAIN_PP:g}pp_at_k{k}"] = verdict(g, g * 100 >= TARGET_GAIN_PP)
    for k in shots:
        g = gains[k]["both_minus_classical"]["mean"]
        targets[f"both_beats_classical_at_k{k}"] = verdict(g, g > 0)
    return {"table": table, "gains": gains, "targets": targets, "class_identity": class_identity}


def render_markdown(report: dict[str, Any]) -> str:
    from dagan_gn.metrics.downstream import REGIMES

    s, summ, dg, times = report["settings"], report["summary"], report["dagan"], report["seconds"]
    div = report["variant_diversity"]
    model = dg["config"]["model"]
    task_word = ("dev task: characters of the training alphabets, which the DAGAN was trained on (all 20 drawings "
                 "each), so the +DAGAN gains here are optimistic" if s["task"] == "dev" else
                 "held-out alphabets " + ", ".join(s["task_prefixes"]) + ": characters the DAGAN never saw")
    n_cls = len(s["task_classes"])
    lines = [
        f"# Omniglot few-shot{' (dev task)' if s['task'] == 'dev' else ''}: does DAGAN augmentation help?",
        "",
        f"{n_cls}-way classification ({task_word}); k drawings per character to train on, "
        f"{s['test_per_class']} other drawings per character to test on ({n_cls * s['test_per_class']} test images "
        f"per seed), {s['size']}×{s['size']} inverted. Seeds {s['seeds']} (each seed: its own shots and test "
        f"drawings, classifier initialisation and batch order); mean ± 95 % CI (Student t over {len(s['seeds'])} "
        f"seeds) of test accuracy in %. Chance: {100 / n_cls:.1f} %.",
        "",
        "| k | " + " | ".join(REGIMES) + " | +DAGAN − real (pp) | +both − classical (pp) |",
        "| ---: | " + " | ".join("---:" for _ in REGIMES) + " | ---: | ---: |",
    ]
    for k, row in summ["table"].items():
        g = summ["gains"][k]
        lines.append(f"| {k} | " + " | ".join(_fmt_pct(row[r]["mean"], row[r]["ci95"]) for r in REGIMES)
                     + f" | {_fmt_pp(g['dagan_minus_real']['mean'], g['dagan_minus_real']['ci95'])}"
                     + f" | {_fmt_pp(g['both_minus_classical']['mean'], g['both_minus_classical']['ci95'])} |")
    lines += [
        "",
        "Gains are paired differences (same seed: same shots, same test drawings), mean ± 95 % CI over seeds. "
        f"Issue targets: +DAGAN ≥ +{TARGET_GAIN_PP:g} pp over real at k = "
        + ", ".join(map(str, TARGET_SHOTS)) + "; +both above classical augmentation alone:",
        "",
    ]
    lines += [f"- `{name}`: {'not measured' if ok is None else 'met' if ok else 'not met'}"
              for name, ok in summ["targets"].items()]
    ref = ", ".join(f"k={k}: {a:.1f} → {b:.1f} ({b - a:+.1f})" for k, (a, b) in REFERENCE.items())
    lines += [
        "",
        f"Reference (amurthy1/dagan_torch, 100-way, held-out characters, real → +DAGAN, %): {ref}.",
        "",
        "## DAGAN",
        "",
        f"- checkpoint `{Path(dg['checkpoint']).name}` (step {dg['step']}, sha256 {dg['checkpoint_sha256'][:16]}…), "
        + ("trained by this run" + (f", resumed from step {dg['resumed_from_step']}" if dg["resumed_from_step"]
                                    is not None else "") if dg["trained_here"] else
           "reused (`--reuse-dagan`)" if s["reuse_dagan"] else "trained by an earlier invocation (resumed/skipped)"),
        f"- config `{s['dagan_config']}` + overrides `{' '.join(s['dagan_overrides']) or '(none)'}`; model "
        f"{model['g_width']}/{model['d_width']} width, z {model['z_dim']}, "
        f"batch {dg['config']['data']['batch_size']}, n_critic {dg['config']['optim']['n_critic']}, "
        f"{dg['config']['train']['steps']} steps, seed {dg['config']['train']['seed']}",
        f"- trained on {dg['training_class_count']} characters; task characters among them: "
        f"{dg['task_classes_seen']} of {n_cls}" + ("" if dg["training_classes_known"] else
                                                   " (training data not found: not verified)"),
        f"- {s['n_variants']} variants per shot (the +DAGAN regimes use only the variants of the k shots"
        + (f"; noise truncated at {s['truncation']:g}" if s.get("truncation") else "") + "); "
        f"contact sheet: `{report['files'].get('contact_sheet')}`",
        "- variants of the first seed's shots, as `dagan assess` measures them (pixel L1 ratios to two real drawings "
        f"of a character): diversity {div['diversity']:.2f}, distance to source {div['distance_to_source']:.2f}, "
        f"identity {100 * div['identity']:.0f} % (nearest shot is their own)",
        *(["- class identity of the variants in each seed's real+albumentations classifier (a classifier that never "
           "saw a variant; share nearest their own character's prototype, mean ± 95 % CI over seeds; chance "
           f"{100 / n_cls:.0f} %): " + ", ".join(f"k = {k}: {_fmt_pct(c['mean'], c['ci95'])}"
                                              for k, c in summ.get("class_identity", {}).items() if c["n"])]
          if any(c["n"] for c in summ.get("class_identity", {}).values()) else []),
        "",
        "## Classifier",
        "",
        f"MONAI ResNet (basic blocks, layers 1-1-1-1, widths {s['classifier']['width']}×(1, 2, 4, 8)), "
        f"{report['classifier_flops']['mflop_per_image']:.1f} MFLOP per image forward, "
        f"{report['classifier_flops']['parameters']:,} parameters; AdamW lr {s['classifier']['lr']}, weight decay "
        f"{s['classifier']['weight_decay']}, batch {s['classifier']['batch_size']}, ≈{s['classifier_steps']} steps "
        f"in every regime (k: steps = " + ", ".join(f"{k}: {v}" for k, v in report["steps_per_k"].items())
        + f"); synthetic ratio {s['classifier']['synthetic_ratio']}; classical augmentation "
        f"`{s['classifier']['augmentation']}`.",
        "",
        "## Wall time",
        "",
        "| stage | this invocation (s) | when the stage last did its work (s) |",
        "| --- | ---: | ---: |",
    ]
    last = report["stage_seconds_last_work"]
    lines += [f"| {name} | {times.get(name, 0.0):.1f} | " + ("—" if last.get(name) is None else f"{last[name]:.1f}")
              + " |" for name in STAGES]
    known = [v for v in last.values() if v is not None]
    lines += [f"| total | {times['total']:.1f} | {sum(known):.1f} |", ""]
    cpu = [r["cpu_seconds"] for r in report["runs"] if r.get("cpu_seconds") is not None]
    if cpu:
        lines.append(f"Classifier trainings: {len(cpu)} runs, {sum(cpu) / 60:.1f} CPU-min in all "
                     f"({np.mean(cpu):.1f} CPU-s per run, training and testing), i.e. ≈{sum(cpu) / 120:.1f} min of "
                     "wall time on two idle cores with `--workers 2`.")
    if dg.get("steps_per_s_last"):
        steps = dg["config"]["train"]["steps"]
        lines.append(f"DAGAN training speed (the run's last log: the average since its last start): "
                     f"{dg['steps_per_s_last']:.2f} steps/s → {steps / dg['steps_per_s_last'] / 60:.1f} min for "
                     f"{steps} steps.")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Accuracy vs k per regime with 95 % CI bars (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dagan_gn.fileio import atomic_path
    from dagan_gn.metrics.downstream import REGIMES

    table = report["summary"]["table"]
    shots = list(table)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for j, regime in enumerate(REGIMES):
        xs = np.asarray(shots, dtype=float) + (j - 1.5) * 0.06
        means = [100 * table[k][regime]["mean"] for k in shots]
        errs = [100 * (table[k][regime]["ci95"] if math.isfinite(table[k][regime]["ci95"]) else 0.0) for k in shots]
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=regime)
    ax.set_xticks(shots)
    ax.set_xlabel("shots per character (k)")
    ax.set_ylabel("test accuracy % (mean ± 95 % CI)")
    ax.set_title(f"Omniglot {len(report['settings']['task_classes'])}-way ({report['settings']['task']})")
    ax.set_ylim(0, 100)  # accuracies; a CI bar reaching past them is clipped, its value is in the table
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def classifier_flops(num_classes: int, size: int, width: int) -> dict[str, float]:
    """Forward FLOPs per image (``FlopCounterMode``: a multiply-add = 2 FLOPs) and parameters of the classifier."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dagan_gn.metrics.downstream import build_classifier

    model = build_classifier(num_classes, 1, size, width=width).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, size, size))
    return {"mflop_per_image": counter.get_total_flops() / 1e6,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


# ------------------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole protocol; returns the report dict (also written to ``OUT``)."""
    import torch

    from dagan_gn.fileio import atomic_write_text
    from dagan_gn.ingest.privacy import load_or_create_salt
    from dagan_gn.runtime import environment_info

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tag = "dev" if args.dev else "test"
    times = StageTimes(out / "timings.json", tag)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    data, train_classes, task_classes = read_omniglot(args)
    times.lap("read")
    say(f"[1/5] read {len(data)} drawings of {len(data.class_names)} characters ({data.duplicates} duplicates read "
        f"once, {len(data.skipped)} skipped); DAGAN: {len(train_classes)} characters; {tag} task: "
        f"{len(task_classes)} characters")

    # The DAGAN's training file: every drawing of the training alphabets (the pipeline's own salt: public data).
    salt = load_or_create_salt(out / "pipeline.salt")
    train_file = out / "dagan_train.h5"
    if args.reuse_dagan is None and not same_train_file(train_file, data, train_classes, args.size):
        if (out / "dagan").is_dir() and any((out / "dagan" / "checkpoints").glob("step_*.pt")):
            raise ProtocolError(f"{train_file} is missing or was made from other data while {out / 'dagan'} holds a "
                                "training run; use another --out")
        write_dagan_train_file(train_file, data, train_classes, args.size, salt)
    times.lap("tasks")

    dagan = train_or_reuse_dagan(args, train_file)
    times.lap("dagan_train", worked=dagan["trained_here"])
    trained_on = dagan["training_classes"]
    dagan["training_classes_known"] = trained_on is not None
    dagan["training_class_count"] = len(trained_on) if trained_on is not None else None
    dagan["task_classes_seen"] = len(set(task_classes) & set(trained_on or []))
    if not args.dev and dagan["task_classes_seen"]:
        raise ProtocolError(f"the DAGAN {dagan['checkpoint']} was trained on {dagan['task_classes_seen']} of the "
                            "held-out test characters; the protocol needs a DAGAN that never saw them")
    dagan.pop("training_classes")
    say(f"[2/5] DAGAN {dagan['checkpoint']} (step {dagan['step']}); task characters it saw: "
        f"{dagan['task_classes_seen']} of {len(task_classes)}")

    task_dir = out / tag
    task_files = {s: write_task_file(task_dir / f"seed{s}" / "shots.h5", data, task_classes, max(args.shots),
                                     args.test_per_class, s, salt) for s in args.seeds}
    times.lap("tasks")
    say(f"[3/5] {tag} task files: {len(task_classes)} characters × (pool of {max(args.shots)} shots + "
        f"{args.test_per_class} test drawings) for seeds {args.seeds}")

    ckpt = Path(dagan["checkpoint"])
    sheet = out / f"variants_{tag}.png"
    made = {s: augment_task(args, f, ckpt, dagan["checkpoint_sha256"], s, sheet if s == args.seeds[0] else None)
            for s, f in task_files.items()}
    variant_files = {s: path for s, (path, _) in made.items()}
    times.lap("augment", worked=any(ran for _, ran in made.values()))
    say(f"[4/5] {args.n} DAGAN variants per shot; contact sheet {sheet}")

    settings = Settings(
        task=tag, data=[Path(d).name for d in args.data], size=args.size, train_alphabets=list(args.train_alphabets),
        task_prefixes=list(args.train_alphabets if args.dev else args.test_alphabets), shots=list(args.shots),
        test_per_class=args.test_per_class, seeds=list(args.seeds), n_variants=args.n, seed=args.seed,
        dagan_config=None if args.reuse_dagan else _shown_path(args.config), dagan_overrides=list(args.overrides),
        reuse_dagan=None if args.reuse_dagan is None else str(args.reuse_dagan),
        classifier={"arch": "resnet", "width": args.width, "layers": [1, 1, 1, 1], "lr": args.lr,
                    "weight_decay": args.weight_decay, "batch_size": args.batch_size,
                    "synthetic_ratio": args.synthetic_ratio, "augmentation": args.augmentation,
                    "bn_recalibration_batches": args.bn_batches,
                    # only when not the default, so runs made before these options keep their fingerprint
                    **({"synthetic_weight": args.synthetic_weight} if args.synthetic_weight != 1.0 else {}),
                    **({"reject_off_class": True} if args.reject_off_class else {})},
        classifier_steps=args.classifier_steps, device=args.device, smoke=args.smoke,
        dev_classes=args.dev_classes if args.dev else 0, threads=args.threads, task_classes=list(task_classes),
        regimes=list(args.regimes), workers=args.workers, truncation=args.truncation,
    )
    fp = _fingerprint({"classifier": settings.classifier, "steps": settings.classifier_steps,
                       "ckpt": dagan["checkpoint_sha256"], "n": args.n, "test_per_class": args.test_per_class,
                       "pool": max(args.shots), "classes": task_classes, "size": args.size,
                       # only when set, so runs made before the option keep their fingerprint
                       **({"truncation": args.truncation} if args.truncation else {})})
    runs, trained_now = run_classifiers(args, task_files, variant_files, task_dir / "runs.jsonl", fp)
    times.lap("classifiers", worked=trained_now > 0)

    name = "omniglot_fewshot" if tag == "test" else "omniglot_fewshot_dev"
    files = {"markdown": str(out / f"{name}.md"), "json": str(out / f"{name}.json"),
             "chart": str(out / f"{name}.png"), "contact_sheet": str(sheet), "runs": str(task_dir / "runs.jsonl"),
             "dagan_run": str(ckpt.parent.parent)}
    steps_per_k = {k: classifier_steps_plan(k * len(task_classes), args.batch_size, args.classifier_steps)[1]
                   for k in args.shots}
    report = {
        "settings": asdict(settings), "summary": summarize(runs, args.shots), "runs": runs, "dagan": dagan,
        "data": {"images": len(data), "characters": len(data.class_names), "duplicates": data.duplicates,
                 "skipped": len(data.skipped), "conflicts": len(data.conflicts)},
        "classifier_flops": classifier_flops(len(task_classes), args.size, args.width), "steps_per_k": steps_per_k,
        "variant_diversity": variant_diversity(task_files[args.seeds[0]], variant_files[args.seeds[0]]),
        "reference_amurthy1_100way": REFERENCE, "files": files, "seconds": times.now,
        "stage_seconds_last_work": times.last_work(),
        "command": " ".join(["python", "pipelines/omniglot_fewshot.py", *getattr(args, "argv", [])]),
        "environment": environment_info(args.device),
    }
    times.lap("report")
    times.now["total"] = time.perf_counter() - t_start
    report["stage_seconds_last_work"] = times.last_work()
    times.save()
    plot(report, Path(files["chart"]))
    atomic_write_text(files["json"], json.dumps(report, indent=2, default=str))
    markdown = render_markdown(report)
    atomic_write_text(files["markdown"], markdown)
    say("[5/5] report: " + files["markdown"])
    say(markdown.split("\n## DAGAN")[0])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to continue in {args.out}", file=sys.stderr)
        return 130
    except DaganError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
