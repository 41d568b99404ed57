"""Joining patch files (the shards of ``extract-patches --shard``): :func:`merge_patch_files`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from dagan_gn.store.patch_file.codecs import _chunk_encoding
from dagan_gn.store.patch_file.format import _RESERVED_ATTRS, StoreError
from dagan_gn.store.patch_file.reader import PatchFile
from dagan_gn.store.patch_file.writer import PatchWriter

__all__ = ["merge_patch_files"]


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
