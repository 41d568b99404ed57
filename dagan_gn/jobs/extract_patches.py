"""The ``extract-patches`` job: a DICOM archive → one HDF5 patch file (``dagan_gn.store.patch_file`` layout).

It reads plan → run → report:

* **plan** (:func:`plan_extraction`, writes nothing): check the :class:`ExtractionOptions`, read the labels CSV, find
  the DICOM files (:func:`dagan_gn.ingest.dicom.find_dicom_files`), take this shard's part, and refuse an ``out`` that
  is a folder, an input file or inside an input folder;
* **run** (under :func:`dagan_gn.locks.output_lock` on ``out``, so a second run on the same output stops with the
  holder's pid): refuse an existing ``out`` unless ``overwrite``, resolve the salt, open (or resume) the writer, and
  stream the files through the decoders into it;
* **report**: count what was written into the :class:`ExtractionReport`, also saved as ``<out>.report.json``.

Streaming: files go through the per-image pipeline (:mod:`dagan_gn.ingest.pipeline`: read, resample, mask, lesion
scaling, sampling, pseudonyms, split, encoding) in ``workers`` processes (:mod:`dagan_gn.workers`; at most
``2 * workers`` images in flight, results consumed in order), one writer in the main process appends each image's
patches and commits it, so memory is flat whatever the archive size. Per-file problems (corrupt, truncated, zero-size,
non-MG, unsupported syntax, bad ROI mask, too many pixels, smaller than a patch, a broken symbolic link, a decoding
process that died on it) become one line in the log and in ``<out>.report.json`` and the run goes on. A worker killed
while decoding (the OOM killer, a crashing decoder) is detected: the files it may have held are decoded again one at a
time in a fresh process, the one that kills it is reported as skipped, and the pool is restarted. ``resume=True``
continues the ``<out>.partial`` file of a killed run (files committed before the kill are not redone; a half-written
one is dropped and redone). ``shard=(i, n)`` takes a deterministic, balanced 1/n of the archive (hash of each file's
path relative to the inputs) so a job array can spread the work; ``dagan merge-patches`` joins the shards.

Privacy: the HDF5 holds salted pseudonyms only (patient, image, source keys), never paths, names, dates or UIDs. The
salt comes from ``salt`` or from ``salt_file`` (default ``<out>.salt``, created once: keep it secret and never share
it with the HDF5). The split is a function of the patient pseudonym and the seed, so shards agree without talking.
File names that are not valid UTF-8 are keyed by their bytes on disk (``os.fsencode``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from dagan_gn.fileio import atomic_write_text, printable_path, sha256_file
from dagan_gn.ingest.dicom import DEFAULT_MAX_PIXELS
from dagan_gn.ingest.labels import LabelsError, LabelTable, load_labels
from dagan_gn.ingest.pipeline import ExtractError, ExtractionOptions, FileResult, FileSkipped, ImageConfig
from dagan_gn.ingest.pipeline import init_worker, process_file
from dagan_gn.ingest.privacy import salt_fingerprint, text_bytes
from dagan_gn.locks import output_lock
from dagan_gn.store.patch_file import EXTRACTION_PROVENANCE, PatchFile, PatchWriter, StoreError, partial_path
from dagan_gn.workers import WorkerStartError, describe_exit, ordered_results

__all__ = [
    "ExtractError",
    "ExtractionOptions",
    "ExtractionPlan",
    "ExtractionReport",
    "extract_patches",
    "plan_extraction",
    "shard_of",
    "report_path",
]

log = logging.getLogger(__name__)

#: Exit codes of ``dagan extract-patches``.
EXIT_OK, EXIT_FATAL, EXIT_SKIPPED = 0, 2, 3


@dataclass
class ExtractionReport:
    """What a run did; also written as ``<out>.report.json`` (may name input paths: it stays with the operator)."""

    output: str
    files_found: int = 0
    files_in_shard: int = 0
    files_already_done: int = 0
    files_used: int = 0
    files_without_patches: int = 0
    files_skipped: int = 0
    files_duplicate: int = 0
    patches_written: int = 0
    patches_total: int = 0
    patches_by_class: dict[str, int] = field(default_factory=dict)
    patches_by_split: dict[str, int] = field(default_factory=dict)
    patients_by_split: dict[str, int] = field(default_factory=dict)
    lesions_used: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    resumed: bool = False
    salt_file: str | None = None
    elapsed_s: float = 0.0
    files_per_s: float = 0.0
    patches_per_s: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every file was used (duplicates once), 3 when some were skipped (see ``skipped``)."""
        return EXIT_SKIPPED if self.files_skipped else EXIT_OK

    def to_json(self) -> str:
        from dagan_gn.runtime import environment_info

        return json.dumps({**asdict(self), "environment": environment_info()}, indent=2, sort_keys=False)

    def skip(self, path: str | os.PathLike, reason: str) -> None:
        """Record (and log) a file that gave nothing."""
        self.files_skipped += 1
        self.skipped.append({"file": printable_path(path), "reason": reason})
        log.warning("skipped %s: %s", printable_path(path), reason)

    def warn(self, path: str | os.PathLike, warning: str) -> None:
        """Record (and log) something odd about a file that was used."""
        self.warnings.append({"file": printable_path(path), "warning": warning})
        log.warning("%s: %s", printable_path(path), warning)


