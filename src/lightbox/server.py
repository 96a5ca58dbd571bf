"""Running the server processes (HTTP now; DIMSE joins here)."""

from __future__ import annotations

import logging

import uvicorn

from lightbox.archive import Archive
from lightbox.settings import Settings
from lightbox.web.app import create_asgi


def serve(settings: Settings) -> None:
    """Open the archive and serve HTTP until interrupted."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s")
    archive = Archive.open(settings)
    archive.blobs.clear_staging()
    app = create_asgi(archive)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.http_port,
            log_level="warning",
            access_log=False,
            http="httptools",
            loop="uvloop",
            timeout_keep_alive=30,
        )
    finally:
        archive.close()
