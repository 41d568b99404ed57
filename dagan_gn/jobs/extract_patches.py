"""The ``extract-patches`` job: a DICOM archive → one HDF5 patch file (``dagan_gn.store.patch_file`` layout).

Streaming: files are decoded in ``workers`` processes (at most ``2 * workers`` images in flight, results consumed in
order), one writer in the main process appends each image's patches and commits it, so memory is flat whatever the
archive size. Per-file problems (corrupt, truncated, zero-size, non-MG, unsupported syntax, bad ROI mask) become one
line in the log and in ``<out>.report.json`` and the run goes on. ``resume=True`` continues the ``<out>.partial``
file of a killed run (files committed before the kill are not redone; a half-written one is dropped and redone).
``shard=(i, n)`` takes a deterministic, balanced 1/n of the archive (hash of each file's path relative to the inputs)
so a job array can spread the work; ``dagan merge-patches`` joins the shards.

Privacy: the HDF5 holds salted pseudonyms only (patient, image, source keys), never paths, names, dates or UIDs. The
salt comes from ``salt`` or from ``salt_file`` (default ``<out>.salt``, created once: keep it secret and never share
it with the HDF5). The split is a function of the patient pseudonym and the seed, so shards agree without talking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dagan_gn.errors import DaganError
from dagan_gn.ingest.labels import LabelsError, LabelTable, load_labels
from dagan_gn.ingest.sampling import cut_patch, lesion_centres, normal_centres
from dagan_gn.store.patch_file import (
    EXTRACTION_PROVENANCE,
    PatchFile,
    PatchWriter,
    StoreError,
    encode_patch_chunks,
    to_uint16,
)
from dagan_gn.fileio import atomic_write_text, sha256_file

__all__ = ["ExtractError", "ExtractionReport", "extract_patches", "shard_of", "salt_fingerprint", "report_path"]

log = logging.getLogger(__name__)

#: Exit codes of ``dagan extract-patches``.
EXIT_OK, EXIT_FATAL, EXIT_SKIPPED = 0, 2, 3


class ExtractError(DaganError, ValueError):
    """A fatal problem with the job itself (bad parameters, unreadable labels, no inputs, resume mismatch)."""


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
    patches_written: int = 0
    patches_total: int = 0
    patches_by_class: dict[str, int] = field(default_factory=dict)
    patches_by_split: dict[str, int] = field(default_factory=dict)
    patients_by_split: dict[str, int] = field(default_factory=dict)
    lesions_used: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False
    salt_file: str | None = None
    elapsed_s: float = 0.0
    files_per_s: float = 0.0
    patches_per_s: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every file was used, 3 when some were skipped (see ``skipped``)."""
        return EXIT_SKIPPED if self.files_skipped else EXIT_OK

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)


def report_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".report.json")


