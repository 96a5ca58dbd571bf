"""The query model shared by QIDO-RS and C-FIND (PS3.4 §C.2.2.2 matching)."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from lightbox.dicom import uids
from lightbox.dicom.attributes import Attribute, Kind, QueryLevel, lookup, visible_at
from lightbox.dicom.instance import normalise_time
from lightbox.errors import BadRequest

_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
MAX_VALUE_LENGTH = 1024
_INTEGER = re.compile(r" *[+-]?[0-9]{1,12} *")  # IS: at most 12 characters, spaces around
MAX_LIST_VALUES = 1000
# A UID list is bounded by its count and by each UID's 64 characters (checked
# one by one), so it may be longer than any other value.
MAX_UID_LIST_LENGTH = MAX_LIST_VALUES * 65


class MatchType(enum.Enum):
    SINGLE = "single"
    WILDCARD = "wildcard"
    RANGE = "range"
    LIST = "list"
    FUZZY = "fuzzy"


@dataclass(frozen=True)
class Match:
    """One matching key: ``attribute`` compared to ``value`` in the way ``type`` says."""

    attribute: Attribute
    type: MatchType
    value: str | tuple[str | None, str | None] | tuple[str, ...]


@dataclass
class Query:
    """A search at one level, with matches, paging and the attributes to return."""

    level: QueryLevel
    matches: list[Match] = field(default_factory=list)
    include: set[int] = field(default_factory=set)
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    unsupported: list[str] = field(default_factory=list)
    # Keywords of the Required Keys whose unknown (empty) values match any
    # value asked for (PS3.4 C.2.2.1.2). C-FIND names them; QIDO-RS does not:
    # a web search for a date range is not expected to list undated studies.
    unknown_matches: frozenset[str] = frozenset()

    def add(self, keyword: str, value: str) -> None:
        """Add a matching key given as keyword or tag with its DICOM-encoded value."""
        attribute = lookup(keyword)
        if attribute is None or attribute not in visible_at(self.level) or (
            attribute.kind is Kind.COUNT
        ):
            self.unsupported.append(keyword)
            return
        if value in ("", "*"):
            # Universal matching (PS3.4 C.2.2.2.3; a lone "*" is the same, C.2.2.2.4):
            # return the attribute, match everything, empty values included.
            self.include.add(attribute.tag)
            return
        self.matches.append(parse_match(attribute, value, fuzzy=self.fuzzy))
        self.include.add(attribute.tag)


def parse_match(attribute: Attribute, value: str, *, fuzzy: bool = False) -> Match:
    """Interpret one DICOM-encoded matching value for ``attribute``."""
    kind = attribute.kind
    if len(value) > (MAX_UID_LIST_LENGTH if kind is Kind.UID else MAX_VALUE_LENGTH):
        raise BadRequest(f"value for {attribute.keyword} is too long")
    if "\x00" in value:
        # No DICOM text value holds one (PS3.5 6.1.2), and PostgreSQL cannot bind one.
        raise BadRequest(f"value for {attribute.keyword} holds a NUL character")
    if kind is Kind.UID:
        return _uid_match(attribute, value)
    if kind in (Kind.DATE, Kind.TIME):
        return _temporal_match(attribute, value)
    if kind is Kind.INTEGER:
        low, high = attribute.integer_range
        if not _INTEGER.fullmatch(value) or not low <= int(value) <= high:
            raise BadRequest(f"{attribute.keyword} must be an integer from {low} to {high}, "
                             f"got {value!r}")
        return Match(attribute, MatchType.SINGLE, str(int(value)))
    if kind is Kind.MULTI:
        return Match(attribute, MatchType.LIST, _values(attribute, _code_list(attribute, value)))
    if kind is Kind.PERSON_NAME and fuzzy:
        return Match(attribute, MatchType.FUZZY, value.strip("*"))
    if "*" in value or "?" in value:
        return Match(attribute, MatchType.WILDCARD, value)
    value = _code_list(attribute, value)
    if "\\" in value:
        return Match(attribute, MatchType.LIST, _values(attribute, value))
    return Match(attribute, MatchType.SINGLE, value)


def _code_list(attribute: Attribute, value: str) -> str:
    """``value`` with commas read as list separators when ``attribute`` is a CS.

    A code string cannot hold a comma (PS3.5 Table 6.2-1), and web clients
    send lists comma-separated: OHIF asks ``ModalitiesInStudy=CT,MR`` through
    dicomweb-client JS, which joins arrays with commas. Other VRs may hold a
    comma, so there it stays part of the value.
    """
    return value.replace(",", "\\") if attribute.vr == "CS" else value


def _values(attribute: Attribute, value: str) -> tuple[str, ...]:
    parts = tuple(v for v in value.split("\\") if v)
    if not parts or len(parts) > MAX_LIST_VALUES:
        raise BadRequest(f"{attribute.keyword} list must have 1 to {MAX_LIST_VALUES} values")
    return parts


def _uid_match(attribute: Attribute, value: str) -> Match:
    parts = _values(attribute, value.replace(",", "\\"))
    for part in parts:
        uids.require_uid(part, attribute.keyword)
    if len(parts) == 1:
        return Match(attribute, MatchType.SINGLE, parts[0])
    return Match(attribute, MatchType.LIST, parts)


def _temporal_match(attribute: Attribute, value: str) -> Match:
    if "-" not in value:
        return Match(attribute, MatchType.SINGLE, _temporal(attribute, value))
    low, _, high = value.partition("-")
    if not low and not high:
        raise BadRequest(f"{attribute.keyword} range needs at least one bound")
    bounds = (
        _temporal(attribute, low) if low else None,
        _temporal(attribute, high) if high else None,
    )
    if bounds[0] and bounds[1] and bounds[0] > bounds[1]:
        raise BadRequest(f"{attribute.keyword} range {value!r} ends before it starts")
    if attribute.kind is Kind.TIME and high:
        # "Up to and including" a time given to the minute includes that whole
        # minute (PS3.4 C.2.2.2.5): the upper bound keeps the precision it was
        # given, and the search lets anything that begins with it match.
        bounds = (bounds[0], high.strip().replace(":", ""))
    return Match(attribute, MatchType.RANGE, bounds)


def _temporal(attribute: Attribute, text: str) -> str:
    text = text.strip()
    if attribute.kind is Kind.DATE:
        if not _DATE.fullmatch(text):
            raise BadRequest(f"{attribute.keyword} must be YYYYMMDD or a range, got {text!r}")
        return text
    text = text.replace(":", "")
    if not _TIME.fullmatch(text):
        raise BadRequest(f"{attribute.keyword} must be HHMMSS.FFFFFF or a range, got {text!r}")
    return normalise_time(text)


def parse_includes(query: Query, values: Iterable[str]) -> None:
    """Apply ``includefield`` values (comma-separated keywords/tags, or ``all``)."""
    for raw in values:
        for item in raw.split(","):
            item = item.strip()
            if not item:
                continue
            if item.lower() == "all":
                query.include_all = True
                continue
            tag = _tag_of(item)
            if tag is None:
                raise BadRequest(f"includefield {item[:64]!r} is not a DICOM keyword or tag")
            query.include.add(tag)


def _tag_of(item: str) -> int | None:
    attribute = lookup(item)
    if attribute is not None:
        return attribute.tag
    if re.fullmatch(r"[0-9A-Fa-f]{8}", item):
        return int(item, 16)
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(item)
    return int(tag) if tag is not None else None
