"""Ed25519 key pairs as PEM files (imeisync keygen / police keygen)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from imeisync.adapters.keys import (
    generate_keypair,
    load_private_key,
    load_public_key,
    validate_kid,
)
from imeisync.domain.errors import BadInput, Refused


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_round_trip_signs_and_verifies(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair("op-ke-01", tmp_path)

    assert private_path == tmp_path / "op-ke-01.key"
    assert public_path == tmp_path / "op-ke-01.pub"
    private_key = load_private_key(private_path)
    public_key = load_public_key(public_path)
    public_key.verify(private_key.sign(b"hello"), b"hello")  # raises if they do not match


def test_keygen_writes_pkcs8_private_and_spki_public_pem(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair("k", tmp_path)

    assert private_path.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert public_path.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")


def test_keygen_private_key_is_0600_and_public_key_0644(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)  # even a strict umask must not narrow the public key
    try:
        private_path, public_path = generate_keypair("k", tmp_path)
    finally:
        os.umask(old_umask)

    assert mode_of(private_path) == 0o600
    assert mode_of(public_path) == 0o644


def test_keygen_creates_missing_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "var" / "keys"

    private_path, _ = generate_keypair("k", out)

    assert private_path.parent == out and private_path.exists()


def test_keygen_refuses_to_overwrite_an_existing_key_pair(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair("k", tmp_path)
    before = private_path.read_bytes(), public_path.read_bytes()

    with pytest.raises(Refused, match="already exists"):
        generate_keypair("k", tmp_path)

    assert (private_path.read_bytes(), public_path.read_bytes()) == before


def test_keygen_refuses_when_only_the_public_file_exists_and_writes_nothing(
    tmp_path: Path,
) -> None:
    (tmp_path / "k.pub").write_text("someone else's key")

    with pytest.raises(Refused, match=r"k\.pub already exists"):
        generate_keypair("k", tmp_path)

    assert not (tmp_path / "k.key").exists()


@pytest.mark.parametrize("kid", ["", "../evil", "a/b", ".hidden", "-dash", "x" * 65, "sp ace"])
def test_keygen_rejects_a_kid_that_is_not_a_safe_file_name(tmp_path: Path, kid: str) -> None:
    with pytest.raises(BadInput, match=r"key id .* is not valid"):
        generate_keypair(kid, tmp_path)

    assert list(tmp_path.iterdir()) == []


def test_kid_with_letters_digits_dots_dashes_and_underscores_is_valid() -> None:
    assert validate_kid("Police.KE_01-a") == "Police.KE_01-a"
    assert validate_kid("x" * 64) == "x" * 64


def test_loading_a_missing_key_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pub"

    with pytest.raises(BadInput, match=r"nope\.pub does not exist"):
        load_public_key(missing)
    with pytest.raises(BadInput, match=r"nope\.pub does not exist"):
        load_private_key(missing)


def test_loading_a_directory_as_a_key_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="is a directory"):
        load_public_key(tmp_path)


def test_loading_a_file_that_is_not_pem_names_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("hello, I am not a key\n")

    with pytest.raises(BadInput, match=r"junk\.pub is not a PEM public key"):
        load_public_key(junk)
    with pytest.raises(BadInput, match=r"junk\.pub is not a PEM private key"):
        load_private_key(junk)


def test_loading_a_binary_file_is_bad_input(tmp_path: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_bytes(bytes(range(256)))

    with pytest.raises(BadInput, match="not a PEM private key"):
        load_private_key(junk)


def test_loading_an_rsa_key_says_it_is_not_ed25519(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.pub"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    with pytest.raises(BadInput, match=r"rsa\.pub is an RSA key, not Ed25519"):
        load_public_key(path)


def test_loading_an_ec_private_key_says_it_is_not_ed25519(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(BadInput, match=r"ec\.key is an EC \(ECDSA\) key, not Ed25519"):
        load_private_key(path)


def test_loading_an_encrypted_private_key_asks_for_an_unencrypted_one(tmp_path: Path) -> None:
    private_path, _ = generate_keypair("k", tmp_path)
    key = load_private_key(private_path)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )

    with pytest.raises(BadInput, match=r"enc\.key is encrypted"):
        load_private_key(encrypted)


def test_swapped_public_and_private_files_are_named_as_such(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair("k", tmp_path)

    with pytest.raises(BadInput, match="holds a public key, not a private key"):
        load_private_key(public_path)
    with pytest.raises(BadInput, match="holds a private key where a public key is expected"):
        load_public_key(private_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_loading_an_unreadable_key_file_is_bad_input(tmp_path: Path) -> None:
    private_path, _ = generate_keypair("k", tmp_path)
    private_path.chmod(0)

    with pytest.raises(BadInput, match=r"cannot read private key file .*k\.key"):
        load_private_key(private_path)


def test_loading_a_key_whose_path_runs_through_a_file_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")

    with pytest.raises(BadInput, match="cannot read public key file"):
        load_public_key(tmp_path / "plain" / "k.pub")
