"""Audit events as DICOM audit messages (PS3.15 A.5, the IHE ATNA format), and
their delivery to a syslog collector (RFC 5424 over UDP, or TCP with octet
counting as in RFC 6587)."""

from __future__ import annotations

import logging
import socket
import threading
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import quoteattr

from lightbox.errors import BadRequest
from lightbox.index.schema import as_utc

log = logging.getLogger("lightbox.audit")

# action -> (EventID code, meaning, EventActionCode, EventTypeCode or None)
_EVENTS: dict[str, tuple[str, str, str, tuple[str, str] | None]] = {
    "login": ("110114", "User Authentication", "E", ("110122", "Login")),
    "logout": ("110114", "User Authentication", "E", ("110123", "Logout")),
    "query": ("110112", "Query", "E", None),
    "view": ("110103", "DICOM Instances Accessed", "R", None),
    "frames": ("110103", "DICOM Instances Accessed", "R", None),
    "retrieve": ("110103", "DICOM Instances Accessed", "R", None),
    "download": ("110106", "Export", "R", None),
    "export": ("110106", "Export", "R", None),
    "upload": ("110107", "Import", "C", None),
    "import": ("110107", "Import", "C", None),
    "delete": ("110105", "DICOM Study Deleted", "D", None),
    "audit_export": ("110101", "Audit Log Used", "R", None),
    "access_denied": ("110113", "Security Alert", "E", ("110132", "Use of Restricted Function")),
}
_SECURITY = ("110113", "Security Alert", "E", ("110137", "User Security Attributes Changed"))
_OUTCOMES = {"success": "0", "failure": "4"}


def _code(tag: str, code: str, meaning: str, system: str = "DCM") -> str:
    return (f"<{tag} csd-code={quoteattr(code)} codeSystemName={quoteattr(system)} "
            f"originalText={quoteattr(meaning)}/>")


def to_xml(row: dict[str, Any], source_id: str) -> str:
    """One audit row as an ``AuditMessage`` document."""
    code, meaning, action, event_type = _EVENTS.get(row["action"], _SECURITY)
    at = as_utc(row["at"]).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    parts = [
        "<AuditMessage>",
        f"<EventIdentification EventActionCode={quoteattr(action)} "
        f"EventDateTime={quoteattr(at)} "
        f"EventOutcomeIndicator={quoteattr(_OUTCOMES.get(row['outcome'], '4'))}>",
        _code("EventID", code, meaning),
    ]
    if event_type is not None:
        parts.append(_code("EventTypeCode", *event_type))
    parts.append("</EventIdentification>")
    requestor = f"<ActiveParticipant UserID={quoteattr(row['actor'])} UserIsRequestor=\"true\""
    if row.get("source"):
        requestor += (f" NetworkAccessPointID={quoteattr(row['source'])}"
                      ' NetworkAccessPointTypeCode="2"')
    parts.append(requestor + "/>")
    parts.append(f"<ActiveParticipant UserID={quoteattr(source_id)} UserIsRequestor=\"false\"/>")
    parts.append(f"<AuditSourceIdentification AuditSourceID={quoteattr(source_id)}/>")
    if row.get("study_uid"):
        parts += [
            f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(row['study_uid'])}"
            ' ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">',
            _code("ParticipantObjectIDTypeCode", "110180", "Study Instance UID"),
            "</ParticipantObjectIdentification>",
        ]
    if row.get("patient_id"):
        parts += [
            f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(row['patient_id'])}"
            ' ParticipantObjectTypeCode="1" ParticipantObjectTypeCodeRole="1">',
            _code("ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881"),
            "</ParticipantObjectIdentification>",
        ]
    parts.append("</AuditMessage>")
    return "".join(parts)


class SyslogSender:
    """Sends audit messages to ``udp://host:port`` or ``tcp://host:port``."""

    def __init__(self, url: str, source_id: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp") or not parts.hostname or not parts.port:
            raise BadRequest(f"audit syslog must be udp://host:port or tcp://host:port: {url!r}")
        self.scheme, self.address = parts.scheme, (parts.hostname, parts.port)
        self.source_id = source_id
        self._host = socket.gethostname()[:255] or "-"
        self._tcp: socket.socket | None = None
        self._lock = threading.Lock()

    def frame(self, row: dict[str, Any]) -> bytes:
        # <85>: facility authpriv (10), severity notice (5). MSGID as IHE ATNA asks.
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        head = f"<85>1 {stamp} {self._host} lightbox - IHE+RFC-3881 - "
        return head.encode() + b"\xef\xbb\xbf" + to_xml(row, self.source_id).encode()

    def send(self, rows: list[dict[str, Any]]) -> None:
        """Best effort: a collector that is down must not stop the archive."""
        try:
            with self._lock:
                for row in rows:
                    self._send_one(self.frame(row))
        except OSError as exc:
            log.warning("audit syslog %s:%d: %s", *self.address, exc)
            self._close_tcp()

    def _send_one(self, message: bytes) -> None:
        if self.scheme == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
            return
        if self._tcp is None:
            self._tcp = socket.create_connection(self.address, timeout=5)
        self._tcp.sendall(f"{len(message)} ".encode() + message)

    def _close_tcp(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
