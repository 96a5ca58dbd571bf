"""HTTPS on the HTTP port: `lightbox serve` with a certificate made here, HSTS and
Secure cookies over TLS (or behind an https public_url) and never on plain HTTP,
``nosniff`` on every kind of response, and clear start-up errors for a bad pair."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from lightbox.archive import Archive
from lightbox.errors import BadRequest
from lightbox.server import https_options
from lightbox.services import auth, sharing
from lightbox.services.auth import Principal
from lightbox.settings import ENV_PREFIX, Settings
from tests.conftest import RunningServer, database_url, free_port, make_settings, serving
from tests.factories import ct_dataset, stow_body, to_bytes
from tests.test_dimse_tls import _certificate, _write

HSTS = "max-age=31536000"
ADMIN = Principal(user="admin", is_admin=True)
PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, and server.pem/.key for localhost and 127.0.0.1 signed by it."""
    folder = tmp_path_factory.mktemp("https-pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    _write(folder, "ca", _certificate("Lightbox HTTPS test CA", ca_key, None, []), ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate("lightbox https", key, ("Lightbox HTTPS test CA", ca_key),
                        [ExtendedKeyUsageOID.SERVER_AUTH])
    _write(folder, "server", cert, key)
    return folder


def _trusting(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


def _serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightbox", "serve", *args]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


@contextmanager
def lightbox_serve(archive: Archive, pki: Path) -> Iterator[int]:
    """`lightbox serve` over ``archive``'s index with HTTPS on a free port."""
    port = free_port()
    settings = archive.settings
    process = subprocess.Popen(
        _serve_command("--data", str(settings.data), "--database", settings.database_url,
                       "--host", "127.0.0.1", "--http-port", str(port), "--dicom-port", "0",
                       "--workers", "1", "--https-cert", str(pki / "server.pem"),
                       "--https-key", str(pki / "server.key")),
        env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"lightbox serve ended: {process.communicate()[1]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("lightbox serve did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        try:
            process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _store_study(client: httpx.Client, token: str) -> str:
    ds = ct_dataset()
    body, content_type = stow_body([to_bytes(ds)])
    stored = client.post("/dicom-web/studies", content=body,
                         headers={"Authorization": f"Bearer {token}",
                                  "Content-Type": content_type})
    assert stored.status_code == 200, stored.text
    return str(ds.StudyInstanceUID)


def _secure(set_cookie: str) -> bool:
    return "secure" in [part.strip().lower() for part in set_cookie.split(";")]


def _sign_in(client: httpx.Client, name: str) -> httpx.Response:
    answer = client.post("/login", data={"username": name, "password": PASSWORD, "next": "/"})
    assert answer.status_code == 303, answer.text
    return answer


def test_serve_over_https_with_hsts_and_secure_cookies(archive: Archive, pki: Path) -> None:
    auth.add_user(archive, "carol", PASSWORD, is_admin=False)
    token = auth.create_token(archive)
    with lightbox_serve(archive, pki) as port:
        origin = f"https://127.0.0.1:{port}"
        with httpx.Client(base_url=origin, verify=_trusting(pki),
                          headers={"Origin": origin}) as client:
            health = client.get("/healthz")
            assert health.status_code == 200 and health.text == "ok"
            assert health.headers["strict-transport-security"] == HSTS
            assert health.headers["x-content-type-options"] == "nosniff"

            signed_in = _sign_in(client, "carol")
            assert _secure(signed_in.headers["set-cookie"])
            assert signed_in.headers["strict-transport-security"] == HSTS
            studies = client.get("/dicom-web/studies")  # the Secure cookie is sent back
            assert studies.status_code == 200
            assert studies.headers["strict-transport-security"] == HSTS

            study = _store_study(client, token)
            made = sharing.create_share(archive, ADMIN, study=study, passcode="tulip-42")
            unlocked = client.post(f"/s/{made.token}", data={"passcode": "tulip-42"})
            assert unlocked.status_code == 303
            assert _secure(unlocked.headers["set-cookie"])

        # Plain HTTP to the HTTPS port fails as a connection error, not a hang,
        # and the server goes on serving.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert httpx.get(origin + "/healthz", verify=_trusting(pki)).status_code == 200


def test_https_offers_only_tls_12_and_up_with_aead_suites(archive: Archive, pki: Path) -> None:
    with lightbox_serve(archive, pki) as port:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = _trusting(pki)
            context.minimum_version = context.maximum_version = version
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                cipher = tls.cipher()
                assert cipher is not None and tls.version() == version.name.replace("_", ".")
                assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="127.0.0.1")


def test_serve_refuses_half_a_pair_or_unusable_files(tmp_path: Path, pki: Path) -> None:
    half = subprocess.run(
        _serve_command("--data", str(tmp_path / "data"), "--https-cert", str(pki / "server.pem")),
        env=_clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert half.returncode == 2
    assert "both https_cert and https_key" in half.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was opened

    def problem(cert: Path, key: Path) -> str:
        with pytest.raises(BadRequest) as failed:
            https_options(Settings(https_cert=str(cert), https_key=str(key)))
        return str(failed.value)

    assert "https_key: cannot read" in problem(pki / "server.pem", tmp_path / "missing.key")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    assert "not a usable PEM" in problem(tmp_path / "junk.pem", pki / "server.key")
    assert "not a usable PEM" in problem(pki / "server.pem", pki / "ca.key")  # wrong key
    options = https_options(Settings(https_cert=str(pki / "server.pem"),
                                     https_key=str(pki / "server.key")))
    assert options["ssl_certfile"] == str(pki / "server.pem")
    assert https_options(Settings()) == {}


def test_plain_http_sends_no_hsts_and_no_secure_cookie(server: RunningServer) -> None:
    auth.add_user(server.archive, "carol", PASSWORD, is_admin=False)
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as client:
        signed_in = _sign_in(client, "carol")
        assert not _secure(signed_in.headers["set-cookie"])
        assert "strict-transport-security" not in signed_in.headers
        studies = client.get("/dicom-web/studies")
        assert studies.status_code == 200
        assert "strict-transport-security" not in studies.headers


def test_an_https_public_url_turns_on_hsts_and_secure_cookies(
    backend: str, tmp_path: Path
) -> None:
    public = "https://images.example.org"
    data = tmp_path / "data"
    with database_url(backend, data) as url:
        archive = Archive.open(make_settings(data, url, public_url=public))
        try:
            auth.add_user(archive, "carol", PASSWORD, is_admin=False)
            with serving(archive) as running, httpx.Client(
                base_url=running.url, headers={"Origin": public}
            ) as client:
                signed_in = _sign_in(client, "carol")  # TLS ends at the proxy
                assert _secure(signed_in.headers["set-cookie"])
                assert signed_in.headers["strict-transport-security"] == HSTS
                study = _store_study(client, running.token)
                made = sharing.create_share(archive, ADMIN, study=study, passcode="tulip-42")
                unlocked = client.post(f"/s/{made.token}", data={"passcode": "tulip-42"})
                assert unlocked.status_code == 303
                assert _secure(unlocked.headers["set-cookie"])
        finally:
            archive.close()


def _nosniff_once(answer: httpx.Response) -> None:
    assert answer.headers.get_list("x-content-type-options") == ["nosniff"], answer.url


def test_every_kind_of_response_carries_nosniff(server: RunningServer) -> None:
    ds = ct_dataset()
    body, content_type = stow_body([to_bytes(ds)])
    stored = httpx.post(server.dicomweb + "/studies", content=body,
                        headers={**server.headers, "Content-Type": content_type})
    assert stored.status_code == 200
    _nosniff_once(stored)
    study = ds.StudyInstanceUID
    found = httpx.get(server.dicomweb + "/studies", headers=server.headers)
    assert found.headers["content-type"].startswith("application/dicom+json")
    _nosniff_once(found)
    frame = (f"{server.dicomweb}/studies/{study}/series/{ds.SeriesInstanceUID}"
             f"/instances/{ds.SOPInstanceUID}/frames/1")
    accept = {**server.headers, "Accept": "multipart/related; type=application/octet-stream"}
    for _ in range(2):  # the first fills the instance cache, the second is the fast path
        answer = httpx.get(frame, headers=accept)
        assert answer.status_code == 200
        _nosniff_once(answer)
    assert "x-request-id" not in answer.headers  # answered before the middleware
    static = httpx.get(server.url + "/static/lightbox.css")
    assert static.status_code == 200
    _nosniff_once(static)
    page = httpx.get(server.url + "/login")
    _nosniff_once(page)  # pages set it themselves: still one header
    for answer in (
        httpx.get(server.dicomweb + "/studies"),  # 401
        httpx.get(f"{server.dicomweb}/studies/1.2.3/metadata", headers=server.headers),  # 404
        httpx.get(server.url + "/no-such-page"),
    ):
        assert answer.status_code in (401, 404)
        _nosniff_once(answer)
        assert "strict-transport-security" not in answer.headers


def test_access_log_keeps_credentials_out(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="lightbox.access")
    secret = "s3cret-token-value"
    httpx.get(f"{server.url}/s/{secret}/dicom-web/studies")
    httpx.get(f"{server.url}/invite/{secret}")
    httpx.get(f"{server.url}/dicom-web/studies?access_token={secret}",
              headers={"Authorization": f"Bearer {secret}", "Cookie": f"lightbox_session={secret}"})
    httpx.post(f"{server.url}/login", data={"username": "x", "password": secret},
               headers={"Origin": server.url})
    lines = [r.getMessage() for r in caplog.records if r.name == "lightbox.access"]
    assert len(lines) == 4 and all(secret not in line for line in lines)
    assert '"/s/<token>/dicom-web/studies"' in lines[0]
    assert '"/invite/<token>"' in lines[1]
