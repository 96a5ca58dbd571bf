"""The audit trail: who did what to which patient's images, when, from where.

Every authentication, view, download, upload, share and deletion becomes an
``Event``. Events that change rights or data (sign-in, deletion, sharing) are
written before the caller gets an answer; frequent ones (queries, views,
frames) are buffered and written together about once a second, frames
counted per caller and study rather than one row each. A crash can lose at
most that last second of views; never a security event.

Rows form a hash chain (each row hashes its content and the previous hash),
so ``verify`` finds any row that was changed, removed or reordered later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from lightbox.index import audit as index
from lightbox.index.schema import studies

log = logging.getLogger("lightbox.audit")

FLUSH_SECONDS = 1.0
MAX_PENDING = 500


@dataclass(frozen=True)
class Event:
    """One audited action. ``actor`` is a user name, ``link:<id>``, ``dicom:<AE>``
    or ``anonymous``; ``source`` the caller's IP address."""

    action: str
    actor: str
    outcome: str = "success"
    study_uid: str | None = None
    series_uid: str | None = None
    patient_id: str | None = None
    source: str | None = None
    user_agent: str | None = None
    link: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Caller:
    """Where a request came from, for the audit trail."""

    source: str | None = None
    user_agent: str | None = None
    link: str | None = None


def row_hash(row: dict[str, Any], prev_hash: str) -> str:
    """SHA-256 over the previous hash and the row's fields, canonically encoded."""
    content = {name: row.get(name) for name in index.FIELDS}
    content["at"] = index.as_utc(row["at"]).isoformat(timespec="microseconds")
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256((prev_hash + encoded).encode()).hexdigest()


def _clip(value: str | None, length: int) -> str | None:
    return value[:length] if value else None


def _row(event: Event, at: datetime) -> dict[str, Any]:
    return {
        "at": at,
        "actor": event.actor[:160] or "anonymous",
        "action": event.action[:32],
        "outcome": event.outcome[:16],
        "patient_id": _clip(event.patient_id, 64),
        "study_uid": _clip(event.study_uid, 64),
        "series_uid": _clip(event.series_uid, 64),
        "source": _clip(event.source, 64),
        "user_agent": _clip(event.user_agent, 256),
        "link": _clip(event.link, 64),
        "detail": json.dumps(event.detail, sort_keys=True) if event.detail else None,
    }


class Auditor:
    """Writes events for one process; the chain is shared through the index."""

    def __init__(self, db: Any, sender: Any | None = None) -> None:
        self._db = db
        self._sender = sender  # an atna.SyslogSender, or None
        self._lock = threading.Lock()
        self._pending: list[tuple[Event, datetime]] = []
        self._counts: dict[tuple[str, str, str | None, str | None, str | None, str | None],
                           int] = {}
        self._counts_since: datetime | None = None
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- recording -------------------------------------------------------------------

    def record(self, event: Event, *, now: bool = False) -> None:
        """Record ``event``; ``now`` writes it (and anything pending) before returning."""
        with self._lock:
            self._pending.append((event, datetime.now(UTC)))
            full = len(self._pending) >= MAX_PENDING
        if now or full or self._closed:
            self.flush()
        else:
            self._ensure_thread()

    def count(
        self, action: str, actor: str, study_uid: str | None, *, source: str | None = None,
        user_agent: str | None = None, link: str | None = None, n: int = 1,
    ) -> None:
        """Count a frequent action (frames served, instances stored): one row per
        caller, study and action per flush, with the number in its detail."""
        key = (action, actor, study_uid, source, user_agent, link)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n
            if self._counts_since is None:
                self._counts_since = datetime.now(UTC)
        self._ensure_thread()

    def patient_of(self, study_uid: str) -> str | None:
        """The study's Patient ID now (for events about studies about to go)."""
        with self._db.read() as conn:
            return _patient_ids(conn, [study_uid]).get(study_uid)

    # -- writing ---------------------------------------------------------------------

    def flush(self) -> None:
        """Write everything pending in one transaction, extending the chain."""
        with self._lock:
            pending, self._pending = self._pending, []
            counts, self._counts = self._counts, {}
            since, self._counts_since = self._counts_since, None
        for (action, actor, study, source, agent, link), n in counts.items():
            detail = {"count": n, "since": since.isoformat() if since else None}
            pending.append((Event(action, actor, study_uid=study, source=source,
                                  user_agent=agent, link=link, detail=detail),
                            datetime.now(UTC)))
        if not pending:
            return
        try:
            self._write(pending)
        except Exception:
            log.exception("could not write %d audit events; kept for the next try", len(pending))
            with self._lock:
                self._pending[:0] = pending

    def _write(self, pending: list[tuple[Event, datetime]]) -> None:
        with self._db.write() as conn:
            patients = _patient_ids(conn, {e.study_uid for e, _ in pending if e.study_uid
                                           and not e.patient_id})
            seq, prev = index.lock_head(conn)
            rows = []
            for event, at in pending:
                row = _row(event, at)
                if not row["patient_id"] and event.study_uid:
                    row["patient_id"] = patients.get(event.study_uid)
                seq += 1
                row["seq"] = seq
                row["prev_hash"] = prev
                row["hash"] = prev = row_hash(row, prev)
                rows.append(row)
            index.append(conn, rows, (seq, prev))
        if self._sender is not None:
            self._sender.send(rows)

    def _ensure_thread(self) -> None:
        if self._thread is not None or self._closed:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_SECONDS)
            self.flush()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.flush()


def _patient_ids(conn: Any, study_uids: Iterable[str]) -> dict[str, str]:
    wanted = list(study_uids)
    if not wanted:
        return {}
    found = conn.execute(
        select(studies.c.study_instance_uid, studies.c.patient_id)
        .where(studies.c.study_instance_uid.in_(wanted))
    )
    return {uid: pid for uid, pid in found if pid}


# -- reading and checking ----------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: int
    problem: str | None = None
    seq: int | None = None


def verify(db: Any) -> Verdict:
    """Walk the chain: every row's hash, every link, and the head."""
    prev, count, last_seq = index.GENESIS, 0, 0
    with db.read() as conn:
        for row in index.rows(conn):
            count += 1
            seq = int(row["seq"])
            if seq != last_seq + 1:
                return Verdict(False, count, f"row {last_seq + 1} is missing", last_seq + 1)
            if row["prev_hash"] != prev:
                return Verdict(False, count, f"row {seq} does not follow row {seq - 1}", seq)
            if row_hash(row, prev) != row["hash"]:
                return Verdict(False, count, f"row {seq} was modified", seq)
            prev, last_seq = row["hash"], seq
        head_seq, head_hash = index.head(conn)
    if (head_seq, head_hash) != (last_seq, prev):
        return Verdict(False, count, f"the chain ends at row {last_seq}, "
                                     f"but its head names row {head_seq}", last_seq + 1)
    return Verdict(True, count)


def history_of_study(db: Any, study_uid: str, limit: int = 100) -> list[dict[str, Any]]:
    with db.read() as conn:
        return index.newest(conn, limit=limit, study_uid=study_uid)


def history_of_link(db: Any, link: str, limit: int = 100) -> list[dict[str, Any]]:
    with db.read() as conn:
        return index.newest(conn, limit=limit, link=link)
