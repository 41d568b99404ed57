"""Labelled images from folders or zips, read as they are: an image's class is its parent folder path.

Layouts (any depth; the class is the folder path of the image relative to the root)::

    root/benign/0001.png                      → class "benign"
    root/Greek/character01/0394_01.png        → class "Greek/character01"  (Omniglot)

A source is a folder (its root is the folder itself) or a ``.zip`` read in place with :mod:`zipfile`, never unpacked.
A zip made by zipping one folder (every entry under a single top-level folder, such as
``images_background_small1/``) is read as that folder, so ``images_background_small1.zip`` and
``images_background_small2.zip`` give the same class names (``Greek/character01``) for the same characters; a
single top folder that is the only class (``cats/*.png``) is kept as the class, and an image directly inside a
wrapping folder is skipped as "not inside a class folder". Several sources merge: an image is
identified by its *relative key* (class path + file name), and a key already read from an earlier source is skipped
(counted in ``duplicates``; a warning names it when the two files' bytes differ, and the first one is kept).

Decoding is Pillow's (PNG, JPEG, BMP, TIFF, GIF; 8- and 16-bit grayscale, RGB, palette), to float intensities in
[0, 1] (16-bit images keep their precision), grayscale unless ``color=True``, resized to ``size`` × ``size`` with an
anti-aliasing (Lanczos) filter — a non-square image is stretched — and optionally inverted (``invert=True``: 1 − v,
for Omniglot's black strokes on white, so strokes are bright on a dark background like tissue in a mammogram).

Files that are not images by extension, hidden files and macOS ``__MACOSX/`` metadata are ignored. An image that
cannot be used (corrupt, truncated, not inside a class folder, too large, a decompression bomb, an encrypted zip
entry) is skipped with a one-line warning naming it and the reason, and listed in ``skipped``. A path that is neither a
folder nor a zip raises :class:`ImageFolderError` (one line naming it). Nothing in an input runs as code: images are
decoded as pixel data only.

::

    from dagan_gn.datasets.image_folder import read_image_folder, ImageArrayDataset

    data = read_image_folder(["images_background_small1.zip", "images_background_small2.zip"], size=32,
                             invert=True, class_prefixes=["Greek", "Latin"])
    data.images.shape, len(data.class_names)      # (1000, 1, 32, 32) float32 in [0, 1], 50 characters
    dataset = ImageArrayDataset(data.images, data.labels, data.class_names)   # the project's dict items
"""

from __future__ import annotations

import io
import logging
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dagan_gn.errors import DaganError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderError",
    "LabelledImages",
    "ImageArrayDataset",
    "read_image_folder",
    "decode_image",
    "class_of",
    "class_matches",
]

log = logging.getLogger(__name__)

#: File name endings read as images (case-insensitive); anything else in a folder or zip is ignored.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
#: The Pillow decoders allowed to open an input (never a format guessed from arbitrary bytes).
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF")
#: Larger files are skipped unread (a zip entry declares its size; this bounds memory for a hostile zip).
MAX_FILE_BYTES = 256 * 1024 * 1024


class ImageFolderError(DaganError, ValueError):
    """A source that is not a readable folder or zip of images, or a selection that matches nothing."""


