"""The per-image pipeline of ``extract-patches``: one DICOM file → its patches and pseudonymous provenance.

:func:`cut_image` reads the file (:func:`dagan_gn.ingest.dicom.read_dicom_raw`), resamples it to the target spacing
when asked, computes the breast mask at block resolution (:mod:`dagan_gn.ingest.mask`), scales the file's lesions to
the pixel grid, samples lesion-centred and normal-tissue centres (:mod:`dagan_gn.ingest.sampling`, seeded by the run
seed and a hash of the file's key), cuts and converts the patches to uint16, derives the patient and image pseudonyms
(:mod:`dagan_gn.ingest.privacy`), assigns the patient-level split and compresses the patch chunks so the single
writer only copies bytes. :func:`process_file` turns any per-file problem into a :class:`FileSkipped` with a one-line
reason. Both run in a worker process set up by :func:`init_worker` (see :mod:`dagan_gn.workers`) or inline.

:class:`ExtractionOptions` says what to cut from every image (and how the job runs); :class:`ExtractError` is the
job's fatal error, raised here for a bad option. Both are part of the job's API (``dagan_gn.jobs.extract_patches``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from dagan_gn.errors import DaganError
from dagan_gn.ingest.dicom import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODALITIES,
    DicomReadError,
    read_dicom_raw,
    resample_to_spacing,
)
from dagan_gn.ingest.labels import LabelTable
from dagan_gn.ingest.mask import breast_mask
from dagan_gn.ingest.privacy import Pseudonymizer, assign_split, text_bytes
from dagan_gn.ingest.sampling import cut_patch, lesion_centres, normal_centres
from dagan_gn.store.patch_file import encode_patch_chunks, to_uint16

__all__ = [
    "ExtractError",
    "ExtractionOptions",
    "FileResult",
    "FileSkipped",
    "ImageConfig",
    "ImagePatches",
    "cut_image",
    "init_worker",
    "key_seed",
    "process_file",
]


class ExtractError(DaganError, ValueError):
    """A fatal problem with the job itself (bad parameters, unreadable labels, no inputs, a refused output, resume
    mismatch, a write that failed)."""


@dataclass(frozen=True)
class ExtractionOptions:
    """What to cut from every image, and how to run. Checked on construction (:class:`ExtractError` on a bad value).

    Args:
        patch_size: S of the S×S patches (after resampling).
        per_image: normal-tissue patches per image (random mode).
        per_lesion: lesion-centred patches per lesion (each with its own jitter).
        min_tissue: minimum fraction of a normal patch covered by the breast mask.
        stride: grid mode: every qualifying centre of a grid with this step (``per_image`` ignored).
        target_spacing_mm: downsample every image to this pixel spacing first (images with no spacing are skipped).
        split: train/val/test fractions, assigned per patient.
        seed: sampling and split seed.
        shard: ``(i, n)``: process only the i-th of n deterministic parts of the archive.
        allow_modalities: DICOM modalities accepted (``"*"`` for any).
        lesion_jitter: lesion patch shift, at most this fraction of S per axis (the lesion stays inside).
        lesion_margin: normal patches keep this many pixels from any lesion (default S // 4).
        compression: ``"gzip"``, ``"lzf"`` or None.
        workers: decoding processes (1 = decode in this process).
        max_pixels: images declaring more pixels (Rows × Columns × samples × frames) are skipped before decoding.

    The first twelve decide the patches and are stored in the file (a resume must repeat them); ``compression``,
    ``workers`` and ``max_pixels`` only decide how the run goes.
    """

    patch_size: int = 256
    per_image: int = 8
    per_lesion: int = 1
    min_tissue: float = 0.9
    stride: int | None = None
    target_spacing_mm: float | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    allow_modalities: tuple[str, ...] = DEFAULT_MODALITIES
    lesion_jitter: float = 0.25
    lesion_margin: int | None = None
    compression: str | None = "gzip"
    workers: int = 1
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        normal = object.__setattr__  # frozen: normalise once here (callers pass lists, numpy numbers, strings)
        normal(self, "split", tuple(float(f) for f in self.split))
        normal(self, "shard", (int(self.shard[0]), int(self.shard[1])))
        normal(self, "allow_modalities", tuple(str(m) for m in self.allow_modalities))
        if self.patch_size < 8:
            raise ExtractError(f"patch size must be at least 8, got {self.patch_size}")
        if self.per_image < 0 or self.per_lesion < 0:
            raise ExtractError("per-image and per-lesion counts must not be negative")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ExtractError(f"min-tissue must be in [0, 1], got {self.min_tissue}")
        if self.stride is not None and self.stride <= 0:
            raise ExtractError(f"stride must be positive, got {self.stride}")
        if self.target_spacing_mm is not None and self.target_spacing_mm <= 0:
            raise ExtractError(f"target spacing must be positive, got {self.target_spacing_mm}")
        if self.workers < 1:
            raise ExtractError(f"workers must be at least 1, got {self.workers}")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise ExtractError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
        if len(self.split) != 3 or min(self.split) < 0 or abs(sum(self.split) - 1.0) > 1e-6:
            raise ExtractError(f"split must be three non-negative fractions summing to 1, got {self.split}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ExtractError(f"max-pixels must be positive, got {self.max_pixels}")

    @property
    def margin(self) -> int:
        """Distance in pixels kept between normal patches and lesions."""
        return self.patch_size // 4 if self.lesion_margin is None else int(self.lesion_margin)

    def stored_parameters(self, labels_sha256: str | None) -> dict[str, Any]:
        """The ``parameters`` attribute of the patch file: everything that decides the patches (a resume must match)."""
        return {
            "patch_size": int(self.patch_size),
            "per_image": int(self.per_image),
            "per_lesion": int(self.per_lesion),
            "min_tissue": float(self.min_tissue),
            "stride": None if self.stride is None else int(self.stride),
            "target_spacing_mm": None if self.target_spacing_mm is None else float(self.target_spacing_mm),
            "split": list(self.split),
            "seed": int(self.seed),
            "shard": list(self.shard),
            "allow_modalities": sorted(m.upper() for m in self.allow_modalities),
            "labels_sha256": labels_sha256,
            "lesion_jitter": float(self.lesion_jitter),
            "lesion_margin": self.margin,
            "intensity": "uint16 v -> v / 65535 in [0, 1], tissue bright",
        }


@dataclass(frozen=True)
class ImageConfig:
    """Everything a decoding process needs (inherited by forked workers, picklable for spawned ones)."""

    options: ExtractionOptions
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
