"""Running the server processes: HTTP, and the DICOM SCP next to it."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import socket
import ssl
from types import FrameType
from typing import Any

import uvicorn

from lightbox import allocator, logs
from lightbox.archive import Archive
from lightbox.child import start_child
from lightbox.dimse import tls as dicom_tls
from lightbox.dimse.scp import DicomServer, serve_process
from lightbox.errors import BadRequest
from lightbox.services import nodes, readahead
from lightbox.settings import Settings
from lightbox.supervisor import Child, Supervisor
from lightbox.web.app import create_asgi

log = logging.getLogger("lightbox.server")

# HTTPS: forward-secret AEAD suites only (TLS 1.3 suites are configured apart).
# uvicorn would otherwise ask for "TLSv1", which admits CBC and SHA-1 suites.
HTTPS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!DSS"


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
    """Open the archive and serve HTTP (and DIMSE unless dicom_port is 0) until interrupted.

    With one worker, this process serves both. With more, it migrates the index,
    binds both ports and forks the workers: ``http_workers`` HTTP processes and
    as many DIMSE processes (one core each for parallel associations), which
    share its imported modules' memory (see supervisor).
    """
    logs.configure(settings.log_level)
    tls = https_options(settings)  # before anything starts: a bad pair stops here
    if settings.dicom_port:
        dicom_tls.server_context(settings)  # so does a bad DICOM TLS pair, not a child
    allocator.keep_buffers()
    archive = Archive.open(settings)
    check_declared_nodes(archive)
    archive.blobs.clear_staging()
    if settings.http_workers > 1:
        archive.close()  # each worker opens its own: no connection crosses a fork
        serve_forked(settings, tls)
        return
    # The helper first: it is forked, and this process starts threads below.
    readahead.helper.fork()
    dicom = DicomServer(archive) if settings.dicom_port != 0 else None
    exit_after_uvicorn()
    try:
        if dicom is not None:
            dicom.start()
        uvicorn.run(create_asgi(archive), **uvicorn_options(settings, tls))
    finally:
        if dicom is not None:
            dicom.stop()
        readahead.helper.stop()
        archive.close()


def check_declared_nodes(archive: Archive) -> None:
    """Stop the start for a node declared in the settings that acts as no user;
    say which registered nodes the declared ones hide."""
    problems = nodes.missing_users(archive)
    if problems:
        archive.close()
        raise BadRequest("; ".join(problems))
    for name in nodes.shadowed(archive):
        log.warning("node %r declared in the settings hides the registered node of that name",
                    name)


def exit_after_uvicorn() -> None:
    """Once uvicorn has shut down on SIGTERM or SIGINT it raises that signal again;
    let it end this process through its ``finally`` blocks (the SCP stopped, the
    archive closed) with status 0, rather than be killed by it."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _orderly_exit)


def _orderly_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def uvicorn_options(settings: Settings, tls: dict[str, Any]) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.http_port,
        "log_level": "warning",
        "access_log": False,
        "http": "httptools",
        "loop": "uvloop",
        "timeout_keep_alive": 30,
        **tls,
    }


def serve_forked(settings: Settings, tls: dict[str, Any]) -> None:
    """Bind both ports here, then fork the HTTP and DIMSE workers that serve them."""
    options = uvicorn_options(settings, tls)
    # uvicorn binds the HTTP socket as it would for its own workers (IPv4 or
    # IPv6 from the host, address reuse); the app named here is never loaded:
    # each worker builds its own.
    http_socket = uvicorn.Config("lightbox.server:serve", **options).bind_socket()
    dicom_socket = listen(settings.host, settings.dicom_port) if settings.dicom_port else None
    parent = os.getpid()
    children = []
    for n in range(settings.http_workers):
        children.append(Child(f"HTTP worker {n + 1}", functools.partial(
            http_worker, settings, options, http_socket, dicom_socket, n + 1, parent)))
    if dicom_socket is not None:
        # Every DIMSE process polls the socket; the one that accepts serves.
        dicom_socket.setblocking(False)
        loads = multiprocessing.get_context("fork").Array("i", settings.http_workers,
                                                          lock=False)
        for n in range(settings.http_workers):
            children.append(Child(f"DIMSE process {n + 1}", functools.partial(
                dicom_worker, settings, dicom_socket, http_socket, loads, n, parent)))
    try:
        Supervisor(children).run()
    finally:
        http_socket.close()
        if dicom_socket is not None:
            dicom_socket.close()


def listen(host: str, port: int) -> socket.socket:
    """The DICOM port's listening socket, or a clear error when it cannot be had."""
    try:
        return socket.create_server((host, port))
    except OSError as exc:
        raise BadRequest(f"dicom_port: cannot listen on {host}:{port}: "
                         f"{exc.strerror or exc}") from exc


def http_worker(settings: Settings, options: dict[str, Any], sock: socket.socket,
                other: socket.socket | None, number: int, parent: int) -> None:
    """One HTTP worker (a forked child): its header helper, its archive, uvicorn."""
    if other is not None:
        other.close()  # the DIMSE port is the DIMSE processes'
    start_child(f"lightbox-http{number}", parent)
    readahead.helper.fork()  # before uvicorn starts any thread
    archive = Archive.open(settings, migrate=False)
    exit_after_uvicorn()
    try:
        config = uvicorn.Config(create_asgi(archive), **options)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        readahead.helper.stop()
        archive.close()


def dicom_worker(settings: Settings, sock: socket.socket, other: socket.socket, loads: Any,
                 slot: int, parent: int) -> None:
    """One DIMSE process (a forked child) serving the shared listening socket."""
    other.close()  # the HTTP port is the HTTP workers'
    serve_process(settings, sock, loads, slot, parent)
