"""IMEI identity: what a person may type, what a network may send, and the 14-digit key."""

from __future__ import annotations

import dataclasses
import doctest

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import imeisync.domain.imei
from imeisync.domain.errors import BadInput
from imeisync.domain.imei import (
    Imei,
    InvalidChecksum,
    InvalidFormat,
    InvalidImei,
    InvalidLength,
    compact,
    format,
    int_to_key,
    is_valid_typed,
    key_of_network,
    key_of_typed,
    key_to_int,
    luhn_check_digit,
    parse_network,
    parse_typed,
)

keys = st.text(alphabet="0123456789", min_size=14, max_size=14)


def with_check_digit(key: str) -> str:
    return key + luhn_check_digit(key)


# --- the DOMAIN.md vectors -------------------------------------------------------------------


@pytest.mark.parametrize(("key", "check_digit"), [("49015420323751", "8"), ("35209900176148", "1")])
def test_luhn_check_digit_matches_the_domain_vectors(key, check_digit):
    assert luhn_check_digit(key) == check_digit


@pytest.mark.parametrize("text", ["490154203237518", "352099001761481", "354178036859789"])
def test_typed_imei_with_right_check_digit_is_valid(text):
    imei = parse_typed(text)
    assert imei.key == text[:14]
    assert imei.check_digit == text[14]
    assert imei.svn is None
    assert imei.full == str(imei) == text
    assert is_valid_typed(text)


def test_typed_imei_354178036859781_is_refused_for_its_check_digit():
    with pytest.raises(InvalidChecksum):
        parse_typed("354178036859781")
    assert not is_valid_typed("354178036859781")


def test_16_digit_imeisv_from_the_network_keys_on_its_first_14_digits():
    imei = parse_network("3568680000414120")
    assert imei == Imei("35686800004141", None, "20")
    assert imei.tac == "35686800"
    assert imei.snr == "004141"
    assert imei.full == "356868000041418"


def test_16_digit_imeisv_typed_by_a_person_is_refused_as_not_the_imei():
    with pytest.raises(InvalidLength) as caught:
        parse_typed("3568680000414120")
    message = str(caught.value)
    assert "16 digits" in message
    assert "IMEISV" in message
    assert "no check digit" in message
    assert "15-digit IMEI" in message


def test_3gpp_example_fails_luhn_when_typed_but_the_network_form_is_accepted():
    with pytest.raises(InvalidChecksum):
        parse_typed("012345678901234")
    imei = parse_network("imei-012345678901234")
    assert imei.key == "01234567890123"
    assert imei.check_digit == "4"  # kept as sent, not validated
    assert imei.full == "012345678901237"  # always the computed check digit


# --- separators and leading zeros ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "35-209900-176148-1",
        "35 209900 176148 1",
        "35.209900.176148.1",
        "35/209900/176148/1",
        "352099-00176148/1",
        " 352099001761481 ",
    ],
)
def test_typed_imei_may_carry_spaces_dashes_dots_and_slashes(text):
    assert parse_typed(text).key == "35209900176148"
    assert key_of_typed(text) == "35209900176148"


def test_compact_removes_only_spaces_dashes_dots_and_slashes():
    assert compact("35-209900 176148.1/") == "352099001761481"
    assert compact("35\t20_99–00") == "35\t20_99–00"


def test_network_identity_with_separators_is_refused():
    with pytest.raises(InvalidFormat):
        parse_network("35-209900-176148-1")


def test_leading_zeros_survive_parsing_formatting_and_the_integer_index():
    text = with_check_digit("01234567890123")
    imei = parse_typed(text)
    assert imei.key == "01234567890123"
    assert imei.tac == "01234567"
    assert format(imei) == "01-234567-890123-7"
    assert int_to_key(key_to_int(imei.key)) == "01234567890123"
    assert key_to_int("00000000000000") == 0
    assert int_to_key(0) == "00000000000000"


@given(keys)
def test_key_to_int_round_trips_every_key(key):
    assert int_to_key(key_to_int(key)) == key


@pytest.mark.parametrize("n", [-1, 10**14])
def test_int_outside_the_key_range_is_refused(n):
    with pytest.raises(ValueError):
        int_to_key(n)


@pytest.mark.parametrize("key", ["1234567890123", "123456789012345", "1234567890123x", ""])
def test_key_to_int_refuses_anything_but_14_ascii_digits(key):
    with pytest.raises(InvalidImei):
        key_to_int(key)


def test_format_splits_tac_serial_and_check_digit_like_stdnum():
    assert format("352099001761481") == "35-209900-176148-1"
    assert format("35 209900 176148 1", separator=" ") == "35 209900 176148 1"
    assert format(parse_network("imeisv-3568680000414120")) == "35-686800-004141-8"


