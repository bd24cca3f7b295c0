"""Notes encrypted at rest: AES-GCM tokens bound to their row, a 0600 key file, rotation."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest

from imeisync.adapters.data_crypto import (
    DataCipher,
    is_encrypted,
    key_id_of,
    rotate_key_file,
)
from imeisync.domain.errors import BadInput, Refused

NOTE = "Owner Wanjiku M., +254 700 000 000, phone taken on matatu route 46"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "var" / "data.key"


@pytest.fixture
def cipher(key_file: Path) -> DataCipher:
    return DataCipher.from_key_file(key_file)


def test_note_round_trips_through_encryption(cipher: DataCipher) -> None:
    token = cipher.encrypt(NOTE, context="record:17")

    assert NOTE not in token and "Wanjiku" not in token
    assert cipher.decrypt(token, context="record:17") == NOTE


def test_unicode_and_empty_notes_round_trip(cipher: DataCipher) -> None:
    for note in ["", "Mzee Jomo — «imeibiwa» 📱", "line\nbreak"]:
        assert cipher.decrypt(cipher.encrypt(note, context="c"), context="c") == note


def test_token_names_version_key_id_nonce_and_ciphertext(cipher: DataCipher) -> None:
    token = cipher.encrypt(NOTE, context="record:17")

    version, key_id, nonce, _sealed = token.split(".")
    assert version == "v1"
    assert key_id == cipher.key_id and len(key_id) == 8
    assert len(base64.urlsafe_b64decode(nonce + "==")) == 12
    assert is_encrypted(token) and not is_encrypted(NOTE)


def test_the_same_note_encrypts_differently_each_time(cipher: DataCipher) -> None:
    assert cipher.encrypt(NOTE, context="c") != cipher.encrypt(NOTE, context="c")


def test_note_moved_to_another_row_does_not_decrypt(cipher: DataCipher) -> None:
    token = cipher.encrypt(NOTE, context="record:17")

    with pytest.raises(BadInput, match=r"^note cannot be decrypted: .*another record") as excinfo:
        cipher.decrypt(token, context="record:18")
    assert excinfo.value.code == "undecryptable_note"


@pytest.mark.parametrize("position", [0, 5, -1])
def test_tampered_ciphertext_is_refused(cipher: DataCipher, position: int) -> None:
    version, key_id, nonce, sealed = cipher.encrypt(NOTE, context="c").split(".")
    raw = bytearray(base64.urlsafe_b64decode(sealed + "=="))
    raw[position] ^= 0x01
    tampered = ".".join(
        [version, key_id, nonce, base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()]
    )

    with pytest.raises(BadInput, match=r"^note cannot be decrypted: it was altered"):
        cipher.decrypt(tampered, context="c")


def test_tampered_nonce_is_refused(cipher: DataCipher) -> None:
    version, key_id, _nonce, sealed = cipher.encrypt(NOTE, context="c").split(".")
    other_nonce = base64.urlsafe_b64encode(bytes(12)).rstrip(b"=").decode()

    with pytest.raises(BadInput, match="note cannot be decrypted"):
        cipher.decrypt(".".join([version, key_id, other_nonce, sealed]), context="c")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "plain text note",
        "v2.abcdef01.AAAA.AAAA",
        "v1.abcdef01.AAAA",
        "v1.x.y.z.w",
        "v1.abcdef01.!!!!.AAAA",
        "v1.abcdef01.AAAAAAAAAAAAAAAA.AAAA",
    ],
)
def test_malformed_tokens_are_bad_input(cipher: DataCipher, token: str) -> None:
    with pytest.raises(BadInput, match=r"^note cannot be decrypted: "):
        cipher.decrypt(token, context="c")


def test_truncated_token_is_bad_input(cipher: DataCipher) -> None:
    token = cipher.encrypt(NOTE, context="c")

    with pytest.raises(BadInput, match="note cannot be decrypted"):
        cipher.decrypt(token[:-10], context="c")


def test_token_from_an_unknown_key_names_the_key_id(tmp_path: Path, cipher: DataCipher) -> None:
    other = DataCipher.from_key_file(tmp_path / "other.key")
    token = other.encrypt(NOTE, context="c")

    with pytest.raises(BadInput, match=f"encrypted with key '{other.key_id}'"):
        cipher.decrypt(token, context="c")


def test_empty_context_is_refused(cipher: DataCipher) -> None:
    with pytest.raises(BadInput, match="needs a context"):
        cipher.encrypt(NOTE, context="")


# --------------------------------------------------------------------------- the key file


def test_key_file_is_created_0600_with_one_base64_256_bit_key(key_file: Path) -> None:
    old_umask = os.umask(0)  # a careless umask must not widen it
    try:
        cipher = DataCipher.from_key_file(key_file)
    finally:
        os.umask(old_umask)

    assert mode_of(key_file) == 0o600
    lines = key_file.read_text().splitlines()
    assert len(lines) == 1
    key = base64.b64decode(lines[0], validate=True)
    assert len(key) == 32
    assert cipher.key_id == hashlib.sha256(key).hexdigest()[:8] == key_id_of(key)


def test_key_file_creation_leaves_no_temporary_files(key_file: Path) -> None:
    DataCipher.from_key_file(key_file)

    assert [p.name for p in key_file.parent.iterdir()] == ["data.key"]


def test_existing_key_file_is_reused_not_replaced(key_file: Path) -> None:
    token = DataCipher.from_key_file(key_file).encrypt(NOTE, context="c")
    content = key_file.read_bytes()

    again = DataCipher.from_key_file(key_file)

    assert key_file.read_bytes() == content
    assert again.decrypt(token, context="c") == NOTE


def test_missing_key_file_without_create_is_bad_input(key_file: Path) -> None:
    with pytest.raises(BadInput, match=r"data key file .*data\.key does not exist"):
        DataCipher.from_key_file(key_file, create=False)

    assert not key_file.exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_file_readable_by_group_or_others_is_refused_with_chmod_hint(
    key_file: Path, mode: int
) -> None:
    DataCipher.from_key_file(key_file)
    key_file.chmod(mode)

    with pytest.raises(Refused, match=f"chmod 600 {key_file}") as excinfo:
        DataCipher.from_key_file(key_file)
    assert f"mode {mode:04o}" in str(excinfo.value)


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("not base64 at all!\n", "line 1 is not base64"),
        (base64.b64encode(bytes(16)).decode() + "\n", "line 1 holds 16 bytes"),
        ("\n# only a comment\n", "it holds no key"),
    ],
)
def test_corrupt_key_file_is_bad_input_naming_the_file(
    key_file: Path, content: str, detail: str
) -> None:
    key_file.parent.mkdir(parents=True)
    key_file.write_text(content)
    key_file.chmod(0o600)

    with pytest.raises(BadInput, match=rf"data key file .*data\.key is corrupt: {detail}"):
        DataCipher.from_key_file(key_file)


def test_binary_key_file_is_bad_input(key_file: Path) -> None:
    key_file.parent.mkdir(parents=True)
    key_file.write_bytes(b"\xff\x00" * 16)
    key_file.chmod(0o600)

    with pytest.raises(BadInput, match="is corrupt: it is not ASCII"):
        DataCipher.from_key_file(key_file)


def test_key_file_that_is_a_directory_is_bad_input(key_file: Path) -> None:
    key_file.mkdir(parents=True)

    with pytest.raises(BadInput, match="not a regular file"):
        DataCipher.from_key_file(key_file)


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_old_notes_readable_and_encrypts_new_ones_with_the_new_key(
    key_file: Path,
) -> None:
    old = DataCipher.from_key_file(key_file)
    old_token = old.encrypt(NOTE, context="record:1")
    new_key = os.urandom(32)
    key_file.write_text(base64.b64encode(new_key).decode() + "\n" + key_file.read_text())

    rotated = DataCipher.from_key_file(key_file)

    assert rotated.key_id == key_id_of(new_key) != old.key_id
    assert rotated.key_ids == [rotated.key_id, old.key_id]
    assert rotated.decrypt(old_token, context="record:1") == NOTE
    new_token = rotated.encrypt("after rotation", context="record:2")
    assert new_token.split(".")[1] == key_id_of(new_key)
    assert rotated.decrypt(new_token, context="record:2") == "after rotation"


def test_rotate_key_file_prepends_a_new_key_and_keeps_0600(key_file: Path) -> None:
    old = DataCipher.from_key_file(key_file)
    old_token = old.encrypt(NOTE, context="c")

    new_id = rotate_key_file(key_file)

    assert mode_of(key_file) == 0o600
    assert len(key_file.read_text().splitlines()) == 2
    rotated = DataCipher.from_key_file(key_file)
    assert rotated.key_id == new_id != old.key_id
    assert rotated.decrypt(old_token, context="c") == NOTE


def test_comments_and_blank_lines_in_the_key_file_are_ignored(key_file: Path) -> None:
    key = os.urandom(32)
    key_file.parent.mkdir(parents=True)
    key_file.write_text(f"# rotated 2024-05-01\n\n{base64.b64encode(key).decode()}\n")
    key_file.chmod(0o600)

    assert DataCipher.from_key_file(key_file).key_id == key_id_of(key)


def test_cipher_without_keys_is_bad_input() -> None:
    with pytest.raises(BadInput, match="no data key"):
        DataCipher([])


def test_a_digest_is_keyed_by_the_data_key_and_its_purpose() -> None:
    import hashlib

    from imeisync.adapters.data_crypto import DataCipher

    one, other = DataCipher([bytes(32)]), DataCipher([bytes(range(32))])
    imsi = "238010123456789"
    digest = one.digest(imsi, purpose="sighting-imsi")
    assert digest == one.digest(imsi, purpose="sighting-imsi")  # stable: it serves the dedupe
    assert digest != other.digest(imsi, purpose="sighting-imsi")  # useless without the key
    assert digest != one.digest(imsi, purpose="another")
    assert digest != one.digest("238010123456780", purpose="sighting-imsi")
    assert digest not in (hashlib.sha256(imsi.encode()).hexdigest(),
                          hashlib.sha256(bytes(32) + imsi.encode()).hexdigest())
    assert imsi not in digest and len(digest) == 64
