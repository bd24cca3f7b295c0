"""Ask an S13 EIR about one device, as an MME would: ``python -m imeisync.entrypoints.s13_probe``.

    python -m imeisync.entrypoints.s13_probe 127.0.0.1:3868 352099001761481 \\
        [--imsi 238010000000001] [--origin-host mme1.example] [--realm example]

Connects over TCP, exchanges capabilities (CER/CEA), sends one ME-Identity-Check-Request and
prints the answer (Equipment-Status, or the result code), then says goodbye (DPR). For trying
a deployment and for ``./scripts/run``'s example; exit status 0 when a verdict came back.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from imeisync.adapters.diameter import codec as c

STATUS = {0: "WHITELISTED", 1: "BLACKLISTED", 2: "GREYLISTED"}


def _read(sock: socket.socket) -> tuple[c.Header, bytes, list[c.Avp]]:
    data = b""
    while len(data) < 4 or len(data) < c.frame_length(data, 0):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the EIR closed the connection")
        data += chunk
    length = c.frame_length(data, 0)
    raw = data[:length]
    return c.read_header(raw), raw, c.read_avps(raw, 20, length)


def _u32(raw: bytes, avps: list[c.Avp], code: int) -> int | None:
    for avp in avps:
        if avp.code == code:
            return avp.u32(raw)
        if avp.code == c.EXPERIMENTAL_RESULT and code == c.EXPERIMENTAL_RESULT_CODE:
            return _u32(raw, c.read_grouped(raw, avp), code)
    return None


def probe(address: str, imei: str, *, imsi: str | None, host: str, realm: str,
          timeout: float = 5.0) -> str:
    ip, _, port = address.rpartition(":")
    with socket.create_connection((ip.strip("[]"), int(port)), timeout=timeout) as sock:
        origin = (c.avp_text(c.ORIGIN_HOST, host), c.avp_text(c.ORIGIN_REALM, realm))
        sock.sendall(c.message(c.FLAG_R, c.CMD_CER, 0, 1, 1, *origin,
                               c.avp_address(c.HOST_IP_ADDRESS, sock.getsockname()[0]),
                               c.avp_u32(c.VENDOR_ID, 0),
                               c.avp_text(c.PRODUCT_NAME, "s13_probe", mandatory=False),
                               c.avp_u32(c.AUTH_APPLICATION_ID, c.APP_S13)))
        _, raw, avps = _read(sock)
        result = _u32(raw, avps, c.RESULT_CODE)
        if result != c.SUCCESS:
            return f"capabilities exchange refused: Result-Code {result}"
        digits = imei.replace("-", "").replace(" ", "")[:14]
        terminal = c.avp_grouped(c.TERMINAL_INFORMATION,
                                 c.avp_text(c.IMEI, digits, vendor=c.VENDOR_3GPP),
                                 vendor=c.VENDOR_3GPP)
        session = c.avp_text(c.SESSION_ID, f"{host};{int(time.time())};1")
        sock.sendall(c.message(c.FLAG_R | c.FLAG_P, c.CMD_ECR, c.APP_S13, 2, 2, session,
                               c.avp_u32(c.AUTH_SESSION_STATE, c.NO_STATE_MAINTAINED), *origin,
                               c.avp_text(c.DESTINATION_REALM, realm), terminal,
                               *([c.avp_text(c.USER_NAME, imsi)] if imsi else [])))
        _, raw, avps = _read(sock)
        sock.sendall(c.message(c.FLAG_R, c.CMD_DPR, 0, 3, 3, *origin,
                               c.avp_u32(c.DISCONNECT_CAUSE, c.DISCONNECT_REBOOTING)))
    status = _u32(raw, avps, c.EQUIPMENT_STATUS)
    result = _u32(raw, avps, c.RESULT_CODE)
    if status is not None:
        return f"{STATUS.get(status, status)} (Result-Code {result}, Equipment-Status {status})"
    experimental = _u32(raw, avps, c.EXPERIMENTAL_RESULT_CODE)
    if experimental == c.EQUIPMENT_UNKNOWN:
        return "UNKNOWN (Experimental-Result 5422 DIAMETER_ERROR_EQUIPMENT_UNKNOWN)"
    return f"no verdict: Result-Code {result}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imeisync.entrypoints.s13_probe",
                                     description="Send one S13 ME-Identity-Check to an EIR.")
    parser.add_argument("address", help="IP:PORT of the EIR's [s13] listen")
    parser.add_argument("imei", help="14 or 15 digits")
    parser.add_argument("--imsi", default=None)
    parser.add_argument("--origin-host", default="mme1.imeisync.invalid",
                        help="our Origin-Host (must be in the EIR's [s13] peers)")
    parser.add_argument("--realm", default="imeisync.invalid",
                        help="Origin-Realm and Destination-Realm (the EIR's origin_realm)")
    args = parser.parse_args(argv)
    try:
        answer = probe(args.address, args.imei, imsi=args.imsi, host=args.origin_host,
                       realm=args.realm)
    except (OSError, ValueError, c.FramingError, c.AvpError) as exc:
        print(f"s13_probe: {exc}", file=sys.stderr)
        sys.exit(1)
    print(answer)
    sys.exit(0 if answer.split(" ")[0] in (*STATUS.values(), "UNKNOWN") else 1)


if __name__ == "__main__":
    main()
