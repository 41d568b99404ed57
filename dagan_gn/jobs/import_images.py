"""The ``import-images`` job: folders/zips of ``class/…/image.png`` → one HDF5 patch file, so ``dagan train``
(same-class pairs), ``dagan augment`` and ``dagan evaluate-augmentation`` run on ordinary image exports unchanged.

::

    report = import_images(["exports/"], "images.h5", size=64, split="0.8,0.1,0.1", seed=0)

- Reading is :func:`dagan_gn.datasets.image_folder.read_image_folder` (zips read in place, several sources merged
  by relative path, bad images skipped with a named reason, optional inversion and class-prefix filter).
- Images are stored on the project's uint16 intensity scale (``v / 65535`` in [0, 1]), 1 channel (3 with
  ``color``), classes = the folder paths, in sorted order.
- ``split`` is one split name for every image (``train``), or ``train,val[,test]`` fractions applied *within each
  class* (seeded), so every class is in every split in proportion. The folders carry no patient identity: when one
  patient can have several images, import each patient-disjoint part with its own split name and
  ``dagan merge-patches`` them (same ``--salt``) instead of splitting fractions here.
- Privacy: provenance holds ``image_pseudonym`` (salted HMAC of the image's relative path, the salt from ``salt`` or
  ``salt_file``, default ``<out>.salt``) and ``source_index``; never a path or a file name. Class names are the
  folder names: do not name folders after patients. ``<out>.report.json`` (skipped files with their paths) stays
  with the operator.
- The output appears complete under its name or not at all (``<out>.partial`` meanwhile); a killed import is simply
  run again (reading and writing take seconds per thousand images).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dagan_gn.datasets.image_folder import LabelledImages, read_image_folder
from dagan_gn.errors import DaganError

__all__ = ["ImageImportError", "ImportReport", "IMAGE_PROVENANCE", "import_images", "split_within_classes",
           "write_images"]

#: Provenance columns of an imported image file (no path, no file name: a salted pseudonym of the relative path).
IMAGE_PROVENANCE: dict[str, Any] = {"image_pseudonym": "str", "source_index": "int32"}


class ImageImportError(DaganError, ValueError):
    """A fatal problem with an import (bad options, an existing output, nothing to import)."""


@dataclass
class ImportReport:
    """What an import did; also written as ``<out>.report.json`` (it names skipped input files: keep it local)."""

    output: str
    images_written: int = 0
    classes: int = 0
    images_by_split: dict[str, int] = field(default_factory=dict)
    images_by_class: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    salt_file: str | None = None
    elapsed_s: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every image was used, 3 when some were skipped (listed in ``skipped``)."""
        return 3 if self.skipped else 0

    def summary(self) -> str:
        splits = ", ".join(f"{k}={v}" for k, v in self.images_by_split.items())
        extra = f"; {len(self.skipped)} skipped" if self.skipped else ""
        dups = f"; {self.duplicates} duplicate(s) across sources read once" if self.duplicates else ""
        return (f"wrote {self.images_written} images of {self.classes} classes ({splits}) to {self.output} in "
                f"{self.elapsed_s:.1f} s{dups}{extra}")

    def to_json(self) -> str:
        from dagan_gn.runtime import environment_info

        return json.dumps({**asdict(self), "environment": environment_info()}, indent=2)


def split_within_classes(labels: np.ndarray, fractions: Sequence[float], seed: int = 0) -> np.ndarray:
    """Split names (``train``/``val``/``test``) per image: in each class a seeded permutation, the first
    ``round(n · f_train)`` images train (at least one when ``f_train > 0``), the next ``round(n · f_val)`` val,
    the rest test."""
    from dagan_gn.ingest.privacy import SPLIT_NAMES

    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    f_train, f_val = float(fractions[0]), float(fractions[1])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_train = min(n, max(1 if f_train > 0 else 0, int(round(n * f_train))))
        n_val = min(n - n_train, int(round(n * f_val)))
        out[idx[:n_train]] = SPLIT_NAMES[0]
        out[idx[n_train:n_train + n_val]] = SPLIT_NAMES[1]
        out[idx[n_train + n_val:]] = SPLIT_NAMES[2]
    return out


