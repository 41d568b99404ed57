"""The per-image pipeline of ``extract-patches``: one DICOM file → its patches and pseudonymous provenance.

:func:`cut_image` reads the file (:func:`dagan_gn.ingest.dicom.read_dicom_raw`), resamples it to the target spacing
when asked, computes the breast mask at block resolution (:mod:`dagan_gn.ingest.mask`), scales the file's lesions to
the pixel grid, samples lesion-centred and normal-tissue centres (:mod:`dagan_gn.ingest.sampling`, seeded by the run
seed and a hash of the file's key), cuts and converts the patches to uint16, derives the patient and image pseudonyms
(:mod:`dagan_gn.ingest.privacy`), assigns the patient-level split and compresses the patch chunks so the single
writer only copies bytes. :func:`process_file` turns any per-file problem into a :class:`FileSkipped` with a one-line
reason. Both run in a worker process set up by :func:`init_worker` (see :mod:`dagan_gn.workers`) or inline.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dagan_gn.errors import DaganError
from dagan_gn.ingest.dicom import DicomReadError, read_dicom_raw, resample_to_spacing
from dagan_gn.ingest.labels import LabelTable
from dagan_gn.ingest.mask import breast_mask
from dagan_gn.ingest.privacy import Pseudonymizer, assign_split, text_bytes
from dagan_gn.ingest.sampling import cut_patch, lesion_centres, normal_centres
from dagan_gn.store.patch_file import encode_patch_chunks, to_uint16

__all__ = [
    "CutOptions",
    "FileResult",
    "FileSkipped",
    "ImageConfig",
    "ImagePatches",
    "cut_image",
    "init_worker",
    "key_seed",
    "process_file",
]


class CutOptions(Protocol):
    """What the pipeline reads of the job's options (:class:`dagan_gn.jobs.extract_patches.ExtractionOptions`)."""

    patch_size: int
    per_image: int
    per_lesion: int
    min_tissue: float
    stride: int | None
    target_spacing_mm: float | None
    split: tuple[float, float, float]
    seed: int
    allow_modalities: tuple[str, ...]
    lesion_jitter: float
    max_pixels: int | None

    @property
    def margin(self) -> int: ...


@dataclass(frozen=True)
class ImageConfig:
    """Everything a decoding process needs (inherited by forked workers, picklable for spawned ones)."""

    options: CutOptions
    salt: bytes
    labels: LabelTable
    chunk_encoding: tuple[str | None, int] | None


@dataclass
class ImagePatches:
    """One usable image: its patches (raw or already compressed) and pseudonymous provenance."""

    key: str
    n: int
    patches: np.ndarray | None
    encoded: list[bytes] | None
    labels: np.ndarray
    centers: np.ndarray
    lesion_index: np.ndarray
    patient: str
    image: str
    split: str
    laterality: str
    view: str
    spacing: float
    lesions: int
    warnings: list[str]


@dataclass
class FileSkipped:
    """A file that gave nothing, and why (one line)."""

    key: str
    path: str
    reason: str


FileResult = ImagePatches | FileSkipped

_WORKER: dict[str, Any] = {}


def init_worker(config: ImageConfig) -> None:
    """Set up this process (a pool worker, or the job's own process with one worker) to run :func:`process_file`."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER.clear()
    _WORKER["config"] = config
    _WORKER["pseudonymizer"] = Pseudonymizer(config.salt)


def key_seed(key: str) -> int:
    """The per-image part of the sampling seed: a hash of the file's key (its path relative to the inputs)."""
    return int.from_bytes(hashlib.sha256(text_bytes(key)).digest()[:8], "big")


def process_file(key: str, path: str) -> FileResult:
    """Decode, mask, sample and cut one file; returns patches + pseudonymous provenance, or the skip reason.

    Runs after :func:`init_worker` (in a pool process or inline); never raises for a bad file."""
    try:
        return cut_image(key, path, _WORKER["config"], _WORKER["pseudonymizer"])
    except DaganError as exc:  # DicomReadError carries the bare reason; LabelsError names the CSV line
        return FileSkipped(key, path, getattr(exc, "reason", None) or str(exc))
    except MemoryError:
        return FileSkipped(key, path, "out of memory while decoding")
    except Exception as exc:  # one bad file must never stop an archive-sized run
        return FileSkipped(key, path, f"unexpected {type(exc).__name__}: {exc}")