def report_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".report.json")


def shard_of(key: str, num_shards: int) -> int:
    """The shard (0..n-1) of a file, from a hash of its relative path: balanced and stable across machines."""
    return int.from_bytes(hashlib.sha256(text_bytes(key)).digest()[:8], "big") % num_shards


def _relative_keys(files: Sequence[Path], inputs: Sequence[str | os.PathLike]) -> list[str]:
    roots = []
    for item in inputs:
        p = Path(os.path.abspath(item))
        roots.append(str(p if p.is_dir() else p.parent))
    root = os.path.commonpath(roots) if roots else os.getcwd()
    return [Path(os.path.relpath(os.path.abspath(f), root)).as_posix() for f in files]


# ---------------------------------------------------------------------------------------------------------------------
# The per-image pipeline (dagan_gn.ingest.pipeline) runs in a pool of decoding processes (dagan_gn.workers).

# gzip level of the patch chunks: 16-bit mammogram noise barely compresses past level 1 (8 real CBIS-DDSM films:
# 6.67 MB at level 1 vs 6.64 MB at level 4, +0.3 %), while level 1 deflates ~1.8x faster in the workers.
_GZIP_LEVEL = 1


def _died(task: Sequence[str], exitcode: int | None) -> FileSkipped:
    """The skip reason of a file whose decoding process died on it."""
    key, path = task
    cause = "; out of memory? see --max-pixels" if exitcode == -signal.SIGKILL else ""
    return FileSkipped(key, path, f"the decoding process died on this file ({describe_exit(exitcode)}{cause})")


# ---------------------------------------------------------------------------------------------------------------------
# Plan


@dataclass
class ExtractionPlan:
    """What a run will do, worked out before anything is written (see :func:`plan_extraction`)."""

    inputs: list[Path]
    out: Path
    options: ExtractionOptions
    labels_csv: Path | None
    table: LabelTable
    #: ``(key, path)`` of this shard's files, sorted by key (the key is the path relative to the inputs).
    tasks: list[tuple[str, str]]
    #: ``(path, reason)`` of this shard's entries that cannot be opened (broken or looping symbolic links).
    unreadable: list[tuple[Path, str]]
    #: ``(path, note)`` of links not followed twice, from the file search.
    notes: list[tuple[Path, str]]
    files_found: int
    parameters: dict[str, Any]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_output_place(out: Path, inputs: Sequence[Path], labels_csv: Path | None) -> None:
    """Refuse an ``out`` that is a folder, an input or inside an input folder (before anything is written)."""
    if out.is_dir():
        raise ExtractError(f"--out {printable_path(out)} is a folder; give the path of the .h5 file to write")
    real_out = Path(os.path.realpath(out))
    for item in inputs:
        real = Path(os.path.realpath(item))
        if item.is_dir() and _inside(real_out, real):
            raise ExtractError(
                f"--out {printable_path(out)} is inside the input folder {printable_path(item)}; write the patch "
                "file outside the archive (later runs would search it, and a wrong name could replace a DICOM)"
            )
        if real_out == real:
            raise ExtractError(f"--out {printable_path(out)} is one of the input files; choose another path")
    if labels_csv is not None and real_out == Path(os.path.realpath(labels_csv)):
        raise ExtractError(f"--out {printable_path(out)} is the labels CSV; choose another path")