def write_images(
    out: str | os.PathLike,
    data: LabelledImages,
    split: Sequence[str] | np.ndarray,
    *,
    salt: bytes,
    parameters: Mapping[str, Any] | None = None,
    extra_columns: Mapping[str, tuple[Any, Sequence[Any] | np.ndarray]] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``data`` as a patch file (atomically: ``<out>.partial`` renamed when complete).

    Args:
        out: the ``.h5`` to write (replaced if it exists).
        data: images in [0, 1] with labels and class names (:func:`read_image_folder`).
        split: split name per image.
        salt: the pseudonym salt (:func:`dagan_gn.ingest.privacy.load_or_create_salt`).
        parameters: stored as the file's ``parameters`` attribute.
        extra_columns: more provenance columns, name → ``(spec, values)`` (e.g. ``{"shot_rank": ("int32", ranks)}``).
        attrs: extra file attributes.
    """
    from dagan_gn.ingest.privacy import Pseudonymizer, salt_fingerprint
    from dagan_gn.store.patch_file import PatchWriter, to_uint16

    extra_columns = dict(extra_columns or {})
    clash = set(extra_columns) & set(IMAGE_PROVENANCE)
    if clash:
        raise ImageImportError(f"provenance column(s) {sorted(clash)} are written by the import itself")
    pseudo = Pseudonymizer(salt)
    pseudonyms = [pseudo.pseudonym("image", key) for key in data.keys]
    columns = {**IMAGE_PROVENANCE, **{name: spec for name, (spec, _) in extra_columns.items()}}
    with PatchWriter(out, patch_size=data.image_size, channels=int(data.images.shape[1]),
                     class_names=data.class_names, provenance=columns, parameters=dict(parameters or {}),
                     attrs={"salt_fingerprint": salt_fingerprint(salt), **dict(attrs or {})},
                     overwrite_partial=True) as writer:
        source_index = writer.add_sources(pseudonyms)
        batch = 4096  # bounded temporary uint16 copies for big imports
        for start in range(0, len(data), batch):
            rows = slice(start, start + batch)
            prov = {"image_pseudonym": pseudonyms[rows], "source_index": source_index[rows]}
            prov.update({name: np.asarray(values)[rows] for name, (_, values) in extra_columns.items()})
            writer.append(to_uint16(data.images[rows]), data.labels[rows], np.asarray(split, dtype=object)[rows],
                          prov)
            writer.commit()
    return Path(out)


def _split_names(split: str, labels: np.ndarray, seed: int) -> np.ndarray:
    from dagan_gn.ingest.privacy import SPLIT_NAMES, parse_split_fractions

    text = split.strip()
    if text in SPLIT_NAMES:
        return np.asarray([text] * len(labels), dtype=object)
    try:
        fractions = parse_split_fractions(text)
    except ValueError as exc:
        raise ImageImportError(f"{exc}; or give one split name ({', '.join(SPLIT_NAMES)})") from None
    return split_within_classes(labels, fractions, seed)


def import_images(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    size: int = 64,
    invert: bool = False,
    color: bool = False,
    class_prefixes: Sequence[str] | None = None,
    split: str = "train",
    seed: int = 0,
    salt: str | None = None,
    salt_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Read ``sources`` (folders/zips of ``class/…/image``) and write them to the patch file ``out``.

    Args:
        sources: folders and/or zips (merged; an image's relative path is read once).
        out: output ``.h5``; ``<out>.report.json`` is written beside it.
        size: side of the square output images.
        invert: ``1 - v`` (dark-on-light drawings → bright-on-dark).
        color: 3 RGB channels instead of gray.
        class_prefixes: keep only classes at or below these folder paths.
        split: a split name, or ``train,val[,test]`` fractions within each class.
        seed: seed of the fraction split.
        salt, salt_file: the pseudonym salt or its file (default ``<out>.salt``, created once; keep it secret).
        overwrite: replace an existing ``out``.
        progress: a progress bar while decoding.

    Raises:
        ImageImportError: bad options, existing output, nothing to import.
        ImageFolderError: a source is not a folder or zip, or a prefix matches nothing.
    """
    from dagan_gn.fileio import atomic_write_text, sha256_file
    from dagan_gn.ingest.privacy import SPLIT_NAMES, load_or_create_salt

    t0 = time.perf_counter()
    out = Path(out)
    if not sources:
        raise ImageImportError("no input folder or zip given")
    if out.exists() and not overwrite:
        raise ImageImportError(f"{out} already exists; pass --overwrite to replace it")
    if size < 4:
        raise ImageImportError(f"--size must be at least 4 pixels, got {size}")
    data = read_image_folder(sources, size=size, invert=invert, color=color, class_prefixes=class_prefixes,
                             progress=progress)
    split_names = _split_names(split, data.labels, seed)
    try:  # after the inputs proved readable, so a failed import leaves no new salt file behind
        salt_path = None if salt is not None else Path(salt_file) if salt_file else Path(str(out) + ".salt")
        salt_bytes = load_or_create_salt(salt_path, salt)
    except ValueError as exc:
        raise ImageImportError(str(exc)) from None
    parameters = {
        "job": "import-images", "size": int(size), "invert": bool(invert), "color": bool(color),
        "class_prefixes": list(class_prefixes or []), "split": split, "seed": int(seed), "sources": len(sources),
        # Content hashes of zip inputs identify the data without naming where it came from.
        "zip_sha256": [sha256_file(s) for s in sources if Path(s).is_file()],
    }
    write_images(out, data, split_names, salt=salt_bytes, parameters=parameters)
    by_split = {name: int((split_names == name).sum()) for name in SPLIT_NAMES if (split_names == name).any()}
    report = ImportReport(
        output=str(out), images_written=len(data), classes=len(data.class_names), images_by_split=by_split,
        images_by_class=data.counts(), duplicates=data.duplicates, conflicts=list(data.conflicts),
        skipped=[{"file": where, "reason": reason} for where, reason in data.skipped], parameters=parameters,
        salt_file=None if salt_path is None else str(salt_path), elapsed_s=time.perf_counter() - t0,
    )
    atomic_write_text(Path(str(out) + ".report.json"), report.to_json())
    return report
