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

Modules: ``format`` (layout constants, column specs, :class:`StoreError`), ``codecs`` (the uint16 scale, chunk
encoding), ``writer`` (:class:`PatchWriter`), ``reader`` (:class:`PatchFile`), ``merge`` (:func:`merge_patch_files`).
Import the public names from here.
"""

from __future__ import annotations

from dagan_gn.store.patch_file.codecs import encode_patch_chunks, to_uint16, uint16_to_signed, uint16_to_unit
from dagan_gn.store.patch_file.format import (
    EXTRACTION_PROVENANCE,
    FORMAT_VERSION,
    SPLIT_NAMES,
    ColumnSpec,
    StoreError,
    partial_path,
)
from dagan_gn.store.patch_file.merge import merge_patch_files
from dagan_gn.store.patch_file.reader import PatchFile, synthetic_pairing_problem
from dagan_gn.store.patch_file.writer import PatchWriter

__all__ = [
    "FORMAT_VERSION",
    "SPLIT_NAMES",
    "EXTRACTION_PROVENANCE",
    "ColumnSpec",
    "StoreError",
    "PatchWriter",
    "PatchFile",
    "synthetic_pairing_problem",
    "merge_patch_files",
    "encode_patch_chunks",
    "partial_path",
    "to_uint16",
    "uint16_to_unit",
    "uint16_to_signed",
]
