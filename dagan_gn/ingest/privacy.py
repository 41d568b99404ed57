"""Salted pseudonyms for patient and image identifiers, and the patient-level train/val/test split.

* The salt is a secret kept by the operator, never inside an output: given by the user (``--salt``) or generated once
  with :func:`secrets.token_bytes` into a salt file (mode 0600). The same salt gives the same pseudonyms, so runs,
  resumed runs and shards of one archive agree; without the salt a pseudonym cannot be linked back to an identifier
  by hashing candidate IDs.
* :class:`Pseudonymizer` maps ``(kind, value)`` to ``"<P|I|S|...>-" + 16 hex digits`` of HMAC-SHA256.
* :func:`salt_fingerprint` is the one-way fingerprint of the salt that patch files store, so a resume or a merge can
  check that every part used the same salt.
* :func:`assign_split` is a pure function of the patient pseudonym and the seed, so every image of a patient lands in
  the same split, and independent shards (``--shard i/n``) agree without talking to each other.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Sequence

__all__ = [
    "SPLIT_NAMES",
    "load_or_create_salt",
    "Pseudonymizer",
    "assign_split",
    "parse_split_fractions",
    "salt_fingerprint",
    "split_uniform",
    "text_bytes",
]

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")

_SALT_BYTES = 32
_PREFIXES = {"patient": "P", "image": "I", "study": "S", "series": "E", "accession": "A"}
_HEX_DIGITS = 16  # 64 bits: no collision among millions of images in practice


def load_or_create_salt(path: str | os.PathLike | None, salt: str | None = None) -> bytes:
    """The secret salt for pseudonyms.

    Args:
        path: salt file; read when it exists, else created once with 32 random bytes (hex, mode 0600). Creation is
            atomic and race-free, so concurrent shards pointed at one file all end up with the same salt.
        salt: a salt given by the user; it wins over ``path`` and nothing is written.

    Raises:
        ValueError: neither is given, the given salt is empty, or the salt file is empty or unreadable as hex.
    """
    if salt is not None:
        if not salt.strip():
            raise ValueError("the salt must not be empty")
        return salt.encode("utf-8")
    if path is None:
        raise ValueError("a salt or a salt file is needed for pseudonyms")
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_bytes(_SALT_BYTES).hex() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails if another process created it first: then we use theirs
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    text = path.read_text().strip()
    if not text:
        raise ValueError(f"{path}: salt file is empty")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: salt file must hold hex digits (as written by dagan), got something else") from None


class Pseudonymizer:
    """Stable, salted pseudonyms: ``pseudonym("patient", "12345") -> "P-3f9c0a1b2d4e5f60"``.

    The kind is part of the hashed message, so the same value under two kinds gives unrelated pseudonyms. Values are
    stripped of surrounding spaces (DICOM pads strings).
    """

    def __init__(self, salt: bytes):
        if not isinstance(salt, (bytes, bytearray)) or not salt:
            raise ValueError("Pseudonymizer needs a non-empty bytes salt (see load_or_create_salt)")
        self._salt = bytes(salt)

    def __repr__(self) -> str:  # never show the salt
        return "Pseudonymizer(salt=<hidden>)"

    def pseudonym(self, kind: str, value: str | bytes) -> str:
        """``"<prefix>-" + 16 hex`` digits of HMAC-SHA256(salt, kind + NUL + value); prefix P (patient), I (image),
        S (study), E (series), A (accession), else the first letter of ``kind`` in upper case.

        ``value`` is hashed as its UTF-8 bytes; a file name that is not valid UTF-8 (a Latin-1 export: Python holds
        its odd bytes as surrogate escapes) is hashed as its bytes on disk, i.e. ``os.fsencode(name)``."""
        kind = kind.strip().lower()
        if not kind:
            raise ValueError("pseudonym kind must not be empty")
        value = value.strip() if isinstance(value, (bytes, bytearray)) else str(value).strip()  # DICOM pads
        message = kind.encode("utf-8") + b"\x00" + text_bytes(value)
        digest = hmac.new(self._salt, message, hashlib.sha256).hexdigest()[:_HEX_DIGITS]
        return f"{_PREFIXES.get(kind, kind[0].upper())}-{digest}"


def salt_fingerprint(salt: bytes) -> str:
    """A one-way fingerprint of the salt, stored in the HDF5 so resume/merge can check that every part used the
    same salt (the salt itself never goes into the file)."""
    return hashlib.sha256(b"dagan-gn salt fingerprint\x00" + salt).hexdigest()[:16]


def text_bytes(value: str | bytes | object) -> bytes:
    """The bytes to hash for ``value``: bytes as given, anything else as UTF-8 of ``str(value)`` with surrogate
    escapes turned back into the bytes they stand for, so a non-UTF-8 file name hashes as ``os.fsencode(name)`` and
    never raises (UTF-8 text gives exactly its UTF-8 encoding)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return str(value).encode("utf-8", "surrogateescape")


def split_uniform(patient_pseudonym: str, seed: int = 0) -> float:
    """A number in [0, 1) that depends only on the pseudonym and the seed (SHA-256, first 64 bits)."""
    digest = hashlib.sha256(f"split\x00{int(seed)}\x00{patient_pseudonym}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = [float(f) for f in fractions]
    if len(values) == 2:
        values.append(0.0)
    if len(values) != 3:
        raise ValueError(f"split needs 2 or 3 fractions (train,val[,test]), got {len(values)}")
    if any(not (v >= 0.0) for v in values):  # also catches NaN
        raise ValueError(f"split fractions must be non-negative, got {fractions}")
    total = sum(values)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total:g} from {fractions}")
    return values[0], values[1], values[2]


def assign_split(patient_pseudonym: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> str:
    """'train', 'val' or 'test' for a patient: a deterministic function of the pseudonym and ``seed`` only."""
    train, val, _ = _check_fractions(fractions)
    u = split_uniform(patient_pseudonym, seed)
    if u < train:
        return SPLIT_NAMES[0]
    if u < train + val:
        return SPLIT_NAMES[1]
    return SPLIT_NAMES[2]


def parse_split_fractions(text: str) -> tuple[float, float, float]:
    """Parse ``"0.8,0.1,0.1"`` (train,val,test) or ``"0.9,0.1"`` (no test split); the fractions must sum to 1.

    Raises:
        ValueError: naming the text and what is wrong with it.
    """
    parts = [p.strip() for p in str(text).replace(";", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split {text!r}: expected 2 or 3 comma-separated numbers like 0.8,0.1,0.1") from None
    try:
        return _check_fractions(values)
    except ValueError as exc:
        raise ValueError(f"--split {text!r}: {exc}") from None