def plan_extraction(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    options: ExtractionOptions,
    *,
    labels_csv: str | os.PathLike | None = None,
) -> ExtractionPlan:
    """Check the inputs and the output place, read the labels, find the files of this shard. Writes nothing.

    Raises:
        ExtractError: no inputs, a missing input, an unreadable labels CSV, an ``out`` that is a folder, an input or
            inside an input folder.
    """
    from dagan_gn.ingest.dicom import find_dicom_files

    out = Path(out)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ExtractError("no inputs given")
    labels = Path(labels_csv) if labels_csv is not None else None
    try:
        table = load_labels(labels)
    except LabelsError as exc:
        raise ExtractError(str(exc)) from exc
    try:
        found = find_dicom_files(inputs)
    except FileNotFoundError as exc:
        raise ExtractError(str(exc)) from exc
    _check_output_place(out, inputs, labels)
    keys = _relative_keys(found.files, inputs)
    tasks = sorted(zip(keys, (str(f) for f in found.files)))
    unreadable = list(zip(_relative_keys([p for p, _ in found.unreadable], inputs), found.unreadable))
    index, count = options.shard
    if count > 1:
        tasks = [t for t in tasks if shard_of(t[0], count) == index]
        unreadable = [u for u in unreadable if shard_of(u[0], count) == index]
    return ExtractionPlan(
        inputs=inputs, out=out, options=options, labels_csv=labels, table=table, tasks=tasks,
        unreadable=[entry for _, entry in unreadable], notes=list(found.notes),
        files_found=len(found.files) + len(found.unreadable),
        parameters=options.stored_parameters(sha256_file(labels) if labels is not None else None),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Run


def _resolve_salt(out: Path, salt: str | None, salt_file: str | os.PathLike | None, num_shards: int):
    from dagan_gn.ingest.privacy import load_or_create_salt

    if salt is not None:
        return load_or_create_salt(None, salt), None
    if salt_file is None:
        if num_shards > 1:
            raise ExtractError(
                "with --shard, give every shard the same --salt or --salt-file (a per-shard salt would give one "
                "patient several pseudonyms and could put it in several splits)"
            )
        salt_file = Path(str(out) + ".salt")
    try:
        return load_or_create_salt(Path(salt_file), None), Path(salt_file)
    except (ValueError, OSError) as exc:
        raise ExtractError(f"salt file {printable_path(salt_file)}: {getattr(exc, 'strerror', None) or exc}") from exc


def _open_writer(plan: ExtractionPlan, table: LabelTable, fingerprint: str, resume: bool) -> PatchWriter:
    try:
        writer = PatchWriter(plan.out, patch_size=plan.options.patch_size, class_names=table.class_names,
                             provenance=EXTRACTION_PROVENANCE, parameters=plan.parameters,
                             attrs={"salt_fingerprint": fingerprint}, synthetic=False,
                             compression=plan.options.compression, compression_level=_GZIP_LEVEL, resume=resume)
    except (StoreError, OSError) as exc:
        raise ExtractError(str(exc)) from exc
    if writer.resumed:
        on_disk = writer.parameters
        changed = {k: (on_disk.get(k), v) for k, v in plan.parameters.items() if on_disk.get(k) != v}
        stored_fp = writer._file.attrs.get("salt_fingerprint")
        if changed or stored_fp != fingerprint:
            writer.close()
            what = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()) or "the salt"
            raise ExtractError(f"cannot resume {writer.partial}: parameters differ from the interrupted run ({what})")
    return writer


