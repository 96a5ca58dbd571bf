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
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from lightbox.errors import BadRequest, Forbidden
from lightbox.index import audit as index
from lightbox.index.schema import as_utc, studies
from lightbox.services import atna

if TYPE_CHECKING:  # auth builds on the archive, which builds on this module
    from lightbox.services.auth import Principal

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
    content["at"] = as_utc(row["at"]).isoformat(timespec="microseconds")
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
        if self._closed:
            self.flush()  # no flusher any more: written now, not dropped
        else:
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
            actions = Counter(event.action for event, _ in pending)
            log.exception("could not write %d audit events (%s); kept for the next try",
                          len(pending), ", ".join(f"{a} x{n}" for a, n in sorted(actions.items())))
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


# -- the administrators' audit page --------------------------------------------------------

PAGE_SIZE = 100
_ACTION = re.compile(r"[A-Za-z0-9_:.-]{1,32}")
_UID = re.compile(r"[0-9.]{1,64}")
_MAX_SEQ = 2**62


@dataclass(frozen=True)
class AuditQuery:
    """The audit page's filters and position; every field optional."""

    action: str | None = None
    actor: str | None = None  # exact, or a prefix when it ends with ``*``
    study_uid: str | None = None
    date_from: date | None = None  # inclusive, UTC days
    date_to: date | None = None  # inclusive
    before: int | None = None  # older page: rows with a smaller sequence number
    after: int | None = None  # newer page: rows with a larger sequence number

    def filters(self) -> dict[str, Any]:
        """Keyword arguments for the index's audit queries."""
        actor, prefix = self.actor, False
        if actor is not None and actor.endswith("*"):
            actor, prefix = actor.rstrip("*"), True
        return {
            "action": self.action,
            "actor": actor or None,
            "actor_prefix": prefix,
            "study_uid": self.study_uid,
            "since": _day_start(self.date_from),
            "until": _day_start(self.date_to + timedelta(days=1)) if self.date_to else None,
        }


@dataclass(frozen=True)
class AuditPage:
    rows: list[dict[str, Any]]
    total: int  # rows matching the filters, on every page
    older: int | None  # ``before`` for the next older page, None on the oldest
    newer: int | None  # ``after`` for the next newer page, None on the newest


def _day_start(day: date | None) -> datetime | None:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) if day else None


def _text(params: Mapping[str, str], name: str, pattern: re.Pattern[str] | None,
          limit: int) -> str | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    printable = all(ch.isprintable() for ch in value)
    if len(value) > limit or not printable or (pattern and not pattern.fullmatch(value)):
        raise BadRequest(f"{name}: not a valid filter value")
    return value


def _day(params: Mapping[str, str], name: str) -> date | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    try:
        if len(value) != 10:
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError as exc:
        raise BadRequest(f"{name}: expected a date as YYYY-MM-DD") from exc


def _seq(params: Mapping[str, str], name: str) -> int | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 18 or int(value) > _MAX_SEQ:
        raise BadRequest(f"{name}: expected a row number")
    return int(value)


def parse_query(params: Mapping[str, str]) -> AuditQuery:
    """The audit page's query string as an AuditQuery; BadRequest for anything else."""
    query = AuditQuery(
        action=_text(params, "action", _ACTION, 32),
        actor=_text(params, "actor", None, 160),
        study_uid=_text(params, "study", _UID, 64),
        date_from=_day(params, "from"),
        date_to=_day(params, "to"),
        before=_seq(params, "before"),
        after=_seq(params, "after"),
    )
    if query.date_from and query.date_to and query.date_from > query.date_to:
        raise BadRequest("from: the first day comes after the last")
    if query.before is not None and query.after is not None:
        raise BadRequest("before and after: one page position at a time")
    return query


def require_auditor(principal: Principal) -> None:
    """Only administrators with the whole archive read the audit trail."""
    if not principal.is_admin or not principal.whole_archive:
        raise Forbidden("only administrators may read the audit trail")


def search(db: Any, principal: Principal, query: AuditQuery,
           page_size: int = PAGE_SIZE) -> AuditPage:
    """One page of matching events, newest first, with the links to its neighbours."""
    require_auditor(principal)
    filters = query.filters()
    with db.read() as conn:
        rows = index.search(conn, limit=page_size, before=query.before, after=query.after,
                            **filters)
        total = index.count(conn, **filters)
        older = newer = None
        if rows:
            low, high = int(rows[-1]["seq"]), int(rows[0]["seq"])
            older = low if index.exists(conn, before=low, **filters) else None
            newer = high if index.exists(conn, after=high, **filters) else None
    for row in rows:
        row["at"] = as_utc(row["at"])
        row["detail"] = json.loads(row["detail"]) if row["detail"] else None
    return AuditPage(rows, total, older, newer)


def export_lines(db: Any, principal: Principal, query: AuditQuery, form: str,
                 source_id: str, batch: int = 2000) -> Iterator[str]:
    """Every matching event in chain order, as ``lightbox audit export`` writes them:
    one JSON object per line, or DICOM audit messages (PS3.15 A.5) inside one
    ``AuditMessages`` element, so that the file is a single XML document.

    Each batch is read in its own short transaction: a slow download holds no
    connection and no snapshot."""
    require_auditor(principal)
    filters = query.filters()
    if form == "atna":
        yield '<?xml version="1.0" encoding="UTF-8"?>\n<AuditMessages>\n'
    after = 0
    while True:
        with db.read() as conn:
            found = index.matching_rows(conn, after=after, batch=batch, **filters)
        for row in found:
            yield export_line(row, form, source_id)
        if len(found) < batch:
            break
        after = int(found[-1]["seq"])
    if form == "atna":
        yield "</AuditMessages>\n"


def export_line(row: dict[str, Any], form: str, source_id: str) -> str:
    """One audit row as an export line: JSON, or an ATNA ``AuditMessage``."""
    if form == "atna":
        return atna.to_xml(row, source_id) + "\n"
    row = {**row, "at": as_utc(row["at"]).isoformat(),
           "detail": json.loads(row["detail"]) if row["detail"] else None}
    return json.dumps(row, sort_keys=True) + "\n"
