"""The administrators' audit page on both backends: rows newest first, filters,
keyset paging, who may open it, hostile parameters, the JSON and ATNA downloads
and a tampered row reported by the chain check."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from lightbox.index.audit import audit_events
from lightbox.services import audit, auth
from lightbox.services.audit import Event
from tests.conftest import RunningServer

ROW = re.compile(r'id="event-(\d+)"')
STUDY = "1.2.826.0.1.3680043.8.498.1"


def _record(server: RunningServer, *events: Event) -> None:
    for event in events:
        server.archive.audit.record(event)
    server.archive.audit.flush()


def _page(server: RunningServer, headers: dict[str, str] | None = None,
          **params: Any) -> httpx.Response:
    return httpx.get(server.url + "/admin/audit", params=params,
                     headers=server.headers if headers is None else headers)


def _seqs(answer: httpx.Response) -> list[int]:
    assert answer.status_code == 200, answer.text
    return [int(n) for n in ROW.findall(answer.text)]


def _link(answer: httpx.Response, rel: str) -> str | None:
    found = re.search(r'<a href="([^"]+)" rel="' + rel + '"', answer.text)
    return found.group(1).replace("&amp;", "&") if found else None


@pytest.fixture
def trail(server: RunningServer) -> RunningServer:
    """A few events of different kinds (seq 1..5)."""
    _record(
        server,
        Event("login", "alice", source="10.0.0.7", user_agent="Mozilla/5.0 " + "x" * 200),
        Event("view", "alice", study_uid=STUDY, series_uid=STUDY + ".1",
              patient_id="PAT-7", source="10.0.0.7"),
        Event("login", "bob", outcome="failure", source="10.0.0.8"),
        Event("share_open", "link:abc123", study_uid=STUDY, link="abc123"),
        Event("delete", "alice", study_uid="1.2.3.4", patient_id="PAT-9"),
    )
    return server


def test_admin_sees_every_event_newest_first(trail: RunningServer) -> None:
    answer = _page(trail)
    assert _seqs(answer) == [5, 4, 3, 2, 1]
    assert answer.headers["content-type"].startswith("text/html")
    text = answer.text
    assert "Hash chain intact: 5 events" in text
    assert '<a href="/admin/audit">Audit log</a>' in text  # in the header, for admins
    for shown in ("PAT-7", STUDY + ".1", "10.0.0.8", "failure", "abc123", "share_open"):
        assert shown in text
    # The long user agent is shortened in its cell (in full only in the tooltip).
    assert ">Mozilla/5.0 " + "x" * 35 + "…</td>" in text


def test_filters_narrow_the_rows(trail: RunningServer) -> None:
    assert _seqs(_page(trail, action="login")) == [3, 1]
    assert _seqs(_page(trail, actor="alice")) == [5, 2, 1]
    assert _seqs(_page(trail, actor="link:*")) == [4]
    assert _seqs(_page(trail, study=STUDY)) == [4, 2]
    assert _seqs(_page(trail, action="login", actor="bob")) == [3]
    assert _seqs(_page(trail, actor="nobody")) == []
    today = datetime.now(UTC).date()
    assert _seqs(_page(trail, **{"from": str(today), "to": str(today)})) == [5, 4, 3, 2, 1]
    assert _seqs(_page(trail, **{"from": str(today + timedelta(days=1))})) == []
    assert _seqs(_page(trail, to=str(today - timedelta(days=1)))) == []
    assert "No events match" in _page(trail, actor="nobody").text


def test_pages_of_a_hundred_walk_every_event_once(server: RunningServer) -> None:
    _record(server, *(Event("query", f"user{n % 3}", detail={"n": n}) for n in range(230)))
    first = _page(server)
    assert _seqs(first) == list(range(230, 130, -1))
    assert "230 events match" in first.text
    assert _link(first, "prev") is None
    _record(server, Event("login", "late"))  # a new event does not shift the older pages
    seen = _seqs(first)
    older = _link(first, "next")
    pages = 1
    while older is not None:
        answer = httpx.get(server.url + older, headers=server.headers)
        seen += _seqs(answer)
        older, pages = _link(answer, "next"), pages + 1
    assert pages == 3 and seen == list(range(230, 0, -1))
    second = httpx.get(server.url + "/admin/audit?before=131", headers=server.headers)
    newer = _link(second, "prev")
    assert newer == "/admin/audit?after=130"
    back = httpx.get(server.url + newer, headers=server.headers)
    assert _seqs(back) == list(range(230, 130, -1))  # the hundred just above, newest first
    user1 = _page(server, actor="user1")  # filters and paging together
    assert len(_seqs(user1)) == 77 and _link(user1, "next") is None


def test_members_get_403_and_anonymous_callers_the_login_page(trail: RunningServer) -> None:
    auth.add_user(trail.archive, "carol", "correct horse", is_admin=False)
    member = {"Authorization": f"Bearer {auth.create_token(trail.archive, user='carol')}"}
    for path in ("/admin/audit", "/admin/audit/export?format=json"):
        refused = httpx.get(trail.url + path, headers=member)
        assert refused.status_code == 403
        assert "only administrators" in refused.text and "PAT-7" not in refused.text
        anonymous = httpx.get(trail.url + path)
        assert anonymous.status_code == 303
        assert anonymous.headers["location"].startswith("/login?next=%2Fadmin%2Faudit")
    browse = httpx.get(trail.url + "/browse", headers=member)
    assert browse.status_code == 200 and 'href="/admin/audit"' not in browse.text
    scoped = auth.create_token(trail.archive, studies=[STUDY])  # an admin's study-scoped token
    assert _page(trail, {"Authorization": f"Bearer {scoped}"}).status_code == 403


@pytest.mark.parametrize(
    "params",
    [
        {"action": "<script>alert(1)</script>"},
        {"action": "x" * 33},
        {"actor": "alice\x00"},
        {"actor": "a" * 161},
        {"study": "1.2.x"},
        {"study": "1' OR '1'='1"},
        {"from": "2024-13-01"},
        {"from": "yesterday"},
        {"to": "2024-02-30"},
        {"from": "2024-05-02", "to": "2024-05-01"},
        {"before": "-1"},
        {"before": "1e9"},
        {"before": "9" * 40},
        {"after": "١٢"},  # digits, but not ASCII ones
        {"before": "10", "after": "5"},
    ],
)
def test_hostile_parameters_get_a_400_page(trail: RunningServer, params: dict[str, str]) -> None:
    answer = _page(trail, **params)
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    assert "<script>alert" not in answer.text
    assert 'role="search"' in answer.text  # the form stays, to correct the value
    export = httpx.get(trail.url + "/admin/audit/export", headers=trail.headers,
                       params={"format": "json", **params})
    assert export.status_code == 400


def test_unknown_export_format_is_a_400(trail: RunningServer) -> None:
    answer = httpx.get(trail.url + "/admin/audit/export?format=csv", headers=trail.headers)
    assert answer.status_code == 400


def test_exports_download_and_parse(trail: RunningServer) -> None:
    answer = httpx.get(trail.url + "/admin/audit/export?format=json", headers=trail.headers)
    assert answer.status_code == 200
    assert answer.headers["content-disposition"].startswith('attachment; filename="lightbox-audit-')
    rows = [json.loads(line) for line in answer.text.splitlines()]
    # The five events, then the export itself (recorded before the download starts).
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[1]["patient_id"] == "PAT-7" and rows[1]["at"].endswith("+00:00")
    assert rows[5]["action"] == "audit_export" and rows[5]["detail"] == {"format": "json"}
    assert set(rows[0]) >= {"seq", "at", "actor", "action", "outcome", "hash", "prev_hash"}

    xml = httpx.get(trail.url + "/admin/audit/export", headers=trail.headers,
                    params={"format": "atna"})
    assert xml.status_code == 200 and xml.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(xml.content)
    assert root.tag == "AuditMessages"
    messages = list(root)
    assert len(messages) == 7 and all(m.tag == "AuditMessage" for m in messages)

    logins = httpx.get(trail.url + "/admin/audit/export", headers=trail.headers,
                       params={"format": "json", "action": "login"})
    assert [json.loads(line)["actor"] for line in logins.text.splitlines()] == ["alice", "bob"]
    assert audit.verify(trail.archive.db).ok  # exporting changed nothing but appended


def test_a_tampered_row_shows_as_a_broken_chain(trail: RunningServer) -> None:
    with trail.archive.db.write() as conn:
        conn.execute(update(audit_events).where(audit_events.c.seq == 2).values(actor="mallory"))
    answer = _page(trail)
    assert answer.status_code == 200
    assert "Hash chain broken: row 2 was modified" in answer.text
    assert _seqs(answer) == [5, 4, 3, 2, 1]  # the rows are still shown