def shard_of(key: str, num_shards: int) -> int:
    """The shard (0..n-1) of a file, from a hash of its relative path: balanced and stable across machines."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % num_shards


def salt_fingerprint(salt: bytes) -> str:
    """A one-way fingerprint of the salt, stored in the HDF5 so resume/merge can check that every part used the
    same salt (the salt itself never goes into the file)."""
    return hashlib.sha256(b"dagan-gn salt fingerprint\x00" + salt).hexdigest()[:16]


def _relative_keys(files: Sequence[Path], inputs: Sequence[str | os.PathLike]) -> list[str]:
    roots = []
    for item in inputs:
        p = Path(os.path.abspath(item))
        roots.append(str(p if p.is_dir() else p.parent))
    root = os.path.commonpath(roots) if roots else os.getcwd()
    return [Path(os.path.relpath(os.path.abspath(f), root)).as_posix() for f in files]


# ---------------------------------------------------------------------------------------------------------------------
# Worker side: decode one image and cut its patches. Runs in a pool process (or inline with workers=1).

# gzip level of the patch chunks: 16-bit mammogram noise barely compresses past level 1 (8 real CBIS-DDSM films:
# 6.67 MB at level 1 vs 6.64 MB at level 4, +0.3 %), while level 1 deflates ~1.8x faster in the workers.
_GZIP_LEVEL = 1

_WORKER: dict[str, Any] = {}


def _init_worker(config: dict[str, Any]) -> None:
    from dagan_gn.ingest.privacy import Pseudonymizer

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER.clear()
    _WORKER.update(config)
    _WORKER["pseudonymizer"] = Pseudonymizer(config["salt"])


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def _process_file(key: str, path: str) -> dict[str, Any]:
    """Decode, mask, sample and cut one file; returns patches + pseudonymous provenance, or the skip reason."""
    from dagan_gn.ingest.dicom import DicomReadError, read_dicom_raw, resample_to_spacing
    from dagan_gn.ingest.mask import breast_mask
    from dagan_gn.ingest.privacy import assign_split

    cfg = _WORKER
    try:
        raw = read_dicom_raw(path, allow_modalities=cfg["allow_modalities"])
        meta = raw.meta
        table: LabelTable = cfg["labels"]
        lesions = [les.resolve((meta.rows, meta.cols)) for les in table.lookup(path, meta)]
        target = cfg["target_spacing_mm"]
        if target is not None and meta.pixel_spacing_mm is None:
            raise DicomReadError(path, "no PixelSpacing/ImagerPixelSpacing, cannot resample to --target-spacing")
        if target is None:
            # Stay on the stored grey levels: the mask maps only block means to display values, and only the cut
            # patches are converted (the display map is elementwise, so they equal patches of the display image).
            pixels, display = raw.values, raw.display
        else:
            pixels, _ = resample_to_spacing(raw.to_image().pixels, meta.pixel_spacing_mm, target)
            display = None
        del raw
        sy, sx = pixels.shape[0] / meta.rows, pixels.shape[1] / meta.cols
        spacing = (meta.pixel_spacing_mm[0] / sy) if meta.pixel_spacing_mm else float("nan")
        # Sampling needs only window coverages: keep the mask at block resolution.
        mask = breast_mask(pixels, meta.laterality, full_resolution=False, display=display)
        S = cfg["patch_size"]
        warnings = []
        scaled = []
        for les in lesions:
            cy, cx = les.center_yx
            if not (0 <= cy < meta.rows and 0 <= cx < meta.cols):
                warnings.append(f"{les.source}: lesion centre (x={cx:g}, y={cy:g}) is outside the "
                                f"{meta.cols}x{meta.rows} image; ignored")
                continue
            scaled.append((les.class_name, (cy * sy, cx * sx, les.radius * min(sy, sx))))
        geometry = [g for _, g in scaled]
        rng = np.random.default_rng([cfg["seed"], _key_seed(key)])
        lesion_pos = lesion_centres(geometry, pixels.shape, S, rng, per_lesion=cfg["per_lesion"],
                                    jitter=cfg["lesion_jitter"])
        normal_pos = normal_centres(mask, S, cfg["per_image"], rng, min_tissue=cfg["min_tissue"], lesions=geometry,
                                    margin=cfg["lesion_margin"], stride=cfg["stride"])
        centres = [(y, x) for y, x, _ in lesion_pos] + list(normal_pos)
        lesion_index = [i for _, _, i in lesion_pos] + [-1] * len(normal_pos)
        class_names = table.class_names
        labels = [class_names.index(scaled[i][0]) for _, _, i in lesion_pos] + [0] * len(normal_pos)
        if centres:
            cut = np.stack([cut_patch(pixels, c, S) for c in centres])
            patches = to_uint16(cut if display is None else display(cut))[:, None]
        else:
            patches = np.zeros((0, 1, S, S), np.uint16)
        pseudo = cfg["pseudonymizer"]
        # Patient key: the patient part of PatientID; without one, fall back to other identifiers so images are
        # never pooled under an empty key (each such image is its own "patient").
        patient_key = meta.patient_id or meta.patient_name or meta.study_uid or f"file:{key}"
        patient = pseudo.pseudonym("patient", patient_key)
        if not meta.patient_id:
            warnings.append("no PatientID; the image was given its own patient pseudonym")
        image_id = pseudo.pseudonym("image", meta.sop_instance_uid or f"file:{key}")
        encoding = cfg["chunk_encoding"]
        # Compress here, in the worker, so the single writer only copies bytes into the file.
        encoded = encode_patch_chunks(patches, *encoding) if encoding is not None else None
        return {
            "ok": True,
            "key": key,
            "n": int(patches.shape[0]),
            "patches": patches if encoded is None else None,
            "encoded": encoded,
            "labels": np.asarray(labels, dtype=np.int32),
            "centers": np.asarray(centres, dtype=np.int32).reshape(-1, 2),
            "lesion_index": np.asarray(lesion_index, dtype=np.int32),
            "patient": patient,
            "image": image_id,
            "split": assign_split(patient, cfg["split"], cfg["seed"]),
            "laterality": meta.laterality,
            "view": meta.view,
            "spacing": spacing,
            "lesions": len(scaled),
            "warnings": warnings,
        }
    except DicomReadError as exc:
        return {"ok": False, "key": key, "path": path, "reason": exc.reason}
    except LabelsError as exc:
        return {"ok": False, "key": key, "path": path, "reason": str(exc)}
    except MemoryError:
        return {"ok": False, "key": key, "path": path, "reason": "out of memory while decoding"}
    except Exception as exc:  # one bad file must never stop an archive-sized run
        return {"ok": False, "key": key, "path": path, "reason": f"unexpected {type(exc).__name__}: {exc}"}


def _results_inline(tasks, config):
    _init_worker(config)
    for key, path in tasks:
        yield _process_file(key, path)


def _results_pool(tasks, config, workers: int):
    """Ordered results with at most ``2 * workers`` images in flight, so memory stays flat even when the writer is
    slower than the decoders (``Pool.imap`` would buffer every finished result)."""
    import multiprocessing as mp

    # Import the decoding stack once here so forked workers inherit it instead of each importing it again.
    import dagan_gn.ingest.dicom  # noqa: F401
    import dagan_gn.ingest.mask  # noqa: F401

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
        pending: deque = deque()
        it = iter(tasks)
        for key, path in it:
            pending.append(pool.apply_async(_process_file, (key, path)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.apply_async(_process_file, nxt))
            yield result


# ---------------------------------------------------------------------------------------------------------------------
# Main side


def _resolve_salt(out: Path, salt: str | None, salt_file: str | os.PathLike | None, shard: tuple[int, int]):
    from dagan_gn.ingest.privacy import load_or_create_salt

    if salt is not None:
        return load_or_create_salt(None, salt), None
    if salt_file is None:
        if shard[1] > 1:
            raise ExtractError(
                "with --shard, give every shard the same --salt or --salt-file (a per-shard salt would give one "
                "patient several pseudonyms and could put it in several splits)"
            )
        salt_file = Path(str(out) + ".salt")
    return load_or_create_salt(Path(salt_file), None), Path(salt_file)


def extract_patches(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    patch_size: int = 256,
    per_image: int = 8,
    per_lesion: int = 1,
    min_tissue: float = 0.9,
    stride: int | None = None,
    target_spacing_mm: float | None = None,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    workers: int = 1,
    seed: int = 0,
    salt: str | None = None,
    salt_file: str | os.PathLike | None = None,
    resume: bool = False,
    shard: tuple[int, int] = (0, 1),
    allow_modalities: Sequence[str] = ("MG",),
    lesion_jitter: float = 0.25,
    lesion_margin: int | None = None,
    compression: str | None = "gzip",
    progress: bool = True,
    _on_file_written: Callable[[int], None] | None = None,
) -> ExtractionReport:
    """Extract patches from DICOM mammograms into the HDF5 patch file ``out``.

    Args:
        inputs: DICOM files and/or folders (searched recursively).
        out: output ``.h5`` path (written as ``<out>.partial`` and renamed when complete).
        labels_csv: lesion labels (``docs/labels-csv.md``); without it every patch is class ``tissue``.
        patch_size: S of the S×S patches (after resampling).
        per_image: normal-tissue patches per image (random mode).
        per_lesion: lesion-centred patches per lesion (each with its own jitter).
        min_tissue: minimum fraction of a normal patch covered by the breast mask.
        stride: grid mode: every qualifying centre of a grid with this step (``per_image`` ignored).
        target_spacing_mm: downsample every image to this pixel spacing first (images with no spacing are skipped).
        split: train/val/test fractions, assigned per patient.
        workers: decoding processes (1 = decode in this process).
        seed: sampling and split seed.
        salt, salt_file: the pseudonym salt or the file holding it (default ``<out>.salt``, created once).
        resume: continue ``<out>.partial`` left by a killed run.
        shard: ``(i, n)``: process only the i-th of n deterministic parts of the archive.
        allow_modalities: DICOM modalities accepted (``"*"`` for any).
        lesion_jitter: lesion patch shift, at most this fraction of S per axis (the lesion stays inside).
        lesion_margin: normal patches keep this many pixels from any lesion (default S // 4).
        compression: ``"gzip"``, ``"lzf"`` or None.
        progress: show a tqdm bar (files/s, patches so far).

    Returns:
        The :class:`ExtractionReport` (also written to ``<out>.report.json``); ``report.exit_code`` is 0 or 3.

    Raises:
        ExtractError: bad parameters, missing inputs, unreadable labels CSV, a resume that does not match.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out = Path(out)
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if patch_size < 8:
        raise ExtractError(f"patch size must be at least 8, got {patch_size}")
    if per_image < 0 or per_lesion < 0:
        raise ExtractError("per-image and per-lesion counts must not be negative")
    if not 0.0 <= min_tissue <= 1.0:
        raise ExtractError(f"min-tissue must be in [0, 1], got {min_tissue}")
    if stride is not None and stride <= 0:
        raise ExtractError(f"stride must be positive, got {stride}")
    if target_spacing_mm is not None and target_spacing_mm <= 0:
        raise ExtractError(f"target spacing must be positive, got {target_spacing_mm}")
    if workers < 1:
        raise ExtractError(f"workers must be at least 1, got {workers}")
    shard_index, num_shards = int(shard[0]), int(shard[1])
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ExtractError(f"shard must be i/n with 0 <= i < n, got {shard_index}/{num_shards}")
    split = tuple(float(f) for f in split)
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ExtractError(f"split must be three non-negative fractions summing to 1, got {split}")
    if not inputs:
        raise ExtractError("no inputs given")
    try:
        table = load_labels(labels_csv)
    except LabelsError as exc:
        raise ExtractError(str(exc)) from exc

    from dagan_gn.ingest.dicom import list_dicom_files

    try:
        files = list_dicom_files(inputs)
    except FileNotFoundError as exc:
        raise ExtractError(str(exc)) from exc
    keys = _relative_keys(files, inputs)
    tasks = sorted(zip(keys, (str(f) for f in files)))
    shard_tasks = [t for t in tasks if shard_of(t[0], num_shards) == shard_index] if num_shards > 1 else tasks

    salt_bytes, salt_path = _resolve_salt(out, salt, salt_file, (shard_index, num_shards))
    fingerprint = salt_fingerprint(salt_bytes)
    from dagan_gn.ingest.privacy import Pseudonymizer

    pseudo = Pseudonymizer(salt_bytes)
    margin = patch_size // 4 if lesion_margin is None else int(lesion_margin)
    parameters = {
        "patch_size": int(patch_size),
        "per_image": int(per_image),
        "per_lesion": int(per_lesion),
        "min_tissue": float(min_tissue),
        "stride": None if stride is None else int(stride),
        "target_spacing_mm": None if target_spacing_mm is None else float(target_spacing_mm),
        "split": list(split),
        "seed": int(seed),
        "shard": [shard_index, num_shards],
        "allow_modalities": sorted(str(m).upper() for m in allow_modalities),
        "labels_sha256": sha256_file(labels_csv) if labels_csv is not None else None,
        "lesion_jitter": float(lesion_jitter),
        "lesion_margin": margin,
        "intensity": "uint16 v -> v / 65535 in [0, 1], tissue bright",
    }
    report = ExtractionReport(output=str(out), files_found=len(tasks), files_in_shard=len(shard_tasks),
                              parameters=parameters, salt_file=str(salt_path) if salt_path else None)

    if resume and out.exists() and not Path(str(out) + ".partial").exists():
        # Finished already (e.g. a requeued job array task): nothing to do.
        with PatchFile(out) as pf:
            if pf.attrs.get("salt_fingerprint") != fingerprint:
                raise ExtractError(f"{out} was written with another salt; resume needs the same --salt/--salt-file")
            report.patches_total = len(pf)
            report.files_already_done = len(shard_tasks)
            report.resumed = True
        log.info("%s is already complete; nothing to resume", out)
        atomic_write_text(report_path(out), report.to_json())
        return report

    try:
        writer = PatchWriter(out, patch_size=patch_size, class_names=table.class_names,
                             provenance=EXTRACTION_PROVENANCE, parameters=parameters,
                             attrs={"salt_fingerprint": fingerprint}, synthetic=False, compression=compression,
                             compression_level=_GZIP_LEVEL, resume=resume)
    except StoreError as exc:
        raise ExtractError(str(exc)) from exc
    done: set[str] = set()
    if writer.resumed:
        on_disk = writer.parameters
        changed = {k: (on_disk.get(k), v) for k, v in parameters.items() if on_disk.get(k) != v}
        stored_fp = writer._file.attrs.get("salt_fingerprint")
        if changed or stored_fp != fingerprint:
            writer.close()
            what = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()) or "the salt"
            raise ExtractError(f"cannot resume {writer.partial}: parameters differ from the interrupted run ({what})")
        done = writer.done_sources
        report.resumed = True
    done_key = {key: pseudo.pseudonym("source", key) for key, _ in shard_tasks}
    todo = [t for t in shard_tasks if done_key[t[0]] not in done]
    report.files_already_done = len(shard_tasks) - len(todo)

    config = {
        "salt": salt_bytes,
        "labels": table,
        "patch_size": int(patch_size),
        "per_image": int(per_image),
        "per_lesion": int(per_lesion),
        "min_tissue": float(min_tissue),
        "stride": stride,
        "target_spacing_mm": target_spacing_mm,
        "split": split,
        "seed": int(seed),
        "allow_modalities": tuple(allow_modalities),
        "lesion_jitter": float(lesion_jitter),
        "lesion_margin": margin,
        "chunk_encoding": writer.chunk_encoding,
    }
    paths = dict(todo)
    results = _results_inline(todo, config) if workers == 1 else _results_pool(todo, config, workers)
    bar = tqdm(total=len(todo), unit="file", desc="extract", disable=not progress, dynamic_ncols=True)
    written = 0
    try:
        with writer:
            for n_done, res in enumerate(results, start=1):
                if res["ok"]:
                    n = res["n"]
                    if n:
                        src = writer.add_sources([res["image"]])[0]
                        writer.append(res["patches"], res["labels"], [res["split"]] * n, encoded=res["encoded"],
                                      provenance={
                            "patient_pseudonym": [res["patient"]] * n,
                            "image_pseudonym": [res["image"]] * n,
                            "laterality": [res["laterality"]] * n,
                            "view": [res["view"]] * n,
                            "center_yx": res["centers"],
                            "pixel_spacing_mm": np.full(n, res["spacing"], dtype=np.float32),
                            "source_index": np.full(n, src, dtype=np.int32),
                            "lesion_index": res["lesion_index"],
                        })
                    else:
                        report.files_without_patches += 1
                    report.files_used += 1
                    report.lesions_used += int(res["lesions"])
                    written += n
                    for w in res["warnings"]:
                        report.warnings.append({"file": paths[res["key"]], "warning": w})
                        log.warning("%s: %s", paths[res["key"]], w)
                    if _on_file_written is not None:
                        _on_file_written(n_done)  # test hook: simulates a kill after the append, before the commit
                    writer.commit(done_key[res["key"]])
                else:
                    report.files_skipped += 1
                    report.skipped.append({"file": res["path"], "reason": res["reason"]})
                    log.warning("skipped %s: %s", res["path"], res["reason"])
                bar.update(1)
                bar.set_postfix(patches=written, skipped=report.files_skipped, refresh=False)
    finally:
        bar.close()
        close = getattr(results, "close", None)
        if close is not None:
            close()

    report.patches_written = written
    with PatchFile(out) as pf:
        report.patches_total = len(pf)
        report.patches_by_class = {c: int((pf.labels == i).sum()) for i, c in enumerate(pf.class_names)}
        report.patches_by_split = {s: int((pf.split == i).sum()) for i, s in enumerate(pf.split_names)}
        patients = pf.provenance("patient_pseudonym")
        report.patients_by_split = {
            s: int(len(set(patients[pf.split == i]))) for i, s in enumerate(pf.split_names)}
    report.elapsed_s = round(time.perf_counter() - started, 3)
    report.files_per_s = round(len(todo) / report.elapsed_s, 3) if report.elapsed_s > 0 else 0.0
    report.patches_per_s = round(written / report.elapsed_s, 3) if report.elapsed_s > 0 else 0.0
    atomic_write_text(report_path(out), report.to_json())
    log.info("wrote %d patches (%d files used, %d skipped) to %s", report.patches_total, report.files_used,
             report.files_skipped, out)
    return report

