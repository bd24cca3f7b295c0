"""How the attach check reads its query: the shortcut for what AMFs send answers exactly like the
general reader, for any query."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imeisync.entrypoints.eir_answers import Refused, _read_all, read_query

_VALUES = st.sampled_from([
    "imeisv-3568680000414120", "imei-352099001761481", "35209900176148", "imei-3520", "",
    "imsi-238010000000001", "imsi-12", "nai-a@b", "nai-", "msisdn-4512345678", "0aF", "zz",
])
_NAMES = st.sampled_from(["pei", "supi", "gpsi", "supported-features", "imsi", ""])


def _outcome(reader, query: str) -> object:  # type: ignore[no-untyped-def]
    try:
        return reader(query)
    except Refused as refused:
        return refused.answer


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=4), st.booleans())
def test_the_shortcut_answers_every_query_like_the_general_reader(
    pairs: list[tuple[str, str]], bare: bool
) -> None:
    query = "&".join(name if bare and not value else f"{name}={value}" for name, value in pairs)

    assert _outcome(read_query, query) == _outcome(_read_all, query)


def test_the_common_shapes_give_the_key_and_the_imsi() -> None:
    assert read_query("pei=imeisv-3568680000414120") == (35686800004141, None)
    assert read_query("pei=imei-352099001761481&supi=imsi-238010000000001") == (
        35209900176148, "238010000000001")
    assert read_query("supi=imsi-238010000000001&pei=35209900176148") == (
        35209900176148, "238010000000001")
    assert read_query("pei=35209900176148&supi=nai-someone%40example.org") == (
        35209900176148, None)
