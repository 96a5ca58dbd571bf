"""QIDO-RS (PS3.18 §10.6): search for studies, series and instances.

An empty result is ``200 []`` (never 204), so every client can parse it the
same way.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lightbox.dicom import dicomjson, uids
from lightbox.dicom.attributes import Attribute, Kind, QueryLevel, lookup
from lightbox.dicom.query import Query, parse_includes
from lightbox.errors import BadRequest
from lightbox.services import search
from lightbox.web import context

MAX_PARAMETERS = 200
MAX_OFFSET = 10_000_000
_DIGITS = re.compile(r"[0-9]{1,12}")  # up to 12 digits; a limit above the cap is clamped
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield", "_", "format"}


def _int_param(request: Request, name: str, high: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    if not _DIGITS.fullmatch(raw):
        raise BadRequest(f"{name} must be a non-negative integer, got {raw[:32]!r}")
    value = int(raw)
    if high is not None and value > high:
        raise BadRequest(f"{name} must be at most {high}")
    return value


def _header_safe(text: str) -> str:
    """``text`` fit for a quoted Warning header: printable ASCII without quote or backslash.

    Keys come from the client's URL; a CR/LF or non-Latin-1 character would
    otherwise make the whole response unsendable.
    """
    return "".join(ch if " " <= ch <= "~" and ch not in '"\\' else "?" for ch in text)


def parse_query(request: Request, level: QueryLevel) -> Query:
    """Build the query model from the URL: path UIDs, matching keys and controls."""
    params = request.query_params
    if len(params.multi_items()) > MAX_PARAMETERS:
        raise BadRequest(f"too many query parameters (at most {MAX_PARAMETERS})")
    query = Query(level=level)
    query.fuzzy = params.get("fuzzymatching", "false").lower() == "true"
    query.limit = _int_param(request, "limit", None)
    query.offset = _int_param(request, "offset", MAX_OFFSET) or 0
    parse_includes(query, params.getlist("includefield"))
    for key in ("study", "series"):
        if key in request.path_params:
            keyword = "StudyInstanceUID" if key == "study" else "SeriesInstanceUID"
            query.add(keyword, uids.require_uid(request.path_params[key], keyword))
    uid_lists: dict[Attribute, tuple[str, list[str]]] = {}
    for key, value in params.multi_items():
        if key in _CONTROL:
            continue
        attribute = lookup(key)
        if attribute is not None and attribute.kind is Kind.UID:
            # Gathered by attribute, so a keyword and its tag form one list too.
            uid_lists.setdefault(attribute, (key, []))[1].append(value)
            continue
        # Other repeated keys stay separate matches, all of which must hold.
        query.add(key, value)
    for key, values in uid_lists.values():
        query.add(key, _uid_list(values))
    return query


def _uid_list(values: list[str]) -> str:
    """The values of a repeated UID key as one list (``A\\B``).

    PS3.18 §8.3.4.1: ``StudyInstanceUID=A&StudyInstanceUID=B`` names the
    elements of one UID list, matching either (dicomweb-client sends a list
    filter this way), not two keys that must both match. A universal value
    among them adds nothing to the list.
    """
    wanted = [v for v in values if v not in ("", "*")]
    return "\\".join(wanted) if wanted else values[0]


def _handler(level: QueryLevel):  # type: ignore[no-untyped-def]
    async def endpoint(request: Request) -> Response:
        query = parse_query(request, level)
        archive = context.archive(request)
        principal = context.principal(request)
        results = await context.blocking(search.search, archive, principal, query)
        warnings = []
        if results.truncated:
            warnings.append(
                f'299 lightbox "results limited to {results.limit}; use offset to page"'
            )
        if query.unsupported:
            names = ", ".join(_header_safe(k[:64]) for k in query.unsupported[:20])
            warnings.append(f'299 lightbox "not supported as matching keys, ignored: {names}"')
        headers = {"Warning": ", ".join(warnings)} if warnings else None
        body = dicomjson.dumps(results.items)
        return context.dicom_json(request, body, headers)

    return endpoint


routes = [
    Route("/studies", _handler(QueryLevel.STUDY), methods=["GET"]),
    Route("/series", _handler(QueryLevel.SERIES), methods=["GET"]),
    Route("/instances", _handler(QueryLevel.INSTANCE), methods=["GET"]),
    Route("/studies/{study}/series", _handler(QueryLevel.SERIES), methods=["GET"]),
    Route("/studies/{study}/instances", _handler(QueryLevel.INSTANCE), methods=["GET"]),
    Route(
        "/studies/{study}/series/{series}/instances", _handler(QueryLevel.INSTANCE),
        methods=["GET"],
    ),
]
