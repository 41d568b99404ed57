"""The HDF5 patch file: one format for extracted (real) and generated (synthetic) patches.

Layout (``FORMAT_VERSION`` 1, documented for users in ``docs/hdf5-format.md``)::

    /patches              uint16 [N, C, S, S]   value v means intensity v / 65535 in [0, 1]; chunk = one patch,
                                                gzip (+ byte shuffle) or lzf compressed, so random access is cheap
    /labels               int32  [N]            index into the ``class_names`` attribute
    /split                uint8  [N]            index into the ``split_names`` attribute (train / val / test)
    /provenance/<column>  [N] or [N, ...]       generic, per-patch columns declared by the writer (name -> dtype)
    /sources              str    [M]            pseudonymous ids of the source images (``source_index`` points here)
    /_resume/done_sources str    [K]            opaque keys of the inputs already written (resume bookkeeping)
    /_resume/row_digest   uint64 [N]            digest of each row as committed (checked when a writer resumes)
    attrs: format_version, tool_version, created (UTC ISO-8601), parameters (JSON), synthetic (bool),
           class_names, split_names, patch_size, channels, plus any extra attributes given by the writer
           (dicts/lists are stored as JSON strings).

Writing (extraction, and ``augment`` for synthetic files)::

    from dagan_gn.store.patch_file import PatchWriter, PatchFile, to_uint16

    columns = {"patient_pseudonym": "str", "source_index": "int64", "noise_seed": "int64"}
    with PatchWriter("synthetic.h5", patch_size=64, class_names=["normal", "benign"], provenance=columns,
                     synthetic=True, parameters={"n_per_source": 4},
                     attrs={"checkpoint_sha256": sha, "generator_config": cfg_dict}) as writer:
        writer.append(to_uint16(images01), labels, split, {"patient_pseudonym": ..., "source_index": ...,
                                                          "noise_seed": ...})
    # leaving the ``with`` block normally renames ``synthetic.h5.partial`` onto ``synthetic.h5``;
    # an exception leaves only the ``.partial`` file, which never looks like a finished output.

Column specs are a numpy dtype name (``"int32"``, ``"float32"``, ``"uint8"``...), ``"str"`` (UTF-8, at most 64
bytes; ``"strN"`` for at most N bytes)
or a ``(dtype, trailing_shape)`` tuple such as ``("int32", (2,))`` for ``center_yx``. ``EXTRACTION_PROVENANCE``
holds the columns written by ``dagan extract-patches``.

Durability and resume: ``writer.commit(key)`` records that input ``key`` is fully written, records a 64-bit digest of
every new row (``/_resume/row_digest``) and makes the file durable. The ``.partial`` file is written through a
journaled storage layer (``dagan_gn.store.journal``), so whatever happens afterwards — a kill, ``ENOSPC``, ``EIO`` —
it reopens exactly as it was at that commit. A writer opened with ``resume=True`` on an existing ``.partial`` file
replays its journal, checks every committed row against its digest, drops everything written after the last commit
(rows of an input that was half-written when the process died are written again) and exposes ``done_sources``. A
failed write raises one ``StoreError`` naming the file ("no space left on device while writing patches ...").

Reading: ``PatchFile(path)`` gives ``len``, ``patches`` (lazy h5py dataset), ``labels``, ``split``, ``class_names``,
``split_names``, ``provenance(name)``, ``sources``, ``attrs`` and ``parameters``. ``merge_patch_files(inputs, out)``
concatenates shards (same patch size, channels, format version and provenance columns; class tables are unified
and labels remapped when they differ).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import signal
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import h5py
import numpy as np

import dagan_gn

from dagan_gn.errors import DaganError
from dagan_gn.fileio import fsync_dir
from dagan_gn.store.journal import JournaledFile, JournalError, journal_path

__all__ = [
    "FORMAT_VERSION",
    "SPLIT_NAMES",
    "EXTRACTION_PROVENANCE",
    "ColumnSpec",
    "StoreError",
    "PatchWriter",
    "PatchFile",
    "merge_patch_files",
    "encode_patch_chunks",
    "partial_path",
    "to_uint16",
    "uint16_to_unit",
    "uint16_to_signed",
]

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


#: Test hook (tests/faults): kill this process with SIGKILL right after its N-th durable commit.
_KILL_AFTER_COMMITS_ENV = "DAGAN_TEST_KILL_AFTER_COMMITS"


class PatchWriter:
    """Append-only writer of a patch file (see the module docstring for the layout and an example).

    Commits are durable and a killed or failed writer never leaves a damaged file: the ``.partial`` file is written
    through a :class:`~dagan_gn.store.journal.JournaledFile`, so after a kill, a full disk or an I/O error it reopens
    exactly as it was at the last :meth:`commit`, and a resumed writer checks every committed row against the
    per-row digest recorded at commit time before it continues. A failed write raises one :class:`StoreError`
    naming the file; the writer then refuses further writes.

    Args:
        path: final output path; the writer works on ``<path>.partial`` and renames it in :meth:`finalize`.
        patch_size: S of the S×S patches.
        class_names: the label table (``labels`` index into it).
        provenance: per-patch column name → spec (``"int32"``, ``"str"``, ``("int32", (2,))``...).
        parameters: job parameters, stored as the JSON ``parameters`` attribute.
        attrs: extra file attributes (dicts/lists stored as JSON strings), e.g. ``checkpoint_sha256``.
        synthetic: True for generated patches.
        channels: C of the N×C×S×S patches (1 for mammograms).
        compression: ``"gzip"`` (portable, default), ``"lzf"`` (faster, h5py only) or None.
        compression_level: gzip level 0–9.
        resume: continue an existing ``.partial`` file (at its last commit) instead of starting afresh. A partial
            file that was never committed (killed while being created) is started afresh, and
            :attr:`recovery_note` says so.
        overwrite_partial: start afresh even when a ``.partial`` file exists (otherwise that is an error, so an
            interrupted run is never thrown away by accident).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        patch_size: int,
        class_names: Sequence[str],
        provenance: Mapping[str, ColumnSpec] = EXTRACTION_PROVENANCE,
        parameters: Mapping[str, Any] | None = None,
        attrs: Mapping[str, Any] | None = None,
        synthetic: bool = False,
        channels: int = 1,
        split_names: Sequence[str] = SPLIT_NAMES,
        compression: str | None = "gzip",
        compression_level: int = 4,
        resume: bool = False,
        overwrite_partial: bool = False,
    ) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.patch_size = int(patch_size)
        self.channels = int(channels)
        self.class_names = [str(c) for c in class_names]
        self.split_names = [str(s) for s in split_names]
        self.columns = {name: _column_dtype(spec) for name, spec in provenance.items()}
        self.resumed = False
        #: A line for the user when a resume could not use the ``.partial`` file as it was (None otherwise).
        self.recovery_note: str | None = None
        self._finalized = False
        self._failure: StoreError | None = None
        self._commits = 0
        if not self.class_names:
            raise StoreError("class_names must not be empty")
        bad = set(attrs or {}) & _RESERVED_ATTRS
        if bad:
            raise StoreError(f"attribute names {sorted(bad)} are reserved by the patch file format")
        if compression not in ("gzip", "lzf", None):
            raise StoreError(f"unknown compression {compression!r}; use 'gzip', 'lzf' or None")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.partial.exists():
            journal_path(self.partial).unlink(missing_ok=True)  # left by a kill just after a finished rename
        if self.partial.exists() and resume and self._open_existing():
            return
        if self.partial.exists() and not resume and not overwrite_partial:
            raise StoreError(
                f"{self.partial} exists (an interrupted run); continue it with resume/--resume or delete it"
            )
        self._create(parameters or {}, attrs or {}, synthetic, compression, compression_level)

    # ------------------------------------------------------------------ creation / resume
    @contextlib.contextmanager
    def _writing(self, doing: str) -> Iterator[None]:
        """Turn a failed write (``ENOSPC``, ``EIO``...) into one :class:`StoreError` and refuse any later write."""
        if self._failure is not None:
            raise self._failure
        try:
            yield
            if self._storage.error is not None:
                raise self._storage.error
        except OSError as exc:
            self._failure = _io_failure(self.path, self.partial, exc, doing)
            raise self._failure from exc

    def _create(self, parameters, attrs, synthetic, compression, level) -> None:
        try:
            self._storage = JournaledFile(self.partial, create=True)
        except JournalError as exc:
            raise StoreError(f"{self.partial} is {exc.strerror}; wait for it or stop it first") from exc
        except OSError as exc:
            raise _io_failure(self.path, self.partial, exc, "creating the file") from exc
        try:
            with self._writing("creating the file"):
                self._file = h5py.File(self._storage, "w", track_order=True)
                self._create_layout(parameters, attrs, synthetic, compression, level)
                self._done: list[str] = []
                self._committed_rows = 0
                self._commit_counts()
        except BaseException:
            # Nothing of value was written yet: leave no partial file that a later resume would have to judge.
            self.partial.unlink(missing_ok=True)
            journal_path(self.partial).unlink(missing_ok=True)
            self._abandon()
            raise

    def _create_layout(self, parameters, attrs, synthetic, compression, level) -> None:
        f = self._file
        S, C = self.patch_size, self.channels
        filters: dict[str, Any] = {}
        if compression == "gzip":
            filters = {"compression": "gzip", "compression_opts": int(level), "shuffle": True}
        elif compression == "lzf":
            filters = {"compression": "lzf", "shuffle": True}
        f.create_dataset("patches", shape=(0, C, S, S), maxshape=(None, C, S, S), dtype=np.uint16,
                         chunks=(1, C, S, S), **filters)
        f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(4096,))
        f.create_dataset("split", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(4096,))
        grp = f.create_group("provenance", track_order=True)
        for name, (dtype, shape) in self.columns.items():
            grp.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                               chunks=(1024, *shape))
        f.create_dataset("sources", shape=(0,), maxshape=(None,), dtype=_STR_DTYPE, chunks=(1024,))
        resume_grp = f.create_group("_resume")
        resume_grp.create_dataset("done_sources", shape=(0,), maxshape=(None,), dtype=_STR_DTYPE, chunks=(1024,))
        resume_grp.create_dataset("row_digest", shape=(0,), maxshape=(None,), dtype=np.uint64, chunks=(4096,))
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["tool_version"] = dagan_gn.__version__
        f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["parameters"] = json.dumps(dict(parameters), sort_keys=True, default=str)
        f.attrs["synthetic"] = bool(synthetic)
        f.attrs["class_names"] = self.class_names
        f.attrs["split_names"] = self.split_names
        f.attrs["patch_size"] = self.patch_size
        f.attrs["channels"] = self.channels
        for key, value in attrs.items():
            f.attrs[key] = _attr_value(value)

    def _open_existing(self) -> bool:
        """Reopen ``.partial`` at its last commit and verify it; False when it was never committed (start afresh)."""
        try:
            self._storage = JournaledFile(self.partial, create=False)
        except JournalError as exc:
            if exc.errno == errno.EBUSY:
                raise StoreError(f"{self.partial} is {exc.strerror}; wait for it or stop it first") from exc
            if exc.errno == errno.ENOENT:
                self.recovery_note = (f"{self.partial} had never been committed (killed while it was being "
                                      "created, or written by an older dagan-gn); started afresh")
                return False
            raise StoreError(f"{self.partial}: {exc.strerror} ({Path(exc.filename).name}); it cannot be resumed — "
                             f"delete it and its .journal file and run again") from exc
        except OSError as exc:
            raise StoreError(f"{self.partial} cannot be opened to resume: {exc.strerror or exc}") from exc
        try:
            try:
                self._file = h5py.File(self._storage, "r+")
            except (OSError, RuntimeError, ValueError) as exc:
                raise StoreError(f"{self.partial} cannot be opened to resume ({_brief(exc)}); delete it and "
                                 "run again") from exc
            self._check_resumable()
            self._verify_committed()
        except BaseException:
            self._abandon()
            raise
        self.resumed = True
        return True

    def _check_resumable(self) -> None:
        f = self._file
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.partial} has format version {version}, this tool writes {FORMAT_VERSION}")
        size = int(f.attrs["patch_size"])
        if size != self.patch_size:
            raise StoreError(f"{self.partial} holds {size}px patches, the resumed run asks for {self.patch_size}")
        classes = _decode_attr(f.attrs["class_names"])
        if list(classes) != self.class_names:
            raise StoreError(f"{self.partial} has classes {classes}, the resumed run has {self.class_names}")
        on_disk = {name: _column_dtype(_spec_of_dataset(ds)) for name, ds in f["provenance"].items()}
        if set(on_disk) != set(self.columns):
            raise StoreError(
                f"{self.partial} has provenance columns {sorted(on_disk)}, the resumed run writes "
                f"{sorted(self.columns)}"
            )

    def _verify_committed(self) -> None:
        """Check that the committed rows are all there and unchanged (their digests), and drop anything past them."""
        f = self._file
        rows = int(f.attrs["committed_rows"])
        try:
            lengths = {ds.name: ds.shape[0] for ds in self._row_datasets()}
            short = {name: n for name, n in lengths.items() if n < rows}
            if short:
                raise StoreError(f"{self.partial}: {rows} rows are committed but {', '.join(short)} holds fewer")
            stored = f["_resume/row_digest"][:rows]
            for start in range(0, rows, _VERIFY_BLOCK):
                stop = min(rows, start + _VERIFY_BLOCK)
                bad = np.flatnonzero(self._row_digests(start, stop) != stored[start:stop])
                if bad.size:
                    raise StoreError(
                        f"{self.partial}: committed row {start + int(bad[0])} does not match the digest recorded when "
                        "it was written; the file is damaged — delete it and run again"
                    )
            with self._writing("dropping uncommitted rows"):
                for ds in self._row_datasets():
                    ds.resize(rows, axis=0)
                f["sources"].resize(int(f.attrs["committed_sources"]), axis=0)
                done = f["_resume/done_sources"]
                done.resize(int(f.attrs["committed_done"]), axis=0)
                self._done = list(done.asstr()[:])
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{self.partial}: committed rows cannot be read back ({_brief(exc)}); the file is "
                             "damaged — delete it and run again") from exc
        self._committed_rows = rows

    def _row_datasets(self) -> list[h5py.Dataset]:
        f = self._file
        return [f["patches"], f["labels"], f["split"], *f["provenance"].values(), f["_resume/row_digest"]]

    def _row_digests(self, start: int, stop: int) -> np.ndarray:
        """64-bit digest of each row in ``[start, stop)``: its stored patch chunk (as compressed on disk), label,
        split and provenance values, read back from the file."""
        f = self._file
        columns = [f["labels"][start:stop], f["split"][start:stop],
                   *(ds[start:stop] for ds in f["provenance"].values())]
        patches = f["patches"].id
        out = np.empty(stop - start, dtype=np.uint64)
        for i in range(start, stop):
            mask, chunk = patches.read_direct_chunk((i, 0, 0, 0))
            h = hashlib.blake2b(chunk, digest_size=8)
            h.update(int(mask).to_bytes(4, "little"))
            for col in columns:
                h.update(np.ascontiguousarray(col[i - start]).tobytes())
            out[i - start] = int.from_bytes(h.digest(), "little")
        return out

    def _commit_counts(self) -> None:
        f = self._file
        f.flush()  # every chunk reaches the file before it is read back for its digest
        rows = f["patches"].shape[0]
        if rows > self._committed_rows:
            f["_resume/row_digest"][self._committed_rows : rows] = self._row_digests(self._committed_rows, rows)
        f.attrs["committed_rows"] = rows
        f.attrs["committed_sources"] = f["sources"].shape[0]
        f.attrs["committed_done"] = f["_resume/done_sources"].shape[0]
        f.flush()
        self._storage.commit()
        self._committed_rows = rows
        self._commits += 1
        kill_after = int(os.environ.get(_KILL_AFTER_COMMITS_ENV, "0") or 0)
        if kill_after and self._commits >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def _abandon(self) -> None:
        """Close the HDF5 file and the storage without committing (the last commit stays on disk)."""
        file = getattr(self, "_file", None)
        if file is not None and file.id.valid:
            try:
                file.close()  # its writes land in the journaled storage, which drops them
            except Exception:  # noqa: BLE001 - cleanup after a failure must not hide that failure
                pass
        storage = getattr(self, "_storage", None)
        if storage is not None:
            storage.close()

    # ------------------------------------------------------------------ public API
    @property
    def num_patches(self) -> int:
        """Rows written so far (committed or not)."""
        return int(self._file["patches"].shape[0])

    @property
    def num_sources(self) -> int:
        return int(self._file["sources"].shape[0])

    @property
    def done_sources(self) -> set[str]:
        """Keys passed to :meth:`commit` (including those of a resumed file)."""
        return set(self._done)

    @property
    def parameters(self) -> dict[str, Any]:
        """The ``parameters`` attribute of the file being written (the original one when resuming)."""
        return json.loads(_decode_attr(self._file.attrs["parameters"]))

    def add_sources(self, source_ids: Sequence[str]) -> np.ndarray:
        """Append pseudonymous source-image ids to the ``sources`` table; returns their indices (int32)."""
        with self._writing("writing the source table"):
            ds = self._file["sources"]
            start = ds.shape[0]
            ds.resize(start + len(source_ids), axis=0)
            if len(source_ids):
                ds[start:] = _encode_strings(source_ids, ds.dtype, "sources")
        return np.arange(start, start + len(source_ids), dtype=np.int32)

    @property
    def chunk_encoding(self) -> tuple[str | None, int] | None:
        """``(compression, level)`` to pass to :func:`encode_patch_chunks` so other processes can compress patches
        for :meth:`append` (``encoded=``); None when the file's filters cannot be reproduced that way (lzf)."""
        return _chunk_encoding(self._file["patches"])

    def append(
        self,
        patches: np.ndarray | None,
        labels: Sequence[int] | np.ndarray,
        split: Sequence[int | str] | np.ndarray,
        provenance: Mapping[str, Any],
        *,
        encoded: Sequence[bytes] | None = None,
    ) -> None:
        """Append n patches (uint16 [n, C, S, S], see :func:`to_uint16`) with labels, split (indices or names) and
        every declared provenance column (n rows each).

        ``encoded``: the patches already compressed by :func:`encode_patch_chunks` with :attr:`chunk_encoding`
        (e.g. in worker processes, so the single writer does no compression); ``patches`` is then None."""
        C, S = self.channels, self.patch_size
        if encoded is not None:
            if self.chunk_encoding is None:
                raise StoreError("this file's compression cannot take pre-encoded chunks; pass patches")
            n = len(encoded)
        else:
            patches = np.asarray(patches)
            n = patches.shape[0]
            if patches.dtype != np.uint16:
                raise StoreError(f"patches must be uint16 (use to_uint16), got {patches.dtype}")
            if patches.shape[1:] != (C, S, S):
                raise StoreError(f"patches must have shape [n, {C}, {S}, {S}], got {list(patches.shape)}")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != n:
            raise StoreError(f"{labels.shape[0]} labels for {n} patches")
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise StoreError(f"labels must index class_names ({len(self.class_names)} classes)")
        split_arr = np.asarray(split)
        if split_arr.dtype.kind in ("U", "S", "O"):
            try:
                split_arr = np.asarray([self.split_names.index(str(s)) for s in split_arr], dtype=np.uint8)
            except ValueError as exc:
                raise StoreError(f"split names must be in {self.split_names}") from exc
        split_arr = split_arr.astype(np.int64).reshape(-1)
        if split_arr.shape[0] != n:
            raise StoreError(f"{split_arr.shape[0]} split values for {n} patches")
        if n and (split_arr.min() < 0 or split_arr.max() >= len(self.split_names)):
            raise StoreError(f"split values must index split_names {self.split_names}")
        missing = set(self.columns) - set(provenance)
        extra = set(provenance) - set(self.columns)
        if missing or extra:
            raise StoreError(f"provenance columns: missing {sorted(missing)}, undeclared {sorted(extra)}")
        values = {}
        for name, (dtype, shape) in self.columns.items():
            col = provenance[name]
            if _is_str(dtype):
                arr = _encode_strings(np.asarray(col, dtype=object).reshape(-1), dtype, f"column {name!r}")
                arr = arr.reshape((-1, *shape)) if shape else arr
            else:
                arr = np.asarray(col, dtype=dtype)
            if arr.shape != (n, *shape):
                raise StoreError(f"provenance column {name!r} has shape {list(arr.shape)}, expected {[n, *shape]}")
            values[name] = arr
        if n == 0:
            return
        with self._writing("writing patches"):
            f = self._file
            start = f["patches"].shape[0]
            for ds in self._row_datasets():
                ds.resize(start + n, axis=0)
            if encoded is not None:
                for i, chunk in enumerate(encoded):
                    f["patches"].id.write_direct_chunk((start + i, 0, 0, 0), bytes(chunk))
            else:
                f["patches"][start:] = patches
            f["labels"][start:] = labels.astype(np.int32)
            f["split"][start:] = split_arr.astype(np.uint8)
            for name, arr in values.items():
                f["provenance"][name][start:] = arr

    def commit(self, source_key: str | None = None) -> None:
        """Make everything appended so far durable: record ``source_key`` (if given) as done, record a digest of each
        new row, and commit the file (fsynced; a kill at any instant afterwards reopens it exactly as it is now).

        A resumed writer continues from the last commit, so commit once per fully written input."""
        with self._writing("committing"):
            if source_key is not None:
                done = self._file["_resume/done_sources"]
                done.resize(done.shape[0] + 1, axis=0)
                done[-1] = _encode_strings([source_key], done.dtype, "done_sources")[0]
            self._commit_counts()
        if source_key is not None:
            self._done.append(str(source_key))

    def set_attrs(self, **attrs: Any) -> None:
        """Add or replace extra file attributes (not the reserved format attributes); durable at the next commit."""
        bad = set(attrs) & _RESERVED_ATTRS
        if bad:
            raise StoreError(f"attribute names {sorted(bad)} are reserved by the patch file format")
        with self._writing("writing attributes"):
            for key, value in attrs.items():
                self._file.attrs[key] = _attr_value(value)

    def finalize(self) -> Path:
        """Commit, close and rename ``<path>.partial`` onto ``path``; returns ``path``. On a failure the ``.partial``
        file stays at its last commit, so running the job again finishes it."""
        if self._finalized:
            return self.path
        self.commit()
        with self._writing("finishing the file"):
            self._file.close()
            self._storage.commit()  # whatever HDF5 wrote while closing
            self._storage.sync()  # the journal goes away below: the file itself must be durable
            self._storage.close()
            os.replace(self.partial, self.path)
            fsync_dir(self.path.parent)
        journal_path(self.partial).unlink(missing_ok=True)
        self._finalized = True
        return self.path

    def close(self) -> None:
        """Close without finalizing: the ``.partial`` file stays at its last commit for a later resume."""
        if not self._finalized:
            self._abandon()

    def __enter__(self) -> "PatchWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.close()


