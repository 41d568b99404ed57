"""dagan_gn.ingest.privacy: salt handling, pseudonyms, patient-level split."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from dagan_gn.ingest.dicom import canonical_patient_id
from dagan_gn.ingest.privacy import (
    SPLIT_NAMES,
    Pseudonymizer,
    assign_split,
    load_or_create_salt,
    parse_split_fractions,
    split_uniform,
)


def test_salt_file_is_created_once_private_and_reused(tmp_path):
    path = tmp_path / "sub" / "patches.h5.salt"
    salt = load_or_create_salt(path, None)
    assert isinstance(salt, bytes) and len(salt) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_salt(path, None) == salt
    assert load_or_create_salt(tmp_path / "other.salt", None) != salt
    assert [p.name for p in path.parent.iterdir()] == ["patches.h5.salt"]  # no temporary left behind


def test_concurrent_creators_agree_on_one_salt(tmp_path):
    path = tmp_path / "shared.salt"
    with ThreadPoolExecutor(8) as pool:
        salts = list(pool.map(lambda _: load_or_create_salt(path, None), range(16)))
    assert len(set(salts)) == 1 and salts[0] == load_or_create_salt(path, None)


def test_user_salt_wins_and_writes_nothing(tmp_path):
    path = tmp_path / "x.salt"
    assert load_or_create_salt(path, "my secret") == b"my secret"
    assert not path.exists()
    assert load_or_create_salt(None, "my secret") == b"my secret"


@pytest.mark.parametrize("content, message", [("", "empty"), ("not hex!", "hex")])
def test_bad_salt_file(tmp_path, content, message):
    path = tmp_path / "bad.salt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_or_create_salt(path, None)
    assert str(path) in str(info.value)


def test_salt_is_required():
    with pytest.raises(ValueError):
        load_or_create_salt(None, None)
    with pytest.raises(ValueError):
        load_or_create_salt(None, "   ")
    with pytest.raises(ValueError):
        Pseudonymizer(b"")


def test_pseudonyms_are_stable_salted_and_typed():
    p = Pseudonymizer(b"salt-1")
    patient = p.pseudonym("patient", "12345")
    assert re.fullmatch(r"P-[0-9a-f]{16}", patient)
    assert re.fullmatch(r"I-[0-9a-f]{16}", p.pseudonym("image", "1.2.3.4"))
    assert p.pseudonym("study", "1.2").startswith("S-") and p.pseudonym("custom", "x").startswith("C-")
    assert Pseudonymizer(b"salt-1").pseudonym("patient", "12345") == patient  # stable across instances
    assert p.pseudonym("patient", " 12345 ") == patient  # DICOM padding does not matter
    assert Pseudonymizer(b"salt-2").pseudonym("patient", "12345") != patient
    assert p.pseudonym("patient", "12346") != patient
    assert p.pseudonym("image", "12345")[2:] != patient[2:]  # the kind is part of the hash
    assert "12345" not in patient and "salt" not in repr(p).replace("salt=<hidden>", "")


def test_split_is_deterministic_and_depends_only_on_pseudonym_and_seed():
    ids = [Pseudonymizer(b"s").pseudonym("patient", str(i)) for i in range(200)]
    first = [assign_split(i, (0.8, 0.1, 0.1), seed=0) for i in ids]
    assert first == [assign_split(i, (0.8, 0.1, 0.1), seed=0) for i in ids]
    assert set(first) <= set(SPLIT_NAMES)
    other_seed = [assign_split(i, (0.8, 0.1, 0.1), seed=1) for i in ids]
    assert other_seed != first
    assert all(0.0 <= split_uniform(i, 3) < 1.0 for i in ids)


def test_split_fractions_are_respected_over_1000_patients():
    p = Pseudonymizer(b"fractions")
    counts = Counter(assign_split(p.pseudonym("patient", f"PAT{i:05d}"), (0.7, 0.2, 0.1), seed=5) for i in range(1000))
    assert abs(counts["train"] / 1000 - 0.7) < 0.05
    assert abs(counts["val"] / 1000 - 0.2) < 0.04
    assert abs(counts["test"] / 1000 - 0.1) < 0.04
    only_train = {assign_split(p.pseudonym("patient", str(i)), (1.0, 0.0, 0.0)) for i in range(100)}
    assert only_train == {"train"}
    no_test = {assign_split(p.pseudonym("patient", str(i)), (0.9, 0.1)) for i in range(300)}
    assert no_test == {"train", "val"}


def test_split_is_patient_level_for_per_image_patient_ids():
    """CBIS-DDSM puts side and view into PatientID: all four images of a patient must share one split."""
    p = Pseudonymizer(b"cbis")
    for patient in range(50):
        raw_ids = [f"Mass-Test_P_{patient:05d}_{side}_{view}" for side in ("LEFT", "RIGHT") for view in ("CC", "MLO")]
        raw_ids.append(f"Calc-Training_P_{patient:05d}_LEFT_CC_1")
        pseudonyms = {p.pseudonym("patient", canonical_patient_id(r)) for r in raw_ids}
        assert len(pseudonyms) == 1
        assert len({assign_split(s, seed=2) for s in pseudonyms}) == 1


def test_assign_split_rejects_bad_fractions():
    for bad in [(0.5, 0.6, 0.1), (-0.1, 0.6, 0.5), (1.0,), (0.25, 0.25, 0.25, 0.25)]:
        with pytest.raises(ValueError):
            assign_split("P-0", bad)


def test_parse_split_fractions():
    assert parse_split_fractions("0.8,0.1,0.1") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_split_fractions(" 0.9 , 0.1 ") == pytest.approx((0.9, 0.1, 0.0))
    for text, words in [
        ("a,b,c", "numbers"),
        ("0.5,0.6,0.1", "sum to 1"),
        ("-0.2,0.6,0.6", "non-negative"),
        ("1", "2 or 3"),
        ("80,10,10", "sum to 1"),
    ]:
        with pytest.raises(ValueError, match=words) as info:
            parse_split_fractions(text)
        assert repr(text) in str(info.value)


def test_a_non_utf8_file_name_is_pseudonymised_by_its_bytes():
    """A Latin-1 export's file name (Python holds the odd byte as a surrogate escape) must not raise, and hashes as
    the bytes on disk; UTF-8 text hashes exactly as before."""
    p = Pseudonymizer(b"salt")
    name = os.fsdecode(b"dicom/caf\xe9.dcm")
    expected = hmac.new(b"salt", b"source\x00dicom/caf\xe9.dcm", hashlib.sha256).hexdigest()[:16]
    assert p.pseudonym("source", name) == f"S-{expected}" == p.pseudonym("source", os.fsencode(name))
    utf8 = hmac.new(b"salt", "patient\x00Müller".encode("utf-8"), hashlib.sha256).hexdigest()[:16]
    assert p.pseudonym("patient", " Müller ") == f"P-{utf8}" == p.pseudonym("patient", "Müller".encode("utf-8"))
