"""The DICOMweb root of a share link: ``/s/<token>/dicom-web``.

The link is resolved and its holder checked here (passcode unlock token from
the cookie or ``Authorization: Bearer``, a signed-in user for signed-in
links); the request then goes to the ordinary QIDO-RS and WADO-RS routes
with a Principal that may read the one study, read-only. De-identified links
go to the handlers below instead for searches, metadata and instances, with
public UIDs in the URL translated back first; frames, bulk data and rendered
images pass through unchanged. Nothing is ever stored or deleted here.

Every answer lands in the audit trail under the link's id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from lightbox.dicom import uids
from lightbox.dicom.attributes import QueryLevel, lookup
from lightbox.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from lightbox.index.instances import StoredInstance
from lightbox.services import shared_study, sharing
from lightbox.services.auth import Principal
from lightbox.services.sharing import ShareLink
from lightbox.web import bulkdata, context, qido, wado
from lightbox.web.audit import StatusNote
from lightbox.web.multipart import closing, new_boundary, part_header

SHARE_COOKIE = "lightbox_share"
_UID_KEYWORDS = {"StudyInstanceUID": "study", "SeriesInstanceUID": "series",
                 "SOPInstanceUID": "instance"}
# Matching keys a de-identified link answers; others could reveal removed values.
_SAFE_KEYWORDS = {"Modality", "ModalitiesInStudy", "SeriesNumber", "InstanceNumber",
                  "SOPClassUID", *_UID_KEYWORDS}
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield", "_", "format"}
_LEVELS = {"studies": "study", "series": "series", "instances": "instance"}


def unlock_token(request: Request) -> str | None:
    """The link's unlock token: ``Authorization: Bearer lbs_…`` or the share cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip().startswith(sharing.UNLOCK_PREFIX):
        return value.strip()
    return request.cookies.get(SHARE_COOKIE) or None


async def holder_of(request: Request, link: ShareLink) -> Principal:
    """The caller as the link's holder; Unauthenticated without the needed credentials."""
    viewer = None
    if link.access.needs_sign_in:
        viewer = context.principal(request)
    unlocked = await context.blocking(
        sharing.is_unlocked, context.archive(request), link, unlock_token(request))
    if not unlocked:
        raise Unauthenticated("this link needs its passcode")
    return sharing.holder(context.archive(request), link, viewer)


def classify(route_path: str) -> str:
    """The audit action of a request under the share root."""
    last = route_path.rstrip("/").rsplit("/", 1)[-1]
    if route_path in ("/studies", "/series", "/instances") or last in ("series", "instances"):
        return "query"
    if "/frames/" in route_path and not route_path.endswith(("/rendered", "/thumbnail")):
        return "frames"
    if "/bulkdata/" in route_path:
        return "frames"
    if last in ("metadata", "rendered", "thumbnail"):
        return "view"
    return "retrieve"


class ScopedRoot:
    """ASGI app mounted at ``/s/{token}/dicom-web``."""

    def __init__(self) -> None:
        self.plain = Router(routes=[*qido.routes, *wado.routes])
        self.deidentified = Router(routes=_deidentified_routes())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        archive = context.archive(request)
        link = await context.blocking(sharing.resolve, archive, scope["path_params"]["token"])
        caller = context.caller(request)
        route_path = scope["path"][len(scope.get("root_path", "")):] or "/"
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise Forbidden("a shared link is read-only")
            principal = await holder_of(request, link)
        except (Unauthenticated, Forbidden) as exc:
            sharing.record(archive, "access_denied", link, f"link:{link.id}", outcome="failure",
                           caller=caller, detail={"reason": exc.message})
            raise
        scope["lightbox.principal"] = principal
        scope["lightbox.share"] = link
        router = self.plain
        _require_the_study(route_path, link)
        if link.deidentify:
            router = self.deidentified
            translated = await context.blocking(_translate, request, link, principal, route_path)
            scope["path"] = scope.get("root_path", "") + translated
            if classify(route_path) == "query":
                scope["query_string"] = _translate_query(request, link).encode()
        answered = StatusNote(send)
        await router(scope, receive, answered)
        if answered.status < 400:
            archive.audit.count(classify(route_path), principal.user, link.study_instance_uid,
                                source=caller.source, user_agent=caller.user_agent, link=link.id)


def _require_the_study(route_path: str, link: ShareLink) -> None:
    """Any study but the link's is unknown here (searches included)."""
    parts = route_path.split("/")
    wanted = link.public_uid(link.study_instance_uid)
    if len(parts) > 2 and parts[1] == "studies" and parts[2] and parts[2] != wanted:
        raise NotFound("study not found")


# -- de-identified links: public UIDs in, public UIDs out ----------------------------------