#: Rows verified per block when a writer resumes (bounds the memory of the check).
_VERIFY_BLOCK = 4096


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


def _read_raw_chunks(ds: h5py.Dataset, rows: slice) -> list[bytes] | None:
    """The stored (compressed) bytes of patches ``rows``, one chunk each; None if any chunk was stored with a filter
    skipped (a non-zero filter mask), which a plain ``encoded=`` append could not reproduce."""
    chunks = []
    for i in range(rows.start, rows.stop):
        mask, data = ds.id.read_direct_chunk((i, 0, 0, 0))
        if mask != 0:
            return None
        chunks.append(data)
    return chunks


def merge_patch_files(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    compression: str | None = "gzip",
    compression_level: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Concatenate patch files (e.g. the shards of ``extract-patches --shard i/n``) into ``out``.

    ``out`` must not be one of the inputs, and an existing ``out`` is replaced only with ``overwrite`` (it stays until
    the merged file is complete). The output is locked (:func:`dagan_gn.locks.output_lock`) while it is written.

    Checks that every input has the same format version, patch size, channels, split names, synthetic flag and
    provenance columns, that they were pseudonymised with the same salt (``salt_fingerprint`` attribute, when
    present) and that no source image appears in two inputs (overlapping shards). Differing class tables are unified
    (first-seen order) and labels remapped. Streams ``batch_size`` patches at a time, so memory stays flat.

    ``compression_level`` None keeps the first input's gzip level (4 when it has none). Patches whose input has the
    output's filters (the usual case: shards of one extraction) are copied as compressed chunks, neither decoded nor
    re-encoded; others are decoded and compressed again."""
    from dagan_gn.fileio import printable_path
    from dagan_gn.locks import output_lock

    if not inputs:
        raise StoreError("merge needs at least one input file")
    real_out = os.path.realpath(out)
    if real_out in {os.path.realpath(p) for p in inputs}:
        raise StoreError(f"--out {printable_path(out)} is also an input; choose another path")
    if Path(out).is_dir():
        raise StoreError(f"--out {printable_path(out)} is a folder; give the path of the .h5 file to write")
    with output_lock(out, what="merge-patches"):
        if Path(out).exists() and not overwrite:
            raise StoreError(f"{printable_path(out)} already exists; pass --overwrite to replace it")
        return _merge_locked(inputs, out, batch_size, compression, compression_level)


def _merge_locked(inputs, out, batch_size, compression, compression_level) -> Path:
    files: list[PatchFile] = []
    try:
        for p in inputs:  # inside the try: a malformed input closes the ones opened before it
            files.append(PatchFile(p))
        first = files[0]
        specs = first.provenance_specs()
        fingerprint = first.attrs.get("salt_fingerprint")
        for pf in files[1:]:
            for what, a, b in (
                ("format version", first.format_version, pf.format_version),
                ("patch size", first.patch_size, pf.patch_size),
                ("channels", first.channels, pf.channels),
                ("split names", first.split_names, pf.split_names),
                ("synthetic flag", first.synthetic, pf.synthetic),
                ("provenance columns", specs, pf.provenance_specs()),
            ):
                if a != b:
                    raise StoreError(f"cannot merge {pf.path} into {first.path}: {what} differs ({b} vs {a})")
            if pf.attrs.get("salt_fingerprint") != fingerprint:
                raise StoreError(
                    f"cannot merge {pf.path} and {first.path}: they were pseudonymised with different salts, so the "
                    "same patient would get two pseudonyms (and could land in two splits)"
                )
        class_names: list[str] = []
        for pf in files:
            for c in pf.class_names:
                if c not in class_names:
                    class_names.append(c)
        seen_sources: dict[str, Path] = {}
        for pf in files:
            for s in pf.sources:
                if s in seen_sources:
                    raise StoreError(
                        f"source image {s} is in both {seen_sources[s].name} and {pf.path.name}: overlapping shards?"
                    )
                seen_sources[s] = pf.path
        params = dict(first.parameters)
        params.pop("shard", None)
        params["merged_from"] = [Path(p).name for p in inputs]
        extra_attrs = {k: v for k, v in first.attrs.items() if k not in _RESERVED_ATTRS}
        if compression_level is None:
            first_encoding = _chunk_encoding(first.patches)
            compression_level = first_encoding[1] if first_encoding and first_encoding[0] == "gzip" else 4
        writer = PatchWriter(out, patch_size=first.patch_size, class_names=class_names, provenance=specs,
                             parameters=params, attrs=extra_attrs, synthetic=first.synthetic, channels=first.channels,
                             split_names=first.split_names, compression=compression,
                             compression_level=compression_level, overwrite_partial=True)
        with writer:
            for pf in files:
                remap = np.asarray([class_names.index(c) for c in pf.class_names], dtype=np.int64)
                offset = writer.num_sources
                sources = pf.sources
                writer.add_sources(list(sources))
                encoding = _chunk_encoding(pf.patches)
                copy_chunks = encoding is not None and encoding == writer.chunk_encoding
                for start in range(0, len(pf), batch_size):
                    rows = slice(start, min(start + batch_size, len(pf)))
                    prov = {name: pf.provenance(name, rows) for name in specs}
                    if "source_index" in prov and len(sources):
                        prov["source_index"] = prov["source_index"] + offset
                    labels, split = remap[pf.labels[rows]], pf.split[rows]
                    chunks = _read_raw_chunks(pf.patches, rows) if copy_chunks else None
                    if chunks is not None:
                        writer.append(None, labels, split, prov, encoded=chunks)
                    else:
                        writer.append(pf.patches[rows], labels, split, prov)
                writer.commit()
        return Path(out)
    finally:
        for pf in files:
            pf.close()
