"""The ``augment`` job: N synthetic DAGAN variants of every selected real patch, written as a patch file.

::

    report = augment("patches.h5", "runs/exp1", "synthetic.h5", n=10, split="train", seed=0)

The job is three steps with typed records: :func:`plan_augment` (an :class:`AugmentRequest` and the open input →
an :class:`AugmentPlan`: the sources, the generator loaded once from its checkpoint, the output's parameters, and
whether an identical finished output already exists), :func:`run_augment` (the plan → the output file, resumable)
and the :class:`AugmentReport`.

- The generator is the run's EMA generator when the checkpoint has one.
- Variant ``k`` of the patch in row ``r`` of the input file gets the noise seed ``noise_seed(seed, r, k)``, so the
  output depends on neither the batch size nor where an interrupted run was resumed; the same arguments give the
  same image bytes.
- The output has the input's layout and intensity scale (``store/patch_file.py``), ``synthetic=True``, the attributes
  ``checkpoint_sha256`` and ``generator_config`` (the run's config with paths reduced to base names: the file is
  meant to leave the hospital), and per-patch provenance: ``source_index`` (row of the source patch in the input
  file), ``variant`` (k), ``noise_seed``, and the source's ``patient_pseudonym`` / ``image_pseudonym`` /
  ``laterality`` / ``view`` when the input has them. Labels are the source's labels (same class table).
- Only the chosen split is augmented (``train`` by default); ``val``/``test`` are refused unless
  ``allow_eval_split=True`` — synthetic copies of evaluation patches would leak into training.
- The output is written to ``<out>.partial`` and renamed when complete; progress is committed (durably) about every
  ``commit_seconds`` (or every ``commit_batches`` batches). Running the same arguments again continues an
  interrupted run without duplicates, and says "already complete" (and writes a missing contact sheet) when the
  output is finished.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from dagan_gn.errors import DaganError
from dagan_gn.locks import locks_output

if TYPE_CHECKING:  # imported lazily at run time: `dagan augment -h` stays fast
    from dagan_gn.config import ExperimentConfig
    from dagan_gn.store.patch_file import PatchFile, PatchWriter
    from dagan_gn.training.families import ModelFamily

__all__ = [
    "AugmentError",
    "AugmentPlan",
    "AugmentReport",
    "AugmentRequest",
    "CARRIED_COLUMNS",
    "EVAL_SPLITS",
    "SourceSelection",
    "augment",
    "generate_variants",
    "noise_seed",
    "plan_augment",
    "run_augment",
    "sample_noise",
    "select_sources",
    "write_contact_sheet",
]

#: Provenance columns copied from the source patch to each of its variants, when the input file has them.
CARRIED_COLUMNS: tuple[str, ...] = ("patient_pseudonym", "image_pseudonym", "laterality", "view")
#: Splits that are never augmented unless explicitly allowed (evaluation must not leak into training data).
EVAL_SPLITS: frozenset[str] = frozenset({"val", "test"})


class AugmentError(DaganError, ValueError):
    """An augment request that cannot be carried out; the message names the file and the problem."""


@dataclass(frozen=True)
class AugmentRequest:
    """The arguments of one augment job (see :func:`augment` for their meaning)."""

    in_path: Path
    checkpoint: Path
    out_path: Path
    n: int = 10
    split: str = "train"
    classes: tuple[str, ...] = ()
    truncation: float = 0.0
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    contact_sheet: Path | None = None
    contact_sheet_rows: int = 8
    allow_eval_split: bool = False
    overwrite: bool = False
    progress: bool = True
    commit_seconds: float = 1.0
    commit_batches: int = 0
    reject_off_class: bool = False

    def check(self) -> None:
        """Refuse impossible arguments before any work: numbers out of range, an evaluation split, the input as
        output, and outputs that cannot be written (so an unwritable ``--contact-sheet`` fails now, not at the end).

        Raises:
            AugmentError: the message names the option.
        """
        from dagan_gn.fileio import OutputError, check_writable

        if self.n < 1:
            raise AugmentError(f"--n must be at least 1, got {self.n}")
        if self.batch_size < 1:
            raise AugmentError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.truncation < 0:
            raise AugmentError(f"--truncation must be >= 0, got {self.truncation}")
        if self.split in EVAL_SPLITS and not self.allow_eval_split:
            raise AugmentError(
                f"refusing to augment the {self.split!r} split: synthetic variants of evaluation patches would leak "
                "into training. Augment 'train' (the default), or pass --allow-eval-split if you really mean it"
            )
        if self.out_path.resolve() == self.in_path.resolve():
            raise AugmentError(f"--out {self.out_path} is the input file; choose another output path")
        try:
            check_writable(self.out_path, "--out")
            if self.contact_sheet is not None:
                check_writable(self.contact_sheet, "--contact-sheet")
        except OutputError as exc:
            raise AugmentError(str(exc)) from exc


@dataclass(frozen=True)
class SourceSelection:
    """The input rows to augment and what the output needs to know about them."""

    #: Rows of the input file, in output order.
    rows: np.ndarray
    #: Label indices (into ``class_names``) that are augmented.
    wanted: list[int]
    class_names: list[str]
    split_code: int
    #: ``CARRIED_COLUMNS`` the input has.
    carried: list[str]


@dataclass
class AugmentPlan:
    """Everything :func:`run_augment` needs, resolved and checked (the checkpoint is loaded once, here)."""

    request: AugmentRequest
    sources: SourceSelection
    generator: nn.Module
    generator_config: ExperimentConfig
    device: torch.device
    checkpoint: Path
    checkpoint_sha256: str
    checkpoint_step: int
    used_ema: bool
    #: Input label → the generator's label (conditional generators), or None.
    label_map: dict[int, int] | None
    #: The ``parameters`` attribute of the output: what determines its content (not batch size or device).
    parameters: dict[str, Any]
    #: The output exists, complete, from these same parameters: nothing to generate.
    complete: bool = False
    notes: list[str] = field(default_factory=list)
    #: ``reject_off_class``: the checkpoint's critic (its class head reads a variant as the self-pair ``(v, v)``).
    critic: nn.Module | None = None

    @property
    def family(self) -> "ModelFamily":
        """The generator's model family (its one generator forward)."""
        from dagan_gn.training.families import get_family

        return get_family(self.generator_config.model.name)

    @property
    def n_written(self) -> int:
        return len(self.sources.rows) * self.request.n


