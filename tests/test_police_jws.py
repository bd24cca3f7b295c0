"""Police orders as signed JWS: what is accepted, and how everything else is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import OKPKey

from imeisync.adapters.keys import generate_keypair, load_private_key
from imeisync.adapters.police_jws import (
    MAX_TOKEN_BYTES,
    ORDER_TYP,
    TrustedKeys,
    VerifiedOrder,
    sign_order,
    verify_order,
)
from imeisync.domain.errors import BadInput, Refused

ORDER: dict[str, Any] = {
    "order_id": "KE-NRB-2024-0001",
    "kind": "block",
    "imei": "490154203237518",
    "case_ref": "OB/123/2024",
    "police_unit": "Nairobi Central",
    "reason": "stolen",
    "issued_at": "2024-05-01T10:00:00Z",
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64url(json.dumps(value).encode())


@pytest.fixture
def police(tmp_path: Path) -> dict[str, Path]:
    """A police authority key pair 'police-ke-1' whose public half is trusted."""
    private_dir = tmp_path / "police-private"
    trusted_dir = tmp_path / "trusted"
    private_path, public_path = generate_keypair("police-ke-1", private_dir)
    trusted_dir.mkdir()
    (trusted_dir / "police-ke-1.pub").write_bytes(public_path.read_bytes())
    return {"key": private_path, "pub": public_path, "trusted": trusted_dir}


@pytest.fixture
def trusted(police: dict[str, Path]) -> TrustedKeys:
    return TrustedKeys.load(police["trusted"])


def craft(header: dict[str, Any], payload: bytes, private_key_path: Path) -> str:
    """A compact JWS signed with raw Ed25519 over exactly the given header and payload bytes."""
    signing_input = f"{b64json(header)}.{b64url(payload)}"
    signature = load_private_key(private_key_path).sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64url(signature)}"


def reason(excinfo: pytest.ExceptionInfo[Exception]) -> str | None:
    return getattr(excinfo.value, "code", None)


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("alg", ["Ed25519", "EdDSA"])
def test_signed_order_verifies_with_both_accepted_algorithms(
    police: dict[str, Path], trusted: TrustedKeys, alg: str
) -> None:
    token = sign_order(ORDER, police["key"], "police-ke-1", alg=alg)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # accepting EdDSA deliberately: no SecurityWarning noise
        verified = verify_order(token, trusted)

    assert verified == VerifiedOrder(kid="police-ke-1", alg=alg, payload=ORDER)


def test_signed_order_header_names_alg_kid_and_order_type(police: dict[str, Path]) -> None:
    token = sign_order(ORDER, police["key"], "police-ke-1")

    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "Ed25519", "kid": "police-ke-1", "typ": ORDER_TYP}


def test_order_signed_by_another_jose_library_without_typ_is_accepted(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    key = OKPKey.import_key(police["key"].read_bytes())
    token = jws.serialize_compact(
        {"alg": "Ed25519", "kid": "police-ke-1"}, json.dumps(ORDER), key, algorithms=["Ed25519"]
    )

    assert verify_order(token, trusted).payload == ORDER


def test_token_read_from_a_file_with_a_trailing_newline_is_accepted(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    token = sign_order(ORDER, police["key"], "police-ke-1") + "\n"

    assert verify_order(token, trusted).payload == ORDER
    assert verify_order(token.encode("ascii"), trusted).payload == ORDER


def test_payload_fields_are_not_validated_here(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    token = sign_order({"anything": ["goes", 1]}, police["key"], "police-ke-1")

    assert verify_order(token, trusted).payload == {"anything": ["goes", 1]}


# --------------------------------------------------------------------------- algorithms


def test_alg_none_token_is_refused_as_unsupported_algorithm(trusted: TrustedKeys) -> None:
    token = f"{b64json({'alg': 'none', 'kid': 'police-ke-1'})}.{b64json(ORDER)}."

    with pytest.raises(Refused, match="alg 'none'; only 'Ed25519' or 'EdDSA'") as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "unsupported_alg"


def test_alg_none_token_with_a_dummy_signature_is_refused(trusted: TrustedKeys) -> None:
    token = f"{b64json({'alg': 'none', 'kid': 'police-ke-1'})}.{b64json(ORDER)}.{b64url(b'x')}"

    with pytest.raises(Refused) as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "unsupported_alg"


def test_hs256_token_keyed_with_the_police_public_key_is_refused(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    # The classic algorithm-confusion attack: the public key PEM used as the HMAC secret.
    secret = police["pub"].read_bytes()
    signing_input = f"{b64json({'alg': 'HS256', 'kid': 'police-ke-1'})}.{b64json(ORDER)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(mac)}"

    with pytest.raises(Refused, match="alg 'HS256'") as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "unsupported_alg"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "HS512", "Ed448", "eddsa", ""])
def test_every_other_algorithm_is_refused(
    police: dict[str, Path], trusted: TrustedKeys, alg: str
) -> None:
    token = craft({"alg": alg, "kid": "police-ke-1"}, json.dumps(ORDER).encode(), police["key"])

    with pytest.raises(Refused) as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "unsupported_alg"
    assert "'Ed25519' or 'EdDSA'" in str(excinfo.value)


@pytest.mark.parametrize("header", [{"kid": "police-ke-1"}, {"alg": 1, "kid": "police-ke-1"}])
def test_missing_or_non_string_alg_is_refused(
    police: dict[str, Path], trusted: TrustedKeys, header: dict[str, Any]
) -> None:
    token = craft(header, json.dumps(ORDER).encode(), police["key"])

    with pytest.raises(Refused) as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "unsupported_alg"


# --------------------------------------------------------------------------- keys


def test_order_signed_with_an_unknown_kid_names_the_kid_and_the_directory(
    tmp_path: Path, trusted: TrustedKeys
) -> None:
    stranger, _ = generate_keypair("police-xx-9", tmp_path / "stranger")
    token = sign_order(ORDER, stranger, "police-xx-9")

    with pytest.raises(Refused) as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "unknown_kid"
    assert str(excinfo.value) == (
        f"the order is signed with key 'police-xx-9', which is not among the trusted police "
        f"keys in {trusted.directory} — ask the police authority for its public key or check "
        "the kid"
    )


def test_order_signed_with_another_key_under_a_trusted_kid_is_a_bad_signature(
    tmp_path: Path, trusted: TrustedKeys
) -> None:
    impostor, _ = generate_keypair("impostor", tmp_path / "impostor")
    token = sign_order(ORDER, impostor, "police-ke-1")  # wrong key, trusted kid

    with pytest.raises(Refused, match="the police signature does not verify") as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "bad_signature"


def test_order_without_kid_is_refused(police: dict[str, Path], trusted: TrustedKeys) -> None:
    token = craft({"alg": "Ed25519"}, json.dumps(ORDER).encode(), police["key"])

    with pytest.raises(Refused, match="names no key") as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "unknown_kid"


def test_embedded_jwk_header_cannot_choose_the_verifying_key(
    tmp_path: Path, trusted: TrustedKeys
) -> None:
    attacker, _ = generate_keypair("attacker", tmp_path / "attacker")
    jwk = OKPKey.import_key(load_private_key(attacker).public_key()).as_dict()
    token = craft(
        {"alg": "Ed25519", "kid": "police-ke-1", "jwk": jwk}, json.dumps(ORDER).encode(), attacker
    )

    with pytest.raises(Refused) as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "bad_signature"


# --------------------------------------------------------------------------- tampering


def test_payload_altered_after_signing_is_a_bad_signature(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    header, _, signature = sign_order(ORDER, police["key"], "police-ke-1").split(".")
    altered = b64json({**ORDER, "kind": "lift", "reason": "recovered"})

    with pytest.raises(Refused, match="altered or signed with another key") as excinfo:
        verify_order(f"{header}.{altered}.{signature}", trusted)
    assert reason(excinfo) == "bad_signature"


def test_header_altered_after_signing_is_a_bad_signature(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    _, payload, signature = sign_order(ORDER, police["key"], "police-ke-1").split(".")
    header = b64json({"alg": "EdDSA", "kid": "police-ke-1"})

    with pytest.raises(Refused) as excinfo:
        verify_order(f"{header}.{payload}.{signature}", trusted)
    assert reason(excinfo) == "bad_signature"


def test_flipped_signature_bit_is_a_bad_signature(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    header, payload, signature = sign_order(ORDER, police["key"], "police-ke-1").split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[0] ^= 1

    with pytest.raises(Refused) as excinfo:
        verify_order(f"{header}.{payload}.{b64url(bytes(raw))}", trusted)
    assert reason(excinfo) == "bad_signature"


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("cut", [10, 60, 120, -1, -5, -40])
def test_truncated_token_is_not_a_jws_compact_serialisation(
    police: dict[str, Path], trusted: TrustedKeys, cut: int
) -> None:
    token = sign_order(ORDER, police["key"], "police-ke-1")

    with pytest.raises(BadInput, match=r"^not a JWS compact serialisation") as excinfo:
        verify_order(token[:cut], trusted)
    assert reason(excinfo) == "malformed_jws"


@pytest.mark.parametrize(
    "token",
    ["", "   ", "abc", "a.b", "a.b.c.d", "a..c", ".b.c", "a.b.", "a+b.c.d", "a.b=.c", "a b.c.d"],
)
def test_strings_that_are_not_three_base64url_parts_are_bad_input(
    trusted: TrustedKeys, token: str
) -> None:
    with pytest.raises(BadInput, match=r"^not a JWS compact serialisation") as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "malformed_jws"


def test_header_that_is_not_json_is_bad_input(trusted: TrustedKeys) -> None:
    token = f"{b64url(b'alg=Ed25519')}.{b64json(ORDER)}.{b64url(bytes(64))}"

    with pytest.raises(BadInput, match="header is not valid JSON") as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "malformed_jws"


@pytest.mark.parametrize("header", [["Ed25519"], "Ed25519", 7, None])
def test_header_that_is_not_a_json_object_is_bad_input(trusted: TrustedKeys, header: Any) -> None:
    token = f"{b64json(header)}.{b64json(ORDER)}.{b64url(bytes(64))}"

    with pytest.raises(BadInput, match=r"header is .*, not a JSON object"):
        verify_order(token, trusted)


def test_header_with_a_duplicate_alg_is_bad_input(trusted: TrustedKeys) -> None:
    header = b'{"alg":"HS256","kid":"police-ke-1","alg":"Ed25519"}'
    token = f"{b64url(header)}.{b64json(ORDER)}.{b64url(bytes(64))}"

    with pytest.raises(BadInput, match="duplicate key 'alg'"):
        verify_order(token, trusted)


def test_payload_that_is_not_json_is_bad_input_even_when_signed(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    token = craft({"alg": "Ed25519", "kid": "police-ke-1"}, b"block 490154203237518", police["key"])

    with pytest.raises(BadInput, match="payload is not a JSON object: it is not valid JSON") as ei:
        verify_order(token, trusted)
    assert reason(ei) == "malformed_payload"


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"order"', b"null", b"\xff\xfe"])
def test_payload_that_is_not_a_json_object_is_bad_input(
    police: dict[str, Path], trusted: TrustedKeys, payload: bytes
) -> None:
    token = craft({"alg": "Ed25519", "kid": "police-ke-1"}, payload, police["key"])

    with pytest.raises(BadInput) as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "malformed_payload"


def test_payload_with_a_duplicate_order_id_is_bad_input(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    payload = b'{"order_id":"A","kind":"block","order_id":"B"}'
    token = craft({"alg": "Ed25519", "kid": "police-ke-1"}, payload, police["key"])

    with pytest.raises(BadInput, match="duplicate key 'order_id'"):
        verify_order(token, trusted)


def test_unsigned_payload_garbage_is_checked_for_signature_before_parsing(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    header, _, signature = sign_order(ORDER, police["key"], "police-ke-1").split(".")

    with pytest.raises(Refused) as excinfo:
        verify_order(f"{header}.{b64url(b'not json')}.{signature}", trusted)
    assert reason(excinfo) == "bad_signature"


def test_ten_megabyte_token_is_refused_before_parsing(trusted: TrustedKeys) -> None:
    token = f"{b64json({'alg': 'Ed25519', 'kid': 'police-ke-1'})}.{'A' * 10_000_000}.AAAA"

    with pytest.raises(BadInput, match=f"over the {MAX_TOKEN_BYTES}-byte limit") as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "malformed_jws"
    with pytest.raises(BadInput, match="over the"):
        verify_order(token.encode("ascii"), trusted)


def test_token_that_is_not_ascii_is_bad_input(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    token = sign_order(ORDER, police["key"], "police-ke-1")
    header, payload, signature = token.split(".")
    non_ascii = f"{header}.{payload}é.{signature}"

    with pytest.raises(BadInput, match="not ASCII") as excinfo:
        verify_order(non_ascii, trusted)
    assert reason(excinfo) == "malformed_jws"
    with pytest.raises(BadInput, match="not ASCII"):
        verify_order(non_ascii.encode("utf-8"), trusted)
    with pytest.raises(BadInput, match="not ASCII"):
        verify_order(token.encode("utf-16"), trusted)


def test_token_that_is_not_text_is_bad_input(trusted: TrustedKeys) -> None:
    with pytest.raises(BadInput, match="expected text"):
        verify_order(12345, trusted)  # type: ignore[arg-type]


def test_crit_header_extension_is_bad_input(police: dict[str, Path], trusted: TrustedKeys) -> None:
    header = {"alg": "Ed25519", "kid": "police-ke-1", "crit": ["exp"], "exp": 1}
    token = craft(header, json.dumps(ORDER).encode(), police["key"])

    with pytest.raises(BadInput, match="'crit'"):
        verify_order(token, trusted)


def test_unencoded_payload_extension_is_bad_input(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    header = {"alg": "Ed25519", "kid": "police-ke-1", "b64": False, "crit": ["b64"]}
    token = craft(header, json.dumps(ORDER).encode(), police["key"])

    with pytest.raises(BadInput) as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "malformed_jws"


def test_token_typed_as_a_jwt_is_not_accepted_as_an_order(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    token = craft(
        {"alg": "Ed25519", "kid": "police-ke-1", "typ": "JWT"},
        json.dumps(ORDER).encode(),
        police["key"],
    )

    with pytest.raises(BadInput, match="typ 'JWT' says it is not an imeisync order"):
        verify_order(token, trusted)


def test_unknown_header_parameters_are_ignored(
    police: dict[str, Path], trusted: TrustedKeys
) -> None:
    header = {"alg": "Ed25519", "kid": "police-ke-1", "x-police-tool": "v2"}
    token = craft(header, json.dumps(ORDER).encode(), police["key"])

    assert verify_order(token, trusted).payload == ORDER


# --------------------------------------------------------------------------- signing input


def test_signing_refuses_an_algorithm_other_than_ed25519(police: dict[str, Path]) -> None:
    with pytest.raises(BadInput, match="cannot sign with algorithm 'HS256'"):
        sign_order(ORDER, police["key"], "police-ke-1", alg="HS256")


def test_signing_refuses_a_payload_that_is_not_an_object(police: dict[str, Path]) -> None:
    with pytest.raises(BadInput, match="must be a JSON object, not an array"):
        sign_order([ORDER], police["key"], "police-ke-1")  # type: ignore[arg-type]


def test_signing_refuses_values_json_cannot_hold(police: dict[str, Path]) -> None:
    with pytest.raises(BadInput, match="cannot be written as JSON"):
        sign_order({"at": object()}, police["key"], "police-ke-1")


def test_signing_with_a_public_key_file_is_bad_input(police: dict[str, Path]) -> None:
    with pytest.raises(BadInput, match="holds a public key"):
        sign_order(ORDER, police["pub"], "police-ke-1")


# --------------------------------------------------------------------------- trusted keys


def test_trusted_keys_are_named_by_their_file_names(tmp_path: Path) -> None:
    generate_keypair("police-a", tmp_path)
    generate_keypair("police-b", tmp_path)
    (tmp_path / "README.txt").write_text("not a key")

    trusted = TrustedKeys.load(tmp_path)

    assert trusted.kids == ["police-a", "police-b"]
    assert "police-a" in trusted and len(trusted) == 2


def test_missing_trusted_keys_directory_is_bad_input_naming_it(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"directory .*nowhere does not exist"):
        TrustedKeys.load(tmp_path / "nowhere")


def test_trusted_keys_path_that_is_a_file_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")

    with pytest.raises(BadInput, match="is not a directory"):
        TrustedKeys.load(tmp_path / "file")


def test_bad_trusted_key_file_is_bad_input_naming_the_file(tmp_path: Path) -> None:
    generate_keypair("good", tmp_path)
    (tmp_path / "broken.pub").write_text("-----BEGIN PUBLIC KEY-----\nnope\n")

    with pytest.raises(BadInput, match=r"broken\.pub is not a PEM public key"):
        TrustedKeys.load(tmp_path)


def test_empty_trusted_directory_says_it_holds_no_keys(
    police: dict[str, Path], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    token = sign_order(ORDER, police["key"], "police-ke-1")

    with pytest.raises(Refused, match="the directory holds none"):
        verify_order(token, TrustedKeys.load(empty))


def test_reload_picks_up_a_new_key_file(tmp_path: Path, trusted: TrustedKeys) -> None:
    newcomer, public_path = generate_keypair("police-ug-1", tmp_path / "newcomer")
    token = sign_order(ORDER, newcomer, "police-ug-1")
    with pytest.raises(Refused):
        verify_order(token, trusted)

    (trusted.directory / "police-ug-1.pub").write_bytes(public_path.read_bytes())
    trusted.reload()

    assert verify_order(token, trusted).kid == "police-ug-1"


def test_reload_drops_a_removed_key(police: dict[str, Path], trusted: TrustedKeys) -> None:
    token = sign_order(ORDER, police["key"], "police-ke-1")
    (trusted.directory / "police-ke-1.pub").unlink()

    trusted.reload()

    with pytest.raises(Refused) as excinfo:
        verify_order(token, trusted)
    assert reason(excinfo) == "unknown_kid"


def test_failed_reload_keeps_the_old_keys(police: dict[str, Path], trusted: TrustedKeys) -> None:
    token = sign_order(ORDER, police["key"], "police-ke-1")
    (trusted.directory / "broken.pub").write_text("garbage")

    with pytest.raises(BadInput, match=r"broken\.pub"):
        trusted.reload()

    assert verify_order(token, trusted).kid == "police-ke-1"
