"""WADO-URI (PS3.18 §9): ``/wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…``."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lightbox.dicom import render, uids
from lightbox.errors import BadRequest, NotAcceptable
from lightbox.services import access, pixels, retrieve
from lightbox.web import context


async def wado(request: Request) -> Response:
    params = request.query_params
    if params.get("requestType") != "WADO":
        raise BadRequest("requestType must be WADO")
    study = uids.require_uid(params.get("studyUID", ""), "studyUID")
    series = uids.require_uid(params.get("seriesUID", ""), "seriesUID")
    sop = uids.require_uid(params.get("objectUID", ""), "objectUID")
    content_type = params.get("contentType", "image/jpeg").split(",")[0].strip()
    archive = context.archive(request)
    principal = context.principal(request)
    instance = (await context.blocking(
        retrieve.find_instances, archive, principal, study, series, sop))[0]
    if content_type == "application/dicom":
        # PS3.18 §8.2.11 / §9.4.2.4: Explicit VR Little Endian unless transferSyntax asks
        # for another; the stored form is served as is when it is the one asked for.
        wanted = params.get("transferSyntax") or uids.EXPLICIT_VR_LITTLE_ENDIAN
        uids.require_uid(wanted, "transferSyntax")
        await context.blocking(access.require_download, principal, study)
        if wanted == instance.transfer_syntax_uid:
            data = await context.blocking(archive.blobs.path(instance.blob_key).read_bytes)
        elif wanted == uids.EXPLICIT_VR_LITTLE_ENDIAN:
            data = await context.blocking(pixels.explicit_little_endian, archive, instance)
        else:
            raise NotAcceptable(
                f"transferSyntax {wanted} cannot be produced; the object is stored as "
                f"{instance.transfer_syntax_uid}, and {uids.EXPLICIT_VR_LITTLE_ENDIAN} is available"
            )
        return Response(data, media_type="application/dicom")
    if content_type not in render.SUPPORTED_MEDIA_TYPES:
        raise NotAcceptable("contentType must be application/dicom, image/jpeg or image/png")
    options = render.parse_wado_uri_query(dict(params))
    raw_number = params.get("frameNumber", "1")
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    number = int(raw_number) if re.fullmatch(r"[0-9]{1,9}", raw_number) else 0
    if number < 1:
        raise BadRequest("frameNumber must be a positive integer")
    data = await context.blocking(pixels.rendered, archive, instance, number, options)
    return Response(data, media_type=options.media_type)


routes = [Route("/wado", wado, methods=["GET"])]
