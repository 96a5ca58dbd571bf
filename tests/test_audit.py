"""The audit trail: what gets recorded, the hash chain, verify, export, syslog."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, update

from lightbox.archive import Archive
from lightbox.index.audit import audit_events
from lightbox.services import atna, audit, auth
from lightbox.services.audit import Auditor, Event
from tests.conftest import RunningServer
from tests.factories import ct_dataset, stow_body, to_bytes


def events(archive: Archive) -> list[dict[str, Any]]:
    archive.audit.flush()
    with archive.db.read() as conn:
        return [dict(r) for r in conn.execute(
            select(audit_events).order_by(audit_events.c.seq)).mappings()]


def test_events_form_a_chain_that_verify_accepts(archive: Archive) -> None:
    for n in range(5):
        archive.audit.record(Event("view", "alice", study_uid=f"1.2.3.{n}", source="10.0.0.1"))
    archive.audit.record(Event("delete", "admin", study_uid="1.2.3.0"), now=True)
    rows = events(archive)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["prev_hash"] == p["hash"] for p, r in itertools.pairwise(rows))
    assert audit.verify(archive.db) == audit.Verdict(True, 6)


def _tamper(archive: Archive, statement: Any) -> None:
    with archive.db.write() as conn:
        conn.execute(statement)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (update(audit_events).where(audit_events.c.seq == 2).values(actor="mallory"),
         "row 2 was modified"),
        (update(audit_events).where(audit_events.c.seq == 3).values(study_uid="9.9"),
         "row 3 was modified"),
        (delete(audit_events).where(audit_events.c.seq == 2), "row 2 is missing"),
        (delete(audit_events).where(audit_events.c.seq == 4), "head names row 4"),
    ],
)
def test_verify_finds_a_changed_or_removed_row(
    archive: Archive, change: Any, problem: str
) -> None:
    for n in range(4):
        archive.audit.record(Event("query", "bob", detail={"n": n}))
    archive.audit.flush()
    _tamper(archive, change)
    verdict = audit.verify(archive.db)
    assert not verdict.ok
    assert problem in (verdict.problem or "")


def test_writers_in_two_processes_extend_one_chain(archive: Archive) -> None:
    # Two Auditors on one index stand for two server processes.
    other = Auditor(archive.db)

    def write(auditor: Auditor, who: str) -> None:
        for n in range(20):
            auditor.record(Event("view", who, detail={"n": n}), now=True)

    threads = [threading.Thread(target=write, args=(a, w))
               for a, w in ((archive.audit, "one"), (other, "two"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit.verify(archive.db) == audit.Verdict(True, 40)


def test_dicomweb_access_is_recorded_with_who_and_what(server: RunningServer) -> None:
    ds = ct_dataset(patient_id="PAT-AUDIT")
    body, content_type = stow_body([to_bytes(ds)])
    headers = {**server.headers, "User-Agent": "audit-test/1"}
    assert httpx.post(server.dicomweb + "/studies", content=body,
                      headers={**headers, "Content-Type": content_type}).status_code == 200
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    instance = f"{server.dicomweb}/studies/{study}/series/{series}/instances/{sop}"
    assert httpx.get(server.dicomweb + "/studies?PatientID=PAT-AUDIT",
                     headers=headers).status_code == 200
    assert httpx.get(instance + "/metadata", headers=headers).status_code == 200
    accept = {"Accept": "multipart/related; type=application/octet-stream"}
    for _ in range(3):  # the first is answered by the application, then the fast path
        assert httpx.get(instance + "/frames/1", headers={**headers, **accept}).status_code == 200
    assert httpx.get(server.dicomweb + "/studies").status_code == 401
    assert httpx.delete(f"{server.dicomweb}/studies/{study}", headers=headers).status_code == 204

    rows = events(server.archive)
    by_action: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_action.setdefault(row["action"], []).append(row)
    upload = by_action["upload"][0]
    assert upload["study_uid"] == study and upload["patient_id"] == "PAT-AUDIT"
    assert json.loads(upload["detail"])["count"] == 1
    assert upload["user_agent"] == "audit-test/1" and upload["source"] == "127.0.0.1"
    assert "PatientID=PAT-AUDIT" in json.loads(by_action["query"][0]["detail"])["query"]
    assert by_action["view"][0]["study_uid"] == study
    assert sum(json.loads(r["detail"])["count"] for r in by_action["frames"]) == 3
    assert by_action["access_denied"][0]["outcome"] == "failure"
    deleted = by_action["delete"][0]
    assert deleted["patient_id"] == "PAT-AUDIT" and deleted["actor"] == "admin"
    assert audit.verify(server.archive.db).ok


def test_sign_in_attempts_are_recorded(server: RunningServer) -> None:
    auth.add_user(server.archive, "dora", "long enough", is_admin=False)
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as client:
        client.post("/login", data={"username": "dora", "password": "wrong password"})
        client.post("/login", data={"username": "dora", "password": "long enough"})
        client.post("/logout")
    # Security events are written before the answer: no flush needed.
    with server.archive.db.read() as conn:
        found = [(r.action, r.actor, r.outcome) for r in conn.execute(
            select(audit_events).order_by(audit_events.c.seq))]
    assert found == [("login", "dora", "failure"), ("login", "dora", "success"),
                     ("logout", "dora", "success")]


def test_atna_messages_name_event_participants_and_objects(archive: Archive) -> None:
    archive.audit.record(Event("download", "alice", study_uid="1.2.3", patient_id="P1",
                               source="192.0.2.7"), now=True)
    row = events(archive)[0]
    message = ET.fromstring(atna.to_xml(row, "LIGHTBOX"))
    assert message.tag == "AuditMessage"
    event_id = message.find("EventIdentification/EventID")
    assert event_id is not None and event_id.get("csd-code") == "110106"
    requestor = message.find("ActiveParticipant[@UserIsRequestor='true']")
    assert requestor is not None and requestor.get("UserID") == "alice"
    assert requestor.get("NetworkAccessPointID") == "192.0.2.7"
    objects = {o.get("ParticipantObjectID")
               for o in message.iter("ParticipantObjectIdentification")}
    assert objects == {"1.2.3", "P1"}


def test_events_reach_a_syslog_collector_over_udp(archive: Archive) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(10)
        port = collector.getsockname()[1]
        settings = replace(archive.settings, audit_syslog=f"udp://127.0.0.1:{port}")
        sending = Archive.open(settings, migrate=False)
        try:
            sending.audit.record(Event("login", "erin", source="127.0.0.1"), now=True)
            datagram, _ = collector.recvfrom(65536)
        finally:
            sending.close()
    assert datagram.startswith(b"<85>1 ")
    assert b" lightbox - IHE+RFC-3881 - \xef\xbb\xbf<AuditMessage>" in datagram
    assert b'UserID="erin"' in datagram


def test_cli_verify_and_export(archive: Archive) -> None:
    archive.audit.record(Event("view", "frank", study_uid="1.2.3"), now=True)
    archive.audit.record(Event("view", "frank", study_uid="1.2.4"), now=True)
    env = {**os.environ, "LIGHTBOX_DATA": str(archive.settings.data),
           "LIGHTBOX_DATABASE": archive.settings.database}

    def lightbox(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lightbox", "audit", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    assert lightbox("verify").stdout.strip() == "audit trail intact: 2 events"
    exported = [json.loads(line) for line in lightbox("export").stdout.splitlines()]
    assert [e["study_uid"] for e in exported] == ["1.2.3", "1.2.4"]
    atna_lines = lightbox("export", "--format", "atna").stdout.splitlines()
    assert all(ET.fromstring(line).tag == "AuditMessage" for line in atna_lines)
    _tamper(archive, update(audit_events).where(audit_events.c.seq == 1).values(actor="x"))
    broken = lightbox("verify")
    assert broken.returncode == 1 and "row 1 was modified" in broken.stderr


def test_the_study_page_lists_its_access_history(server: RunningServer) -> None:
    ds = ct_dataset(patient_id="PAT-HISTORY")
    body, content_type = stow_body([to_bytes(ds)])
    httpx.post(server.dicomweb + "/studies", content=body,
               headers={**server.headers, "Content-Type": content_type})
    study = ds.StudyInstanceUID
    httpx.get(f"{server.dicomweb}/studies/{study}/metadata", headers=server.headers)
    server.archive.audit.flush()
    page = httpx.get(f"{server.url}/browse/studies/{study}", headers=server.headers)
    assert page.status_code == 200
    history = page.text.split('id="history"', 1)[1]
    assert "upload" in history and "view" in history and "admin" in history
    assert 'action="/shares"' in page.text


def test_study_pages_and_their_thumbnails_are_views() -> None:
    from lightbox.web.audit import classify

    study, series = "1.2.3.4", "1.2.3.4.5"
    assert classify("GET", f"/browse/studies/{study}", "") == ("view", study, None)
    assert classify("GET", f"/browse/thumbnails/{study}/{series}.jpg", "") == (
        "view", study, series)
    assert classify("POST", f"/browse/studies/{study}/delete", "") is None
    assert classify("GET", "/browse", "") is None


def test_counts_after_close_are_written_not_dropped(archive: Archive) -> None:
    """A request that finishes while its archive closes still leaves its trace."""
    sending = Archive.open(archive.settings, migrate=False)
    sending.close()
    sending.audit.count("upload", "dicom:LATE", "1.2.3", n=2)
    with archive.db.read() as conn:
        rows = conn.execute(select(audit_events.c.actor, audit_events.c.detail)
                            .where(audit_events.c.action == "upload")).all()
    assert [(actor, json.loads(detail)["count"]) for actor, detail in rows] == [("dicom:LATE", 2)]