@dataclass
class AugmentReport:
    """What :func:`augment` did."""

    out_path: Path
    checkpoint: Path
    checkpoint_sha256: str
    used_ema: bool
    split: str
    n_per_source: int
    n_sources: int
    #: Synthetic patches in the finished file (``n_sources * n_per_source``).
    n_written: int
    #: Sources already done by an interrupted run that this call resumed (0 for a fresh run).
    n_resumed_sources: int
    class_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    contact_sheet: Path | None = None
    #: The output was already finished by an identical earlier run; nothing was generated.
    already_complete: bool = False
    #: Lines for the user (e.g. an interrupted ``.partial`` file that had to be started afresh).
    notes: list[str] = field(default_factory=list)
    #: With ``reject_off_class``: the share of generated variants the critic's class head put in another class
    #: (not written; also the output's ``rejected_share`` attribute). None without rejection.
    rejected_share: float | None = None

    @property
    def patches_per_second(self) -> float:
        """Patches generated by this call per second of wall time."""
        made = 0 if self.already_complete else (self.n_sources - self.n_resumed_sources) * self.n_per_source
        return made / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        if self.already_complete:
            return (f"{self.out_path} is already complete: {self.n_written} synthetic patches from the same "
                    "arguments; nothing to do")
        resumed = f" (resumed after {self.n_resumed_sources} sources)" if self.n_resumed_sources else ""
        rejected = ("" if self.rejected_share is None else
                    f"; {100 * self.rejected_share:.1f} % of the generated variants rejected as off-class")
        return (
            f"wrote {self.n_written} synthetic patches ({self.n_per_source} per source × {self.n_sources} "
            f"{self.split} patches){resumed} to {self.out_path} in {self.seconds:.1f} s "
            f"({self.patches_per_second:.1f} patches/s); classes: "
            + ", ".join(f"{k}={v}" for k, v in self.class_counts.items()) + rejected
        )


