#!/usr/bin/env python3
"""An independent HBONE client: Python's `ssl` and `socket` plus the `h2` package.

It shares no code with Ambit. It opens one tunnel the way HBONE says (TLS 1.3 with a
client certificate, ALPN h2, the server's SPIFFE identity checked instead of a host
name, then an HTTP/2 CONNECT to the inner target with a `forwarded` header), so the
end-to-end test (tests/tests/hbone_interop.rs) can prove ztunnel's 15008 speaks HBONE
to a client that is not our own.

Output: one JSON object on stdout, e.g.
    {"status": 200, "reason": null, "peer_identity": "spiffe://...", "echo": "hello"}
Exit 0 when the exchange ran to completion, whatever the status; non-zero (with a
message on stderr) on any error: TLS, identity mismatch, protocol, timeout.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys

import h2.config
import h2.errors
import h2.connection
import h2.events
import h2.exceptions
from cryptography import x509

READ_SIZE = 65536


class HboneError(Exception):
    pass


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not IP:PORT")
    return host.strip("[]"), int(port)


def tls_context(cert: str, key: str, root: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # The chain must reach the mesh root; the peer is authenticated by its SPIFFE
    # identity (checked after the handshake), never by a host name.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=root)
    ctx.load_cert_chain(certfile=cert, keyfile=key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def uri_sans(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


class Tunnel:
    """One TLS connection carrying one HBONE CONNECT stream."""

    def __init__(self, tls: ssl.SSLSocket):
        self.tls = tls
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.flush()
        self.stream_id: int | None = None
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.ended = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.tls.sendall(data)

    def pump(self) -> None:
        """Reads once from the socket and handles the events for our stream."""
        data = self.tls.recv(READ_SIZE)
        if not data:
            raise HboneError("the server closed the connection")
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                if event.stream_id == self.stream_id:
                    self.headers = {k: v for k, v in event.headers}
                    self.status = int(self.headers[":status"])
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id == self.stream_id:
                    self.body.extend(event.data)
                # Give the window back so a large echo never stalls.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                if event.stream_id == self.stream_id:
                    self.ended = True
            elif isinstance(event, h2.events.StreamReset):
                if event.stream_id == self.stream_id:
                    # After a complete response, RST_STREAM(NO_ERROR) only tells us to
                    # stop sending (RFC 9113 8.1); anything else is a failure.
                    if event.error_code != h2.errors.ErrorCodes.NO_ERROR or self.status is None:
                        raise HboneError(
                            f"stream reset by the server (error code {event.error_code!r})"
                        )
                    self.ended = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise HboneError(f"GOAWAY from the server (error code {event.error_code})")
        self.flush()

    def connect(self, target: str, forwarded_for: str) -> None:
        self.stream_id = self.conn.get_next_available_stream_id()
        # RFC 9113 8.5: CONNECT carries only :method and :authority.
        headers = [
            (":method", "CONNECT"),
            (":authority", target),
            ("forwarded", f'for="{forwarded_for}"'),
        ]
        self.conn.send_headers(self.stream_id, headers, end_stream=False)
        self.flush()
        while self.status is None and not self.ended:
            self.pump()
        if self.status is None:
            raise HboneError("the stream ended without a response")

    def send(self, payload: bytes) -> None:
        view = memoryview(payload)
        while view:
            window = self.conn.local_flow_control_window(self.stream_id)
            chunk = min(window, self.conn.max_outbound_frame_size, len(view))
            if chunk <= 0:
                self.pump()  # wait for WINDOW_UPDATE
                continue
            self.conn.send_data(self.stream_id, bytes(view[:chunk]))
            self.flush()
            view = view[chunk:]
        self.conn.end_stream(self.stream_id)
        self.flush()

    def receive_all(self) -> bytes:
        while not self.ended:
            self.pump()
        return bytes(self.body)


def run(args: argparse.Namespace) -> dict:
    ctx = tls_context(args.cert, args.key, args.root)
    host, port = args.connect
    raw = socket.create_connection((host, port), timeout=args.timeout)
    try:
        tls = ctx.wrap_socket(raw, server_side=False)
    except ssl.SSLError as e:
        raw.close()
        raise HboneError(f"TLS handshake with {host}:{port} failed: {e}") from e
    with tls:
        if tls.version() != "TLSv1.3":
            raise HboneError(f"negotiated {tls.version()}, not TLSv1.3")
        if tls.selected_alpn_protocol() != "h2":
            raise HboneError(f"ALPN negotiated {tls.selected_alpn_protocol()!r}, not 'h2'")
        # getpeercert() without binary_form is empty when the certificate has no
        # subject; parse the DER ourselves.
        der = tls.getpeercert(binary_form=True)
        if not der:
            raise HboneError("the server presented no certificate")
        sans = uri_sans(der)
        if len(sans) != 1:
            raise HboneError(f"server certificate has URI SANs {sans}, expected exactly one")
        peer_identity = sans[0]
        if args.expect_identity and peer_identity != args.expect_identity:
            raise HboneError(
                f"server identity is {peer_identity}, expected {args.expect_identity}"
            )
        local_ip, local_port = tls.getsockname()[:2]
        forwarded_for = args.forwarded_for or (
            f"[{local_ip}]:{local_port}" if ":" in local_ip else f"{local_ip}:{local_port}"
        )

        tunnel = Tunnel(tls)
        target = f"{args.target[0]}:{args.target[1]}"
        if ":" in args.target[0]:
            target = f"[{args.target[0]}]:{args.target[1]}"
        tunnel.connect(target, forwarded_for)
        result = {
            "status": tunnel.status,
            "reason": tunnel.headers.get("x-ambit-reason"),
            "peer_identity": peer_identity,
            "forwarded_for": forwarded_for,
            "echo": None,
        }
        if tunnel.status == 200:
            tunnel.send(args.send.encode())
            result["echo"] = tunnel.receive_all().decode(errors="replace")
        try:
            tunnel.conn.close_connection()
            tunnel.flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connect", type=parse_host_port, required=True,
                   help="the HBONE server, IP:15008")
    p.add_argument("--target", type=parse_host_port, required=True,
                   help="the CONNECT :authority, IP:PORT")
    p.add_argument("--cert", required=True, help="client certificate chain, PEM, leaf first")
    p.add_argument("--key", required=True, help="client private key, PEM")
    p.add_argument("--root", required=True, help="mesh root certificate, PEM")
    p.add_argument("--expect-identity", help="the SPIFFE ID the server must present")
    p.add_argument("--send", default="hello over hbone", help="text to send through the tunnel")
    p.add_argument("--timeout", type=float, default=10.0, help="socket timeout, seconds")
    p.add_argument("--forwarded-for", help="claim this ip:port in `forwarded` instead of our own")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except (HboneError, OSError, h2.exceptions.H2Error) as e:
        print(f"hbone_client: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
