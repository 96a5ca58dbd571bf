"""C-FIND / C-MOVE / C-GET identifiers <-> the query model shared with QIDO-RS.

An identifier's keys become ``Query.add(keyword, value)`` calls with the value
as DICOM encodes it (``A\\B`` lists, ``a-b`` ranges, ``*``/``?`` wildcards), so
both protocols match by the same rules. The keys asked for are the keys
returned: missing values come back empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName, validate_value
from pynetdicom.events import Event

from lightbox.dicom import uids
from lightbox.dicom.attributes import (
    BY_TAG,
    PATIENT_ROOT_REQUIRED_KEYS,
    STUDY_ROOT_REQUIRED_KEYS,
    QueryLevel,
)
from lightbox.dicom.dicomjson import CHARSET_VRS, person_name
from lightbox.dicom.query import Query, parse_match
from lightbox.dimse import contexts, matches
from lightbox.errors import BadRequest

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
UTF8 = "ISO_IR 192"
# Keys the SCP answers itself rather than from the index.
_ANSWERED = {QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, RETRIEVE_AE_TITLE,
             INSTANCE_AVAILABILITY}
_UNMATCHABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}
MAX_KEYS = 200

DEFAULT_KEYS: dict[QueryLevel, tuple[str, ...]] = {
    QueryLevel.PATIENT: ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"),
    QueryLevel.STUDY: (
        "PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
        "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
        "StudyInstanceUID",
    ),
    QueryLevel.SERIES: (
        "StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
        "SeriesDescription", "NumberOfSeriesRelatedInstances",
    ),
    QueryLevel.INSTANCE: (
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
        "InstanceNumber",
    ),
}


@dataclass(frozen=True)
class ReturnKey:
    tag: int
    vr: str


@dataclass
class FindRequest:
    """A parsed C-FIND identifier: the query and the keys to return."""

    query: Query
    keys: list[ReturnKey]
    # Keys with a value to match that nothing matches on (not indexed, or not at
    # this level): every match is answered "Pending, warning" (FF01, PS3.4 C.4.1.1.4).
    unmatched: list[str] = field(default_factory=list)


def level_of(identifier: Dataset, model: str) -> QueryLevel:
    """The Query/Retrieve Level, checked against the information model."""
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        level = QueryLevel(raw)
    except ValueError as exc:
        raise BadRequest(f"Query/Retrieve Level {raw[:16]!r} is not valid") from exc
    if level is QueryLevel.PATIENT and model not in contexts.PATIENT_ROOT:
        raise BadRequest("the Study Root model has no PATIENT level")
    return level


def _text(value: Any) -> str:
    if isinstance(value, PersonName):
        return str(value)
    return "" if value is None else str(value)


def encoded_value(elem: DataElement) -> str | None:
    """The element's value as DICOM encodes it, or None when it cannot be matched on."""
    if elem.VR in _UNMATCHABLE_VRS:
        return None
    value = elem.value
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_text(v) for v in value)
    return _text(value)


def _keyword(elem: DataElement) -> str:
    return elem.keyword or f"{int(elem.tag):08X}"


def received_identifier(event: Event) -> Dataset:
    """The identifier of a C-FIND, C-MOVE or C-GET request; BadRequest when its
    bytes are not a dataset at all."""
    try:
        return event.identifier
    except Exception as exc:  # pynetdicom decodes it on first access
        raise BadRequest(f"unreadable identifier: {exc}") from exc


def _elements(identifier: Dataset) -> list[DataElement]:
    """The identifier's elements, each decoded now. pydicom decodes lazily, so
    a value it cannot read (a VR that is none, a length past the end) would
    otherwise surface wherever the element is first looked at; here it is
    the peer's error, BadRequest, whatever the request."""
    try:
        return [e for e in identifier if e.tag.group not in (0x0000, 0x0002)]
    except Exception as exc:
        raise BadRequest(f"unreadable identifier: {exc}") from exc


def find_request(identifier: Dataset, model: str) -> FindRequest:
    """Parse a C-FIND identifier; BadRequest when it cannot be answered."""
    # PS3.4 C.2.2.1.2: an entity with an empty Required Key matches any value of it.
    patient_root = model in contexts.PATIENT_ROOT
    required = PATIENT_ROOT_REQUIRED_KEYS if patient_root else STUDY_ROOT_REQUIRED_KEYS
    elements = _elements(identifier)
    query = Query(level=level_of(identifier, model), unknown_matches=required)
    keys: list[ReturnKey] = []
    unmatched: list[str] = []
    if len(elements) > MAX_KEYS:
        raise BadRequest(f"too many keys (at most {MAX_KEYS})")
    for elem in elements:
        tag = int(elem.tag)
        if tag == QUERY_RETRIEVE_LEVEL:
            continue
        keys.append(ReturnKey(tag, elem.VR))
        if tag in _ANSWERED:
            continue
        value = encoded_value(elem)
        if value is not None:
            keyword = _keyword(elem)
            query.add(keyword, value)
            if value not in ("", "*") and keyword in query.unsupported:
                unmatched.append(keyword)
        if tag not in BY_TAG:
            # Not indexed: returned from a stored instance of the match.
            query.include.add(tag)
    return FindRequest(query=query, keys=keys, unmatched=unmatched)


