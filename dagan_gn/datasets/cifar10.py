"""CIFAR-10 readers and dataset: the standard python form and image trees/zips, never a download.

Supported forms of ``path`` (a clear :class:`Cifar10FormatError` naming the path otherwise):

* ``cifar-10-python.tar.gz`` (or any ``.tar``/``.tar.gz``/``.tgz`` holding ``cifar-10-batches-py/``): read in place,
  nothing is extracted to disk;
* the extracted ``cifar-10-batches-py/`` folder (pickled ``data_batch_1..5``, ``test_batch``, ``batches.meta``), or a
  folder that contains it;
* an image tree ``<root>/train/<class>/*.png|jpg`` (and ``<root>/test/<class>/...``), or a zip of that tree such as
  ``cifar10-jpeg-train.zip``; for a zip that holds only one split, the sibling zip whose name has ``train`` replaced
  by ``test`` (or vice versa) is used for the other split. A folder holding such zips works too.

Images come back as ``uint8 [N, 32, 32, 3]`` (HWC, RGB), labels as ``int64 [N]`` and the class names.

The python form is a set of pickles, and a pickle can name any function to call while it loads. The batches are read
with a restricted unpickler that admits only what CIFAR-10 batches hold (dicts, lists, tuples, bytes, str, numbers
and numpy arrays of plain dtypes); a batch that asks for anything else (``os.system``, ``builtins.eval``, a class of
some package) is refused with a :class:`Cifar10FormatError` naming the file and the refused name, before it can run.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dagan_gn.errors import DaganError
from dagan_gn.runtime import default_cache_dir

__all__ = [
    "CIFAR10_CLASSES",
    "SPLITS",
    "Cifar10FormatError",
    "load_cifar10",
    "limit_indices_per_class",
    "CIFAR10Dataset",
]

#: The standard class order of CIFAR-10 (also the alphabetical order of the image-tree folders).
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SPLITS = ("train", "test")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
_PY_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_PY_TEST_BATCHES = ("test_batch",)


class Cifar10FormatError(DaganError, ValueError):
    """``path`` is not a CIFAR-10 archive, folder or image zip that this module can read; the message names it."""


@dataclass
class _Cifar10Arrays:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    #: Positions of the images in the full split (all of them unless a per-class limit selected some).
    indices: np.ndarray | None = None


@dataclass
class _Selection:
    """A deterministic per-class subset, applied before decoding where the form allows it (image zips/trees)."""

    limit_per_class: int
    seed: int

    def indices(self, labels: np.ndarray) -> np.ndarray:
        return limit_indices_per_class(labels, self.limit_per_class, self.seed)


# --------------------------------------------------------------------------------------------- python (pickle) form


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a name outside :data:`_ALLOWED_GLOBALS`."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"): allow that and nothing else.
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_core(name: str) -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core to numpy._core
    module, _, attr = name.rpartition(".")
    return getattr(getattr(core, module), attr)


#: (module, name) → object: every global a CIFAR-10 python batch can need. numpy arrays are rebuilt from raw bytes
#: (``_reconstruct`` + ``ndarray.__setstate__``, or ``_frombuffer`` under protocol 5) and numpy scalars from a dtype
#: and bytes; none of these runs code named by the file. Batches pickled by Python 2 (the published archive) name
#: ``numpy.core``, recent numpy ``numpy._core``.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _prefix in ("numpy.core", "numpy._core"):
    for _name in ("multiarray._reconstruct", "multiarray.scalar", "numeric._frombuffer"):
        _module, _, _attr = _name.rpartition(".")
        _ALLOWED_GLOBALS[(f"{_prefix}.{_module}", _attr)] = _numpy_core(_name)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only containers, bytes, str, numbers and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("a persistent id")


def _only_plain_values(value: Any, depth: int = 0) -> bool:
    """True when ``value`` holds only containers, bytes, str, numbers and numpy arrays of non-object dtype."""
    if depth > 8:
        return False
    if isinstance(value, (np.ndarray, np.generic)):
        return not value.dtype.hasobject
    if value is None or isinstance(value, (bytes, str, int, float)):
        return True
    if isinstance(value, dict):
        return all(_only_plain_values(k, depth + 1) and _only_plain_values(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_only_plain_values(v, depth + 1) for v in value)
    return False


def _unpickle(fh: io.BufferedIOBase, where: str) -> dict:
    try:
        batch = _BatchUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise Cifar10FormatError(
            f"{where}: refused to unpickle: the file asks for {exc}, which a CIFAR-10 batch never holds (only "
            "containers, bytes, str, numbers and numpy arrays are read); it may be a malicious file"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is not a CIFAR batch
        raise Cifar10FormatError(
            f"{where}: not a readable CIFAR-10 python batch ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(batch, dict) or not _only_plain_values(batch):
        raise Cifar10FormatError(f"{where}: not a CIFAR-10 python batch (expected a dict of arrays, lists and bytes, "
                                 f"got {type(batch).__name__})")
    return batch


def _batch_to_arrays(batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise Cifar10FormatError(f"{where}: CIFAR-10 batch lacks 'data' or 'labels'")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise Cifar10FormatError(f"{where}: CIFAR-10 batch 'data' has shape {data.shape}, expected [N, 3072]")
    # Rows are 1024 red, then green, then blue values in row-major order.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def _class_names_from_meta(meta: dict | None) -> list[str]:
    if not meta:
        return list(CIFAR10_CLASSES)
    names = meta.get(b"label_names", meta.get("label_names"))
    if not names:
        return list(CIFAR10_CLASSES)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_python_tar(path: Path, split: str) -> _Cifar10Arrays:
    wanted = _PY_TRAIN_BATCHES if split == "train" else _PY_TEST_BATCHES
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise Cifar10FormatError(f"{path}: cannot open as a tar archive ({exc})") from exc
    with tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        missing = [b for b in wanted if b not in members]
        if missing:
            raise Cifar10FormatError(
                f"{path}: tar archive is not CIFAR-10's python form (missing {', '.join(missing)}; expected "
                "cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta)"
            )
        meta = None
        if "batches.meta" in members:
            meta = _unpickle(tar.extractfile(members["batches.meta"]), f"{path}:batches.meta")
        parts = [
            _batch_to_arrays(_unpickle(tar.extractfile(members[b]), f"{path}:{b}"), f"{path}:{b}") for b in wanted
        ]
    return _Cifar10Arrays(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), _class_names_from_meta(meta)
    )


def _python_folder(path: Path) -> Path | None:
    """The folder holding ``data_batch_1``/``test_batch`` (``path`` itself or its ``cifar-10-batches-py``)."""
    for cand in (path, path / "cifar-10-batches-py"):
        if (cand / "test_batch").is_file() or (cand / "data_batch_1").is_file():
            return cand
    return None


def _read_python_folder(folder: Path, split: str) -> _Cifar10Arrays:
    wanted = _PY_TRAIN_BATCHES if split == "train" else _PY_TEST_BATCHES
    missing = [b for b in wanted if not (folder / b).is_file()]
    if missing:
        raise Cifar10FormatError(f"{folder}: CIFAR-10 python folder lacks {', '.join(missing)} for split '{split}'")
    meta = None
    if (folder / "batches.meta").is_file():
        with open(folder / "batches.meta", "rb") as fh:
            meta = _unpickle(fh, str(folder / "batches.meta"))
    parts = []
    for b in wanted:
        with open(folder / b, "rb") as fh:
            parts.append(_batch_to_arrays(_unpickle(fh, str(folder / b)), str(folder / b)))
    return _Cifar10Arrays(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), _class_names_from_meta(meta)
    )


# --------------------------------------------------------------------------------------------- image tree / zip form


def _decode_image(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise Cifar10FormatError(f"{where}: cannot decode image ({exc})") from exc
    if arr.shape != (32, 32, 3):
        raise Cifar10FormatError(f"{where}: image is {arr.shape[1]}x{arr.shape[0]}, CIFAR-10 images are 32x32")
    return arr


def _split_entries(names: Sequence[str], split: str) -> dict[str, list[str]]:
    """Map class name → sorted entry names for entries shaped ``[prefix/]<split>/<class>/<file>``."""
    by_class: dict[str, list[str]] = {}
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_EXTS):
            continue
        if parts[-3] != split:
            continue
        by_class.setdefault(parts[-2], []).append(name)
    return {c: sorted(v) for c, v in sorted(by_class.items())}


def _arrays_from_entries(
    by_class: dict[str, list[str]], read, where: str, select: "_Selection | None"
) -> _Cifar10Arrays:
    class_names = list(by_class)
    names = [name for cls in class_names for name in by_class[cls]]
    labels = np.asarray([label for label, cls in enumerate(class_names) for _ in by_class[cls]], dtype=np.int64)
    keep = select.indices(labels) if select is not None else np.arange(len(names))
    images = np.empty((len(keep), 32, 32, 3), dtype=np.uint8)
    for j, i in enumerate(keep):
        images[j] = _decode_image(read(names[i]), f"{where}:{names[i]}")
    return _Cifar10Arrays(images, labels[keep], class_names, keep)


def _zip_for_split(path: Path, split: str) -> Path | None:
    """The zip that holds ``split``: ``path`` itself, or its sibling with train↔test swapped in the name."""
    other = "test" if split == "train" else "train"
    with zipfile.ZipFile(path) as zf:
        if _split_entries(zf.namelist(), split):
            return path
    if other in path.name:
        sibling = path.with_name(path.name.replace(other, split))
        if sibling.is_file():
            return sibling
    return None


def _read_image_zip(path: Path, split: str, select: _Selection | None) -> _Cifar10Arrays:
    try:
        zpath = _zip_for_split(path, split)
    except zipfile.BadZipFile as exc:
        raise Cifar10FormatError(f"{path}: not a valid zip file ({exc})") from exc
    if zpath is None:
        raise Cifar10FormatError(
            f"{path}: zip holds no '{split}/<class>/<image>' entries and no sibling zip for split '{split}' was found"
        )
    with zipfile.ZipFile(zpath) as zf:
        by_class = _split_entries(zf.namelist(), split)
        return _arrays_from_entries(by_class, zf.read, str(zpath), select)


def _read_image_tree(root: Path, split: str, select: _Selection | None) -> _Cifar10Arrays:
    folder = root / split
    names = [str(p.relative_to(root)) for p in folder.glob("*/*") if p.is_file()]
    by_class = _split_entries(names, split)
    if not by_class:
        raise Cifar10FormatError(f"{folder}: no '<class>/<image>' files for split '{split}'")
    return _arrays_from_entries(by_class, lambda name: (root / name).read_bytes(), str(root), select)


# --------------------------------------------------------------------------------------------- dispatch and caching


def _read_any(path: Path, split: str, select: _Selection | None) -> _Cifar10Arrays:
    if path.is_file():
        name = path.name.lower()
        if zipfile.is_zipfile(path):
            return _read_image_zip(path, split, select)
        if name.endswith((".tar.gz", ".tgz", ".tar")) or tarfile.is_tarfile(path):
            return _read_python_tar(path, split)
        raise Cifar10FormatError(
            f"{path}: not a CIFAR-10 archive (expected cifar-10-python.tar.gz, a cifar-10-batches-py/ folder, "
            "or an image tree/zip of <split>/<class>/<image>)"
        )
    if path.is_dir():
        folder = _python_folder(path)
        if folder is not None:
            return _read_python_folder(folder, split)
        if (path / split).is_dir():
            return _read_image_tree(path, split, select)
        tars = sorted(path.glob("cifar-10-python.tar.gz"))
        if tars:
            return _read_python_tar(tars[0], split)
        zips = sorted(p for p in path.glob("*.zip") if split in p.name)
        if zips:
            return _read_image_zip(zips[0], split, select)
        raise Cifar10FormatError(
            f"{path}: folder holds no CIFAR-10 data for split '{split}' (expected cifar-10-batches-py/ batches, "
            f"a {split}/<class>/ image tree, cifar-10-python.tar.gz or a *{split}*.zip)"
        )
    raise Cifar10FormatError(f"{path}: CIFAR-10 path does not exist")


def _cache_file(path: Path, split: str, cache_dir: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{split}|v1"
    return cache_dir / f"cifar10-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _load(
    path: str | os.PathLike, split: str, limit_per_class: int, seed: int, cache_dir: str | os.PathLike | None
) -> _Cifar10Arrays:
    if split not in SPLITS:
        raise Cifar10FormatError(f"{path}: unknown CIFAR-10 split '{split}'; use one of {', '.join(SPLITS)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise Cifar10FormatError(f"{p}: CIFAR-10 path does not exist")
    select = _Selection(limit_per_class, seed) if limit_per_class > 0 else None
    # Only full decodes of image forms are worth caching (the pickle form reads in a second).
    use_cache = cache_dir is not None and select is None and (zipfile.is_zipfile(p) or p.is_dir())
    cache = _cache_file(p, split, Path(cache_dir)) if use_cache else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            arrays = _Cifar10Arrays(z["images"], z["labels"], [str(c) for c in z["class_names"]])
    else:
        arrays = _read_any(p, split, select)
        if cache is not None and len(arrays.images):
            from dagan_gn.fileio import atomic_path

            with atomic_path(cache, suffix=".npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, images=arrays.images, labels=arrays.labels, class_names=np.array(arrays.class_names))
    if len(arrays.images) == 0:
        raise Cifar10FormatError(f"{p}: no images found for split '{split}'")
    if arrays.indices is None:
        keep = limit_indices_per_class(arrays.labels, limit_per_class, seed)
        if len(keep) != len(arrays.labels):
            arrays = _Cifar10Arrays(arrays.images[keep], arrays.labels[keep], arrays.class_names, keep)
        else:
            arrays.indices = keep
    return arrays


def load_cifar10(
    path: str | os.PathLike,
    split: str = "train",
    *,
    limit_per_class: int = 0,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read one split of CIFAR-10 from any supported form (see the module docstring).

    Args:
        path: archive, folder or zip; nothing is downloaded.
        split: ``train`` or ``test``.
        limit_per_class: keep at most this many images per class (0: all), chosen deterministically by ``seed``;
            image zips/trees decode only the kept images.
        seed: seed of the per-class selection.
        cache_dir: optional folder for a decoded ``.npz`` copy of image zips/trees (keyed by the path, size and
            modification time of ``path``); ``None`` decodes every time.

    Returns:
        ``(images uint8 [N, 32, 32, 3], labels int64 [N], class_names)``.
    """
    arrays = _load(path, split, limit_per_class, seed, cache_dir)
    return arrays.images, arrays.labels, arrays.class_names


