"""Interoperability tests: ambit-ca issuing certificates to a Python grpcio client.

The client shares no code with the CA. Its stubs are generated at test time from
proto/proto/ca.proto, and it asks for certificates the way Istio's ztunnel does:
an ECDSA P-256 key, a CSR with an empty subject and one critical URI SAN,
`authorization: Bearer <token>` metadata, and for a node agent the
`ImpersonatedIdentity` key in the request's metadata Struct.

The binary under test comes from $AMBIT_CA_BIN (default: target/debug/ambit-ca;
build it with `cargo build -p ambit-ca`).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.resources
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto" / "proto"
CA_BIN = Path(os.environ.get("AMBIT_CA_BIN", REPO_ROOT / "target" / "debug" / "ambit-ca"))

# The CA's serving certificate carries this DNS SAN; the channel checks it in place of
# "127.0.0.1", which the certificate does not name.
CA_DNS_NAME = "ambit-control.ambit-system.svc"

CART = "spiffe://cluster.local/ns/shop/sa/cart"
PAY = "spiffe://cluster.local/ns/shop/sa/pay"
ZTUNNEL = "spiffe://cluster.local/ns/ambit-system/sa/ztunnel"
WORKLOAD_TOKEN = "workload-token-0123456789"
NODE_AGENT_TOKEN = "node-agent-token-0123456789"

TOKENS_YAML = f"""\
- token: "{WORKLOAD_TOKEN}"
  identity: {CART}
- token: "{NODE_AGENT_TOKEN}"
  identity: {ZTUNNEL}
  nodeAgent: true
  node: node-a
"""

STARTUP_TIMEOUT = 30.0  # seconds for the CA to log "CA serving"
RPC_TIMEOUT = 10.0
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
SERVING_ADDR = re.compile(r"addr=127\.0\.0\.1:(\d+)")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    """Generates ca_pb2 / ca_pb2_grpc from ca.proto into a temp dir and imports them."""
    out = tmp_path_factory.mktemp("stubs")
    # grpc_tools bundles the well-known types (google/protobuf/struct.proto) here.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_DIR}", f"-I{well_known}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        str(PROTO_DIR / "ca.proto"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"

    sys.path.insert(0, str(out))
    try:
        ca_pb2 = importlib.import_module("ca_pb2")
        ca_pb2_grpc = importlib.import_module("ca_pb2_grpc")
        yield ca_pb2, ca_pb2_grpc
    finally:
        sys.path.remove(str(out))
        for name in ("ca_pb2", "ca_pb2_grpc"):
            sys.modules.pop(name, None)


class CaProcess:
    """A running ambit-ca whose stderr is drained by a thread into `lines`.

    Draining continuously keeps the child from blocking on a full pipe, and keeps
    its log at hand to show when a test fails.
    """

    def __init__(self, root_dir: Path, tokens: Path):
        if not CA_BIN.is_file():
            pytest.fail(f"{CA_BIN} not found: run `cargo build -p ambit-ca` or set AMBIT_CA_BIN")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")}
        env["NO_COLOR"] = "1"  # colours are stripped anyway; this keeps the log readable
        self.root_dir = root_dir
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [str(CA_BIN), "--root-dir", str(root_dir), "--listen", "127.0.0.1:0",
             "--tokens", str(tokens), "--log", "info"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env,
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for raw in self.proc.stderr:
            line = ANSI_ESCAPE.sub("", raw.rstrip("\n"))
            with self._lock:
                self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)  # EOF: the process closed stderr, i.e. exited

    def log(self, since: int = 0) -> str:
        with self._lock:
            return "\n".join(self.lines[since:])

    def wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"ambit-ca did not log 'CA serving' within {timeout}s:\n{self.log()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                pytest.fail(f"ambit-ca exited with {code} before serving:\n{self.log()}")
            if "CA serving" in line:
                match = SERVING_ADDR.search(line)
                assert match, f"no addr=127.0.0.1:PORT in serving line: {line!r}"
                return int(match.group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the CA shuts down gracefully
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ambit-ca")
    tokens = workdir / "tokens.yaml"
    tokens.write_text(TOKENS_YAML)
    process = CaProcess(workdir / "root", tokens)
    try:
        process.port = process.wait_for_port(STARTUP_TIMEOUT)
        process.root_pem = (workdir / "root" / "root-cert.pem").read_bytes()
        yield process
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def server_log_on_failure(ca):
    """Writes the CA's log lines from this test to stderr, which pytest shows on failure."""
    start = len(ca.lines)
    yield
    time.sleep(0.05)  # let the drain thread catch the last lines of this test's call
    sys.stderr.write(f"--- ambit-ca stderr during this test ---\n{ca.log(start)}\n")


@pytest.fixture(scope="module")
def stub(pb, ca):
    _, ca_pb2_grpc = pb
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.root_pem)
    channel = grpc.secure_channel(
        f"127.0.0.1:{ca.port}",
        credentials,
        options=[("grpc.ssl_target_name_override", CA_DNS_NAME)],
    )
    try:
        # Fails fast (with a clear error) if the TLS handshake cannot complete.
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)
        yield ca_pb2_grpc.IstioCertificateServiceStub(channel)
    finally:
        channel.close()


