"""Running the server processes: HTTP, and the DICOM SCP next to it."""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import fields
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from lightbox import allocator
from lightbox.archive import Archive
from lightbox.child import start_child
from lightbox.dimse.scp import DicomServer
from lightbox.errors import BadRequest
from lightbox.services import readahead
from lightbox.settings import ENV_PREFIX, Settings, load
from lightbox.web.app import create_asgi

# HTTPS: forward-secret AEAD suites only (TLS 1.3 suites are configured apart).
# uvicorn would otherwise ask for "TLSv1", which admits CBC and SHA-1 suites.
HTTPS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!DSS"


def export_settings(settings: Settings) -> None:
    """Put every setting into LIGHTBOX_* variables, for worker processes."""
    for field in fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        os.environ[ENV_PREFIX + field.name.upper()] = str(value)


def worker_app() -> ASGIApp:
    """The application of one HTTP worker process (settings from the environment)."""
    start_child()
    archive = Archive.open(load(), migrate=False)
    readahead.helper.start()  # ready before the first upload, not started by it
    return create_asgi(archive)


def https_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS options for ``https_cert``/``https_key``; none for plain HTTP.

    The pair is loaded once here, so a missing half, an unreadable file or a key
    that does not match the certificate stops the start with a clear message.
    Python's server context accepts TLS 1.2 and 1.3 only.
    """
    cert, key = settings.https_cert, settings.https_key
    if not cert and not key:
        return {}
    if not cert or not key:
        raise BadRequest("HTTPS needs both https_cert and https_key (PEM files)")
    for name, path in (("https_cert", cert), ("https_key", key)):
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise BadRequest(f"{name}: cannot read {path}: {exc.strerror}") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # No passphrase prompt on the terminal: an encrypted key fails here.
        context.load_cert_chain(cert, key, password=lambda: b"")
        context.set_ciphers(HTTPS_CIPHERS)
    except ssl.SSLError as exc:
        raise BadRequest(f"https_cert/https_key: not a usable PEM certificate and key "
                         f"({exc.reason or exc})") from exc
    return {
        "ssl_certfile": cert,
        "ssl_keyfile": key,
        "ssl_version": ssl.PROTOCOL_TLS_SERVER,
        "ssl_ciphers": HTTPS_CIPHERS,
    }


def serve(settings: Settings) -> None:
    """Open the archive and serve HTTP (and DIMSE unless dicom_port is 0) until interrupted."""
    # force: the CLI has configured WARNING already, and the server logs at log_level.
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s", force=True)
    # pynetdicom logs every PDU at INFO; our association log says what happened.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl …" at every start
    tls = https_options(settings)  # before anything starts: a bad pair stops here
    allocator.keep_buffers()
    archive = Archive.open(settings)
    archive.blobs.clear_staging()
    app = create_asgi(archive)
    # As many DIMSE processes as HTTP workers: one core each for parallel associations.
    dicom = (DicomServer(archive, processes=settings.http_workers)
             if settings.dicom_port != 0 else None)
    try:
        if dicom is not None:
            dicom.start()
        if settings.http_workers > 1:
            # Worker processes build their own app from the same settings,
            # handed over through the environment.
            export_settings(settings)
            app = "lightbox.server:worker_app"  # type: ignore[assignment]
        else:
            readahead.helper.start()
        uvicorn.run(
            app,
            factory=settings.http_workers > 1,
            workers=settings.http_workers if settings.http_workers > 1 else None,
            host=settings.host,
            port=settings.http_port,
            log_level="warning",
            access_log=False,
            http="httptools",
            loop="uvloop",
            timeout_keep_alive=30,
            **tls,
        )
    finally:
        if dicom is not None:
            dicom.stop()
        archive.close()
