"""What the holder of a share link sees: the study's summary, and for
de-identified links the search results, metadata and instances after the
Basic Confidentiality Profile, with burned-in instances withheld.

Links that are not de-identified need nothing from here beyond the summary:
their holders go through the ordinary DICOMweb routes with a scoped
Principal.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from lightbox.archive import Archive
from lightbox.dicom.query import Query
from lightbox.errors import NotFound
from lightbox.index import browse as browse_index
from lightbox.index import shares as index
from lightbox.index.instances import StoredInstance
from lightbox.services import deidentify, export, pixels, retrieve, search
from lightbox.services.auth import Principal
from lightbox.services.deidentify import UidMapper
from lightbox.services.sharing import ShareLink, withheld

SOP_INSTANCE_UID = "00080018"


@dataclass(frozen=True)
class SeriesCard:
    """A series on the share page (UIDs as the link shows them)."""

    series_instance_uid: str
    modality: str | None
    series_number: int | None
    description: str | None
    instances: int


@dataclass(frozen=True)
class Summary:
    """The share page's study summary; identifying fields are None when de-identified."""

    study_instance_uid: str
    patient_name: str | None
    study_date: str | None
    description: str | None
    modalities: list[str]
    series: list[SeriesCard]
    instances: int
    withheld: int


def summary(archive: Archive, link: ShareLink) -> Summary:
    """The study behind ``link`` as its page shows it."""
    hidden = withheld(archive, link)
    with archive.db.read() as conn:
        study = browse_index.study(conn, link.study_instance_uid)
        if study is None:
            raise NotFound("the shared study is no longer in the archive")
        rows = browse_index.series_of_study(conn, study.pk)
        hidden_by_series = index.withheld_by_series(conn, link.row_id) if hidden else {}
    cards = []
    for row in rows:
        shown = row.number_of_instances - hidden_by_series.get(row.series_instance_uid, 0)
        if shown <= 0:
            continue
        cards.append(SeriesCard(
            link.public_uid(row.series_instance_uid), row.modality, row.series_number,
            None if link.deidentify else row.series_description, shown,
        ))
    plain = not link.deidentify
    return Summary(
        study_instance_uid=link.public_uid(study.study_instance_uid),
        patient_name=study.patient_name if plain else None,
        study_date=study.study_date if plain else None,
        description=study.study_description if plain else None,
        modalities=sorted({c.modality for c in cards if c.modality}),
        series=cards,
        instances=sum(c.instances for c in cards),
        withheld=len(hidden),
    )


def _mapper(link: ShareLink) -> UidMapper:
    mapper = link.mapper
    if mapper is None:
        raise ValueError("only de-identified links are served from here")
    return mapper


def search_deidentified(
    archive: Archive, link: ShareLink, principal: Principal, query: Query
) -> list[dict[str, Any]]:
    """QIDO results for a de-identified link: cleaned, without withheld instances."""
    mapper = _mapper(link)
    hidden = withheld(archive, link)
    items = search.search(archive, principal, query).items
    return [
        deidentify.deidentify_json(item, mapper) for item in items
        if _sop_of(item) not in hidden
    ]


def _sop_of(item: dict[str, Any]) -> str | None:
    values = item.get(SOP_INSTANCE_UID, {}).get("Value")
    return str(values[0]) if values else None


def metadata_deidentified(
    archive: Archive, link: ShareLink, principal: Principal, study: str,
    series: str | None = None, sop: str | None = None,
) -> bytes:
    """WADO-RS metadata for a de-identified link (base placeholder unresolved)."""
    mapper = _mapper(link)
    hidden = withheld(archive, link)
    raw = retrieve.metadata(archive, principal, study, series, sop)
    objects = [o for o in json.loads(raw)
               if _sop_of(o) not in hidden and not deidentify.json_burned_in(o)]
    if not objects:
        raise NotFound("nothing to show here")
    cleaned = [deidentify.deidentify_json(o, mapper) for o in objects]
    return json.dumps(cleaned, separators=(",", ":"), ensure_ascii=False).encode()


def shown_instances(
    archive: Archive, link: ShareLink, principal: Principal, study: str,
    series: str | None = None, sop: str | None = None,
) -> list[StoredInstance]:
    """The instances in scope that the link shows; NotFound when none."""
    hidden = withheld(archive, link)
    found = [i for i in retrieve.find_instances(archive, principal, study, series, sop)
             if i.sop_instance_uid not in hidden]
    if not found:
        raise NotFound("nothing to show here")
    return found


def deidentified_export(
    archive: Archive, link: ShareLink, principal: Principal
) -> export.StudyExport:
    """The study as a de-identified ZIP: public UIDs, the profile applied to
    every file, images with burned-in text left out."""
    mapper = _mapper(link)
    found = shown_instances(archive, link, principal, link.study_instance_uid)

    def rewrite(instance: StoredInstance, source: BinaryIO) -> tuple[StoredInstance, bytes]:
        public = replace(
            instance, study_instance_uid=mapper.public(instance.study_instance_uid),
            series_instance_uid=mapper.public(instance.series_instance_uid),
            sop_instance_uid=mapper.public(instance.sop_instance_uid))
        return public, deidentify.deidentify_file(source, mapper)

    return export.StudyExport(mapper.public(link.study_instance_uid), found, rewrite)


def instance_deidentified(
    archive: Archive, link: ShareLink, instance: StoredInstance, syntax: str
) -> bytes:
    """One instance as de-identified Part 10 bytes in ``syntax`` (stored or
    Explicit VR Little Endian)."""
    mapper = _mapper(link)
    if syntax == instance.transfer_syntax_uid:
        with archive.blobs.open(instance.blob_key) as fh:
            return deidentify.deidentify_file(fh, mapper)
    converted = pixels.explicit_little_endian(archive, instance)
    return deidentify.deidentify_file(io.BytesIO(converted), mapper)


def representative(
    archive: Archive, link: ShareLink, principal: Principal, study: str, series: str | None
) -> tuple[str, str]:
    """(series, SOP instance) of the image that stands for a study or series:
    the middle shown instance with pixel data."""
    found = shown_instances(archive, link, principal, study, series)
    images = [i for i in found if i.layout is not None] or found
    chosen = images[len(images) // 2]
    return chosen.series_instance_uid, chosen.sop_instance_uid


def bulk_path_allowed(tag_path: str) -> bool:
    """Whether a BulkDataURI path names a value the profile keeps (every tag on
    the way is kept), e.g. ``7FE00010`` yes, a private tag or an icon no."""
    parts = tag_path.strip("/").split("/")
    try:
        tags = [int(p, 16) for p in parts[0::2]]
    except ValueError:
        return False
    return all(deidentify.action_of(t) in (None, deidentify.CLEAN_ITEMS) for t in tags)


def json_list(items: list[dict[str, Any]]) -> bytes:
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode()
