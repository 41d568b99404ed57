"""The layout of a patch file: format version, split names, provenance column specs (``ColumnSpec``), the fixed-length
string columns, attribute encoding, :class:`StoreError` and the one-line error of a failed write. Shared by the
writer, the reader and the merge (see the package docstring for the layout)."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any, Union

import h5py
import numpy as np

from dagan_gn.errors import DaganError

__all__ = ["FORMAT_VERSION", "SPLIT_NAMES", "EXTRACTION_PROVENANCE", "ColumnSpec", "StoreError", "partial_path"]

FORMAT_VERSION = 1
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
ColumnSpec = Union[str, tuple]

#: Provenance columns of an extracted (real) patch file. No paths, names, dates or UIDs: only salted pseudonyms.
EXTRACTION_PROVENANCE: dict[str, ColumnSpec] = {
    "patient_pseudonym": "str",
    "image_pseudonym": "str",
    "laterality": "str",
    "view": "str",
    "center_yx": ("int32", (2,)),
    "pixel_spacing_mm": "float32",
    "source_index": "int32",
    "lesion_index": "int32",
}

# Strings are fixed-length UTF-8 (default 64 bytes): variable-length strings live in HDF5's global heap, which a
# killed writer can leave inconsistent with the truncated datasets, breaking resume. Fixed-length ones are plain
# chunked data like every other column.
_STR_LEN = 64
_STR_DTYPE = h5py.string_dtype("utf-8", _STR_LEN)
_STR_SPEC = re.compile(r"^str(\d*)$")


def _str_dtype(length: int) -> np.dtype:
    return h5py.string_dtype("utf-8", int(length))


def _is_str(dtype: Any) -> bool:
    return isinstance(dtype, np.dtype) and h5py.check_string_dtype(dtype) is not None


def _encode_strings(values: Any, dtype: np.dtype, what: str) -> np.ndarray:
    encoded = [str(v).encode("utf-8") for v in values]
    too_long = [v for v in encoded if len(v) > dtype.itemsize]
    if too_long:
        raise StoreError(f"{what}: value {too_long[0][:80]!r} is longer than {dtype.itemsize} bytes")
    return np.asarray(encoded, dtype=dtype)
_RESERVED_ATTRS = {
    "format_version", "tool_version", "created", "parameters", "synthetic", "class_names", "split_names",
    "patch_size", "channels", "committed_rows", "committed_sources", "committed_done",
}


class StoreError(DaganError, ValueError):
    """A patch file is missing, incomplete, from another format version, or incompatible with an operation."""


def partial_path(path: str | os.PathLike) -> Path:
    """Where a writer keeps an unfinished output: ``<path>.partial``."""
    return Path(str(path) + ".partial")


def _column_dtype(spec: ColumnSpec) -> tuple[Any, tuple[int, ...]]:
    if isinstance(spec, tuple):
        dtype, shape = spec
        shape = tuple(int(s) for s in shape)
    else:
        dtype, shape = spec, ()
    if dtype is str:
        dtype = "str"
    match = _STR_SPEC.match(dtype) if isinstance(dtype, str) else None
    if match:
        return _str_dtype(int(match.group(1) or _STR_LEN)), shape
    try:
        return np.dtype(dtype), shape
    except TypeError as exc:
        raise StoreError(f"unknown provenance column dtype {dtype!r}") from exc


def _spec_of_dataset(ds: h5py.Dataset) -> ColumnSpec:
    if _is_str(ds.dtype):
        name = "str" if ds.dtype.itemsize == _STR_LEN else f"str{ds.dtype.itemsize}"
    else:
        name = ds.dtype.name
    return (name, tuple(ds.shape[1:])) if ds.ndim > 1 else name


def _attr_value(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)) and not (
        isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
    ):
        return json.dumps(value, sort_keys=True, default=str)
    if value is None:
        return "null"
    return value


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in ("O", "S", "U"):
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_column(ds: h5py.Dataset, sel: Any = slice(None)) -> np.ndarray:
    if _is_str(ds.dtype):
        return np.asarray(ds.asstr()[sel], dtype=object)
    return ds[sel]


def _brief(exc: BaseException) -> str:
    """An exception's message on one line (HDF5 messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _io_failure(path: Path, partial: Path, exc: OSError, doing: str) -> "StoreError":
    """The one-line error for a failed write: what failed, where, and that a re-run continues from the last commit."""
    reason = (exc.strerror or str(exc)).rstrip(".").lower()
    if exc.errno == errno.ENOSPC:
        hint = "free some space, then resume: the .partial file keeps everything up to the last commit"
    else:
        hint = "nothing committed is lost; fix the storage, then resume from the last commit"
    return StoreError(f"{path}: {reason} while {doing} ({partial.name}); {hint}")
