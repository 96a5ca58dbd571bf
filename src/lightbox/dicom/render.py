"""Rendered images for WADO-RS ``/rendered`` and ``/thumbnail`` and for WADO-URI.

The pipeline follows PS3.18 §8.3.5 and the grayscale pipeline of PS3.3 C.11:
decode one frame, crop to the requested source region, apply the Modality LUT
(rescale slope/intercept or a Modality LUT Sequence), the VOI window (query
window, else the first header window, else the frame's min/max), invert
MONOCHROME1, then scale to fit the viewport keeping the aspect ratio and
encode as 8-bit JPEG or PNG. Colour frames (RGB, YBR converted to RGB by the
decoder, PALETTE COLOR through its LUT) skip the grayscale steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from io import BytesIO
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

from lightbox.dicom.transcode import frame_array
from lightbox.errors import BadRequest, NotAcceptable, Unavailable

JPEG = "image/jpeg"
PNG = "image/png"
SUPPORTED_MEDIA_TYPES = (JPEG, PNG)  # in order of preference when the client has none
WINDOW_FUNCTIONS = ("linear", "linear-exact", "sigmoid")
MAX_VIEWPORT = 8192  # per side; bigger requests are refused rather than rendered
THUMBNAIL_VIEWPORT = (128, 128)
_HEADER_FUNCTIONS = {"LINEAR": "linear", "LINEAR_EXACT": "linear-exact", "SIGMOID": "sigmoid"}

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Region:
    """The part of the frame to render.

    ``x``/``y`` are the top-left corner; ``width``/``height`` the extent, None
    meaning "to the edge" and a negative value flipping that axis. Units are
    pixels, or fractions of the frame's columns/rows when ``relative`` is set
    (WADO-URI ``region``).
    """

    x: float = 0.0
    y: float = 0.0
    width: float | None = None
    height: float | None = None
    relative: bool = False


@dataclass(frozen=True)
class RenderOptions:
    """How to render one frame.

    ``window`` is (center, width) applied with ``window_function`` after the
    Modality LUT; None means the header's first window, else the frame's
    min/max. ``viewport`` is the (width, height) box the image is scaled to
    fit, keeping its aspect ratio (up or down). ``quality`` only affects JPEG.
    """

    media_type: str = JPEG
    window: tuple[float, float] | None = None
    window_function: str = "linear"
    viewport: tuple[int, int] | None = None
    region: Region | None = None
    quality: int = 90


def parse_render_query(params: Mapping[str, str], *, accept: str | None) -> RenderOptions:
    """Parse WADO-RS rendered query parameters (PS3.18 §8.3.5.1).

    Understands ``window=center,width[,function]`` (function linear,
    linear-exact or sigmoid; linear when omitted), ``viewport=vw,vh`` or
    ``viewport=vw,vh,sx,sy,sw,sh`` (empty sw/sh = to the edge, negative =
    flip), ``quality=1..100`` and the media type from the ``accept`` query
    parameter or else the Accept header (image/jpeg, image/png and wildcards;
    JPEG by default). Other parameters are ignored.

    Raises BadRequest for malformed values, NotAcceptable when neither JPEG nor
    PNG is acceptable.
    """
    media_type = choose_media_type(params.get("accept") or accept)
    options = RenderOptions(media_type=media_type)
    if "window" in params:
        center, width, function = _parse_window(params["window"])
        options = replace(options, window=(center, width), window_function=function)
    if "viewport" in params:
        viewport, region = _parse_viewport(params["viewport"])
        options = replace(options, viewport=viewport, region=region)
    if "quality" in params:
        options = replace(options, quality=_integer(params["quality"], "quality", 1, 100))
    return options


def thumbnail_options(params: Mapping[str, str], accept: str | None) -> RenderOptions:
    """Like :func:`parse_render_query`, with a 128x128 viewport unless one is given."""
    options = parse_render_query(params, accept=accept)
    if options.viewport is None:
        options = replace(options, viewport=THUMBNAIL_VIEWPORT)
    return options


def parse_wado_uri_query(params: Mapping[str, str]) -> RenderOptions:
    """Parse the rendering parameters of a WADO-URI request (PS3.18 §9.5).

    ``contentType`` (image types only; application/dicom is the caller's
    business), ``rows``/``columns`` (a box to fit; either alone constrains one
    side), ``windowCenter`` with ``windowWidth`` (linear), ``imageQuality`` and
    ``region=x1,y1,x2,y2`` as fractions of the frame. ``frameNumber`` and the
    identifying UIDs are left to the caller.

    Raises BadRequest / NotAcceptable like :func:`parse_render_query`.
    """
    options = RenderOptions(media_type=choose_media_type(params.get("contentType")))
    rows, columns = params.get("rows"), params.get("columns")
    if rows is not None or columns is not None:
        # The unconstrained side gets the largest box, so only the given one binds.
        width = _integer(columns, "columns", 1, MAX_VIEWPORT) if columns else MAX_VIEWPORT
        height = _integer(rows, "rows", 1, MAX_VIEWPORT) if rows else MAX_VIEWPORT
        options = replace(options, viewport=(width, height))
    center, width_text = params.get("windowCenter"), params.get("windowWidth")
    if (center is None) != (width_text is None):
        raise BadRequest("windowCenter and windowWidth must be given together")
    if center is not None and width_text is not None:
        window = (_number(center, "windowCenter"), _number(width_text, "windowWidth"))
        _check_width(window[1], "linear")
        options = replace(options, window=window)
    if "imageQuality" in params:
        quality = _integer(params["imageQuality"], "imageQuality", 1, 100)
        options = replace(options, quality=quality)
    if "region" in params:
        options = replace(options, region=_parse_uri_region(params["region"]))
    return options


def choose_media_type(accept: str | None) -> str:
    """Pick JPEG or PNG from an Accept value, honouring q-values and wildcards.

    Each candidate takes the q of its most specific matching range; the highest
    q wins, JPEG on a tie. An empty or missing value means JPEG.
    Raises NotAcceptable when both end with q=0, BadRequest for a bad q.
    """
    if accept is None or not accept.strip():
        return JPEG
    ranges = [_media_range(part) for part in accept.split(",") if part.strip()]
    best, best_q = None, 0.0
    for candidate in SUPPORTED_MEDIA_TYPES:
        q = _acceptance(candidate, ranges)
        if q > best_q:
            best, best_q = candidate, q
    if best is None:
        raise NotAcceptable(
            f"rendered images are available as {' or '.join(SUPPORTED_MEDIA_TYPES)}"
        )
    return best


def render_frame(ds: Dataset, frame_number: int, options: RenderOptions) -> bytes:
    """Render frame ``frame_number`` (1-based) of ``ds`` as an encoded image.

    Returns JPEG or PNG bytes (``options.media_type``), 8-bit grey for
    single-sample data and RGB for colour. Raises NotFound for a missing frame
    or pixel data, Unavailable when the frame cannot be decoded or its
    photometric interpretation cannot be displayed, BadRequest when the
    requested region lies outside the frame.
    """
    arr = _crop(frame_array(ds, frame_number), options.region)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR" or (arr.ndim == 3 and arr.shape[2] == 3):
        pixels = _rgb8(arr, ds, palette=photometric == "PALETTE COLOR")
    elif arr.ndim == 2:
        pixels = _grey(arr, ds, frame_number - 1, options)
    else:
        raise Unavailable(f"cannot render {photometric or 'unknown'} pixel data")
    return _encode(pixels, options)


def render_rgb(arr: npt.NDArray[np.uint8], options: RenderOptions) -> bytes:
    """Render a frame decoded elsewhere (a video's) as 8-bit RGB: crop, fit, encode."""
    return _encode(_crop(arr, options.region), options)


def _encode(pixels: npt.NDArray[np.uint8], options: RenderOptions) -> bytes:
    image = _fit(Image.fromarray(np.ascontiguousarray(pixels)), options.viewport)
    out = BytesIO()
    if options.media_type == PNG:
        # Level 1 costs a few percent of size and saves most of the encoding time.
        image.save(out, format="PNG", compress_level=1)
    else:
        image.save(out, format="JPEG", quality=options.quality)
    return out.getvalue()


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise BadRequest(f"{what} must be a finite number, got {text!r}")
    return value


def _integer(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise BadRequest(f"{what} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{what} must be between {low} and {high}, got {value}")
    return value


def _check_width(width: float, function: str) -> None:
    # C.11.2.1.2: linear needs width >= 1; the others only need it positive.
    if function == "linear" and width < 1:
        raise BadRequest(f"window width must be at least 1 for linear windowing, got {width}")
    if width <= 0:
        raise BadRequest(f"window width must be positive, got {width}")


def _parse_window(text: str) -> tuple[float, float, str]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (2, 3):
        raise BadRequest(f"window must be center,width,function; got {text!r}")
    center = _number(parts[0], "window center")
    width = _number(parts[1], "window width")
    function = parts[2].lower() if len(parts) == 3 and parts[2] else "linear"
    if function not in WINDOW_FUNCTIONS:
        raise BadRequest(
            f"window function must be one of {', '.join(WINDOW_FUNCTIONS)}; got {parts[2]!r}"
        )
    _check_width(width, function)
    return center, width, function


def _parse_viewport(text: str) -> tuple[tuple[int, int], Region | None]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (2, 6):
        raise BadRequest(f"viewport must be vw,vh or vw,vh,sx,sy,sw,sh; got {text!r}")
    viewport = (
        _integer(parts[0], "viewport width", 1, MAX_VIEWPORT),
        _integer(parts[1], "viewport height", 1, MAX_VIEWPORT),
    )
    if len(parts) == 2:
        return viewport, None
    sx = _number(parts[2], "viewport sx") if parts[2] else 0.0
    sy = _number(parts[3], "viewport sy") if parts[3] else 0.0
    sw = _number(parts[4], "viewport sw") if parts[4] else None
    sh = _number(parts[5], "viewport sh") if parts[5] else None
    if sx < 0 or sy < 0 or sw == 0 or sh == 0:
        raise BadRequest(f"viewport source region is empty or starts before the image: {text!r}")
    return viewport, Region(sx, sy, sw, sh)


def _parse_uri_region(text: str) -> Region:
    parts = text.split(",")
    if len(parts) != 4:
        raise BadRequest(f"region must be x1,y1,x2,y2; got {text!r}")
    x1, y1, x2, y2 = (_number(part, "region") for part in parts)
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise BadRequest(f"region must satisfy 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1: {text!r}")
    return Region(x1, y1, x2 - x1, y2 - y1, relative=True)


def _media_range(part: str) -> tuple[str, float]:
    media, *parameters = (field.strip() for field in part.split(";"))
    q = 1.0
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            q = _number(value.strip(), "Accept q-value")
            if not 0 <= q <= 1:
                raise BadRequest(f"Accept q-value must be between 0 and 1: {part.strip()!r}")
    return media.lower(), q


def _acceptance(candidate: str, ranges: list[tuple[str, float]]) -> float:
    """q of the most specific range matching ``candidate`` (0 when none does)."""
    kind = candidate.split("/")[0]
    for pattern in (candidate, f"{kind}/*", "*/*"):
        matches = [q for media, q in ranges if media == pattern]
        if matches:
            return max(matches)
    return 0.0


def _crop(arr: npt.NDArray[Any], region: Region | None) -> npt.NDArray[Any]:
    """Cut ``region`` out of the frame, flipping for negative extents."""
    if region is None:
        return arr
    rows, columns = arr.shape[:2]
    x0, x1 = _span(region.x, region.width, columns, region.relative)
    y0, y1 = _span(region.y, region.height, rows, region.relative)
    if x0 >= x1 or y0 >= y1:
        raise BadRequest(f"the requested region lies outside the {columns}x{rows} frame")
    arr = arr[y0:y1, x0:x1]
    if region.width is not None and region.width < 0:
        arr = arr[:, ::-1]
    if region.height is not None and region.height < 0:
        arr = arr[::-1]
    return arr


def _span(start: float, extent: float | None, size: int, relative: bool) -> tuple[int, int]:
    scale = size if relative else 1
    first = round(start * scale)
    last = size if extent is None else first + round(abs(extent) * scale)
    return min(first, size), min(last, size)


def _fit(image: Image.Image, viewport: tuple[int, int] | None) -> Image.Image:
    """Scale to fit inside the viewport with the aspect ratio kept."""
    if viewport is None:
        return image
    width, height = image.size
    scale = min(viewport[0] / width, viewport[1] / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == image.size:
        return image
    # reducing_gap=2 shrinks by whole factors first: near-LANCZOS quality, ~2x faster.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _float(value: Any, default: float) -> float:
    """First value of a (possibly multi-valued, possibly garbled) numeric element."""
    if value is None:
        return default
    if not isinstance(value, str | int | float) and hasattr(value, "__getitem__"):
        value = value[0] if len(value) else None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


def _frame_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """The per-frame, else shared, functional group item ``keyword`` (enhanced objects)."""
    for groups_keyword, item_index in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(groups_keyword)
        if groups and len(groups) > item_index:
            sequence = groups[item_index].get(keyword)
            if sequence:
                item: Dataset = sequence[0]
                return item
    return None


def _modality(arr: npt.NDArray[Any], ds: Dataset, index: int) -> FloatArray:
    """Stored values to modality values (PS3.3 C.11.1)."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    source = _frame_item(ds, index, "PixelValueTransformationSequence") or ds
    slope = _float(source.get("RescaleSlope"), 1.0)
    intercept = _float(source.get("RescaleIntercept"), 0.0)
    values = arr.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _voi(
    values: FloatArray, ds: Dataset, index: int, options: RenderOptions
) -> tuple[float, float, str]:
    """(center, width, function) to apply: query, else header, else the frame's range."""
    if options.window is not None:
        return options.window[0], options.window[1], options.window_function
    source = _frame_item(ds, index, "FrameVOILUTSequence") or ds
    center = _float(source.get("WindowCenter"), math.nan)
    width = _float(source.get("WindowWidth"), math.nan)
    function = _HEADER_FUNCTIONS.get(str(source.get("VOILUTFunction", "")).upper(), "linear")
    if math.isfinite(center) and width > 0 and (width >= 1 or function != "linear"):
        return center, width, function
    low, high = float(values.min()), float(values.max())
    return (low + high) / 2, max(high - low, 1.0), "linear-exact"


def _window(values: FloatArray, center: float, width: float, function: str) -> FloatArray:
    """Map modality values to 0..255 in place (PS3.3 C.11.2.1.2 / C.11.2.1.3)."""
    if function == "sigmoid":
        values -= np.float32(center)
        values *= np.float32(-4.0 / width)
        with np.errstate(over="ignore"):  # exp overflows to inf far below center: 255/inf = 0
            np.exp(values, out=values)
        values += np.float32(1.0)
        np.divide(np.float32(255.0), values, out=values)
        return values
    if function == "linear" and width <= 1:
        # Width 1 degenerates to a threshold at center - 0.5.
        return np.where(values > center - 0.5, np.float32(255), np.float32(0)).astype(np.float32)
    if function == "linear":
        scale, origin = 255.0 / (width - 1), center - 0.5 - (width - 1) / 2
    else:
        scale, origin = 255.0 / width, center - width / 2
    values -= np.float32(origin)
    values *= np.float32(scale)
    # +0.5 turns the truncating uint8 cast into rounding.
    values += np.float32(0.5)
    np.clip(values, 0.0, 255.0, out=values)
    return values


def _grey(
    arr: npt.NDArray[Any], ds: Dataset, index: int, options: RenderOptions
) -> npt.NDArray[np.uint8]:
    values = _modality(arr, ds, index)
    center, width, function = _voi(values, ds, index, options)
    grey = _window(values, center, width, function).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        np.subtract(np.uint8(255), grey, out=grey)
    return grey


def _rgb8(arr: npt.NDArray[Any], ds: Dataset, *, palette: bool) -> npt.NDArray[np.uint8]:
    """RGB (or palette indices) to 8-bit RGB, keeping the top 8 significant bits."""
    if palette:
        try:
            arr = apply_color_lut(arr, ds)
        except (ValueError, AttributeError, KeyError) as exc:
            raise Unavailable(f"cannot apply the palette colour lookup table: {exc}") from exc
        bits = 8 if arr.dtype == np.uint8 else 16  # LUT entries are 8 or 16 bits
    else:
        bits = int(ds.get("BitsStored") or 8)
    if arr.dtype == np.uint8 or bits <= 8:
        return arr.astype(np.uint8, copy=False)
    return (arr >> (bits - 8)).astype(np.uint8)