def test_format_of_a_bad_typed_imei_is_refused():
    with pytest.raises(InvalidChecksum):
        format("352099001761488")


# --- what a person may not type --------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "- / ."])
def test_empty_typed_imei_says_it_is_empty(text):
    with pytest.raises(InvalidFormat) as caught:
        parse_typed(text)
    assert caught.value.message == "IMEI is empty"
    assert caught.value.code == "imei_empty"


def test_typed_imei_with_14_digits_asks_for_all_15_including_the_check_digit():
    with pytest.raises(InvalidLength) as caught:
        parse_typed("35209900176148")
    assert caught.value.message == (
        "IMEI 35209900176148 has 14 digits; a police order needs all 15, including the check digit"
    )
    assert caught.value.hint  # says where to find the number
    assert caught.value.code == "imei_length"


def test_typed_imei_with_17_digits_is_refused_for_its_length():
    with pytest.raises(InvalidLength, match="17 digits"):
        parse_typed("35209900176148123")


def test_typed_imei_with_wrong_check_digit_names_got_and_expected():
    with pytest.raises(InvalidChecksum) as caught:
        parse_typed("35-209900-176148-8")
    error = caught.value
    assert error.message == "IMEI 352099001761488: check digit is 8, expected 1"
    assert "mistyped" in str(error)
    assert error.code == "imei_checksum"


@pytest.mark.parametrize(
    ("text", "named", "position"),
    [
        ("35209900176148A", "'A' (LATIN CAPITAL LETTER A)", 15),
        ("35 20990017614x1", "'x' (LATIN SMALL LETTER X)", 15),  # counted as typed, space included
        ("O52099001761481", "'O' (LATIN CAPITAL LETTER O)", 1),
        ("35209900176148\u0661", "ARABIC-INDIC DIGIT ONE", 15),
        ("\u0663\u0665209900176148\u0661", "ARABIC-INDIC DIGIT THREE", 1),
        ("\uff13\uff15209900176148\uff11", "FULLWIDTH DIGIT THREE", 1),
        ("3520990017614\x008", "NUL", 14),
        ("352099001761481\n", "LINE FEED", 16),
        ("35\u2013209900\u2013176148\u20131", "EN DASH", 3),
    ],
)
def test_typed_imei_with_a_non_digit_names_the_character_and_its_position(text, named, position):
    with pytest.raises(InvalidFormat) as caught:
        parse_typed(text)
    message = caught.value.message
    assert named in message
    assert f"at position {position};" in message
    assert caught.value.hint
    assert caught.value.code == "imei_format"


def test_unicode_digits_are_refused_although_str_isdigit_accepts_them():
    arabic_indic = "".join(chr(0x0660 + int(d)) for d in "352099001761481")
    full_width = "".join(chr(0xFF10 + int(d)) for d in "352099001761481")
    for text in (arabic_indic, full_width):
        assert text.isdigit()
        with pytest.raises(InvalidFormat, match=r"U\+"):
            parse_typed(text)
        with pytest.raises(InvalidFormat):
            parse_network(text)
        assert not is_valid_typed(text)


def test_typed_imei_with_the_network_prefix_is_told_to_drop_it():
    with pytest.raises(InvalidFormat) as caught:
        parse_typed("imei-352099001761481")
    assert "prefix" in caught.value.hint


@pytest.mark.parametrize("filler", ["1", "a", "\x00", "\u0661"])
def test_10_kb_typed_input_is_refused_with_a_short_message(filler):
    text = filler * 10_240
    with pytest.raises(InvalidImei) as caught:
        parse_typed(text)
    assert len(str(caught.value)) < 250
    assert "10240 characters" in caught.value.message
    assert "…" in caught.value.message


def test_10_kb_network_input_is_refused_with_a_short_message():
    for text in ("1" * 10_240, "imei-" + "a" * 10_240):
        with pytest.raises(InvalidImei) as caught:
            parse_network(text)
        assert len(str(caught.value)) < 250


def test_imei_errors_are_bad_input():
    for cls in (InvalidFormat, InvalidLength, InvalidChecksum):
        assert issubclass(cls, InvalidImei)
    assert issubclass(InvalidImei, BadInput)
    assert InvalidImei("x").exit_code == 2


