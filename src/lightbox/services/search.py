"""Search (QIDO-RS, later C-FIND): run a Query within the caller's rights and
render the hits as DICOM JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lightbox.archive import Archive
from lightbox.dicom.attributes import ATTRIBUTES, Kind, QueryLevel, visible_at
from lightbox.dicom.dicomjson import BASE_PLACEHOLDER
from lightbox.dicom.levels import belongs_at
from lightbox.dicom.query import Query
from lightbox.index import search as index
from lightbox.services import access
from lightbox.services.auth import Principal

RETRIEVE_URL = "00081190"
INSTANCE_AVAILABILITY = "00080056"


@dataclass(frozen=True)
class Results:
    """Matches as DICOM JSON objects; ``truncated`` when the server cap cut them."""

    items: list[dict[str, Any]]
    truncated: bool
    limit: int


def search(archive: Archive, principal: Principal, query: Query) -> Results:
    """Run ``query`` for ``principal``; the cap and default limit come from settings."""
    settings = archive.settings
    wanted = query.limit if query.limit is not None else settings.qido_max_results + 1
    limit = min(wanted, settings.qido_max_results)
    scope = access.study_scope(principal)
    with archive.db.read() as conn:
        hits = index.search(conn, query, limit=limit + 1, scope_study_pks=scope)
        truncated = len(hits) > limit
        hits = hits[:limit]
        items = [_render(query, hit.values) for hit in hits]
        if query.include_all or _extra_tags(query):
            for item, hit in zip(items, hits, strict=True):
                _merge_stored(conn, query, hit, item)
    # Only a cut made by the server's cap is a truncation; a client's own limit is paging.
    return Results(items=items, truncated=truncated and wanted > limit, limit=limit)


def _render(query: Query, values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in visible_at(query.level):
        out[a.tag_hex] = element(a.vr, a.kind, values.get(a.keyword))
    base = f"{BASE_PLACEHOLDER}/studies/{values['StudyInstanceUID']}" if (
        query.level is not QueryLevel.PATIENT
    ) else None
    if query.level is not QueryLevel.PATIENT:
        # "Shall be present if known" (PS3.18 Tables 10.6.3-3 study, 10.6.3-5 instance);
        # a series result carries its study's attributes (§10.6.3.3.2). Everything
        # here is on the archive's own storage, as C-FIND also answers.
        out[INSTANCE_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
    if base and query.level is QueryLevel.STUDY:
        out[RETRIEVE_URL] = {"vr": "UR", "Value": [base]}
    elif base and query.level is QueryLevel.SERIES:
        out[RETRIEVE_URL] = {"vr": "UR", "Value": [f"{base}/series/{values['SeriesInstanceUID']}"]}
    elif base and query.level is QueryLevel.INSTANCE:
        # PS3.18 Table 10.6.3-5 lists Retrieve URL among the instance attributes too.
        url = f"{base}/series/{values['SeriesInstanceUID']}/instances/{values['SOPInstanceUID']}"
        out[RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    return out


def element(vr: str, kind: Kind, value: Any) -> dict[str, Any]:
    """One DICOM JSON element from an indexed value."""
    if value is None or value == "":
        return {"vr": vr}
    if kind is Kind.PERSON_NAME:
        groups = str(value).split("=")
        names = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False))
        return {"vr": vr, "Value": [{k: v for k, v in names.items() if v}]}
    if kind is Kind.MULTI:
        return {"vr": vr, "Value": [v for v in str(value).split("\\") if v]}
    if kind in (Kind.INTEGER, Kind.COUNT):
        return {"vr": vr, "Value": [int(value)]}
    return {"vr": vr, "Value": [str(value)]}


def _extra_tags(query: Query) -> set[int]:
    known = {a.tag for a in visible_at(query.level)}
    return {t for t in query.include if t not in known}


def _merge_stored(conn: Any, query: Query, hit: index.Hit, item: dict[str, Any]) -> None:
    """Add requested attributes the index does not keep, from a stored instance's JSON."""
    level = query.level
    pk = {QueryLevel.STUDY: hit.study_pk, QueryLevel.SERIES: hit.series_pk,
          QueryLevel.INSTANCE: hit.instance_pk}.get(level)
    if pk is None:
        return
    raw = index.representative_json(conn, level, pk)
    if raw is None:
        return
    # An instance cached before NaN and infinities became null may still hold them.
    stored: dict[str, Any] = json.loads(raw, parse_constant=lambda _name: None)
    wanted = None if query.include_all else {f"{t:08X}" for t in _extra_tags(query)}
    # The representative instance speaks for its study or series, but its own
    # identity and that of its series (SOP Instance UID, Modality, ...) do not.
    below = {a.tag_hex for a in ATTRIBUTES} - {a.tag_hex for a in visible_at(level)}
    for key, value in stored.items():
        if key in item or key in below or (wanted is not None and key not in wanted):
            continue
        if wanted is None and not belongs_at(key, level):
            continue  # "all" means all of this level's attributes, not the instance's own
        if "BulkDataURI" in value or key.startswith("7FE0"):
            continue
        item[key] = value