def response(item: dict[str, Any], request: FindRequest, ae_title: str,
             explicit: bool | None = None) -> Dataset:
    """One C-FIND match: the requested keys, filled from a DICOM JSON search
    result. With ``explicit`` (the transfer syntax's VR is explicit or not;
    None when it is neither little endian one), already encoded where it can
    be (``matches.Encoded``)."""
    obj = response_json(item, request, ae_title)
    if explicit is not None:
        data = matches.encode(obj, explicit=explicit)
        if data is not None:
            return matches.Encoded(data, explicit, lambda: Dataset.from_json(obj))
    return Dataset.from_json(obj)


def response_json(item: dict[str, Any], request: FindRequest, ae_title: str) -> dict[str, Any]:
    """The match as DICOM JSON: the requested keys from ``item`` (binary values
    left out), the keys the SCP answers itself, and the others empty."""
    wanted = {f"{k.tag:08X}" for k in request.keys}
    obj = {
        key: value for key, value in item.items()
        if key in wanted and "BulkDataURI" not in value and "InlineBinary" not in value
    }
    for key in request.keys:
        name = f"{key.tag:08X}"
        if name in obj:
            continue
        if key.tag == RETRIEVE_AE_TITLE:
            obj[name] = {"vr": "AE", "Value": [ae_title]}
        elif key.tag == INSTANCE_AVAILABILITY:
            obj[name] = {"vr": "CS", "Value": ["ONLINE"]}
        elif key.tag != SPECIFIC_CHARACTER_SET:
            obj[name] = {"vr": key.vr.split(" or ")[0]}  # an ambiguous VR: empty anyway
    if any(k.tag == SPECIFIC_CHARACTER_SET for k in request.keys) or not _ascii(obj):
        obj[f"{SPECIFIC_CHARACTER_SET:08X}"] = {"vr": "CS", "Value": [UTF8]}
    obj[f"{QUERY_RETRIEVE_LEVEL:08X}"] = {"vr": "CS", "Value": [request.query.level.value]}
    return obj


def _ascii(obj: dict[str, Any]) -> bool:
    """Whether every text value in ``obj``, sequences' items included, is ASCII."""
    for attribute in obj.values():
        vr = attribute.get("vr")
        for value in attribute.get("Value") or () if vr in CHARSET_VRS or vr == "SQ" else ():
            if vr == "SQ":
                if isinstance(value, dict) and not _ascii(value):
                    return False
            elif not (person_name(value) if isinstance(value, dict) else str(value)).isascii():
                return False
    return True


@dataclass(frozen=True)
class RetrieveRequest:
    """What a C-MOVE / C-GET identifier names, by unique keys (PS3.4 C.4.2.2.1)."""

    level: QueryLevel
    patient_id: str | None = None
    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    instances: tuple[str, ...] = ()


def _uid_list(identifier: Dataset, keyword: str, *, single: bool) -> tuple[str, ...]:
    value = encoded_value(identifier[keyword]) or "" if keyword in identifier else ""
    parts = tuple(v.strip() for v in value.split("\\") if v.strip())
    if not parts:
        raise BadRequest(f"{keyword} is required at this level")
    if single and len(parts) > 1:
        raise BadRequest(f"{keyword} must be a single UID at this level")
    return tuple(uids.require_uid(p, keyword) for p in parts)


def retrieve_request(identifier: Dataset, model: str) -> RetrieveRequest:
    """Parse a C-MOVE / C-GET identifier; BadRequest when a unique key is
    missing or a value cannot be read."""
    _elements(identifier)
    level = level_of(identifier, model)
    if level is QueryLevel.PATIENT:
        pid = str(identifier.get("PatientID", "") or "").strip()
        if not pid or "*" in pid or "?" in pid:
            raise BadRequest("a single Patient ID is required at PATIENT level")
        return RetrieveRequest(level, patient_id=pid)
    if level is QueryLevel.STUDY:
        return RetrieveRequest(level, studies=_uid_list(identifier, "StudyInstanceUID",
                                                        single=False))
    study = _uid_list(identifier, "StudyInstanceUID", single=True)
    if level is QueryLevel.SERIES:
        return RetrieveRequest(level, studies=study,
                               series=_uid_list(identifier, "SeriesInstanceUID", single=False))
    return RetrieveRequest(
        level,
        studies=study,
        series=_uid_list(identifier, "SeriesInstanceUID", single=True),
        instances=_uid_list(identifier, "SOPInstanceUID", single=False),
    )


