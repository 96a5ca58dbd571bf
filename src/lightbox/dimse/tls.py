"""DICOM TLS (PS3.15 B.1 / BCP 195): SSL contexts for the SCP and the SCU.

One certificate and key serve both roles: the SCP presents them, and the SCU
presents them as its client certificate (so a CA that checks key usage needs
both the serverAuth and clientAuth extended key usages in it). A CA bundle, when configured, is what
peers are verified against; on the SCP it also makes a client certificate
mandatory.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from lightbox.errors import BadRequest
from lightbox.settings import Settings


def enabled(settings: Settings) -> bool:
    """Whether the SCP speaks TLS (a certificate and its key are configured)."""
    return bool(settings.tls_cert and settings.tls_key)


def _load_chain(context: ssl.SSLContext, settings: Settings) -> None:
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise BadRequest(f"cannot load TLS certificate {settings.tls_cert}: {exc}") from exc


def _load_ca(context: ssl.SSLContext, settings: Settings) -> None:
    try:
        context.load_verify_locations(cafile=settings.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise BadRequest(f"cannot load TLS CA bundle {settings.tls_ca}: {exc}") from exc


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's context, or None when TLS is not configured."""
    if not enabled(settings):
        if settings.tls_cert or settings.tls_key:
            raise BadRequest("DICOM TLS needs both tls_cert and tls_key")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, settings)
    if settings.tls_ca:
        _load_ca(context, settings)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """The SCU's context for a node with ``tls``: verify the peer against
    ``tls_ca`` (or the system's CAs) and present our certificate if we have one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_ca:
        _load_ca(context, settings)
    if enabled(settings):
        _load_chain(context, settings)
    return context


def describe(settings: Settings) -> str:
    if not enabled(settings):
        return "plain TCP"
    verify = f", client certificates verified against {Path(settings.tls_ca).name}" if (
        settings.tls_ca
    ) else ""
    return f"TLS{verify}"