# --- what a network may send -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("35209900176148", Imei("35209900176148")),
        ("352099001761481", Imei("35209900176148", "1")),
        ("352099001761480", Imei("35209900176148", "0")),  # spare digit: not validated
        ("3520990017614812", Imei("35209900176148", None, "12")),
        ("imei-35209900176148", Imei("35209900176148")),
        ("imei-352099001761489", Imei("35209900176148", "9")),
        ("imeisv-3520990017614812", Imei("35209900176148", None, "12")),
    ],
)
def test_network_identity_is_bare_or_prefixed_and_keys_on_14_digits(text, expected):
    assert parse_network(text) == expected
    assert key_of_network(text) == "35209900176148"


@pytest.mark.parametrize(
    "text",
    [
        "3520990017614",
        "35209900176148123",
        "imei-3520990017614",
        "imei-3520990017614812",  # 16 digits need imeisv-
        "imeisv-35209900176148",
        "imeisv-352099001761481",
        "imeisv-35209900176148123",
    ],
)
def test_network_identity_with_wrong_digit_count_for_its_prefix_is_refused(text):
    with pytest.raises(InvalidLength):
        parse_network(text)
    with pytest.raises(InvalidLength):
        key_of_network(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "imei-",
        "imeisv-",
        "IMEI-352099001761481",
        "imei-35209900176148\x00",
        "imei-35209900176148\u0661",
        " 352099001761481",
        "35209900176148x",
        "mac-00-11-22-33-44-55",
    ],
)
def test_network_identity_that_is_not_digits_is_refused_as_format(text):
    with pytest.raises(InvalidFormat):
        parse_network(text)
    with pytest.raises(InvalidFormat):
        key_of_network(text)


def test_non_imei_pei_is_named_for_what_it_is():
    with pytest.raises(InvalidFormat) as caught:
        parse_network("mac-00-11-22-33-44-55")
    assert caught.value.code == "pei_not_imei"
    assert "mac-" in caught.value.message


@given(keys, st.text(alphabet="0123456789", min_size=0, max_size=2))
def test_network_identity_never_raises_checksum_errors(key, tail):
    for text in (key + tail, "imei-" + key + tail[:1], "imeisv-" + key + tail.ljust(2, "0")):
        try:
            imei = parse_network(text)
        except InvalidChecksum:  # pragma: no cover - the property under test
            pytest.fail(f"{text} was refused for its check digit")
        except (InvalidFormat, InvalidLength):
            continue
        assert imei.key == key == key_of_network(text)


# --- the Imei value --------------------------------------------------------------------------


def test_imei_is_a_frozen_value_with_slots():
    imei = parse_typed("352099001761481")
    with pytest.raises(dataclasses.FrozenInstanceError):
        imei.key = "00000000000000"  # type: ignore[misc]
    assert not hasattr(imei, "__dict__")
    assert imei == Imei("35209900176148", "1")
    assert hash(imei) == hash(Imei("35209900176148", "1"))


@pytest.mark.parametrize(
    "fields",
    [
        ("3520990017614",),
        ("3520990017614x",),
        ("35209900176148", "12"),
        ("35209900176148", None, "1"),
    ],
)
def test_imei_built_by_hand_is_checked(fields):
    with pytest.raises(InvalidFormat):
        Imei(*fields)


# --- Luhn properties -------------------------------------------------------------------------


@given(keys)
def test_every_14_digits_with_their_computed_check_digit_validate(key):
    imei = parse_typed(with_check_digit(key))
    assert imei.key == key
    assert imei.full == with_check_digit(key)


@given(keys, st.integers(0, 14), st.sampled_from("0123456789"))
def test_every_single_digit_substitution_is_caught(key, position, digit):
    valid = with_check_digit(key)
    assume(valid[position] != digit)
    typo = valid[:position] + digit + valid[position + 1 :]
    with pytest.raises(InvalidChecksum):
        parse_typed(typo)


@given(keys, st.integers(0, 13))
def test_every_adjacent_transposition_is_caught_except_0_and_9(key, position):
    valid = with_check_digit(key)
    a, b = valid[position], valid[position + 1]
    assume(a != b and {a, b} != {"0", "9"})
    swapped = valid[:position] + b + a + valid[position + 2 :]
    with pytest.raises(InvalidChecksum):
        parse_typed(swapped)


@given(keys, st.integers(0, 12))
def test_luhn_blind_spot_swapping_adjacent_0_and_9_goes_unnoticed(key, position):
    """Documented, not a bug: 0 and 9 contribute the same whether doubled or not (0; 9)."""
    valid = with_check_digit(key[:position] + "09" + key[position + 2 :])
    swapped = valid[:position] + "90" + valid[position + 2 :]
    assert parse_typed(swapped).key != parse_typed(valid).key


# --- the examples in the module docstring ----------------------------------------------------


def test_module_docstring_examples_hold():
    results = doctest.testmod(imeisync.domain.imei)
    assert results.attempted > 0
    assert results.failed == 0
