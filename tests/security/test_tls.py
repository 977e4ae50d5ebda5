"""HTTPS and mutual TLS on a real ``sluice serve``, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from security_support import Served, serve


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(root: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    cert_path, key_path = root / f"{stem}.pem", root / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pair(cert_path, key_path)


class Authority:
    """A throw-away CA that signs server and client certificates."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = _write(root, name, self.cert, self.key).cert

    def issue(self, common: str, *, server: bool) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return _write(self.root, common, builder.sign(self.key, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(root, "sluice-test-ca"), Authority(root, "rogue-ca")
    return {
        "ca": ca,
        "server": ca.issue("sluice-server", server=True),
        "client": ca.issue("checkout-service", server=False),
        "rogue_client": rogue.issue("intruder", server=False),
    }


def client_context(ca: Authority, pair: Pair | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.pem))
    if pair is not None:
        context.load_cert_chain(str(pair.cert), str(pair.key))
    return context


def tls_args(pki: dict[str, object], mutual: bool) -> list[str]:
    server = pki["server"]
    ca = pki["ca"]
    assert isinstance(server, Pair)
    assert isinstance(ca, Authority)
    args = ["--ssl-certfile", str(server.cert), "--ssl-keyfile", str(server.key)]
    if mutual:
        args += ["--ssl-ca-certs", str(ca.pem)]
    return args


@pytest.fixture(scope="module")
def https_server(
    tiny_repo: Path, pki: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    ca = pki["ca"]
    assert isinstance(ca, Authority)
    checker = httpx.Client(verify=client_context(ca))
    log = tmp_path_factory.mktemp("log") / "https.log"
    with checker:
        running = serve(tiny_repo, log, *tls_args(pki, mutual=False), client=checker)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(
    tiny_repo: Path, pki: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    ca, client = pki["ca"], pki["client"]
    assert isinstance(ca, Authority)
    assert isinstance(client, Pair)
    checker = httpx.Client(verify=client_context(ca, client))
    log = tmp_path_factory.mktemp("log") / "mtls.log"
    with checker:
        running = serve(tiny_repo, log, *tls_args(pki, mutual=True), client=checker)
    yield running
    running.stop()


def test_https_serves_a_client_that_trusts_the_ca(
    https_server: Served, pki: dict[str, object]
) -> None:
    ca = pki["ca"]
    assert isinstance(ca, Authority)
    assert https_server.url.startswith("https://")
    with httpx.Client(verify=client_context(ca)) as client:
        answer = client.get(f"{https_server.url}/v2/models/tree")
    assert answer.status_code == 200
    assert answer.json()["name"] == "tree"


def test_plain_http_to_the_https_port_gets_no_answer(https_server: Served) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{https_server.port}/v2/health/live", timeout=10)


def test_a_client_that_does_not_trust_the_ca_refuses_the_server(https_server: Served) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_server.url}/v2/health/live", timeout=10)


def test_mutual_tls_serves_a_client_with_a_certificate_from_the_ca(
    mtls_server: Served, pki: dict[str, object]
) -> None:
    ca, client_pair = pki["ca"], pki["client"]
    assert isinstance(ca, Authority)
    assert isinstance(client_pair, Pair)
    with httpx.Client(verify=client_context(ca, client_pair)) as client:
        answer = client.get(f"{mtls_server.url}/v2/health/ready")
    assert answer.status_code == 200


@pytest.mark.parametrize("which", [None, "rogue_client"], ids=["no-cert", "other-ca"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    mtls_server: Served, pki: dict[str, object], which: str | None
) -> None:
    ca = pki["ca"]
    assert isinstance(ca, Authority)
    pair = pki[which] if which is not None else None
    assert pair is None or isinstance(pair, Pair)
    with (
        httpx.Client(verify=client_context(ca, pair)) as client,
        pytest.raises(httpx.TransportError),
    ):
        # TLS 1.3 finishes the handshake before the server checks the client certificate:
        # the refusal arrives as an alert on the first read.
        client.get(f"{mtls_server.url}/v2/health/ready", timeout=10)


def test_tls_settings_must_come_in_pairs() -> None:
    from server.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="tls_certfile and tls_keyfile go together"):
        load_settings(environ={"SLUICE_SECURITY__TLS_CERTFILE": "/tmp/cert.pem"})


@pytest.mark.parametrize(
    ("host", "security", "expected"),
    [
        ("127.0.0.1", {}, None),
        ("::1", {}, None),
        ("localhost", {}, None),
        ("0.0.0.0", {}, "WITHOUT API KEYS"),
        ("10.1.2.3", {"keys_file": "/etc/sluice/keys.yaml"}, "plain HTTP"),
        (
            "0.0.0.0",
            {"keys_file": "/k.yaml", "tls_certfile": "/c.pem", "tls_keyfile": "/c.key"},
            None,
        ),
    ],
)
def test_a_reachable_bind_without_keys_or_tls_is_warned_about(
    host: str, security: dict[str, str], expected: str | None
) -> None:
    from server.config import Settings
    from server.http.serving import exposure_warnings

    warnings = exposure_warnings(Settings(host=host, security=security))
    if expected is None:
        assert warnings == []
    else:
        [warning] = warnings
        assert warning.startswith("SECURITY:")
        assert expected in warning