class _Writing:
    """The main-process side of a run: takes each file's result in order, appends and commits it."""

    def __init__(self, writer: PatchWriter, report: ExtractionReport, done_key: dict[str, str],
                 paths: dict[str, str], on_file_written: Callable[[int], None] | None) -> None:
        self.writer = writer
        self.report = report
        self.done_key = done_key
        self.paths = paths
        self.on_file_written = on_file_written
        self.written = 0
        # Image pseudonym (from the SOPInstanceUID) -> file that gave it: the same image reached twice (a copy, a
        # second export) is written once. A resumed run knows the images already in the file.
        self.first_file: dict[str, str] = {}
        if writer.resumed:  # (PatchWriter has no public reader of its source table)
            self.first_file = dict.fromkeys(writer._file["sources"].asstr()[:], "an image already in the file")

    def take(self, n_done: int, res: FileResult) -> None:
        report = self.report
        if isinstance(res, FileSkipped):
            report.skip(res.path, res.reason)  # not committed: a resume tries it again
            return
        path = self.paths[res.key]
        if res.image in self.first_file:
            report.files_duplicate += 1
            report.warn(path, f"same image (SOPInstanceUID) as {self.first_file[res.image]}; not written twice")
            self.writer.commit(self.done_key[res.key])
            return
        self.first_file[res.image] = printable_path(path)
        n = res.n
        if n:
            src = self.writer.add_sources([res.image])[0]
            self.writer.append(res.patches, res.labels, [res.split] * n, encoded=res.encoded, provenance={
                "patient_pseudonym": [res.patient] * n,
                "image_pseudonym": [res.image] * n,
                "laterality": [res.laterality] * n,
                "view": [res.view] * n,
                "center_yx": res.centers,
                "pixel_spacing_mm": np.full(n, res.spacing, dtype=np.float32),
                "source_index": np.full(n, src, dtype=np.int32),
                "lesion_index": res.lesion_index,
            })
        else:
            report.files_without_patches += 1
        report.files_used += 1
        report.lesions_used += int(res.lesions)
        self.written += n
        for w in res.warnings:
            report.warn(path, w)
        if self.on_file_written is not None:
            self.on_file_written(n_done)  # test hook: simulates a kill after the append, before the commit
        self.writer.commit(self.done_key[res.key])


def _summarise(report: ExtractionReport, out: Path, started: float, n_todo: int, written: int) -> None:
    report.patches_written = written
    with PatchFile(out) as pf:
        report.patches_total = len(pf)
        report.patches_by_class = {c: int((pf.labels == i).sum()) for i, c in enumerate(pf.class_names)}
        report.patches_by_split = {s: int((pf.split == i).sum()) for i, s in enumerate(pf.split_names)}
        patients = pf.provenance("patient_pseudonym")
        report.patients_by_split = {
            s: int(len(set(patients[pf.split == i]))) for i, s in enumerate(pf.split_names)}
    report.elapsed_s = round(time.perf_counter() - started, 3)
    report.files_per_s = round(n_todo / report.elapsed_s, 3) if report.elapsed_s > 0 else 0.0
    report.patches_per_s = round(written / report.elapsed_s, 3) if report.elapsed_s > 0 else 0.0


def _report_finished(plan: ExtractionPlan, report: ExtractionReport, fingerprint: str) -> None:
    """``--resume`` on a finished output (a requeued job array task): nothing to do but check its salt and count."""
    try:
        with PatchFile(plan.out) as pf:
            same_salt = pf.attrs.get("salt_fingerprint") == fingerprint
            report.patches_total = len(pf)
    except StoreError as exc:
        raise ExtractError(f"--resume: {exc}") from exc
    if not same_salt:
        raise ExtractError(f"{printable_path(plan.out)} was written with another salt; resume needs the same "
                           "--salt/--salt-file")
    report.files_already_done = len(plan.tasks) + len(plan.unreadable)
    report.resumed = True
    log.info("%s is already complete; nothing to resume", printable_path(plan.out))


