"""The ``augment`` job: N synthetic DAGAN variants of every selected real patch, written as a patch file.

::

    report = augment("patches.h5", "runs/exp1", "synthetic.h5", n=10, split="train", seed=0)

The job is three steps with typed records: :func:`plan_augment` (an :class:`AugmentRequest` and the open input →
an :class:`AugmentPlan`: the sources, the generator loaded once from its checkpoint, the output's parameters, and
whether an identical finished output already exists), :func:`run_augment` (the plan → the output file, resumable)
and the :class:`AugmentReport`. This module holds the three steps; the records are in ``augment_types.py``, the
output file (its attributes and provenance columns, the contact sheet) in ``augment_output.py``, the report in
``augment_report.py``, and the variants of a batch (per-row noise seeds, the generator forward, the critic's
off-class verdict) in :mod:`dagan_gn.training.variants`.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from dagan_gn.jobs.augment_output import (append_variants, contact_sheet_tiles, finished_output, open_writer,
                                          output_parameters, write_contact_sheet)
from dagan_gn.jobs.augment_report import AugmentReport, augment_report
from dagan_gn.jobs.augment_types import (CARRIED_COLUMNS, EVAL_SPLITS, AugmentError, AugmentPlan, AugmentRequest,
                                         SourceSelection)
from dagan_gn.locks import locks_output
from dagan_gn.training.variants import generate_variants, noise_seed, off_class_variants, sample_noise

if TYPE_CHECKING:  # imported lazily at run time: `dagan augment -h` stays fast
    from dagan_gn.config import ExperimentConfig
    from dagan_gn.store.patch_file import PatchFile, PatchWriter

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


def plan_augment(request: AugmentRequest, pf: PatchFile) -> AugmentPlan:
    """Resolve a request against the open input file: select the sources, load the checkpoint (once) and build the
    generator, check that it fits the input, and find out whether an identical output is already finished.

    Raises:
        AugmentError: see :func:`select_sources`; a missing/unreadable checkpoint, a non-DAGAN model, a patch-size,
            channel or class mismatch, or an existing output made otherwise.
    """
    from dagan_gn.fileio import sha256_file
    from dagan_gn.runtime import resolve_device
    from dagan_gn.training.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from dagan_gn.training.families import generator_from_state, get_family

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
    parameters = output_parameters(request, pf, ckpt_sha, len(sources.rows))
    plan = AugmentPlan(request=request, sources=sources, generator=generator, generator_config=cfg, device=dev,
                       checkpoint=ckpt_path, checkpoint_sha256=ckpt_sha, checkpoint_step=step, used_ema=used_ema,
                       label_map=label_map, parameters=parameters, critic=critic)
    plan.complete = finished_output(request, parameters, plan.n_written)
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


# ---------------------------------------------------------------------------------------------------- run
def _done_positions(keys: set[str]) -> set[int]:
    """Positions in the source order recorded as done by commit keys ``"a-b"`` (half-open ranges)."""
    done: set[int] = set()
    for key in keys:
        a, _, b = key.partition("-")
        done.update(range(int(a), int(b)))
    return done


def _write_batch(plan: AugmentPlan, pf: PatchFile, writer: PatchWriter, positions: list[int]) -> int:
    """Generate and append the variants of the sources at ``positions`` (consecutive); returns the rows written."""
    request, n = plan.request, plan.request.n
    src_rows = plan.sources.rows[positions[0] : positions[-1] + 1]
    x = torch.from_numpy(pf.read_patches(src_rows, signed=True))
    rows_rep = np.repeat(src_rows, n)
    k_rep = np.tile(np.arange(n), len(src_rows))
    seeds = [noise_seed(request.seed, r, k) for r, k in zip(rows_rep, k_rep)]
    label_rep = np.repeat(pf.labels[src_rows], n)
    y = None
    if plan.label_map is not None:
        y = torch.as_tensor([plan.label_map[int(lbl)] for lbl in label_rep], dtype=torch.long)
    fake = generate_variants(plan.generator, x.repeat_interleave(n, dim=0), seeds, y, truncation=request.truncation,
                             batch_size=request.batch_size, device=plan.device, family=plan.family)
    keep = np.ones(len(rows_rep), bool)
    if plan.critic is not None:
        keep = ~off_class_variants(plan.critic, fake, torch.as_tensor(label_rep), y).numpy()
    append_variants(plan, pf, writer, src_rows, fake, seeds, keep)
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
    writer = open_writer(plan, pf)
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
        report = augment_report(plan, pf, n_resumed)
        if request.contact_sheet is not None:
            report.contact_sheet = write_contact_sheet(*contact_sheet_tiles(plan, pf), request.contact_sheet)
    report.seconds = time.perf_counter() - t0
    return report
