"""DICOM TLS: a CA, server and client certificates made here; mutual authentication
with pynetdicom and with Lightbox's own SCU; plain or certificate-less callers fail
cleanly and the server keeps serving."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.association import Association

from lightbox.archive import Archive
from lightbox.dimse import contexts, scu
from lightbox.services import nodes
from tests.conftest import free_port
from tests.dimse_peers import scp, with_settings

Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: Key, issuer: tuple[str, Key] | None,
                 usage: list[x509.ObjectIdentifier]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0),
                                        critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                        critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: Key | None) -> None:
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem; server.pem/.key and client.pem/.key signed by it."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Lightbox test CA", ca_key, None, [])
    _write(folder, "ca", ca, None)
    # Lightbox presents its one certificate as server and as client: it has both uses.
    for name, usage in (
        ("server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        ("client", [ExtendedKeyUsageOID.CLIENT_AUTH]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(folder, name, _certificate(f"lightbox {name}", key, ("Lightbox test CA", ca_key),
                                          usage), key)
    return folder


def _client(pki: Path, *, certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if certificate:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return context


def _echo(port: int, tls: ssl.SSLContext | None) -> Association:
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(contexts.VERIFICATION)
    tls_args = (tls, "localhost") if tls else None
    return ae.associate("127.0.0.1", port, ae_title="LIGHTBOX", tls_args=tls_args)


def test_tls_with_client_certificates(archive: Archive, pki: Path) -> None:
    secured = with_settings(
        archive, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
        tls_ca=str(pki / "ca.pem"), dicom_acse_timeout=5,
    )
    with scp(secured) as server:
        # A client that connects and never starts its handshake holds nobody else up.
        stalled = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        assoc = _echo(server.port, _client(pki))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()

        started = time.monotonic()
        plain = _echo(server.port, None)
        assert not plain.is_established  # the TLS port does not speak plain DICOM
        anonymous = _echo(server.port, _client(pki, certificate=False))
        assert not anonymous.is_established  # no client certificate, no association
        assert time.monotonic() - started < 15

        # Lightbox's own SCU, for a node marked tls: verifies the server, presents ours.
        node = nodes.add_node(secured, name="self", ae_title="LIGHTBOX", host="localhost",
                              port=server.port, tls=True)
        assert scu.echo(secured, node) == 0

        again = _echo(server.port, _client(pki))  # still serving after the failures
        assert again.is_established
        again.release()
        stalled.close()


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-cert", "server.pem"], "DICOM TLS needs both tls_cert and tls_key"),
    (["--tls-cert", "missing.pem", "--tls-key", "server.key"], "cannot load TLS certificate"),
    (["--tls-cert", "server.pem", "--tls-key", "client.key"], "cannot load TLS certificate"),
])
def test_serve_refuses_an_unusable_dicom_tls_pair_before_it_starts(
    tmp_path: Path, pki: Path, flags: list[str], message: str
) -> None:
    argv = [sys.executable, "-m", "lightbox", "serve", "--data", str(tmp_path / "data"),
            "--http-port", str(free_port()), "--dicom-port", str(free_port()),
            *(str(pki / f) if f.endswith((".pem", ".key")) else f for f in flags)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTBOX_")}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("lightbox: ") and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "DIMSE process" not in done.stderr