def parse_key(text: str) -> tuple[int, str]:
    """``Keyword=value``, ``0010,0020=value`` or ``00100020=value`` -> (tag, value)."""
    name, _, value = text.partition("=")
    name = name.strip().strip("()")
    if not name:
        raise BadRequest(f"a key needs a keyword or tag before '=', got {text!r}")
    tag: int | None
    if "," in name:
        group, _, element = name.partition(",")
        tag = _hex(group + element)
    else:
        tag = _hex(name) if len(name) == 8 else None
        if tag is None:
            found = tag_for_keyword(name)
            tag = int(found) if found is not None else None
    if tag is None:
        raise BadRequest(f"not a DICOM keyword or tag: {name!r}")
    return tag, value


def _hex(text: str) -> int | None:
    try:
        return int(text, 16) if len(text) == 8 else None
    except ValueError:
        return None


def identifier(level: QueryLevel, keys: Iterable[tuple[int, str]]) -> Dataset:
    """A C-FIND / C-MOVE identifier at ``level`` with the given (tag, value) keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    keys = list(keys)
    if any(not value.isascii() for _, value in keys):
        ds.SpecificCharacterSet = UTF8
    for tag, value in keys:
        try:
            vr = dictionary_VR(tag)
        except KeyError as exc:
            raise BadRequest(f"unknown DICOM tag {tag:08X}") from exc
        vr = vr.split(" or ")[0]
        _check_key(tag, vr, value)
        if vr in ("US", "SS", "UL", "SL"):
            ds.add_new(tag, vr, int(value) if value else None)
        elif vr in ("FL", "FD"):
            ds.add_new(tag, vr, float(value) if value else None)
        elif vr == "SQ":
            ds.add_new(tag, vr, [])
        else:
            ds.add_new(tag, vr, value)
    return ds


def _check_key(tag: int, vr: str, value: str) -> None:
    """BadRequest for a value that the identifier cannot carry: one the query
    model would refuse (a malformed date range, an invalid UID…), a number that
    is not one, a control character, a value longer than any VR allows."""
    name = keyword_for_tag(tag) or f"{tag:08X}"
    if not value:
        return
    if vr == "SQ" or any(ch < " " for ch in value) or len(value) > 1024:
        raise BadRequest(f"{name}: {value!r} cannot be a matching value")
    attribute = BY_TAG.get(tag)
    if attribute is not None:
        parse_match(attribute, value)
    try:
        if vr in ("US", "SS", "UL", "SL"):
            int(value)
        elif vr in ("FL", "FD"):
            float(value)
    except ValueError as exc:
        raise BadRequest(f"{name} ({vr}) needs a number, got {value!r}") from exc
    for piece in value.split("\\"):
        # A wildcard or a range is a matching value no VR's own rules describe.
        if "*" in piece or "?" in piece or (vr in ("DA", "TM", "DT") and "-" in piece):
            continue
        try:
            validate_value(vr, piece, config.RAISE)
        except ValueError as exc:
            reason = str(exc).split(". Please see")[0].rstrip(".")
            raise BadRequest(f"{name}: {reason}") from exc


def default_keys(level: QueryLevel) -> list[tuple[int, str]]:
    return [(_tag(k), "") for k in DEFAULT_KEYS[level]]


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise BadRequest(f"not a DICOM keyword: {keyword!r}")
    return int(tag)


def merged_keys(
    level: QueryLevel, extra: Sequence[tuple[int, str]]
) -> list[tuple[int, str]]:
    """The default return keys of ``level`` with the caller's keys added or overriding."""
    merged = dict(default_keys(level))
    for tag, value in extra:
        merged[tag] = value
    return list(merged.items())


def describe(ds: Dataset) -> str:
    """One line per C-FIND match, ``Keyword=value`` pairs, for people."""
    parts = []
    for elem in ds:
        if int(elem.tag) in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET):
            continue
        name = keyword_for_tag(elem.tag) or f"{int(elem.tag):08X}"
        value = encoded_value(elem)
        parts.append(f"{name}={value if value is not None else '<binary>'}")
    return "  ".join(parts)