def cut_image(key: str, path: str, cfg: ImageConfig, pseudo: Pseudonymizer) -> FileResult:
    """Read, (resample,) mask, scale the lesions, sample the centres, cut, pseudonymise, split and encode one image.

    Raises:
        DaganError: the file cannot be used (:class:`DicomReadError` carries the bare reason).
    """
    opt = cfg.options
    raw = read_dicom_raw(path, allow_modalities=opt.allow_modalities, max_pixels=opt.max_pixels)
    meta = raw.meta
    lesions = [les.resolve((meta.rows, meta.cols)) for les in cfg.labels.lookup(path, meta)]
    target = opt.target_spacing_mm
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
    S = opt.patch_size
    if pixels.shape[0] < S or pixels.shape[1] < S:
        resampled = " after resampling" if target is not None else ""
        return FileSkipped(key, path, f"image is {pixels.shape[1]}x{pixels.shape[0]} pixels{resampled}, smaller "
                                       f"than one {S}x{S} patch")
    sy, sx = pixels.shape[0] / meta.rows, pixels.shape[1] / meta.cols
    spacing = (meta.pixel_spacing_mm[0] / sy) if meta.pixel_spacing_mm else float("nan")
    # Sampling needs only window coverages: keep the mask at block resolution.
    mask = breast_mask(pixels, meta.laterality, full_resolution=False, display=display)
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
    rng = np.random.default_rng([opt.seed, key_seed(key)])
    lesion_pos = lesion_centres(geometry, pixels.shape, S, rng, per_lesion=opt.per_lesion, jitter=opt.lesion_jitter)
    normal_pos = normal_centres(mask, S, opt.per_image, rng, min_tissue=opt.min_tissue, lesions=geometry,
                                margin=opt.margin, stride=opt.stride)
    centres = [(y, x) for y, x, _ in lesion_pos] + list(normal_pos)
    lesion_index = [i for _, _, i in lesion_pos] + [-1] * len(normal_pos)
    class_names = cfg.labels.class_names
    labels = [class_names.index(scaled[i][0]) for _, _, i in lesion_pos] + [0] * len(normal_pos)
    if centres:
        cut = np.stack([cut_patch(pixels, c, S) for c in centres])
        patches = to_uint16(cut if display is None else display(cut))[:, None]
    else:
        patches = np.zeros((0, 1, S, S), np.uint16)
        if opt.per_image or (geometry and opt.per_lesion):
            warnings.append(f"no patch: no {S}x{S} window is covered by breast tissue to --min-tissue "
                            f"{opt.min_tissue:g} and no labelled lesion is inside the image")
    # Patient key: the patient part of PatientID; without one, fall back to other identifiers so images are
    # never pooled under an empty key (each such image is its own "patient").
    patient_key = meta.patient_id or meta.patient_name or meta.study_uid or f"file:{key}"
    patient = pseudo.pseudonym("patient", patient_key)
    if not meta.patient_id:
        warnings.append("no PatientID; the image was given its own patient pseudonym")
    image_id = pseudo.pseudonym("image", meta.sop_instance_uid or f"file:{key}")
    # Compress here, in the worker, so the single writer only copies bytes into the file.
    encoded = encode_patch_chunks(patches, *cfg.chunk_encoding) if cfg.chunk_encoding is not None else None
    return ImagePatches(
        key=key,
        n=int(patches.shape[0]),
        patches=patches if encoded is None else None,
        encoded=encoded,
        labels=np.asarray(labels, dtype=np.int32),
        centers=np.asarray(centres, dtype=np.int32).reshape(-1, 2),
        lesion_index=np.asarray(lesion_index, dtype=np.int32),
        patient=patient,
        image=image_id,
        split=assign_split(patient, opt.split, opt.seed),
        laterality=meta.laterality,
        view=meta.view,
        spacing=spacing,
        lesions=len(scaled),
        warnings=warnings,
    )
