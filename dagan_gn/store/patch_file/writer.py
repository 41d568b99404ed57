"""The patch-file writer: :class:`PatchWriter` (append, commit, resume, finalize; see the package docstring)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

import dagan_gn
from dagan_gn.fileio import fsync_dir
from dagan_gn.store.journal import JournaledFile, JournalError, journal_path
from dagan_gn.store.patch_file.codecs import _chunk_encoding
from dagan_gn.store.patch_file.format import (
    _RESERVED_ATTRS,
    _STR_DTYPE,
    EXTRACTION_PROVENANCE,
    FORMAT_VERSION,
    SPLIT_NAMES,
    ColumnSpec,
    StoreError,
    _attr_value,
    _brief,
    _column_dtype,
    _decode_attr,
    _encode_strings,
    _io_failure,
    _is_str,
    _spec_of_dataset,
    partial_path,
)

__all__ = ["PatchWriter"]

#: Rows verified per block when a writer resumes (bounds the memory of the check).
_VERIFY_BLOCK = 4096

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
