"""The intensity scale of a patch file (uint16 ``v`` means ``v / 65535`` in [0, 1]; networks see [-1, 1]) and the
encoding of patch chunks exactly as the file's filters would store them (so worker processes can compress)."""

from __future__ import annotations

import zlib

import h5py
import numpy as np

from dagan_gn.store.patch_file.format import StoreError

__all__ = ["to_uint16", "uint16_to_unit", "uint16_to_signed", "encode_patch_chunks"]


def to_uint16(images01: np.ndarray) -> np.ndarray:
    """Float intensities in [0, 1] → the stored uint16 scale (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(images01, dtype=np.float32) * 65535.0), 0, 65535).astype(np.uint16)


def uint16_to_unit(values: np.ndarray) -> np.ndarray:
    """Stored uint16 → float32 intensity in [0, 1]."""
    return np.asarray(values, dtype=np.float32) / 65535.0


def uint16_to_signed(values: np.ndarray) -> np.ndarray:
    """Stored uint16 → float32 in [-1, 1], the scale networks see (``v / 65535 * 2 - 1``)."""
    return np.asarray(values, dtype=np.float32) / 65535.0 * 2.0 - 1.0


def encode_patch_chunks(patches: np.ndarray, compression: str | None = "gzip", level: int = 4) -> list[bytes]:
    """Encode uint16 [n, C, S, S] patches exactly as the file's filter pipeline would (byte shuffle, then zlib), one
    chunk per patch, for :meth:`PatchWriter.append` ``encoded=``. Pure numpy/zlib, so worker processes can do it."""
    patches = np.ascontiguousarray(patches, dtype=np.uint16)
    out = []
    for patch in patches:
        if compression is None:
            out.append(patch.tobytes())
            continue
        if compression != "gzip":
            raise StoreError(f"cannot pre-encode {compression!r} chunks")
        shuffled = patch.view(np.uint8).reshape(-1, 2).T.tobytes()  # HDF5 shuffle filter for 2-byte elements
        out.append(zlib.compress(shuffled, level))
    return out


def _chunk_encoding(ds: h5py.Dataset) -> tuple[str | None, int] | None:
    """``(compression, level)`` of a one-patch-per-chunk ``patches`` dataset whose chunks :func:`encode_patch_chunks`
    can produce (and a writer can take as ``encoded=``); None otherwise. The level only matters for writing: any
    gzip level decodes the same."""
    if ds.chunks is None or ds.chunks[0] != 1 or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
        return None
    if ds.compression is None and not ds.shuffle:
        return (None, 0)
    if ds.compression == "gzip" and ds.shuffle:
        return ("gzip", int(ds.compression_opts))
    return None