# ---------------------------------------------------------------------------- helpers


def make_csr(identity: str, key: ec.EllipticCurvePrivateKey | None = None):
    """A CSR built like ztunnel's: P-256 key, empty subject, one critical URI SAN, SHA-256."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr, key


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def create_certificate(pb, stub, csr: str, token: str | None = None,
                       validity: int = 0, impersonate: str | None = None) -> list[str]:
    ca_pb2, _ = pb
    request = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=validity)
    if impersonate is not None:
        request.metadata.update({"ImpersonatedIdentity": impersonate})
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    response = stub.CreateCertificate(request, metadata=metadata, timeout=RPC_TIMEOUT)
    return list(response.cert_chain)


def expect_error(code: grpc.StatusCode, call) -> str:
    """Runs `call`, asserts it fails with `code`, and returns the status details."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    return info.value.details() or ""


def verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate):
    """Checks `cert`'s signature with `issuer`'s public key (raises if it does not verify)."""
    public_key = issuer.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(cert.signature, cert.tbs_certificate_bytes,
                          ec.ECDSA(cert.signature_hash_algorithm))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(cert.signature, cert.tbs_certificate_bytes,
                          padding.PKCS1v15(), cert.signature_hash_algorithm)
    else:
        public_key.verify(cert.signature, cert.tbs_certificate_bytes)


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


# ------------------------------------------------------------------------------ tests


def test_workload_gets_certificate_for_own_identity(pb, stub, ca):
    csr, key = make_csr(CART)
    before = datetime.datetime.now(datetime.timezone.utc)
    chain_pems = create_certificate(pb, stub, csr_pem(csr), WORKLOAD_TOKEN, validity=3600)
    after = datetime.datetime.now(datetime.timezone.utc)

    # One PEM certificate per element. A freshly generated self-signed root signs
    # leaves directly, so the chain is exactly [leaf, root].
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in chain_pems]
    assert len(chain) == 2, chain_pems
    leaf, root = chain[0], chain[-1]
    assert root == x509.load_pem_x509_certificate(ca.root_pem)
    verify_signed_by(leaf, root)

    # Identity only in a critical URI SAN, as Istio requires for an empty subject.
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert uri_sans(leaf) == [CART]

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.digital_signature
    assert key_usage.key_encipherment

    # Backdated ~2 minutes against clock skew; expires validity_duration after issuance.
    # Certificate times have whole-second precision, hence the slack of a few seconds.
    backdate = (after - leaf.not_valid_before_utc).total_seconds()
    assert 100 <= backdate <= 200, leaf.not_valid_before_utc
    expiry = datetime.timedelta(seconds=3600)
    slack = datetime.timedelta(seconds=5)
    assert before + expiry - slack <= leaf.not_valid_after_utc <= after + expiry + slack

    assert public_der(leaf.public_key()) == public_der(key.public_key())


def test_node_agent_impersonates_workload(pb, stub):
    csr, _ = make_csr(PAY)
    chain = create_certificate(pb, stub, csr_pem(csr), NODE_AGENT_TOKEN, impersonate=PAY)
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert uri_sans(leaf) == [PAY]


def test_workload_cannot_impersonate(pb, stub):
    csr, _ = make_csr(PAY)
    details = expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        lambda: create_certificate(pb, stub, csr_pem(csr), WORKLOAD_TOKEN, impersonate=PAY),
    )
    assert CART in details and PAY in details, details


def test_no_token_is_unauthenticated(pb, stub):
    csr, _ = make_csr(CART)
    expect_error(grpc.StatusCode.UNAUTHENTICATED,
                 lambda: create_certificate(pb, stub, csr_pem(csr), token=None))


def test_bad_token_is_unauthenticated(pb, stub):
    csr, _ = make_csr(CART)
    expect_error(grpc.StatusCode.UNAUTHENTICATED,
                 lambda: create_certificate(pb, stub, csr_pem(csr), "not-a-known-token-0123456789"))


def test_csr_for_other_identity_is_denied(pb, stub):
    csr, _ = make_csr(PAY)
    expect_error(grpc.StatusCode.PERMISSION_DENIED,
                 lambda: create_certificate(pb, stub, csr_pem(csr), WORKLOAD_TOKEN))


def test_garbage_csr_is_invalid(pb, stub):
    expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                 lambda: create_certificate(pb, stub, "this is not a CSR", WORKLOAD_TOKEN))


def test_tampered_csr_signature_is_invalid(pb, stub):
    csr, _ = make_csr(CART)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    # The signature BIT STRING closes the DER, and an ECDSA signature ends in the last
    # byte of its `s` INTEGER: flipping that byte keeps the DER well formed, so the
    # CA can only reject the CSR by checking the signature.
    assert der.endswith(csr.signature)
    der[-1] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der))
    assert not tampered.is_signature_valid  # the client library agrees it is broken

    details = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: create_certificate(pb, stub, csr_pem(tampered), WORKLOAD_TOKEN),
    )
    assert "signature" in details.lower(), details
