"""The study browser: study lists within the caller's rights, study pages, the
hand-over to desktop viewers, and deleting a study.

Lists are paged in the index (never filtered here); a page number past the end
is brought back to the last page rather than refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from math import ceil
from urllib.parse import quote, urlencode

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.errors import BadRequest, Forbidden, NotFound
from lightbox.index import browse as index
from lightbox.index.browse import InstanceRef, SeriesRow, SortKey, StudyFilter, StudyRow
from lightbox.services import access, auth, manage, thumbnails
from lightbox.services.attribute_table import AttributeRow, attribute_rows
from lightbox.services.audit import Caller
from lightbox.services.auth import Principal
from lightbox.services.retrieve import InstanceCache

PAGE_SIZE = 25
MAX_PAGE_SIZE = 100
MAX_TEXT = 64
MAX_INSTANCE_CHOICES = 2000
LAUNCH_LIFETIME = timedelta(hours=2)
LAUNCHERS = ("slicer", "weasis")
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")


@dataclass(frozen=True)
class Listing:
    """A study list request: filters, order and page (all validated)."""

    filter: StudyFilter = field(default_factory=StudyFilter)
    sort: SortKey = SortKey.STUDY_DATE
    descending: bool = True
    page: int = 1
    size: int = PAGE_SIZE


@dataclass(frozen=True)
class StudyPage:
    """One page of studies and where it sits in the whole list."""

    rows: list[StudyRow]
    total: int
    page: int
    pages: int
    first: int  # 1-based position of the first row (0 when empty)
    last: int


def _text(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name, "").strip()
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{name} is too long (at most {MAX_TEXT} characters)")
    if any(not ch.isprintable() for ch in value):
        raise BadRequest(f"{name} contains control characters")
    return value or None


def _date(params: Mapping[str, str], name: str, label: str) -> str | None:
    """A date given as YYYY-MM-DD (what date inputs send) or YYYYMMDD, as YYYYMMDD."""
    value = params.get(name, "").strip()
    if not value:
        return None
    digits = value.replace("-", "")
    try:
        if not re.fullmatch(r"\d{8}", digits):
            raise ValueError(value)
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError as exc:
        raise BadRequest(f"{label} must be a date like 2024-01-31, got {value[:32]!r}") from exc
    return digits


def _number(params: Mapping[str, str], name: str, default: int) -> int:
    """A positive number; missing, negative or not a number gives the default."""
    value = params.get(name, "").strip()
    if not re.fullmatch(r"[0-9]{1,30}", value):
        return default
    return max(1, min(int(value), 10**12))


def parse_listing(params: Mapping[str, str]) -> Listing:
    """Read a study list request from query parameters.

    Unknown sort keys, directions and page numbers fall back to defaults (the
    page is clamped later, once the total is known); malformed dates, modality
    codes and over-long texts are BadRequest.
    """
    modality = (_text(params, "modality") or "").upper() or None
    if modality is not None and not _MODALITY.fullmatch(modality):
        raise BadRequest("modality must be a code such as CT or MR")
    wanted = StudyFilter(
        patient_name=_text(params, "name"),
        patient_id=_text(params, "id"),
        accession_number=_text(params, "accession"),
        date_from=_date(params, "from", "Study date from"),
        date_to=_date(params, "to", "Study date to"),
        modality=modality,
    )
    if wanted.date_from and wanted.date_to and wanted.date_from > wanted.date_to:
        raise BadRequest("the study date range ends before it starts")
    sorts = {key.value: key for key in SortKey}
    sort = sorts.get(params.get("sort", ""), SortKey.STUDY_DATE)
    default_descending = sort is SortKey.STUDY_DATE
    direction = params.get("dir", "")
    descending = direction == "desc" if direction in ("asc", "desc") else default_descending
    size = min(_number(params, "size", PAGE_SIZE), MAX_PAGE_SIZE)
    return Listing(wanted, sort, descending, _number(params, "page", 1), size)


def list_studies(
    archive: Archive, principal: Principal, listing: Listing, folder_id: int | None = None
) -> StudyPage:
    """The page of studies ``listing`` asks for, among those ``principal`` may
    see (in one folder, when ``folder_id`` is given)."""
    wanted = replace(listing.filter, scope=access.study_scope(principal), folder_id=folder_id)
    with archive.db.read() as conn:
        total = index.count_studies(conn, wanted)
        pages = max(1, ceil(total / listing.size))
        page = min(listing.page, pages)
        offset = (page - 1) * listing.size
        rows = index.list_studies(
            conn, wanted, listing.sort, descending=listing.descending, limit=listing.size,
            offset=offset,
        )
    first = offset + 1 if rows else 0
    return StudyPage(rows, total, page, pages, first, offset + len(rows))


@dataclass(frozen=True)
class SeriesView:
    """A series on the study page, with the images offered as key images."""

    series: SeriesRow
    key_candidates: list[InstanceRef]


@dataclass(frozen=True)
class StudyView:
    study: StudyRow
    series: list[SeriesView]
    selected_series: SeriesRow | None
    instances: list[InstanceRef]  # of the selected series, for choosing one
    selected_instance: InstanceRef | None
    attributes: list[AttributeRow]


def _readable_study(archive: Archive, principal: Principal, study_uid: str) -> StudyRow:
    uids.require_uid(study_uid, "StudyInstanceUID")
    principal.require_read(study_uid)
    with archive.db.read() as conn:
        found = index.study(conn, study_uid)
    if found is None:
        raise NotFound(f"study {study_uid} not found")
    return found


def study_view(
    archive: Archive,
    principal: Principal,
    study_uid: str,
    *,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> StudyView:
    """Everything the study page shows; NotFound for studies the caller may not see.

    The attribute table shows ``sop_uid`` of ``series_uid`` when given (and
    found), else the first instance of that series, else of the first series.
    """
    found = _readable_study(archive, principal, study_uid)
    with archive.db.read() as conn:
        all_series = index.series_of_study(conn, found.pk)
        views = []
        for row in all_series:
            # The first and the middle image are offered as key images.
            candidates = [
                *index.instances_of_series(conn, row.pk, limit=1),
                *index.instances_of_series(conn, row.pk, limit=1,
                                           offset=row.number_of_instances // 2),
            ]
            views.append(SeriesView(row, list({r.pk: r for r in candidates}.values())))
        chosen = next((s for s in all_series if s.series_instance_uid == series_uid), None)
        chosen = chosen or (all_series[0] if all_series else None)
        refs = index.instances_of_series(conn, chosen.pk, limit=MAX_INSTANCE_CHOICES) if (
            chosen is not None
        ) else []
        instance = next((r for r in refs if r.sop_instance_uid == sop_uid), None)
        instance = instance or (refs[0] if refs else None)
        raw = index.instance_json(conn, chosen.pk, instance.sop_instance_uid) if (
            chosen is not None and instance is not None
        ) else None
    attributes = attribute_rows(raw) if raw is not None else []
    return StudyView(found, views, chosen, refs, instance, attributes)


def launch_url(
    archive: Archive, principal: Principal, study_uid: str, launcher: str, dicomweb_root: str
) -> str:
    """A link that opens the study in a desktop viewer (3D Slicer or Weasis).

    It carries a new token that may only read this one study, for two hours.
    """
    if launcher not in LAUNCHERS:
        raise NotFound(f"no viewer called {launcher[:32]!r}")
    _readable_study(archive, principal, study_uid)
    if principal.studies is not None:
        # A launch token must not mint the next one (a leaked token would live for ever).
        raise Forbidden("a token limited to some studies cannot hand out new ones")
    access.require_download(principal, study_uid)  # a desktop viewer takes whole files
    token = auth.create_token(
        archive, user=principal.user, expires=LAUNCH_LIFETIME, studies=[study_uid],
        read_only=True, label=launcher,
    )
    if launcher == "slicer":
        query = urlencode(
            {"studyUID": study_uid, "access_token": token, "dicomweb_endpoint": dicomweb_root}
        )
        return f"slicer://viewer/?{query}"
    # Weasis runs the command in its URI path (its DICOMweb retrieve command).
    command = (
        f'$dicom:rs --url "{dicomweb_root}" -r "studyUID={study_uid}"'
        f' -H "Authorization: Bearer {token}"'
    )
    return "weasis://" + quote(command, safe="")


def delete_study(
    archive: Archive, cache: InstanceCache, principal: Principal, study_uid: str,
    caller: Caller | None = None,
) -> int:
    """Delete a study and its cached thumbnails (administrators only)."""
    principal.require_admin()
    found = _readable_study(archive, principal, study_uid)
    with archive.db.read() as conn:
        series_uids = [s.series_instance_uid for s in index.series_of_study(conn, found.pk)]
    removed = manage.delete(archive, cache, principal, study_uid, caller=caller)
    thumbnails.forget(archive, series_uids)
    return removed