def _translate(request: Request, link: ShareLink, principal: Principal,
               route_path: str) -> str:
    """The route path with public UIDs replaced by the originals; study- and
    series-level rendered images turned into the representative instance's."""
    archive = context.archive(request)
    parts = route_path.split("/")
    for i in range(1, len(parts)):
        level = _LEVELS.get(parts[i - 1])
        if level is not None and parts[i] and uids.is_valid_uid(parts[i]):
            parts[i] = sharing.original_uid(archive, link, parts[i], level)
    if parts[-1] in ("rendered", "thumbnail") and "instances" not in parts:
        study = parts[2] if len(parts) > 2 else ""
        series = parts[4] if len(parts) > 4 and parts[3] == "series" else None
        series, sop = shared_study.representative(archive, link, principal, study, series)
        parts = ["", "studies", study, "series", series, "instances", sop, parts[-1]]
    if "bulkdata" in parts:
        at = parts.index("bulkdata")
        if not shared_study.bulk_path_allowed("/".join(parts[at + 1:])):
            raise NotFound("no bulk data here")
    return "/".join(parts)


def _translate_query(request: Request, link: ShareLink) -> str:
    """The query string with public UIDs translated; identifying matching keys refused."""
    archive = context.archive(request)
    out = []
    for key, value in parse_qsl(request.url.query, keep_blank_values=True):
        if key in _CONTROL:
            out.append((key, value))
            continue
        attribute = lookup(key)
        keyword = attribute.keyword if attribute is not None else key
        if keyword not in _SAFE_KEYWORDS:
            raise BadRequest(f"a de-identified link cannot be searched by {key[:64]!r}")
        level = _UID_KEYWORDS.get(keyword)
        if level is not None and value:
            value = ",".join(
                sharing.original_uid(archive, link, v.strip(), level)
                for v in value.replace("\\", ",").split(",") if v.strip())
        out.append((key, value))
    return urlencode(out)


def _search(level: QueryLevel):  # type: ignore[no-untyped-def]
    async def endpoint(request: Request) -> Response:
        query = qido.parse_query(request, level)
        link: ShareLink = request.scope["lightbox.share"]
        items = await context.blocking(
            shared_study.search_deidentified, context.archive(request), link,
            context.principal(request), query)
        return context.dicom_json(request, shared_study.json_list(items))

    return endpoint


async def _metadata(request: Request) -> Response:
    # The same path parsing, Accept rules and transfer syntax choice as the
    # plain routes, so a de-identified answer differs only in its content.
    study, series, sop = context.path_uids(request)
    link: ShareLink = request.scope["lightbox.share"]
    payload = await context.blocking(
        shared_study.metadata_deidentified, context.archive(request), link,
        context.principal(request), study, series, sop)
    return context.dicom_json(request, payload)


async def _instances(request: Request) -> Response:
    study, series, sop = context.path_uids(request)
    choices = wado.syntax_choices(request.headers.get("accept"))
    archive = context.archive(request)
    link: ShareLink = request.scope["lightbox.share"]
    found = await context.blocking(
        shared_study.shown_instances, archive, link, context.principal(request),
        study, series, sop)
    chosen = [(i, wado.choose_syntax(i, choices)) for i in found]

    def convert(instance: StoredInstance, syntax: str) -> bytes:
        return shared_study.instance_deidentified(archive, link, instance, syntax)

    chosen, first = await wado.first_sendable(chosen, convert, keep_stored=False)
    boundary = new_boundary()

    async def body() -> AsyncIterator[bytes]:
        async for _n, _instance, syntax, data in wado.sendable(
            chosen, first, convert, keep_stored=False
        ):
            yield part_header(boundary, f"application/dicom; transfer-syntax={syntax}")
            yield (data or b"") + b"\r\n"
        yield closing(boundary)

    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(body(), media_type=media)


def _deidentified_routes() -> list[Route]:
    instance = wado.INSTANCE
    return [
        Route("/studies", _search(QueryLevel.STUDY), methods=["GET"]),
        Route("/series", _search(QueryLevel.SERIES), methods=["GET"]),
        Route("/instances", _search(QueryLevel.INSTANCE), methods=["GET"]),
        Route("/studies/{study}/series", _search(QueryLevel.SERIES), methods=["GET"]),
        Route("/studies/{study}/instances", _search(QueryLevel.INSTANCE), methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances", _search(QueryLevel.INSTANCE),
              methods=["GET"]),
        Route("/studies/{study}", _instances, methods=["GET"]),
        Route("/studies/{study}/series/{series}", _instances, methods=["GET"]),
        Route(instance, _instances, methods=["GET"]),
        Route("/studies/{study}/metadata", _metadata),
        Route("/studies/{study}/series/{series}/metadata", _metadata),
        Route(instance + "/metadata", _metadata),
        Route(instance + "/frames/{frames}", wado.frames),
        Route(instance + "/bulkdata/{path:path}", bulkdata.bulkdata),
        Route(instance + "/rendered", wado.rendered),
        Route(instance + "/thumbnail", wado.rendered),
        Route(instance + "/frames/{frame:int}/rendered", wado.rendered),
        Route(instance + "/frames/{frame:int}/thumbnail", wado.rendered),
    ]
