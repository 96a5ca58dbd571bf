"""DICOM JSON (PS3.18 §F.2) for stored instances, built once at ingest.

Binary values larger than a threshold become BulkDataURIs. URIs are written
relative to a placeholder that the web layer replaces with the caller's
DICOMweb root, so the cached bytes serve every root (plain or shared link).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

BASE_PLACEHOLDER = "@@LIGHTBOX_BASE@@"
BULK_THRESHOLD = 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def instance_path(study: str, series: str, sop: str) -> str:
    return f"{BASE_PLACEHOLDER}/studies/{study}/series/{series}/instances/{sop}"


def to_json(
    ds: Dataset, *, uri_prefix: str, pixel_vr: str | None, pixel_bulk_uri: str | None
) -> bytes:
    """Encode ``ds`` (read without pixel data) as one DICOM JSON object.

    ``pixel_vr``/``pixel_bulk_uri`` add the Pixel Data element as a BulkDataURI
    when the stored file has one.
    """
    obj = _dataset(ds, f"{uri_prefix}/bulkdata", "")
    if pixel_vr and pixel_bulk_uri:
        obj["7FE00010"] = {"vr": pixel_vr, "BulkDataURI": pixel_bulk_uri}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _dataset(ds: Dataset, bulk_root: str, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.group == 0x0002 or elem.tag.element == 0:
            continue  # file meta and group lengths do not belong in DICOM JSON
        key = f"{int(elem.tag):08X}"
        out[key] = _element(elem, bulk_root, f"{path}{key}")
    return out


def _element(elem: DataElement, bulk_root: str, path: str) -> dict[str, Any]:
    vr = elem.VR
    if vr == "SQ":
        items = [_dataset(item, bulk_root, f"{path}/{i + 1}/") for i, item in enumerate(elem.value)]
        return {"vr": vr, "Value": items} if items else {"vr": vr}
    if vr in _BINARY_VRS:
        value = elem.value
        if value is None or value == b"":
            return {"vr": vr}
        if isinstance(value, bytes | bytearray) and len(value) > BULK_THRESHOLD:
            return {"vr": vr, "BulkDataURI": f"{bulk_root}/{path}"}
        if isinstance(value, bytes | bytearray):
            return {"vr": vr, "InlineBinary": base64.b64encode(value).decode()}
    try:
        result: dict[str, Any] = elem.to_json_dict(None, BULK_THRESHOLD)
    except Exception:
        # A value pydicom cannot convert (bad number, odd encoding) is kept
        # out of the JSON rather than making the whole instance unreadable.
        return {"vr": vr}
    return result