def noise_seed(seed: int, source_index: int, variant: int) -> int:
    """The noise seed of variant ``variant`` of input row ``source_index`` (a 63-bit int, stored as int64)."""
    state = np.random.SeedSequence([int(seed), int(source_index), int(variant)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def sample_noise(seeds: Sequence[int], z_dim: int, truncation: float = 0.0) -> torch.Tensor:
    """Noise ``[len(seeds), z_dim]`` on the CPU, row ``i`` drawn from its own generator seeded with ``seeds[i]``
    (truncated at ``truncation`` when > 0, as in training), so every row is reproducible on its own."""
    from dagan_gn.training.models import truncated_noise

    rows = [truncated_noise(1, z_dim, truncation, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(rows) if rows else torch.zeros(0, z_dim)


@torch.no_grad()
def generate_variants(
    generator: nn.Module,
    x: torch.Tensor,
    seeds: Sequence[int],
    y: torch.Tensor | None = None,
    *,
    truncation: float = 0.0,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    family: "ModelFamily | None" = None,
) -> torch.Tensor:
    """Run a DAGAN generator on source images with per-sample noise seeds, through its model family's one
    generator forward (:meth:`dagan_gn.training.families.ModelFamily.generate`).

    Args:
        generator: ``G(x, z, y=None)`` with a ``z_dim`` attribute, in eval mode.
        x: sources ``[B, C, S, S]`` in [-1, 1] (repeat a source to get several variants of it).
        seeds: one noise seed per row of ``x`` (see :func:`noise_seed`).
        y: class labels ``[B]`` for a class-conditional generator, else None.
        truncation: noise truncation bound (0: none).
        batch_size: rows per forward pass.
        device: where to run (default: the generator's device).
        family: the image-to-image model family of the generator (default: the DAGAN's).

    Returns:
        ``[B, C, S, S]`` float32 in [-1, 1] on the CPU.
    """
    from dagan_gn.training.families import SampleInputs, get_family

    if len(seeds) != len(x):
        raise ValueError(f"{len(seeds)} noise seeds for {len(x)} source images")
    if len(x) == 0:
        return torch.zeros_like(x, dtype=torch.float32)
    family = family or get_family("dagan")
    z = sample_noise(seeds, int(generator.z_dim), truncation)
    return family.generate(generator, SampleInputs(z, x.float(), y), batch_size=batch_size, device=device)


# ---------------------------------------------------------------------------------------------------- plan
def _generator_labels(cfg: Any, class_names: list[str], wanted: list[int], in_path: Path) -> dict[int, int] | None:
    """File label → the label index the (conditional) generator was trained with, or None if unconditional."""
    num_classes = int(cfg.model.num_classes)
    if num_classes <= 0:
        return None
    trained = [str(c) for c in (cfg.data.classes or [])]
    if trained:
        # Training restricted to some classes: the dataset numbers them in the order given.
        unknown = [class_names[i] for i in wanted if class_names[i] not in trained]
        if unknown:
            raise AugmentError(
                f"the conditional generator was trained on classes {trained} only; it cannot make variants of "
                f"{unknown} from {in_path}. Pick classes with --classes"
            )
        return {i: trained.index(class_names[i]) for i in wanted}
    if num_classes != len(class_names):
        raise AugmentError(
            f"the conditional generator has {num_classes} classes but {in_path} has {len(class_names)} "
            f"({', '.join(class_names)}); augment the file it was trained on"
        )
    return {i: i for i in wanted}


def select_sources(request: AugmentRequest, pf: PatchFile) -> SourceSelection:
    """The rows of ``request.split`` (and ``request.classes``) of the open input file ``pf``.

    Raises:
        AugmentError: a synthetic input, an unknown split or class, or nothing to augment.
    """
    in_path, split = request.in_path, request.split
    if pf.synthetic:
        raise AugmentError(f"{in_path} is itself a synthetic file; augment the real patches it was made from")
    if split not in pf.split_names:
        raise AugmentError(f"{in_path} has no split {split!r}; its splits are {', '.join(pf.split_names)}")
    rows = pf.split_indices(split)
    if len(rows) == 0:
        raise AugmentError(f"the {split!r} split of {in_path} is empty: nothing to augment")
    class_names = list(pf.class_names)
    if request.classes:
        unknown = [c for c in request.classes if c not in class_names]
        if unknown:
            raise AugmentError(
                f"unknown class(es) {', '.join(map(repr, unknown))} in {in_path}; known classes: "
                f"{', '.join(class_names)}"
            )
        wanted = sorted(class_names.index(c) for c in dict.fromkeys(request.classes))
        rows = rows[np.isin(pf.labels[rows], wanted)]
        if len(rows) == 0:
            raise AugmentError(
                f"the {split!r} split of {in_path} has no patches of class(es) {', '.join(request.classes)}")
    else:
        wanted = sorted(set(pf.labels[rows].tolist()))
    carried = [c for c in CARRIED_COLUMNS if c in pf.provenance_columns]
    return SourceSelection(rows=rows, wanted=wanted, class_names=class_names,
                           split_code=pf.split_names.index(split), carried=carried)


def _output_parameters(request: AugmentRequest, pf: PatchFile, ckpt_sha: str, n_sources: int) -> dict[str, Any]:
    """The arguments that determine the output (not batch size or device): a resumed run must match them, and a
    finished output with the same ones is complete. Base names only: the output may leave the hospital."""
    return {
        "job": "augment",
        "input": request.in_path.name,
        "input_rows": len(pf),
        "input_created": str(pf.attrs.get("created", "")),
        "checkpoint_sha256": ckpt_sha,
        "n_per_source": int(request.n),
        "split": request.split,
        "classes": list(request.classes),
        "truncation": float(request.truncation),
        **({"reject_off_class": True} if request.reject_off_class else {}),
        "seed": int(request.seed),
        "n_sources": int(n_sources),
    }


def _finished_output(request: AugmentRequest, parameters: dict[str, Any], expected_rows: int) -> bool:
    """True when ``out_path`` is a finished output of these parameters; False when there is none (or it will be
    overwritten).

    Raises:
        AugmentError: an output made otherwise (or unreadable) exists and ``overwrite`` is off.
    """
    from dagan_gn.store.patch_file import PatchFile, StoreError, partial_path
    from dagan_gn.store.journal import journal_path

    out = request.out_path
    if not out.exists() or request.overwrite:
        return False
    try:
        with PatchFile(out) as existing:
            made_with, rows, synthetic = existing.parameters, len(existing), existing.synthetic
    except StoreError as exc:
        raise AugmentError(f"{out} already exists and is not a readable patch file ({exc}); pass --overwrite to "
                           "replace it") from exc
    diff = sorted(k for k in set(parameters) | set(made_with) if parameters.get(k) != made_with.get(k))
    # With rejection a finished file holds at most the expected rows (the rejected variants are not written).
    rows_ok = rows <= expected_rows if request.reject_off_class else rows == expected_rows
    if diff or not synthetic or not rows_ok:
        what = ", ".join(diff) if diff else "its content"
        raise AugmentError(f"{out} already exists (made with other arguments: {what}); pass --overwrite to "
                           "replace it")
    if not partial_path(out).exists():
        journal_path(partial_path(out)).unlink(missing_ok=True)  # a kill right after the final rename left it
    return True


def plan_augment(request: AugmentRequest, pf: PatchFile) -> AugmentPlan:
    """Resolve a request against the open input file: select the sources, load the checkpoint (once) and build the
    generator, check that it fits the input, and find out whether an identical output is already finished.

    Raises:
        AugmentError: see :func:`select_sources`; a missing/unreadable checkpoint, a non-DAGAN model, a patch-size,
            channel or class mismatch, or an existing output made otherwise.
    """
    from dagan_gn.fileio import sha256_file
    from dagan_gn.runtime import resolve_device
    from dagan_gn.training.checkpoint import CheckpointError, generator_from_state, load_checkpoint, \
        resolve_checkpoint

    in_path = request.in_path
    sources = select_sources(request, pf)
    dev = resolve_device(request.device)
    try:
        ckpt_path = resolve_checkpoint(request.checkpoint)
        state = load_checkpoint(ckpt_path)
        generator, cfg = generator_from_state(state, ckpt_path, device=dev, use_ema=True)
        critic = _class_head_critic(state, cfg, ckpt_path, pf, dev) if request.reject_off_class else None
    except CheckpointError as exc:
        raise AugmentError(str(exc)) from exc
    used_ema, step = state.get("ema") is not None, int(state.get("step", -1))
    del state
    from dagan_gn.training.families import get_family

    if not get_family(cfg.model.name).conditions_on_image:
        raise AugmentError(f"{ckpt_path} is a {cfg.model.name!r} model; augment needs an image-to-image DAGAN")
    if int(cfg.model.image_size) != pf.patch_size:
        raise AugmentError(
            f"patch-size mismatch: {ckpt_path} was trained on {cfg.model.image_size}px patches but {in_path} "
            f"holds {pf.patch_size}px patches"
        )
    if int(cfg.model.channels) != pf.channels:
        raise AugmentError(
            f"channel mismatch: {ckpt_path} expects {cfg.model.channels}-channel images but {in_path} has "
            f"{pf.channels}"
        )
    label_map = _generator_labels(cfg, sources.class_names, sources.wanted, in_path)
    ckpt_sha = sha256_file(ckpt_path)
    parameters = _output_parameters(request, pf, ckpt_sha, len(sources.rows))
    plan = AugmentPlan(request=request, sources=sources, generator=generator, generator_config=cfg, device=dev,
                       checkpoint=ckpt_path, checkpoint_sha256=ckpt_sha, checkpoint_step=step, used_ema=used_ema,
                       label_map=label_map, parameters=parameters, critic=critic)
    plan.complete = _finished_output(request, parameters, plan.n_written)
    return plan


def _class_head_critic(state: dict[str, Any], cfg: ExperimentConfig, ckpt_path: Path, pf: PatchFile,
                       device: torch.device) -> nn.Module:
    """The checkpoint's critic, for ``reject_off_class``: it must have a class head over the input's classes."""
    from dagan_gn.training.families import build_networks

    classes = int(cfg.model.critic_classes)
    if classes <= 0 or state.get("critic") is None:
        raise AugmentError(f"--reject-off-class needs a critic class head: {ckpt_path} was trained without one "
                           "(model.critic_classes); train with model.critic_classes=-1 loss.class_weight=1, or judge "
                           "variants with dagan evaluate-augmentation --reject-off-class")
    if classes != len(pf.class_names):
        raise AugmentError(f"--reject-off-class: the critic's class head knows {classes} classes but the input has "
                           f"{len(pf.class_names)} ({', '.join(pf.class_names)}); augment the file it was trained on")
    _, critic = build_networks(cfg.model)
    critic.load_state_dict(state["critic"])
    return critic.to(device).eval()


@torch.no_grad()
def off_class_variants(critic: nn.Module, variants: torch.Tensor, labels: torch.Tensor,
                       conditioning: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    """True for each variant that the critic's class head (reading the self-pair ``(v, v)``) puts in a class other
    than ``labels``; ``conditioning``: the class labels a class-conditional critic takes (its projection term)."""
    device = next(critic.parameters()).device
    predicted = []
    for a in range(0, len(variants), batch_size):
        v = variants[a : a + batch_size].to(device)
        y = None if conditioning is None else conditioning[a : a + batch_size].to(device)
        predicted.append(critic(v, v, y, with_logits=True)[1].argmax(1).cpu())
    return torch.cat(predicted) != labels.long().cpu()


# ---------------------------------------------------------------------------------------------------- run
def _done_positions(keys: set[str]) -> set[int]:
    """Positions in the source order recorded as done by commit keys ``"a-b"`` (half-open ranges)."""
    done: set[int] = set()
    for key in keys:
        a, _, b = key.partition("-")
        done.update(range(int(a), int(b)))
    return done


def _open_writer(plan: AugmentPlan, pf: PatchFile) -> PatchWriter:
    """The output writer: a fresh ``.partial`` file, or the interrupted one of the same arguments, resumed.

    Raises:
        AugmentError: the ``.partial`` file is from other arguments or cannot be resumed.
    """
    from dagan_gn.config import config_without_paths
    from dagan_gn.store.patch_file import PatchWriter, StoreError, partial_path

    out = plan.request.out_path
    columns: dict[str, Any] = {"source_index": "int64", "variant": "int32", "noise_seed": "int64"}
    columns.update({c: "str" for c in plan.sources.carried})
    try:
        writer = PatchWriter(
            out, patch_size=pf.patch_size, class_names=plan.sources.class_names, provenance=columns,
            parameters=plan.parameters, synthetic=True, channels=pf.channels, split_names=pf.split_names,
            attrs={
                "checkpoint_sha256": plan.checkpoint_sha256,
                "generator_config": config_without_paths(plan.generator_config),
                "source_file": plan.request.in_path.name,
                "checkpoint_step": plan.checkpoint_step,
                "used_ema": plan.used_ema,
            },
            resume=partial_path(out).exists(),
        )
    except StoreError as exc:
        raise AugmentError(f"cannot resume {partial_path(out)}: {exc}") from exc
    if writer.recovery_note:
        plan.notes.append(writer.recovery_note)
    if writer.resumed and writer.parameters != plan.parameters:
        diff = sorted(k for k in set(plan.parameters) | set(writer.parameters)
                      if plan.parameters.get(k) != writer.parameters.get(k))
        writer.close()
        raise AugmentError(
            f"{partial_path(out)} is an interrupted augment run with different arguments ({', '.join(diff)}); run "
            "with the same arguments to finish it, or delete it to start afresh"
        )
    return writer


def _write_batch(plan: AugmentPlan, pf: PatchFile, writer: PatchWriter, positions: list[int]) -> int:
    """Generate and append the variants of the sources at ``positions`` (consecutive); returns the rows written."""
    from dagan_gn.store.patch_file import to_uint16

    request, n = plan.request, plan.request.n
    src_rows = plan.sources.rows[positions[0] : positions[-1] + 1]
    x = torch.from_numpy(pf.read_patches(src_rows, signed=True))
    labels = pf.labels[src_rows]
    rows_rep = np.repeat(src_rows, n)
    k_rep = np.tile(np.arange(n), len(src_rows))
    seeds = [noise_seed(request.seed, r, k) for r, k in zip(rows_rep, k_rep)]
    y = None
    if plan.label_map is not None:
        y = torch.as_tensor([plan.label_map[int(lbl)] for lbl in np.repeat(labels, n)], dtype=torch.long)
    fake = generate_variants(plan.generator, x.repeat_interleave(n, dim=0), seeds, y, truncation=request.truncation,
                             batch_size=request.batch_size, device=plan.device, family=plan.family)
    prov: dict[str, Any] = {
        "source_index": rows_rep.astype(np.int64),
        "variant": k_rep.astype(np.int32),
        "noise_seed": np.asarray(seeds, dtype=np.int64),
    }
    for c in plan.sources.carried:
        prov[c] = np.repeat(pf.provenance(c, src_rows), n)
    label_rep = np.repeat(labels, n)
    keep = np.ones(len(rows_rep), bool)
    if plan.critic is not None:
        keep = ~off_class_variants(plan.critic, fake, torch.as_tensor(label_rep), y).numpy()
    if keep.any():
        writer.append(to_uint16((fake.numpy()[keep] + 1.0) * 0.5), label_rep[keep],
                      np.full(int(keep.sum()), plan.sources.split_code, dtype=np.uint8),
                      {c: col[keep] for c, col in prov.items()})
    return len(rows_rep)


def run_augment(plan: AugmentPlan, pf: PatchFile) -> int:
    """Write the output of a plan (continuing an interrupted ``.partial`` run of the same arguments) and rename it
    into place; returns how many sources an interrupted run had already done.

    A batch covers consecutive source positions only, and commits fall on batch boundaries, so a resumed run forms
    exactly the batches an uninterrupted run forms (same shapes, same bytes).

    Raises:
        AugmentError: an interrupted run with other arguments.
        StoreError: a failed write (full disk, I/O error): one line; the ``.partial`` file keeps every commit.
    """
    from tqdm.auto import tqdm

    request, n = plan.request, plan.request.n
    n_sources = len(plan.sources.rows)
    writer = _open_writer(plan, pf)
    try:
        done = _done_positions(writer.done_sources)
        todo = [p for p in range(n_sources) if p not in done]
        sources_per_batch = max(1, request.batch_size // n)
        bar = tqdm(total=n_sources * n, initial=len(done) * n, unit="patch", desc="augment",
                   disable=not request.progress, dynamic_ncols=True)
        pending: list[list[int]] = []  # [first, end) position ranges written since the last commit
        last_commit, batches = time.monotonic(), 0
        i = 0
        while i < len(todo):
            j = i + 1
            while j < len(todo) and j - i < sources_per_batch and todo[j] == todo[j - 1] + 1:
                j += 1
            positions = todo[i:j]
            bar.update(_write_batch(plan, pf, writer, positions))
            if pending and pending[-1][1] == positions[0]:
                pending[-1][1] = positions[-1] + 1
            else:
                pending.append([positions[0], positions[-1] + 1])
            batches += 1
            if (j == len(todo) or (batches % request.commit_batches == 0 if request.commit_batches > 0
                                   else time.monotonic() - last_commit >= request.commit_seconds)):
                for first, end in pending:
                    writer.commit(f"{first}-{end}")
                pending, last_commit = [], time.monotonic()
            i = j
        bar.close()
        if request.reject_off_class:
            # Over the whole file (a resumed run's earlier batches included): every rejected variant is a missing row.
            expected = n_sources * n
            writer.set_attrs(rejected_share=float(1 - writer.num_patches / expected) if expected else 0.0)
        writer.finalize()
    except BaseException:
        writer.close()  # the .partial file keeps its committed batches for a resume
        raise
    return len(done)


# ---------------------------------------------------------------------------------------------------- report
def write_contact_sheet(
    sources: torch.Tensor, variants: torch.Tensor, path: str | os.PathLike, *, padding: int = 2
) -> Path:
    """PNG grid (the project's one grid writer, :func:`dagan_gn.training.run_log.save_image_grid`): one row per
    source, the source first then its variants.

    Args:
        sources: ``[R, C, S, S]`` in [-1, 1].
        variants: ``[R, K, C, S, S]`` in [-1, 1].
        path: output PNG (written atomically).
    """
    from dagan_gn.training.run_log import save_image_grid

    rows = torch.cat([sources[:, None], variants], dim=1)  # [R, 1 + K, C, S, S]
    return save_image_grid(rows.flatten(0, 1), path, nrow=rows.shape[1], padding=padding)


def _contact_sheet(plan: AugmentPlan, pf: PatchFile) -> Path:
    """The contact sheet of a finished output: the first ``contact_sheet_rows`` sources and up to 10 variants."""
    from dagan_gn.store.patch_file import PatchFile

    request, rows = plan.request, plan.sources.rows
    r, k = min(request.contact_sheet_rows, len(rows)), min(request.n, 10)
    with PatchFile(request.out_path) as out:
        src_index, variant = out.provenance("source_index"), out.provenance("variant")
        blank = np.full((pf.channels, pf.patch_size, pf.patch_size), -1.0, np.float32)

        def tile(p: int, j: int) -> np.ndarray:
            # A variant rejected as off-class (--reject-off-class) is a black tile: columns stay variant numbers.
            hit = np.flatnonzero((src_index == rows[p]) & (variant == j))
            return out.read_patches(hit[:1], signed=True)[0] if len(hit) else blank

        variants = np.stack([np.stack([tile(p, j) for j in range(k)]) for p in range(r)])
    src = torch.from_numpy(pf.read_patches(rows[:r], signed=True))
    return write_contact_sheet(src, torch.from_numpy(variants), request.contact_sheet)


def _written(path: Path, n_classes: int) -> tuple[int, np.ndarray, float | None]:
    """Rows, rows per class and ``rejected_share`` of a finished output (read once: with ``--reject-off-class``
    the rows are fewer than sources × n and only the file knows how many)."""
    from dagan_gn.store.patch_file import PatchFile

    with PatchFile(path) as out:
        share = out.attrs.get("rejected_share")
        return len(out), np.bincount(out.labels, minlength=n_classes), None if share is None else float(share)


def _report(plan: AugmentPlan, pf: PatchFile, n_resumed: int) -> AugmentReport:
    sources, request = plan.sources, plan.request
    n_written, rejected = plan.n_written, None
    counts = np.bincount(pf.labels[sources.rows], minlength=len(sources.class_names)) * request.n
    if request.reject_off_class:
        n_written, counts, rejected = _written(request.out_path, len(sources.class_names))
    return AugmentReport(
        out_path=request.out_path, checkpoint=plan.checkpoint, checkpoint_sha256=plan.checkpoint_sha256,
        used_ema=plan.used_ema, split=request.split, n_per_source=request.n, n_sources=len(sources.rows),
        n_written=n_written, n_resumed_sources=n_resumed,
        class_counts={sources.class_names[c]: int(counts[c]) for c in sources.wanted},
        already_complete=plan.complete, notes=list(plan.notes), rejected_share=rejected,
    )


# ---------------------------------------------------------------------------------------------------- the job
@locks_output("out_path", what="augment")  # a second run on the same --out stops with the holder's pid
def augment(
    in_path: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    n: int = 10,
    split: str = "train",
    classes: Sequence[str] | None = None,
    truncation: float = 0.0,
    batch_size: int = 32,
    device: str = "auto",
    seed: int = 0,
    contact_sheet: str | os.PathLike | None = None,
    contact_sheet_rows: int = 8,
    allow_eval_split: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    commit_seconds: float = 1.0,
    commit_batches: int = 0,
    reject_off_class: bool = False,
) -> AugmentReport:
    """Write ``n`` synthetic variants of every patch of ``split`` (optionally only ``classes``) of ``in_path``.

    Args:
        in_path: real patch file (``dagan extract-patches``).
        checkpoint: a run folder (its newest checkpoint) or a checkpoint file.
        out_path: synthetic patch file to write.
        n: variants per source patch.
        split: split to augment; ``val``/``test`` need ``allow_eval_split``.
        classes: class names to augment (default: all).
        truncation: noise truncation bound (0: none).
        batch_size: generator batch size.
        device: ``auto``, ``cpu``, ``cuda``...
        seed: base of the per-sample noise seeds.
        contact_sheet: optional PNG path: the first ``contact_sheet_rows`` sources and their variants.
        allow_eval_split: permit augmenting ``val``/``test`` (for experiments that know what they do).
        overwrite: replace an existing finished ``out_path`` (an interrupted ``.partial`` run is always resumed when
            its arguments match).
        progress: show a tqdm progress bar.
        commit_seconds: seconds between durable commits (a kill loses at most about this much work; each commit
            costs a few fsyncs). 0 commits after every batch.
        commit_batches: when > 0, commit after every ``commit_batches`` batches instead (a cadence by count, not by
            clock: the fault-injection tests use it to hit the same mid-run commits on any machine).
        reject_off_class: do not write the variants that the checkpoint's critic class head (``model.critic_classes``,
            trained over the input's classes) puts in another class than their source's; the share dropped is the
            output's ``rejected_share`` attribute and the report's. Needs a checkpoint with a class head.

    Raises:
        AugmentError: evaluation split without ``allow_eval_split``; unknown split or class; empty selection;
            checkpoint/patch-size or channel mismatch; an unreadable input or checkpoint; an existing output made
            with other arguments; a ``.partial`` file from other arguments; an unwritable ``out_path`` or
            ``contact_sheet``.
        StoreError: a write failed (full disk, I/O error); running the same arguments again continues.
    """
    from dagan_gn.store.patch_file import PatchFile, StoreError

    t0 = time.perf_counter()
    request = AugmentRequest(
        in_path=Path(in_path), checkpoint=Path(checkpoint), out_path=Path(out_path), n=int(n), split=split,
        classes=tuple(classes or ()), truncation=float(truncation), batch_size=int(batch_size), device=device,
        seed=int(seed), contact_sheet=Path(contact_sheet) if contact_sheet is not None else None,
        contact_sheet_rows=int(contact_sheet_rows), allow_eval_split=allow_eval_split, overwrite=overwrite,
        progress=progress, commit_seconds=float(commit_seconds), commit_batches=int(commit_batches),
        reject_off_class=bool(reject_off_class),
    )
    request.check()
    try:
        pf = PatchFile(request.in_path)
    except StoreError as exc:
        raise AugmentError(str(exc)) from exc
    with pf:
        plan = plan_augment(request, pf)
        n_resumed = 0 if plan.complete else run_augment(plan, pf)
        report = _report(plan, pf, n_resumed)
        if request.contact_sheet is not None:
            report.contact_sheet = _contact_sheet(plan, pf)
    report.seconds = time.perf_counter() - t0
    return report
