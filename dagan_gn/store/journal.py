"""Crash-safe storage under an HDF5 file that is being written: a page overlay and a redo journal.

HDF5 updates its metadata (chunk B-trees, object headers, the superblock) in place and keeps no journal, so a process
that dies, or a write that fails with ``ENOSPC``/``EIO``, in the middle of a flush can leave a file whose index points
at chunks that never reached the disk. A resumed writer that trusts such a file writes patches that read back as
zeros (issue 13: black patches with valid labels) or crashes on a damaged B-tree. :class:`JournaledFile` is the file
object h5py's ``fileobj`` driver writes through, and makes "committed" mean durable and intact:

- The bytes of the file as it was at the last commit are never overwritten between commits: a write below the
  committed length goes to an in-memory page overlay; a write past it (new chunks, appended metadata) goes straight to
  the file, where nothing committed can be hurt.
- :meth:`JournaledFile.commit` fsyncs the file (the appended bytes), writes the overlay pages and the new length to
  ``<path>.journal.tmp``, fsyncs it and renames it onto ``<path>.journal`` — that rename is the commit point — then
  copies the pages into the file (made durable by the next commit's first fsync, or :meth:`JournaledFile.sync`;
  until then the journal can replay them).
- Opening an existing file (``create=False``) first replays its journal (replaying twice is harmless) and cuts the file
  back to the committed length, so after a kill at any instant the file is, byte for byte, the last committed one.
- A failed OS write never reaches HDF5 (a failed write inside the library leaves it in a state that crashes the
  interpreter when it exits): the bytes are kept in memory, :attr:`JournaledFile.error` is set, and
  :meth:`JournaledFile.commit` raises it, so nothing after the failure can be committed.

The cost is a few fsyncs per commit and the overlay pages (the partly filled chunks of the small per-row datasets and
the metadata HDF5 rewrites), typically well under a megabyte per commit.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from pathlib import Path

from dagan_gn.fileio import fsync_dir

__all__ = ["PAGE_SIZE", "JournaledFile", "JournalError", "journal_path"]

PAGE_SIZE = 4096
_MAGIC = b"dagan-gn journal 1\n"
_HEADER = struct.Struct("<QQ")  # committed length, number of pages
_PAGE_NO = struct.Struct("<Q")


class JournalError(OSError):
    """The journal beside a file is missing (the file was never committed) or damaged."""


def journal_path(path: str | os.PathLike) -> Path:
    """The redo journal of ``path``: ``<path>.journal``."""
    return Path(str(path) + ".journal")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        if written <= 0:  # pragma: no cover - pwrite raises rather than return 0 on a full disk
            raise OSError(errno.EIO, "short write")
        data, offset = data[written:], offset + written


class JournaledFile:
    """A file-like object for ``h5py.File(JournaledFile(path), mode)`` (see the module docstring).

    Args:
        path: the file (the writer's ``.partial`` file).
        create: start an empty file (removing any journal); otherwise recover an existing one from its journal.

    Raises:
        JournalError: another process is writing the file (``EBUSY``); ``create=False`` and the file has no journal
            (it was never committed: ``ENOENT``) or a damaged one (``EIO``).
        OSError: the file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool) -> None:
        self.path = Path(path)
        self.journal = journal_path(self.path)
        self.error: OSError | None = None
        self._pages: dict[int, bytearray] = {}
        self._pos = 0
        self._fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            self._lock()
            if create:  # emptied only once it is ours: another writer's file is never cut under it
                os.ftruncate(self._fd, 0)
                self.journal.unlink(missing_ok=True)
                committed = 0
            else:
                committed = self._recover()
        except BaseException:
            os.close(self._fd)
            raise
        self._set_committed(committed)

    def _lock(self) -> None:
        """One writer per file, as HDF5's own file locking would ensure (h5py's fileobj driver has none)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise JournalError(errno.EBUSY, "being written by another process", str(self.path)) from exc
        except OSError as exc:  # a filesystem without locks (some network mounts): carry on, as HDF5 can be told to
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    # ------------------------------------------------------------------ commit / recovery
    def _set_committed(self, length: int) -> None:
        self._committed = length
        self._length = length
        # Pages that hold committed bytes are copy-on-write; everything from here on is new.
        self._cow_limit = -(-length // PAGE_SIZE) * PAGE_SIZE
        self._pages.clear()

    def _recover(self) -> int:
        Path(str(self.journal) + ".tmp").unlink(missing_ok=True)
        if not self.journal.is_file():
            raise JournalError(errno.ENOENT, "never committed (no journal)", str(self.journal))
        data = self.journal.read_bytes()
        body, digest = data[:-32], data[-32:]
        if not body.startswith(_MAGIC) or hashlib.sha256(body).digest() != digest:
            raise JournalError(errno.EIO, "damaged journal", str(self.journal))
        length, n_pages = _HEADER.unpack_from(body, len(_MAGIC))
        self._apply(length, self._parse_pages(body, n_pages), sync=True)
        return length

    @staticmethod
    def _parse_pages(body: bytes, n_pages: int) -> list[tuple[int, bytes]]:
        pages, at = [], len(_MAGIC) + _HEADER.size
        for _ in range(n_pages):
            (page_no,) = _PAGE_NO.unpack_from(body, at)
            at += _PAGE_NO.size
            pages.append((page_no, body[at : at + PAGE_SIZE]))
            at += PAGE_SIZE
        return pages

    def _apply(self, length: int, pages: list[tuple[int, bytes]], *, sync: bool) -> None:
        for page_no, page in pages:
            start = page_no * PAGE_SIZE
            _pwrite_all(self._fd, memoryview(page)[: max(0, min(PAGE_SIZE, length - start))], start)
        os.ftruncate(self._fd, length)
        if sync:
            os.fsync(self._fd)

    def commit(self) -> None:
        """Make the current content durable; after a kill the file reopens exactly as it is now.

        Raises the first failed write of this session (nothing after it is committed), or the error of the commit
        itself; the last commit stays intact in both cases."""
        if self.error is not None:
            raise self.error
        os.fsync(self._fd)  # appended chunks reach the disk before the journal says they are committed
        pages = sorted(p for p in self._pages if p * PAGE_SIZE < self._length)
        parts = [_MAGIC, _HEADER.pack(self._length, len(pages))]
        for p in pages:
            parts += [_PAGE_NO.pack(p), bytes(self._pages[p])]
        body = b"".join(parts)
        tmp = Path(str(self.journal) + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _pwrite_all(fd, memoryview(body + hashlib.sha256(body).digest()), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.journal)  # the commit point
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)  # the rename is durable before any committed byte is overwritten
        # No fsync after copying the pages in: until the next commit's first fsync, the journal can replay them.
        self._apply(self._length, [(p, self._pages[p]) for p in pages], sync=False)
        self._set_committed(self._length)

    def sync(self) -> None:
        """fsync the file itself (before it is renamed and its journal removed)."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close without committing: whatever was written since the last commit is dropped on the next open."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pages.clear()

    def discard_journal(self) -> None:
        """Remove the journal (once the file is complete and renamed, or abandoned)."""
        self.journal.unlink(missing_ok=True)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # ------------------------------------------------------------------ the file-object protocol h5py uses
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = int(offset)
        elif whence == os.SEEK_CUR:
            self._pos += int(offset)
        else:
            self._pos = self._length + int(offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        """Nothing to do: durability is :meth:`commit`'s job."""

    def _page(self, page_no: int) -> bytearray:
        page = self._pages.get(page_no)
        if page is None:
            page = bytearray(PAGE_SIZE)
            start = page_no * PAGE_SIZE
            have = max(0, min(PAGE_SIZE, self._length - start))
            if have:
                got = os.preadv(self._fd, [memoryview(page)[:have]], start)
                page[got:have] = bytes(have - got)
            self._pages[page_no] = page
        return page

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        n, pos, off = len(mv), self._pos, 0
        while off < n:
            at = pos + off
            page_no = at // PAGE_SIZE
            if self.error is None and at >= self._cow_limit and page_no not in self._pages:
                try:
                    _pwrite_all(self._fd, mv[off:], at)
                    off = n
                    break
                except OSError as exc:
                    # Keep HDF5 consistent in memory (it must never see a failed write); commit() reports it.
                    self.error = OSError(exc.errno, exc.strerror, str(self.path))
                    continue
            page = self._page(page_no)
            start = at - page_no * PAGE_SIZE
            k = min(PAGE_SIZE - start, n - off)
            page[start : start + k] = mv[off : off + k]
            off += k
        self._pos = pos + n
        self._length = max(self._length, self._pos)
        return n

    def readinto(self, buffer) -> int:
        mv = memoryview(buffer).cast("B")
        n, pos = len(mv), self._pos
        avail = max(0, min(n, self._length - pos))
        mv[avail:] = bytes(n - avail)
        off = 0
        while off < avail:
            at = pos + off
            page_no = at // PAGE_SIZE
            page = self._pages.get(page_no)
            if page is not None:
                start = at - page_no * PAGE_SIZE
                k = min(PAGE_SIZE - start, avail - off)
                mv[off : off + k] = page[start : start + k]
                off += k
                continue
            last = (pos + avail - 1) // PAGE_SIZE
            q = page_no + 1
            while q <= last and q not in self._pages:
                q += 1
            stop = min(avail, q * PAGE_SIZE - pos)
            got = os.preadv(self._fd, [mv[off:stop]], at)
            mv[off + got : stop] = bytes(stop - off - got)  # a hole past the end of the disk file reads as zeros
            off = stop
        self._pos = pos + n
        return n

    def read(self, size: int = -1) -> bytes:
        size = max(0, self._length - self._pos) if size is None or size < 0 else size
        buf = bytearray(size)
        self.readinto(buf)
        return bytes(buf)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else int(size)
        self._length = size
        for p in [p for p in self._pages if p * PAGE_SIZE >= size]:
            del self._pages[p]
        page = self._pages.get(size // PAGE_SIZE)
        if page is not None:
            start = size % PAGE_SIZE
            page[start:] = bytes(PAGE_SIZE - start)
        if size >= self._committed and self.error is None:
            try:
                # Only the uncommitted tail changes; a cut into committed bytes waits for commit().
                os.ftruncate(self._fd, max(size, self._cow_limit))
            except OSError as exc:
                self.error = OSError(exc.errno, exc.strerror, str(self.path))
        return size
