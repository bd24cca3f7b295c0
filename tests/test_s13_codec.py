"""The Diameter codec and the S13 application, without a network: bounds and fuzzing.

The application answers from a real ``AttachIndex``; every mutation of a valid ECR must get
an answer that is itself well-formed Diameter (never an exception, never a bad length).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imeisync.adapters.attach_index import AttachIndex
from imeisync.adapters.diameter import codec as c
from imeisync.adapters.diameter.s13 import OUTCOMES, S13App
from imeisync.domain.verdict import Status
from support.s13_harness import ecr

BLOCKED = "35209900176148"


def make_app(unknown: str = "WHITELISTED", index: AttachIndex | None = None) -> S13App:
    if index is None:
        index = AttachIndex()
        index.apply({int(BLOCKED): {"block"}}, {}, [int(BLOCKED)])
    holder = [index]

    def lookup(key: int, imsi: str | None) -> Status:
        return holder[0].lookup(key, imsi)

    return S13App(lookup, lambda: True, origin_host="eir1.epc.test", origin_realm="epc.test",
                  unknown_status=unknown)


def answer(app: S13App, request: bytes) -> bytes:
    head = c.read_header(request)
    return app.answer(request, 0, len(request), head.flags, head.hbh, head.e2e)


def well_formed(raw: bytes) -> list[c.Avp]:
    assert c.frame_length(raw, 0) == len(raw)
    return c.read_avps(raw, 20, len(raw))


def test_frame_length_limits() -> None:
    good = ecr(BLOCKED)
    assert c.frame_length(good, 0) == len(good)
    for length, code in ((0, c.INVALID_MESSAGE_LENGTH), (19, c.INVALID_MESSAGE_LENGTH),
                         (22, c.INVALID_MESSAGE_LENGTH), (c.MAX_MESSAGE + 4,
                                                          c.INVALID_MESSAGE_LENGTH)):
        with pytest.raises(c.FramingError) as error:
            c.frame_length(bytes([1]) + length.to_bytes(3, "big"), 0)
        assert error.value.result_code == code
    with pytest.raises(c.FramingError) as error:
        c.frame_length(bytes([2]) + good[1:], 0)
    assert error.value.result_code == c.UNSUPPORTED_VERSION


def test_nesting_deeper_than_the_limit_is_refused_by_the_reader() -> None:
    nested = c.avp_u32(1, 1)
    for _ in range(c.MAX_DEPTH + 2):
        nested = c.avp_grouped(4242, nested)
    avp = c.read_avps(nested, 0, len(nested))[0]
    with pytest.raises(c.AvpError):
        depth = 0
        while True:
            depth += 1
            avp = c.read_avps(nested, avp.start, avp.end, depth)[0]


def test_answers_are_one_per_verdict_and_5422_has_no_result_code() -> None:
    app = make_app("NOT_FOUND")
    blocked = well_formed(answer(app, ecr(BLOCKED)))
    unknown_raw = answer(app, ecr("01234567890123"))
    unknown = well_formed(unknown_raw)
    assert c.EQUIPMENT_STATUS in [a.code for a in blocked]
    assert c.RESULT_CODE not in [a.code for a in unknown]
    assert c.EXPERIMENTAL_RESULT in [a.code for a in unknown]
    assert app.counts[OUTCOMES.index("NOT_FOUND")] == 1
    assert app.counts[OUTCOMES.index("BLACKLISTED")] == 1


def test_no_index_yet_is_3004() -> None:
    class NoIndex:
        index = None

    keeper = NoIndex()
    app = S13App(lambda key, imsi: keeper.index.lookup(key, imsi),  # type: ignore[attr-defined]
                 lambda: keeper.index is not None, origin_host="e.test", origin_realm="epc.test")
    raw = answer(app, ecr(BLOCKED))
    head = c.read_header(raw)
    assert head.flags & c.FLAG_E
    assert c.RESULT_CODE in [a.code for a in well_formed(raw)]
    assert app.counts[OUTCOMES.index("too_busy")] == 1


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_mutation_of_an_ecr_gets_a_well_formed_answer(data: st.DataObject) -> None:
    app = make_app(data.draw(st.sampled_from(["WHITELISTED", "NOT_FOUND"])))
    request = bytearray(ecr(BLOCKED, imsi="238010000000001"))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(20, len(request) - 1))
        request[at] = data.draw(st.integers(0, 255))
    raw = answer(app, bytes(request))
    avps = well_formed(raw)
    assert avps[0].code == c.SESSION_ID or c.RESULT_CODE in [a.code for a in avps]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_reader_raises_only_avp_errors(blob: bytes) -> None:
    padded = blob + b"\0" * (-len(blob) & 3)
    try:
        for avp in c.read_avps(padded, 0, len(padded)):
            assert avp.start <= avp.end <= len(padded)
    except c.AvpError as error:
        assert error.result_code in (c.INVALID_AVP_LENGTH, c.INVALID_AVP_VALUE)


# -- [s13] configuration ------------------------------------------------------------------------


def _config(tmp_path, body: str):  # type: ignore[no-untyped-def]
    from imeisync.config import load_config

    path = tmp_path / "imeisync.toml"
    path.write_text(body)
    return load_config(path)


@pytest.mark.parametrize(("body", "words"), [
    ('[s13]\ntransport = "udp"\n', ["[s13] transport", '"tcp" or "sctp"']),
    ('[s13]\nlisten = "localhost:3868"\n', ["[s13] listen", "IP:PORT"]),
    ('[s13]\norigin_host = "eir 1"\n', ["[s13] origin_host", "host or realm name"]),
    ('[s13]\npeers = "mme1.example,"\nwatchdog = "0s"\n', ["[s13] watchdog", "at least 1s"]),
    ('[s13]\npeers = 3\n', ["[s13] peers", '["*"]']),
    ('[s13]\npeers = ["mme one"]\n', ["[s13] peers"]),
])
def test_bad_s13_settings_are_refused_naming_the_key(tmp_path, body: str,  # type: ignore
                                                     words: list[str]) -> None:
    from imeisync.domain.errors import BadInput

    with pytest.raises(BadInput) as refused:
        _config(tmp_path, body)
    for word in words:
        assert word in str(refused.value), (word, str(refused.value))


def test_s13_settings_from_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from imeisync.domain.errors import BadInput
    from imeisync.entrypoints.s13 import settings_from

    config = _config(tmp_path, '[s13]\nlisten = "127.0.0.1:3868"\npeers = ["mme1.example"]\n'
                               'watchdog = "45s"\n')
    settings = settings_from(config)
    assert settings.peers == frozenset({"mme1.example"})
    assert (settings.watchdog, settings.stall_timeout) == (45.0, 10.0)
    assert settings_from(_config(tmp_path, '[s13]\npeers = ["*"]\n')).peers is None
    with pytest.raises(BadInput, match="peers is empty"):
        settings_from(_config(tmp_path, '[s13]\nlisten = "127.0.0.1:3868"\n'))


def test_a_fault_of_ours_still_answers_5012_and_is_counted() -> None:
    """A bug cannot be produced by the real index: a lookup that raises stands in for one."""
    from imeisync.adapters.diameter.s13 import AnswerFault

    def broken(key: int, imsi: str | None) -> Status:
        raise RuntimeError("a bug")

    app = S13App(broken, lambda: True, origin_host="e.test", origin_realm="epc.test")
    with pytest.raises(AnswerFault) as fault:
        answer(app, ecr(BLOCKED))
    avps = well_formed(fault.value.answer)
    assert avps[0].code == c.SESSION_ID
    result = next(a for a in avps if a.code == c.RESULT_CODE)
    assert result.u32(fault.value.answer) == c.UNABLE_TO_COMPLY
    assert app.counts[OUTCOMES.index("error")] == 1
