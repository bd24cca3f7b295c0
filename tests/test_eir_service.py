"""The attach check as the network sees it: a real Granian server on loopback.

TS 29.511 equipment-status over HTTP/1.1, h2c (prior knowledge) and TLS; every pei form; the
ProblemDetails bodies; exceptions by supi; orders accepted by another process; the store going
away; restarts from the persisted index.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from imeisync.domain.imei import luhn_check_digit
from imeisync.entrypoints.granian_server import server_path
from support.eir_harness import (
    EIC,
    EirServer,
    free_port,
    imeisync,
    seed,
    status_of,
    wait_for,
    write_eir_config,
)

BLOCKED = "35209900176148"  # IMEI 352099001761481
TRACKED = "49015420323751"  # IMEI 490154203237518
BOTH = "35417803685978"  # blocked by one operator, tracked by another
CLONED = "35686800004141"  # blocked, with an exception for one IMSI
UNKNOWN = "01234567890123"
LEGIT_IMSI = "238010000000001"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EirServer]:
    """One SQLite-backed server for the read-only checks of this module."""
    folder = tmp_path_factory.mktemp("eir")
    url = f"sqlite:///{folder / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se"), (TRACKED, "track", "op-se"),
               (BOTH, "block", "op-se"), (BOTH, "track", "op-no"),
               (CLONED, "block", "op-dk")],
         exceptions=[(CLONED, LEGIT_IMSI)])
    port = free_port()
    with EirServer(write_eir_config(folder, url, port=port), port) as srv:
        yield srv


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


def full(key: str) -> str:
    return key + luhn_check_digit(key)


def wrong_check_digit(key: str) -> str:
    return key + str((int(luhn_check_digit(key)) + 1) % 10)


@pytest.mark.parametrize("pei", [
    pytest.param(f"imei-{full(BLOCKED)}", id="imei-15"),
    pytest.param(f"imei-{BLOCKED}", id="imei-14"),
    pytest.param(f"imeisv-{BLOCKED}07", id="imeisv-16"),
    pytest.param(full(BLOCKED), id="bare-15"),
    pytest.param(BLOCKED, id="bare-14"),
    pytest.param(f"{BLOCKED}42", id="bare-16"),
    pytest.param(f"imei-{BLOCKED}0", id="spare-zero"),
    pytest.param(f"imei-{wrong_check_digit(BLOCKED)}", id="wrong-check-digit"),
])
def test_every_pei_form_of_a_blocked_device_is_blacklisted(
    server: EirServer, client: httpx.Client, pei: str
) -> None:
    response = client.get(server.url + EIC, params={"pei": pei})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "BLACKLISTED"}


def test_tracked_device_is_greylisted_and_block_wins_over_track(
    server: EirServer, client: httpx.Client
) -> None:
    assert status_of(client, server.url, f"imeisv-{TRACKED}01") == "GREYLISTED"
    assert status_of(client, server.url, f"imei-{full(BOTH)}") == "BLACKLISTED"


def test_unknown_device_is_whitelisted_by_default(server: EirServer, client: httpx.Client) -> None:
    assert status_of(client, server.url, f"imei-{full(UNKNOWN)}") == "WHITELISTED"


def test_exception_lets_only_its_supi_through_the_block(
    server: EirServer, client: httpx.Client
) -> None:
    pei = f"imeisv-{CLONED}11"
    assert status_of(client, server.url, pei, f"imsi-{LEGIT_IMSI}") == "WHITELISTED"
    assert status_of(client, server.url, pei, "imsi-238010000000002") == "BLACKLISTED"
    assert status_of(client, server.url, pei) == "BLACKLISTED"
    assert status_of(client, server.url, pei, "nai-someone@example.org") == "BLACKLISTED"
    # gpsi and supported-features are tolerated
    response = client.get(server.url + EIC, params={
        "pei": pei, "supi": f"imsi-{LEGIT_IMSI}", "gpsi": "msisdn-4512345678",
        "supported-features": "0"})
    assert response.json() == {"status": "WHITELISTED"}


def test_missing_pei_is_400_mandatory_query_param_missing(
    server: EirServer, client: httpx.Client
) -> None:
    response = client.get(server.url + EIC, params={"supi": f"imsi-{LEGIT_IMSI}"})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 400 and body["cause"] == "MANDATORY_QUERY_PARAM_MISSING"
    assert body["invalidParams"][0]["param"] == "query pei"
    assert {"type", "title", "detail"} <= set(body)


@pytest.mark.parametrize("pei", [
    "imei-3520990017614", "imei-35209900176148a", "mac-00-11-22-33-44-55",
    "IMEI-352099001761481", "", "imeisv-352099001761481",
])
def test_malformed_pei_is_400_mandatory_query_param_incorrect_naming_query_pei(
    server: EirServer, client: httpx.Client, pei: str
) -> None:
    response = client.get(server.url + EIC, params={"pei": pei})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["cause"] == "MANDATORY_QUERY_PARAM_INCORRECT"
    assert body["invalidParams"][0]["param"] == "query pei"
    assert body["invalidParams"][0]["reason"]
    assert "Traceback" not in response.text


def test_malformed_imsi_supi_is_400_naming_query_supi(
    server: EirServer, client: httpx.Client
) -> None:
    response = client.get(server.url + EIC, params={"pei": BLOCKED, "supi": "imsi-12ab"})

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["param"] == "query supi"


def test_pei_given_twice_is_400_mandatory_query_param_incorrect(
    server: EirServer, client: httpx.Client
) -> None:
    response = client.get(f"{server.url}{EIC}?pei={BLOCKED}&pei={UNKNOWN}")

    assert response.status_code == 400
    body = response.json()
    assert body["cause"] == "MANDATORY_QUERY_PARAM_INCORRECT"
    assert body["invalidParams"] == [{"param": "query pei", "reason": "given more than once"}]


@pytest.mark.parametrize(("params", "named"), [
    pytest.param({"supi": ""}, ["query supi"], id="supi-empty"),
    pytest.param({"supi": "imsi-12ab"}, ["query supi"], id="supi-imsi-letters"),
    pytest.param({"supi": "imsi-1234"}, ["query supi"], id="supi-imsi-4-digits"),
    pytest.param({"supi": "238010000000001"}, ["query supi"], id="supi-no-prefix"),
    pytest.param({"supi": "nai-"}, ["query supi"], id="supi-nai-empty"),
    pytest.param({"gpsi": ""}, ["query gpsi"], id="gpsi-empty"),
    pytest.param({"supported-features": "zz"}, ["query supported-features"], id="features-zz"),
    pytest.param({"supi": "", "gpsi": "", "supported-features": "1g"},
                 ["query supi", "query gpsi", "query supported-features"], id="all-three"),
])
def test_malformed_optional_params_are_400_optional_query_param_incorrect_naming_each(
    server: EirServer, client: httpx.Client, params: dict[str, str], named: list[str]
) -> None:
    response = client.get(server.url + EIC, params={"pei": f"imei-{full(BLOCKED)}", **params})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["cause"] == "OPTIONAL_QUERY_PARAM_INCORRECT"
    assert [p["param"] for p in body["invalidParams"]] == named
    assert all(p["reason"] for p in body["invalidParams"])


def test_well_formed_optional_params_are_accepted(
    server: EirServer, client: httpx.Client
) -> None:
    for params in ({"supi": "nai-someone@example.org", "gpsi": "msisdn-4512345678",
                    "supported-features": "0aF"}, {"supported-features": ""},
                   {"gpsi": "extid-someone@example.org"}):
        response = client.get(server.url + EIC, params={"pei": full(BLOCKED), **params})
        assert response.status_code == 200, (params, response.text)
        assert response.json() == {"status": "BLACKLISTED"}


def test_a_parameter_ts_29511_does_not_define_is_400_invalid_query_param(
    server: EirServer, client: httpx.Client
) -> None:
    response = client.get(server.url + EIC, params={"pei": full(BLOCKED), "imsi": LEGIT_IMSI})

    assert response.status_code == 400
    body = response.json()
    assert body["cause"] == "INVALID_QUERY_PARAM"
    assert body["invalidParams"][0]["param"] == "query imsi"


def test_a_missing_pei_wins_over_other_faults(server: EirServer, client: httpx.Client) -> None:
    response = client.get(server.url + EIC, params={"imsi": "1", "supi": ""})

    assert response.json()["cause"] == "MANDATORY_QUERY_PARAM_MISSING"


def test_percent_encoded_query_is_decoded(server: EirServer, client: httpx.Client) -> None:
    response = client.get(f"{server.url}{EIC}?pei=imei%2D{full(BLOCKED)}")

    assert response.json() == {"status": "BLACKLISTED"}


@pytest.mark.parametrize("query", ["pei=imei%2D35209900176148%FF", "pei=%E2%80%AE35209900176148",
                                   "pei=3520990017614%00"])
def test_percent_encoded_garbage_in_pei_is_400_mandatory_query_param_incorrect(
    server: EirServer, client: httpx.Client, query: str
) -> None:
    response = client.get(f"{server.url}{EIC}?{query}")

    assert response.status_code == 400
    assert response.json()["cause"] == "MANDATORY_QUERY_PARAM_INCORRECT"
    assert response.json()["invalidParams"][0]["param"] == "query pei"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_with_allow_get(
    server: EirServer, client: httpx.Client, method: str
) -> None:
    response = client.request(method, server.url + EIC, params={"pei": BLOCKED})

    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 405


def test_h2c_with_prior_knowledge_answers_like_http1(server: EirServer) -> None:
    with httpx.Client(http1=False, http2=True, timeout=5) as h2:
        response = h2.get(server.url + EIC, params={"pei": f"imei-{full(BLOCKED)}"})
        missing = h2.get(server.url + EIC)

    assert response.http_version == "HTTP/2"
    assert response.json() == {"status": "BLACKLISTED"}
    assert missing.status_code == 400 and missing.json()["cause"] == \
        "MANDATORY_QUERY_PARAM_MISSING"


def test_healthz_and_metrics_describe_the_index(server: EirServer, client: httpx.Client) -> None:
    health = client.get(server.url + "/healthz")
    metrics = client.get(server.url + "/metrics")

    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["database"]["reachable"] is True
    assert body["attach_index"]["entries"] == 4 and body["attach_index"]["seq"] == 6
    assert body["attach_index"]["staleness_seconds"] < 5
    assert metrics.status_code == 200
    assert 'imeisync_attach_checks_total{interface="n5g-eir",outcome="BLACKLISTED"' \
        in metrics.text
    assert "imeisync_attach_check_seconds_bucket" in metrics.text
    assert "imeisync_attach_index_entries" in metrics.text


def test_healthz_and_the_start_up_log_say_what_serves_the_check(
    server: EirServer, client: httpx.Client
) -> None:
    expected = server_path()

    assert client.get(server.url + "/healthz").json()["server"] == expected.as_dict()
    assert expected.describe() in server.output()


def test_unknown_device_is_404_equipment_unknown_when_configured(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se")])
    port = free_port()
    config = write_eir_config(tmp_path, url, port=port, unknown_status="NOT_FOUND")
    with EirServer(config, port) as srv, httpx.Client(timeout=5) as client:
        response = client.get(srv.url + EIC, params={"pei": f"imei-{full(UNKNOWN)}"})
        blocked = client.get(srv.url + EIC, params={"pei": f"imei-{full(BLOCKED)}"})

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["cause"] == "ERROR_EQUIPMENT_UNKNOWN"
    assert blocked.json() == {"status": "BLACKLISTED"}


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "eir.crt", folder / "eir.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_with_a_self_signed_certificate_serves_http2_by_alpn_and_http1(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se")])
    cert, key = _self_signed(tmp_path)
    port = free_port()
    config = write_eir_config(tmp_path, url, port=port, tls=(cert, key))
    trust = ssl.create_default_context(cafile=str(cert))
    srv = EirServer(config, port, scheme="https").start(verify=trust)
    try:
        with httpx.Client(http2=True, verify=trust, timeout=5) as h2:
            over_h2 = h2.get(srv.url + EIC, params={"pei": f"imei-{full(BLOCKED)}"})
        with httpx.Client(verify=trust, timeout=5) as h1:
            over_h1 = h1.get(srv.url + EIC, params={"pei": f"imei-{full(BLOCKED)}"})
    finally:
        srv.stop()

    assert over_h2.http_version == "HTTP/2" and over_h2.json() == {"status": "BLACKLISTED"}
    assert over_h1.http_version == "HTTP/1.1" and over_h1.json() == {"status": "BLACKLISTED"}


def test_order_accepted_in_another_process_is_answered_within_one_second(
    tmp_path: Path, database_url: str
) -> None:
    seed(database_url, [(TRACKED, "track", "op-se")])
    port = free_port()
    config = write_eir_config(tmp_path, database_url, port=port)
    imei = full(BLOCKED)
    with EirServer(config, port) as srv, httpx.Client(timeout=5) as client:
        assert status_of(client, srv.url, f"imei-{imei}") == "WHITELISTED"

        imeisync(config, "order", "block", "--imei", imei, "--case", "CPH-7", "--unit", "CPH")
        accepted = time.monotonic()
        wait_for(lambda: status_of(client, srv.url, f"imei-{imei}") == "BLACKLISTED", 1.0)
        visible_after = time.monotonic() - accepted

        imeisync(config, "exception", "add", "--imei", imei, "--imsi", LEGIT_IMSI,
                 "--case", "CPH-7")
        wait_for(lambda: status_of(client, srv.url, imei, f"imsi-{LEGIT_IMSI}")
                 == "WHITELISTED", 1.0)
        imeisync(config, "exception", "remove", "--imei", imei, "--imsi", LEGIT_IMSI)
        wait_for(lambda: status_of(client, srv.url, imei, f"imsi-{LEGIT_IMSI}")
                 == "BLACKLISTED", 1.0)

    assert visible_after <= 1.0


def _assert_answers_from_memory(srv: EirServer, client: httpx.Client) -> None:
    def stale() -> bool:
        body = client.get(srv.url + "/healthz").json()
        return body["status"] == "stale" and body["database"]["reachable"] is False

    wait_for(stale, 5.0)
    health = client.get(srv.url + "/healthz")
    assert health.status_code == 200, "it can still answer attach checks"
    assert health.json()["database"]["last_error"]
    assert status_of(client, srv.url, f"imei-{full(BLOCKED)}") == "BLACKLISTED"
    assert status_of(client, srv.url, f"imeisv-{TRACKED}00") == "GREYLISTED"
    time.sleep(1.1)
    later = client.get(srv.url + "/healthz").json()
    assert later["attach_index"]["staleness_seconds"] >= 1.0


def test_sqlite_store_gone_keeps_answering_from_memory_and_healthz_reports_stale(
    tmp_path: Path,
) -> None:
    db_file = tmp_path / "imeisync.db"
    url = f"sqlite:///{db_file}"
    seed(url, [(BLOCKED, "block", "op-se"), (TRACKED, "track", "op-se")])
    port = free_port()
    config = write_eir_config(tmp_path, url, port=port)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    with EirServer(config, port) as srv, httpx.Client(timeout=5) as client:
        for path in tmp_path.glob("imeisync.db*"):
            shutil.move(str(path), moved / path.name)

        _assert_answers_from_memory(srv, client)

        for path in moved.iterdir():  # the file comes back: it follows the store again
            shutil.move(str(path), tmp_path / path.name)
        wait_for(lambda: client.get(srv.url + "/healthz").json()["status"] == "ok", 10.0)


@pytest.mark.postgres
def test_postgres_stopped_keeps_answering_from_memory_and_healthz_reports_stale(
    tmp_path: Path, postgres_server: object
) -> None:
    from support.pg_server import ThrowawayPostgres  # our own server: this test stops it

    pg = ThrowawayPostgres()
    try:
        pg.start()
        url = pg.create_database("eir_down")
        seed(url, [(BLOCKED, "block", "op-se"), (TRACKED, "track", "op-se")])
        port = free_port()
        config = write_eir_config(tmp_path, url, port=port)
        with EirServer(config, port) as srv, httpx.Client(timeout=5) as client:
            pg.stop()
            _assert_answers_from_memory(srv, client)
    finally:
        pg.stop()


def test_persisted_index_survives_a_restart_and_a_corrupted_file_is_rebuilt(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'imeisync.db'}"
    seed(url, [(BLOCKED, "block", "op-se"), (TRACKED, "track", "op-se")])
    port = free_port()
    config = write_eir_config(tmp_path, url, port=port)
    index_file = tmp_path / "attach-index.bin"
    with httpx.Client(timeout=5) as client:
        first = EirServer(config, port).start()
        assert client.get(first.url + "/healthz").json()["attach_index"]["source"] == "store"
        first.stop()
        assert index_file.is_file()
        seed(url, [(UNKNOWN, "block", "op-se")])  # a change while the server is down

        with EirServer(config, port) as second:
            health = client.get(second.url + "/healthz").json()["attach_index"]
            assert health["source"] == "file"
            assert health["seq"] == 3, "caught up with the change made while it was down"
            assert status_of(client, second.url, f"imei-{full(UNKNOWN)}") == "BLACKLISTED"
            assert status_of(client, second.url, f"imei-{full(TRACKED)}") == "GREYLISTED"

        data = bytearray(index_file.read_bytes())
        data[-3] ^= 0xFF
        index_file.write_bytes(bytes(data))
        third = EirServer(config, port).start()
        try:
            health = client.get(third.url + "/healthz").json()["attach_index"]
            assert health["source"] == "store"
            assert status_of(client, third.url, f"imei-{full(BLOCKED)}") == "BLACKLISTED"
        finally:
            log = third.stop()
    assert "fails its SHA-256 checksum" in log and "rebuilding it from the store" in log
