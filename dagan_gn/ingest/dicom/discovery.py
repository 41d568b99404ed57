"""Finding the DICOM files of an archive: folders searched recursively (links followed once), files with or without
``.dcm``, hidden files and DICOMDIR skipped, broken or looping links reported."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pydicom

from dagan_gn.fileio import printable_path


_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# Names that are DICOM but never an image of a study: DICOMDIR is the media directory of a CD/DVD export.
_SKIP_NAMES = {"DICOMDIR"}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _looks_like_dicom(path: Path) -> bool:
    if path.name in _SKIP_NAMES:
        return False
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True  # named DICOM: keep it even if broken, so the job reports it instead of ignoring it
    try:
        return pydicom.misc.is_dicom(path)
    except OSError:
        return False


@dataclass
class DicomSearch:
    """What :func:`find_dicom_files` found under the inputs.

    ``files``: the DICOM files, sorted by path, each real file once. ``unreadable``: ``(path, reason)`` of entries named
    like DICOM (or without a suffix) that cannot be opened at all: broken (dangling) or looping symbolic links; a job
    reports each as a skipped file. ``notes``: ``(path, note)`` of what was deliberately not taken twice: a file
    reached again through a symbolic or hard link, a folder link that leads back into a folder already searched.
    """

    files: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[tuple[Path, str]] = field(default_factory=list)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be followed (dangling or looping), or None when it can."""
    try:
        os.stat(path)
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself); nothing to read"
        try:
            target = printable_path(os.readlink(path))
        except OSError:
            target = "?"
        return f"broken symbolic link: its target {target} does not exist"


def find_dicom_files(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> DicomSearch:
    """The DICOM files under ``inputs``, and the entries that could not be taken (see :class:`DicomSearch`).

    Folders are searched recursively, following symbolic links to folders (each folder is searched once, so a link
    that loops back is noted and not followed again); files given in ``inputs`` are always kept. A file counts when
    its name ends in ``.dcm``/``.dicom``/``.dic`` (kept even when broken, so the extraction job can report it) or when
    it carries the DICOM "DICM" preamble whatever its name. Hidden files and folders (leading dot) and DICOMDIR
    indexes are skipped. The same file reached by two paths (links) is listed once, under its path without links
    when it has one, else the first in sorted order.

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    search = DicomSearch()
    candidates: dict[Path, tuple[int, int]] = {}
    unreadable: dict[Path, str] = {}
    searched: set[tuple[int, int]] = set()
    for item in inputs:
        root = Path(item)
        if root.is_file():
            candidates[root] = _identity(root.stat())
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"input not found: {printable_path(root)}")
        if _identity(root.stat()) in searched:
            continue
        searched.add(_identity(root.stat()))
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            kept = []
            for d in sorted(dirnames):
                if _is_hidden(d):
                    continue
                sub = Path(dirpath) / d
                try:
                    ident = _identity(sub.stat())
                except OSError:
                    continue  # vanished while searching
                if ident in searched:
                    search.notes.append(
                        (sub, "folder link leads into a folder already searched (a loop or a second path); "
                              "not searched again"))
                    continue
                searched.add(ident)
                kept.append(d)
            dirnames[:] = kept
            for name in filenames:
                if _is_hidden(name):
                    continue
                candidate = Path(dirpath) / name
                if candidate.is_symlink():
                    problem = _link_problem(candidate)
                    if problem is not None:
                        suffix = candidate.suffix.lower()
                        if (suffix in _DICOM_SUFFIXES or not suffix) and name not in _SKIP_NAMES:
                            unreadable[candidate] = problem
                        continue
                if candidate.is_file() and _looks_like_dicom(candidate):
                    candidates[candidate] = _identity(candidate.stat())
    first_path: dict[tuple[int, int], Path] = {}
    # Of several paths to one file, keep the one without links (then the first in sorted order): deterministic, and
    # the key of a file does not change when someone adds a link to it.
    for path in sorted(candidates, key=lambda p: (os.path.realpath(p) != os.path.abspath(p), p.as_posix())):
        ident = candidates[path]
        if ident in first_path:
            search.notes.append((path, f"same file as {printable_path(first_path[ident])} (reached through a link); "
                                       "read once"))
            continue
        first_path[ident] = path
        search.files.append(path)
    search.files.sort(key=lambda p: p.as_posix())
    search.unreadable = sorted(unreadable.items(), key=lambda kv: kv[0].as_posix())
    search.notes.sort(key=lambda kv: kv[0].as_posix())
    return search


def list_dicom_files(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """The DICOM files under ``inputs``, sorted: :attr:`DicomSearch.files` of :func:`find_dicom_files` (which also
    says what could not be taken).

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    return find_dicom_files(inputs).files
