"""Shared fixtures: archives on SQLite and PostgreSQL, and a real HTTP server.

PostgreSQL is the server on 127.0.0.1:5432 (override with LIGHTBOX_TEST_PG);
each test gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import uvicorn

from lightbox.archive import Archive
from lightbox.services import auth
from lightbox.settings import Settings
from lightbox.web.app import create_asgi

PG_ADMIN = os.environ.get("LIGHTBOX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]

# The module-scoped Chromium fixture of the browser tests.
pytest_plugins = ["tests.browser"]


@contextmanager
def database_url(backend: str, data: Path) -> Iterator[str]:
    """A fresh, empty database of ``backend``; PostgreSQL ones are dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{data / 'index.sqlite'}"
        return
    name = "lbtest_" + secrets.token_hex(6)
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# The viewer fetched by `make install` (tests that need it fail if it is missing).
VIEWER_DIR = Path(__file__).resolve().parent.parent / ".viewer" / "ohif-3.13.2"


def make_settings(data: Path, url: str, **extra: Any) -> Settings:
    extra.setdefault("viewer_dir", VIEWER_DIR)
    return Settings(data=data, database=url, **extra)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def archive(backend: str, tmp_path: Path) -> Iterator[Archive]:
    """An open, empty archive on the parametrised backend."""
    data = tmp_path / "data"
    with database_url(backend, data) as url:
        opened = Archive.open(make_settings(data, url))
        try:
            yield opened
        finally:
            opened.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    """A Lightbox HTTP server on a loopback port, with an admin token."""

    archive: Archive
    url: str
    token: str

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextmanager
def serving(archive: Archive) -> Iterator[RunningServer]:
    port = free_port()
    config = uvicorn.Config(
        create_asgi(archive), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    token = auth.create_token(archive)
    try:
        yield RunningServer(archive, f"http://127.0.0.1:{port}", token)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server(archive: Archive) -> Iterator[RunningServer]:
    """A running server over the parametrised archive."""
    with serving(archive) as running:
        yield running
