"""The patch-file reader: :class:`PatchFile` (layout checked on opening; ``read_patches`` is the one row reader)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from dagan_gn.store.patch_file.codecs import uint16_to_signed
from dagan_gn.store.patch_file.format import (
    FORMAT_VERSION,
    ColumnSpec,
    StoreError,
    _brief,
    _decode_attr,
    _read_column,
    _spec_of_dataset,
    partial_path,
)

__all__ = ["PatchFile"]


class PatchFile:
    """Read access to a finished patch file. Small per-patch arrays are read once; patches are read lazily.

    Opening checks the layout, so a malformed file fails here with one :class:`StoreError` naming the file and the
    dataset, never later as a wrong image or a wrapped label: the required datasets and attributes are present,
    ``patches`` is uint16 ``N×C×S×S`` with C and S those of the attributes, ``labels``/``split`` are integer and
    ``N`` long with values indexing ``class_names``/``split_names``, and every provenance column has N rows.

    Use as a context manager or call :meth:`close`. Not shared across processes: open one per worker."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an unfinished run left a .partial file; finish it with --resume)" if partial_path(
                self.path).exists() else ""
            raise StoreError(f"{self.path}: no such patch file{hint}")
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a patch file")
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, RuntimeError, ValueError) as exc:
            raise StoreError(f"{self.path}: not a readable HDF5 file ({_brief(exc)})") from exc
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise

    def _validate(self) -> None:
        f, where = self._file, self.path
        try:
            if "format_version" not in f.attrs or "patches" not in f:
                raise StoreError(f"{where}: not a dagan-gn patch file (no format_version / patches)")
            self.format_version = int(f.attrs["format_version"])
            if self.format_version > FORMAT_VERSION:
                raise StoreError(
                    f"{where}: format version {self.format_version} is newer than this tool ({FORMAT_VERSION}); "
                    "upgrade dagan-gn"
                )
            for name in ("labels", "split"):
                if not isinstance(f.get(name), h5py.Dataset):
                    raise StoreError(f"{where}: dataset '{name}' is missing")
            if not isinstance(f.get("provenance"), h5py.Group):
                raise StoreError(f"{where}: group 'provenance' is missing")
            for attr in ("patch_size", "class_names", "split_names"):
                if attr not in f.attrs:
                    raise StoreError(f"{where}: attribute '{attr}' is missing")
            patches = f["patches"]
            if not isinstance(patches, h5py.Dataset) or patches.dtype != np.uint16:
                dtype = getattr(patches, "dtype", "a group")
                raise StoreError(f"{where}: dataset 'patches' is {dtype}, expected uint16 (v / 65535 in [0, 1])")
            self.patch_size = int(f.attrs["patch_size"])
            self.channels = int(f.attrs.get("channels", patches.shape[1] if patches.ndim > 1 else 0))
            want = (self.channels, self.patch_size, self.patch_size)
            if patches.ndim != 4 or tuple(patches.shape[1:]) != want:
                raise StoreError(f"{where}: dataset 'patches' has shape {list(patches.shape)}, expected "
                                 f"[N, {', '.join(map(str, want))}] (channels and patch_size attributes)")
            self.class_names = [str(c) for c in _as_list(_decode_attr(f.attrs["class_names"]))]
            self.split_names = [str(s) for s in _as_list(_decode_attr(f.attrs["split_names"]))]
            if not self.class_names:
                raise StoreError(f"{where}: attribute 'class_names' is empty")
            n = patches.shape[0]
            self.labels = self._index_column("labels", n, len(self.class_names), "class_names")
            self.split = self._index_column("split", n, len(self.split_names), "split_names").astype(np.uint8)
            for name, ds in f["provenance"].items():
                if not isinstance(ds, h5py.Dataset) or ds.ndim == 0 or ds.shape[0] != n:
                    rows = ds.shape[0] if isinstance(ds, h5py.Dataset) and ds.ndim else "no"
                    raise StoreError(f"{where}: dataset 'provenance/{name}' has {rows} rows, 'patches' has {n}")
            if "parameters" in f.attrs:
                json.loads(_decode_attr(f.attrs["parameters"]))
        except StoreError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # a damaged or truncated file
            raise StoreError(f"{where}: cannot read the patch file layout ({_brief(exc)})") from exc
        self.patches: h5py.Dataset = patches

    def _index_column(self, name: str, n: int, size: int, table: str) -> np.ndarray:
        ds = self._file[name]
        if ds.ndim != 1 or ds.dtype.kind not in "iu":
            raise StoreError(f"{self.path}: dataset '{name}' is {ds.dtype} with shape {list(ds.shape)}, expected "
                             "1-D integers")
        if ds.shape[0] != n:
            raise StoreError(f"{self.path}: dataset '{name}' has {ds.shape[0]} rows, 'patches' has {n}")
        values = ds[:].astype(np.int64)
        bad = np.flatnonzero((values < 0) | (values >= size))
        if bad.size:
            raise StoreError(f"{self.path}: dataset '{name}' row {int(bad[0])} is {int(values[bad[0]])}, outside "
                             f"0..{size - 1} ({table} has {size} entries)")
        return values

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes, decoded (``parameters`` and other JSON strings stay strings; see :attr:`parameters`)."""
        return {k: _decode_attr(v) for k, v in self._file.attrs.items()}

    @property
    def parameters(self) -> dict[str, Any]:
        return json.loads(_decode_attr(self._file.attrs["parameters"])) if "parameters" in self._file.attrs else {}

    @property
    def synthetic(self) -> bool:
        return bool(self._file.attrs.get("synthetic", False))

    @property
    def provenance_columns(self) -> list[str]:
        return list(self._file["provenance"].keys())

    def provenance_specs(self) -> dict[str, ColumnSpec]:
        """Column name → spec, in the form :class:`PatchWriter` accepts."""
        return {name: _spec_of_dataset(ds) for name, ds in self._file["provenance"].items()}

    def provenance(self, name: str, rows: Any = slice(None)) -> np.ndarray:
        """A provenance column (strings come back as a numpy object array of ``str``)."""
        if name not in self._file["provenance"]:
            raise KeyError(f"{self.path}: no provenance column {name!r} (has {self.provenance_columns})")
        return _read_column(self._file["provenance"][name], rows)

    @property
    def sources(self) -> np.ndarray:
        return _read_column(self._file["sources"]) if "sources" in self._file else np.asarray([], dtype=object)

    def read_patch(self, index: int) -> np.ndarray:
        """One stored patch, uint16 [C, S, S]."""
        return self.patches[int(index)]

    def read_patches(self, rows: Sequence[int] | np.ndarray, *, signed: bool = False,
                     block: int = 512) -> np.ndarray:
        """Patches ``rows`` (any order, repeats allowed) as uint16 ``[n, C, S, S]``, or with ``signed`` as float32
        in [-1, 1] (:func:`uint16_to_signed`, the networks' scale). Read ``block`` rows at a time, each block as one
        slice when its rows are contiguous, else as one point selection, so memory holds only the result."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(rows, return_inverse=True)
        if len(unique) and (unique[0] < 0 or unique[-1] >= len(self)):
            raise StoreError(f"{self.path}: rows {unique[0]}..{unique[-1]} outside the file's {len(self)} patches")
        out = np.empty((len(unique), *self.patches.shape[1:]), dtype=np.float32 if signed else np.uint16)
        for start in range(0, len(unique), block):
            idx = unique[start : start + block]
            if idx[-1] - idx[0] + 1 == len(idx):
                raw = self.patches[int(idx[0]) : int(idx[-1]) + 1]
            else:
                raw = self.patches[idx.tolist()]
            out[start : start + len(idx)] = uint16_to_signed(raw) if signed else raw
        return out if np.array_equal(unique, rows) else out[inverse.reshape(-1)]

    def split_indices(self, split: str) -> np.ndarray:
        """Rows of one split (``"train"``, ``"val"``, ``"test"``)."""
        if split not in self.split_names:
            raise StoreError(f"{self.path}: unknown split {split!r}; the file has {self.split_names}")
        return np.flatnonzero(self.split == self.split_names.index(split))

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "PatchFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value)


def synthetic_pairing_problem(real: PatchFile, syn: PatchFile, real_path: Any, syn_path: Any, *,
                              same_classes: bool = False) -> str | None:
    """Why ``syn`` cannot be judged against ``real`` as its generator's training data (one line naming the file),
    or None: ``syn`` must be synthetic, ``real`` real, with the same patch size and channels (and, with
    ``same_classes``, the same class table). Each job raises its own error with the message."""
    if not syn.synthetic:
        return f"{syn_path}: not a synthetic patch file (attribute synthetic is not true)"
    if real.synthetic:
        return f"{real_path}: is a synthetic patch file; pass the real patches the generator saw"
    if (syn.patch_size, syn.channels) != (real.patch_size, real.channels):
        return (f"{syn_path} holds {syn.channels}×{syn.patch_size}px patches but {real_path} "
                f"{real.channels}×{real.patch_size}px")
    if same_classes and list(syn.class_names) != list(real.class_names):
        return f"{syn_path} has classes {list(syn.class_names)} but {real_path} {list(real.class_names)}"
    return None
