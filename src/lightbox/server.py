"""Running the server processes: HTTP, and the DICOM SCP next to it."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from dataclasses import fields

import uvicorn
from starlette.types import ASGIApp

from lightbox.archive import Archive
from lightbox.dimse.scp import DicomServer
from lightbox.settings import ENV_PREFIX, Settings, load
from lightbox.web.app import create_asgi

PR_SET_PDEATHSIG = 1


def export_settings(settings: Settings) -> None:
    """Put every setting into LIGHTBOX_* variables, for worker processes."""
    for field in fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        os.environ[ENV_PREFIX + field.name.upper()] = str(value)


def worker_app() -> ASGIApp:
    """The application of one HTTP worker process (settings from the environment)."""
    _die_with_parent()
    archive = Archive.open(load(), migrate=False)
    return create_asgi(archive)


def _die_with_parent() -> None:
    """Ask Linux to end this worker when the supervisor dies (even by kill -9),
    so no orphan keeps serving from an archive nobody supervises."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's own shutdown still stops workers
    if os.getppid() == 1:
        os._exit(0)  # the supervisor died before the request took effect


def serve(settings: Settings) -> None:
    """Open the archive and serve HTTP (and DIMSE unless dicom_port is 0) until interrupted."""
    # force: the CLI has configured WARNING already, and the server logs at log_level.
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s", force=True)
    # pynetdicom logs every PDU at INFO; our association log says what happened.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl …" at every start
    archive = Archive.open(settings)
    archive.blobs.clear_staging()
    app = create_asgi(archive)
    dicom = DicomServer(archive) if settings.dicom_port != 0 else None
    try:
        if dicom is not None:
            dicom.start()
        if settings.http_workers > 1:
            # Worker processes build their own app from the same settings,
            # handed over through the environment.
            export_settings(settings)
            app = "lightbox.server:worker_app"  # type: ignore[assignment]
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
        )
    finally:
        if dicom is not None:
            dicom.stop()
        archive.close()