def limit_indices_per_class(labels: np.ndarray, limit_per_class: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted) keeping at most ``limit_per_class`` images of each class, chosen at random but
    deterministically by ``seed``; ``limit_per_class <= 0`` keeps everything."""
    labels = np.asarray(labels)
    if limit_per_class <= 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[:limit_per_class])
    return np.sort(np.concatenate(keep))


class CIFAR10Dataset(Dataset):
    """CIFAR-10 as the project's dataset contract: items ``{"image": FloatTensor[3, 32, 32] in [-1, 1],
    "label": int, "index": int}`` where ``index`` is the image's position in the full split.

    The whole split is held in memory as ``uint8`` (150 MB for the training set); ``images_uint8`` (``[N, 3, 32,
    32]``) is what the metrics use as reference images. ``cache_dir="auto"`` keeps a decoded copy of image zips/trees
    under :func:`dagan_gn.runtime.default_cache_dir` (the 50k JPEGs take ~16 s to decode on 2 cores); ``None`` disables it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        limit_per_class: int = 0,
        seed: int = 0,
        *,
        cache_dir: str | os.PathLike | None = "auto",
    ) -> None:
        if cache_dir == "auto":
            cache_dir = default_cache_dir() / "cifar10"
        arrays = _load(path, split, limit_per_class, seed, cache_dir)
        self.path = Path(path)
        self.split = split
        self.class_names = list(arrays.class_names)
        self.indices = torch.from_numpy(np.asarray(arrays.indices, dtype=np.int64))
        self.images_uint8 = torch.from_numpy(np.ascontiguousarray(arrays.images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(arrays.labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image = self.images_uint8[i].float().div_(127.5).sub_(1.0)
        return {"image": image, "label": int(self.labels[i]), "index": int(self.indices[i])}