def _write_all(writing: _Writing, results: Iterable[FileResult], n_todo: int, progress: bool) -> None:
    """Stream every result into the writer (finalized at the end); a failed write becomes one ExtractError."""
    from tqdm.auto import tqdm

    writer, report = writing.writer, writing.report
    bar = tqdm(total=n_todo, unit="file", desc="extract", disable=not progress, dynamic_ncols=True)
    try:
        with writer:
            for n_done, res in enumerate(results, start=1):
                writing.take(n_done, res)
                bar.update(1)
                bar.set_postfix(patches=writing.written, skipped=report.files_skipped, refresh=False)
    except WorkerStartError as exc:
        raise ExtractError(str(exc)) from exc
    except (StoreError, OSError) as exc:
        # A full disk, a lost share, a failed flush: what was committed before stays in the .partial file.
        raise ExtractError(
            f"writing {printable_path(writer.partial)} failed ({exc}); every file committed before is kept: fix the "
            "cause (e.g. free disk space) and run the same command with --resume"
        ) from exc
    finally:
        bar.close()
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _run(plan: ExtractionPlan, *, salt: str | None, salt_file: str | os.PathLike | None, resume: bool,
         overwrite: bool, progress: bool, on_file_written: Callable[[int], None] | None,
         started: float) -> ExtractionReport:
    """Everything that writes; called with the output lock held."""
    from dagan_gn.ingest.privacy import Pseudonymizer

    out, options = plan.out, plan.options
    finished = out.exists() and not partial_path(out).exists()
    if finished and not resume and not overwrite:
        raise ExtractError(f"{printable_path(out)} already exists; pass --overwrite to replace it (it is kept until "
                           "the new file is complete)")
    salt_bytes, salt_path = _resolve_salt(out, salt, salt_file, options.shard[1])
    fingerprint = salt_fingerprint(salt_bytes)
    report = ExtractionReport(output=printable_path(out), files_found=plan.files_found,
                              files_in_shard=len(plan.tasks) + len(plan.unreadable), parameters=plan.parameters,
                              max_pixels=options.max_pixels,
                              salt_file=printable_path(salt_path) if salt_path else None)
    if finished and resume:
        _report_finished(plan, report, fingerprint)
        atomic_write_text(report_path(out), report.to_json())
        return report

    writer = _open_writer(plan, plan.table, fingerprint, resume)
    pseudo = Pseudonymizer(salt_bytes)
    done_key = {key: pseudo.pseudonym("source", key) for key, _ in plan.tasks}
    done = writer.done_sources if writer.resumed else set()
    todo = [t for t in plan.tasks if done_key[t[0]] not in done]
    report.resumed = writer.resumed
    report.files_already_done = len(plan.tasks) - len(todo)
    for path, note in plan.notes:
        report.warn(path, note)
    for path, reason in plan.unreadable:  # nothing to decode: reported on every run
        report.skip(path, reason)

    config = ImageConfig(options=options, salt=salt_bytes, labels=plan.table, chunk_encoding=writer.chunk_encoding)
    results = ordered_results(todo, process_file, workers=options.workers, initializer=init_worker,
                              initargs=(config,), on_death=_died, what="decoding")
    writing = _Writing(writer, report, done_key, dict(todo), on_file_written)
    _write_all(writing, results, len(todo), progress)
    _summarise(report, out, started, len(todo), writing.written)
    atomic_write_text(report_path(out), report.to_json())
    log.info("wrote %d patches (%d files used, %d skipped) to %s", report.patches_total, report.files_used,
             report.files_skipped, printable_path(out))
    return report


def _options_with(options: ExtractionOptions | None, overrides: dict[str, Any]) -> ExtractionOptions:
    options = options or ExtractionOptions()
    if not overrides:
        return options
    names = {f.name for f in dataclasses.fields(ExtractionOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"extract_patches() got unknown option(s) {unknown}; ExtractionOptions has {sorted(names)}")
    return dataclasses.replace(options, **overrides)


def extract_patches(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    options: ExtractionOptions | None = None,
    *,
    labels_csv: str | os.PathLike | None = None,
    salt: str | None = None,
    salt_file: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    _on_file_written: Callable[[int], None] | None = None,
    **option_values: Any,
) -> ExtractionReport:
    """Extract patches from DICOM mammograms into the HDF5 patch file ``out``.

    Args:
        inputs: DICOM files and/or folders (searched recursively, following folder links).
        out: output ``.h5`` path (written as ``<out>.partial`` and renamed when complete; never an input, never
            inside an input folder).
        options: what to cut and how to run (:class:`ExtractionOptions`); any of its fields may also be given as a
            keyword (``extract_patches(dirs, out, patch_size=64)``), replacing the value in ``options``.
        labels_csv: lesion labels (``docs/labels-csv.md``); without it every patch is class ``tissue``.
        salt, salt_file: the pseudonym salt or the file holding it (default ``<out>.salt``, created once).
        resume: continue ``<out>.partial`` left by a killed run (a finished ``out`` is left as it is).
        overwrite: replace an existing ``out`` (it stays until the new file is complete).
        progress: show a tqdm bar (files/s, patches so far).

    Returns:
        The :class:`ExtractionReport` (also written to ``<out>.report.json``); ``report.exit_code`` is 0 or 3.

    Raises:
        ExtractError: bad options, missing inputs, unreadable labels CSV, a refused output, a resume that does not
            match, a write that failed (the ``.partial`` file stays resumable).
        OutputLockError: another live run holds ``out`` (the message names its pid), or ``out`` cannot be created.
    """
    started = time.perf_counter()
    options = _options_with(options, option_values)
    plan = plan_extraction(inputs, out, options, labels_csv=labels_csv)
    with output_lock(plan.out, what="extract-patches"):
        return _run(plan, salt=salt, salt_file=salt_file, resume=resume, overwrite=overwrite, progress=progress,
                    on_file_written=_on_file_written, started=started)