# ------------------------------------------------------------------------------------------------ decoding
def decode_image(data: bytes, size: int, *, color: bool = False, invert: bool = False) -> np.ndarray:
    """Decode image bytes to float32 ``[C, size, size]`` in [0, 1] (C = 1, or 3 with ``color``).

    8-bit images are scaled by 255, 16-bit ones by 65535; resizing uses Pillow's Lanczos filter on the float image
    (anti-aliased when shrinking), the result is clipped to [0, 1] and inverted when ``invert``.

    Raises:
        ValueError: the bytes are not a decodable image of an allowed format (the message says why).
    """
    from PIL import Image

    with warnings.catch_warnings():
        # A decompression bomb is an input error here, not a warning to scroll past.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
                im.load()
                planes = _float_planes(im, color)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"image too large ({exc})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's ways of saying "not a valid image"
            raise ValueError(f"cannot decode image ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    out = np.empty((len(planes), size, size), dtype=np.float32)
    for c, plane in enumerate(planes):
        if plane.shape != (size, size):
            plane = np.asarray(Image.fromarray(plane).resize((size, size), Image.Resampling.LANCZOS))
        out[c] = plane
    np.clip(out, 0.0, 1.0, out=out)
    if invert:
        np.subtract(1.0, out, out=out)
    return out


def _float_planes(im: Any, color: bool) -> list[np.ndarray]:
    """A decoded Pillow image → float32 planes in [0, 1] (one gray plane, or R, G, B)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float32)
        # 16-bit PNG/TIFF: values 0..65535 (older Pillow opens them as 32-bit "I"); larger ones are scaled by the max.
        top = 65535.0 if arr.size == 0 or arr.max() <= 65535 else float(arr.max())
        gray = arr / top
        return [gray] * 3 if color else [gray]
    if im.mode == "F":
        gray = np.asarray(im, dtype=np.float32)
        return [gray] * 3 if color else [gray]
    if color:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return [np.ascontiguousarray(rgb[..., c]) for c in range(3)]
    return [np.asarray(im.convert("L"), dtype=np.float32) / 255.0]


# ------------------------------------------------------------------------------------------------ listing sources
@dataclass
class _Entry:
    key: str  # relative key: "<class path>/<file name>" (POSIX)
    where: str  # "source.zip:inner/path" or a file path, for messages (never stored in outputs)
    size: int
    read: Callable[[], bytes]
    crc: Callable[[], int]


def _is_ignored(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _strip_wrapper(names: list[tuple[str, ...]]) -> int:
    """1 when every image lies under one top-level folder holding class folders (the "zipped folder" convention:
    an image directly in it is then not in a class), 0 when that folder is itself the only class, or there are
    several top-level entries."""
    tops = {parts[0] for parts in names}
    if len(tops) != 1 or any(len(parts) < 2 for parts in names):
        return 0
    return 1 if any(len(parts) >= 3 for parts in names) else 0


def _zip_entries(path: Path, skipped: list[tuple[str, str]]) -> Iterator[_Entry]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImageFolderError(f"{path}: not a readable zip archive ({exc})") from None
    infos = []
    for info in zf.infolist():
        parts = tuple(p for p in PurePosixPath(info.filename.replace("\\", "/")).parts if p not in ("", "/"))
        if info.is_dir() or not parts or _is_ignored(parts) or not _is_image_name(parts[-1]):
            continue
        if ".." in parts:
            skipped.append((f"{path}:{info.filename}", "path leaves the archive ('..')"))
            continue
        infos.append((parts, info))
    drop = _strip_wrapper([p for p, _ in infos])
    for parts, info in infos:
        where = f"{path}:{info.filename}"
        rel = parts[drop:]
        if len(rel) < 2:
            skipped.append((where, "not inside a class folder"))
            continue
        yield _Entry("/".join(rel), where, int(info.file_size), lambda info=info: zf.read(info),
                     lambda info=info: int(info.CRC))


def _folder_entries(root: Path, skipped: list[tuple[str, str]]) -> Iterator[_Entry]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored([d]))
        for name in sorted(filenames):
            if not _is_ignored([name]) and _is_image_name(name):
                files.append(Path(dirpath) / name)
    for file in files:
        rel = file.relative_to(root).parts
        if len(rel) < 2:
            skipped.append((str(file), "not inside a class folder"))
            continue
        try:
            size = file.stat().st_size
        except OSError as exc:
            skipped.append((str(file), f"cannot stat ({exc.strerror or exc})"))
            continue
        yield _Entry("/".join(rel), str(file), int(size), file.read_bytes,
                     lambda file=file: zlib.crc32(file.read_bytes()))


def _entries(source: Path, skipped: list[tuple[str, str]]) -> list[_Entry]:
    if source.is_dir():
        return list(_folder_entries(source, skipped))
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise ImageFolderError(f"{source}: not a zip archive or a folder of class/image files")
        return list(_zip_entries(source, skipped))
    raise ImageFolderError(f"{source}: no such folder or zip")


def class_of(key: str) -> str:
    """The class of a relative key: its folder path (``"Greek/character01/0394_01.png"`` → ``"Greek/character01"``)."""
    return key.rsplit("/", 1)[0]


def class_matches(class_name: str, prefixes: Sequence[str]) -> bool:
    """True when ``class_name`` is one of ``prefixes`` or lies below one of them, folder by folder
    (``"Greek"`` matches ``"Greek/character01"``, not ``"Greek_ancient/character01"``)."""
    for prefix in prefixes:
        prefix = prefix.strip("/")
        if class_name == prefix or class_name.startswith(prefix + "/"):
            return True
    return False


# ------------------------------------------------------------------------------------------------ result
@dataclass
class LabelledImages:
    """Decoded images with their classes.

    ``images`` float32 ``[N, C, S, S]`` in [0, 1]; ``labels`` int64 ``[N]`` indexing ``class_names`` (sorted);
    ``keys`` the relative key of each image (class path + file name: may name people in a user's folders, so keep
    it out of shared outputs); ``skipped`` ``(where, reason)`` of every unusable image; ``duplicates`` the keys seen
    again in a later source and not read twice; ``conflicts`` those of them whose bytes differed from the kept one.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    keys: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def uint8(self) -> np.ndarray:
        """The images as uint8 ``[N, C, S, S]`` (rounded)."""
        return np.clip(np.rint(self.images * 255.0), 0, 255).astype(np.uint8)

    def counts(self) -> dict[str, int]:
        """Images per class."""
        per = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, per)}

    def select(self, indices: Sequence[int] | np.ndarray) -> "LabelledImages":
        """The images at ``indices`` (in that order), with a class table restricted to the classes present
        (sorted, labels renumbered)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        present = sorted({self.class_names[i] for i in np.unique(self.labels[idx])})
        remap = np.full(len(self.class_names), -1, dtype=np.int64)
        for new, name in enumerate(present):
            remap[self.class_names.index(name)] = new
        return LabelledImages(self.images[idx], remap[self.labels[idx]], present, [self.keys[i] for i in idx],
                              list(self.skipped), self.duplicates, list(self.conflicts))

    def select_classes(self, names: Sequence[str]) -> "LabelledImages":
        """The images of the classes ``names`` (exact class names)."""
        wanted = set(names)
        missing = sorted(wanted - set(self.class_names))
        if missing:
            raise ImageFolderError(f"unknown class(es) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        keep = [i for i, label in enumerate(self.labels) if self.class_names[label] in wanted]
        return self.select(keep)


def read_image_folder(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    size: int = 32,
    invert: bool = False,
    color: bool = False,
    class_prefixes: Sequence[str] | None = None,
    progress: bool = False,
) -> LabelledImages:
    """Read labelled images from folders and/or zips (see the module docstring).

    Args:
        sources: one or more folders or ``.zip`` files; merged, an image key read once.
        size: side S of the S×S output images.
        invert: ``1 - v`` after resizing (dark strokes on white → bright strokes on black).
        color: three RGB channels instead of one gray channel.
        class_prefixes: keep only classes equal to or below these folder paths (e.g. alphabets ``["Greek",
            "Latin"]``); only those images are decoded. Each prefix must match at least one class.
        progress: a tqdm bar over the decoded images.

    Raises:
        ImageFolderError: a source is missing or not a folder/zip, holds no images, a prefix matches no class, or
            nothing is left to read.
    """
    from tqdm.auto import tqdm

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ImageFolderError("no image folder or zip given")
    if size < 1:
        raise ImageFolderError(f"image size must be at least 1 pixel, got {size}")
    skipped: list[tuple[str, str]] = []
    chosen: dict[str, _Entry] = {}
    duplicates, conflicts = 0, []
    for source in sources:
        source = Path(source).expanduser()
        skipped_before = len(skipped)
        found = _entries(source, skipped)
        if not found and len(skipped) == skipped_before:
            raise ImageFolderError(
                f"{source}: no images found (expected <class>/<image> files with one of {', '.join(IMAGE_EXTENSIONS)})"
            )
        for entry in found:
            kept = chosen.get(entry.key)
            if kept is None:
                chosen[entry.key] = entry
                continue
            duplicates += 1
            if kept.size != entry.size or kept.crc() != entry.crc():
                conflicts.append(entry.key)
                log.warning("%s: same relative path as %s but different content; kept the first", entry.where,
                            kept.where)
    all_classes = sorted({class_of(k) for k in chosen})
    if class_prefixes:
        unmatched = [p for p in class_prefixes if not any(class_matches(c, [p]) for c in all_classes)]
        if unmatched:
            tops = sorted({c.split("/")[0] for c in all_classes})
            raise ImageFolderError(
                f"no class matches {', '.join(map(repr, unmatched))} in {', '.join(str(s) for s in sources)}; "
                f"top-level folders: {', '.join(tops[:20])}{' ...' if len(tops) > 20 else ''}"
            )
        keys = sorted(k for k in chosen if class_matches(class_of(k), class_prefixes))
    else:
        keys = sorted(chosen)
    channels = 3 if color else 1
    images = np.empty((len(keys), channels, size, size), dtype=np.float32)
    kept_keys: list[str] = []
    for key in tqdm(keys, desc="read images", unit="img", disable=not progress, dynamic_ncols=True):
        entry = chosen[key]
        if entry.size > MAX_FILE_BYTES:
            reason = f"file is {entry.size / 2**20:.0f} MiB, larger than {MAX_FILE_BYTES // 2**20} MiB"
        else:
            try:
                images[len(kept_keys)] = decode_image(entry.read(), size, color=color, invert=invert)
                kept_keys.append(key)
                continue
            except ValueError as exc:
                reason = str(exc)
            except (OSError, RuntimeError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
                # A damaged or encrypted zip entry, or a file that vanished or cannot be read.
                reason = f"cannot read ({' '.join(str(exc).split()) or type(exc).__name__})"
        skipped.append((entry.where, reason))
        log.warning("skipped %s: %s", entry.where, reason)
    for where, reason in skipped:
        if reason in ("not inside a class folder", "path leaves the archive ('..')"):
            log.warning("skipped %s: %s", where, reason)
    if not kept_keys:
        raise ImageFolderError(
            f"no usable images in {', '.join(str(s) for s in sources)}"
            + (f" ({len(skipped)} skipped, first: {skipped[0][0]}: {skipped[0][1]})" if skipped else "")
        )
    class_names = sorted({class_of(k) for k in kept_keys})
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.asarray([index[class_of(k)] for k in kept_keys], dtype=np.int64)
    return LabelledImages(images[: len(kept_keys)], labels, class_names, kept_keys, skipped, duplicates, conflicts)


# ------------------------------------------------------------------------------------------------ dataset
class ImageArrayDataset(Dataset):
    """In-memory images as the project's dataset contract: items ``{"image": FloatTensor[C, S, S] in [-1, 1],
    "label": int, "index": int}`` (``index``: position in the given arrays, or ``indices[i]`` when given).

    Args:
        images: ``[N, C, S, S]`` intensities in [0, 1] (float) or uint8/uint16 stored values.
        labels: ``[N]`` integers indexing ``class_names``.
        class_names: the class table.
        indices: optional per-item ``index`` values (e.g. the rows of a patch file the images came from).
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray,
                 class_names: Sequence[str], indices: Sequence[int] | np.ndarray | None = None) -> None:
        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.ndim != 4:
            raise ValueError(f"images must be [N, C, S, S], got shape {list(arr.shape)}")
        scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(arr.dtype, 1.0)
        self.images = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32) / scale * 2.0 - 1.0)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.labels.shape[0]} labels for {self.images.shape[0]} images")
        self.class_names = [str(c) for c in class_names]
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must index the {len(self.class_names)} class names")
        self.indices = (np.arange(len(self.labels), dtype=np.int64) if indices is None
                        else np.asarray(indices, dtype=np.int64).reshape(-1))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i].clone(), "label": int(self.labels[i]), "index": int(self.indices[i])}
