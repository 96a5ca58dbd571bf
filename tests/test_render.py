"""Rendered images: query parsing and the pixel pipeline, on pydicom's test files."""

from __future__ import annotations

import copy
import time
import warnings
from io import BytesIO

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from lightbox.dicom.render import (
    JPEG,
    MAX_VIEWPORT,
    PNG,
    Region,
    RenderOptions,
    choose_media_type,
    parse_render_query,
    parse_wado_uri_query,
    render_frame,
    thumbnail_options,
)
from lightbox.errors import BadRequest, NotAcceptable, NotFound, Unavailable

PNG_OPTIONS = RenderOptions(media_type=PNG)


def load(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def open_image(data: bytes) -> Image.Image:
    image = Image.open(BytesIO(data))
    image.load()
    return image


def pixels(data: bytes) -> npt.NDArray[np.int64]:
    return np.asarray(open_image(data)).astype(np.int64)


def synthetic(values: npt.NDArray[np.int16], **elements: object) -> Dataset:
    """A single-frame MONOCHROME2 16-bit signed dataset holding ``values``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = values.astype("<i2").tobytes()
    return ds


# --- query parsing ---------------------------------------------------------------------------


def test_parse_render_query_reads_all_parameters() -> None:
    options = parse_render_query(
        {"window": "40,400,linear-exact", "viewport": "256,128", "quality": "75"},
        accept="image/png",
    )
    assert options == RenderOptions(
        media_type=PNG,
        window=(40.0, 400.0),
        window_function="linear-exact",
        viewport=(256, 128),
        quality=75,
    )


def test_parse_render_query_defaults() -> None:
    assert parse_render_query({}, accept=None) == RenderOptions()
    assert parse_render_query({"window": "10,20"}, accept=None).window_function == "linear"


def test_viewport_with_source_region() -> None:
    options = parse_render_query({"viewport": "64,64,10,20,-30,"}, accept=None)
    assert options.viewport == (64, 64)
    assert options.region == Region(10.0, 20.0, -30.0, None)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, JPEG),
        ("", JPEG),
        ("*/*", JPEG),
        ("image/*", JPEG),
        ("image/png", PNG),
        ("image/gif, image/png;q=0.5", PNG),
        ("image/png;q=0.5, image/jpeg;q=0.4", PNG),
        ("image/jpeg;q=0, */*", PNG),
        ("IMAGE/JPEG", JPEG),
    ],
)
def test_choose_media_type(accept: str | None, expected: str) -> None:
    assert choose_media_type(accept) == expected


@pytest.mark.parametrize("accept", ["image/gif", "application/dicom", "image/*;q=0"])
def test_unsupported_media_type_is_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        parse_render_query({}, accept=accept)


def test_accept_query_parameter_overrides_header() -> None:
    assert parse_render_query({"accept": "image/png"}, accept="image/jpeg").media_type == PNG


@pytest.mark.parametrize(
    "params",
    [
        {"window": "a,400,linear"},
        {"window": "40,400,cubic"},
        {"window": "40,0,linear"},
        {"window": "40,0.5,linear"},
        {"window": "40,-1,sigmoid"},
        {"window": "40"},
        {"window": "40,nan,linear"},
        {"viewport": "0,10"},
        {"viewport": "10"},
        {"viewport": "10,10,1"},
        {"viewport": "x,10"},
        {"viewport": f"{MAX_VIEWPORT + 1},10"},
        {"viewport": "10,10,-1,0,5,5"},
        {"viewport": "10,10,0,0,0,5"},
        {"quality": "0"},
        {"quality": "101"},
        {"quality": "high"},
    ],
)
def test_bad_parameters_are_bad_requests(params: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        parse_render_query(params, accept=None)


def test_bad_q_value_is_bad_request() -> None:
    with pytest.raises(BadRequest):
        parse_render_query({}, accept="image/png;q=high")


def test_thumbnail_options_default_viewport() -> None:
    assert thumbnail_options({}, None).viewport == (128, 128)
    assert thumbnail_options({"viewport": "64,32"}, "image/png").viewport == (64, 32)


def test_parse_wado_uri_query() -> None:
    options = parse_wado_uri_query(
        {
            "contentType": "image/png",
            "rows": "100",
            "windowCenter": "40",
            "windowWidth": "400",
            "imageQuality": "60",
            "region": "0.25,0,0.75,0.5",
        }
    )
    assert options == RenderOptions(
        media_type=PNG,
        window=(40.0, 400.0),
        viewport=(MAX_VIEWPORT, 100),
        region=Region(0.25, 0.0, 0.5, 0.5, relative=True),
        quality=60,
    )
    assert parse_wado_uri_query({}) == RenderOptions()


@pytest.mark.parametrize(
    "params",
    [
        {"windowCenter": "40"},
        {"rows": "0"},
        {"columns": "many"},
        {"imageQuality": "0"},
        {"region": "0.5,0,0.25,1"},
        {"region": "0,0,1"},
    ],
)
def test_bad_wado_uri_parameters(params: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        parse_wado_uri_query(params)


def test_wado_uri_unsupported_content_type() -> None:
    with pytest.raises(NotAcceptable):
        parse_wado_uri_query({"contentType": "image/gif"})


# --- rendering -------------------------------------------------------------------------------


def test_renders_jpeg_and_png() -> None:
    ds = load("CT_small.dcm")
    jpeg = open_image(render_frame(ds, 1, RenderOptions()))
    assert (jpeg.format, jpeg.mode, jpeg.size) == ("JPEG", "L", (128, 128))
    png = open_image(render_frame(ds, 1, PNG_OPTIONS))
    assert (png.format, png.mode, png.size) == ("PNG", "L", (128, 128))
    assert np.asarray(png).std() > 10  # a real image, not a constant


def test_quality_changes_jpeg_size() -> None:
    ds = load("CT_small.dcm")
    low = render_frame(ds, 1, RenderOptions(quality=10))
    high = render_frame(ds, 1, RenderOptions(quality=100))
    assert len(low) < len(high)


@pytest.mark.parametrize(
    ("name", "viewport", "size"),
    [
        ("JPEG2000.dcm", (100, 100), (25, 100)),  # 256 columns x 1024 rows
        ("JPEG2000.dcm", (1000, 200), (50, 200)),
        ("MR_small.dcm", (32, 64), (32, 32)),
        ("MR_small.dcm", (128, 256), (128, 128)),  # scaled up to fit
        ("examples_rgb_color.dcm", (160, 160), (160, 120)),
    ],
)
def test_viewport_keeps_aspect_ratio(
    name: str, viewport: tuple[int, int], size: tuple[int, int]
) -> None:
    image = open_image(render_frame(load(name), 1, RenderOptions(viewport=viewport)))
    assert image.size == size


def test_thumbnail_size() -> None:
    options = thumbnail_options({}, None)
    assert open_image(render_frame(load("CT_small.dcm"), 1, options)).size == (128, 128)


def test_window_changes_pixels() -> None:
    ds = load("CT_small.dcm")
    soft = pixels(render_frame(ds, 1, RenderOptions(media_type=PNG, window=(40, 400))))
    bone = pixels(render_frame(ds, 1, RenderOptions(media_type=PNG, window=(1000, 200))))
    assert not np.array_equal(soft, bone)


def test_linear_window_follows_ps3_3() -> None:
    values = np.array([[0, 50, 100, 149, 150, 1000]], dtype=np.int16)
    options = RenderOptions(media_type=PNG, window=(100, 101))
    # y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clamped, rounded.
    assert pixels(render_frame(synthetic(values), 1, options)).tolist() == [
        [0, 1, 129, 254, 255, 255]
    ]


def test_linear_exact_and_sigmoid_windows() -> None:
    values = np.array([[0, 50, 100, 150, 1000]], dtype=np.int16)
    exact = RenderOptions(media_type=PNG, window=(100, 100), window_function="linear-exact")
    assert pixels(render_frame(synthetic(values), 1, exact)).tolist() == [[0, 0, 128, 255, 255]]
    sigmoid = RenderOptions(media_type=PNG, window=(100, 100), window_function="sigmoid")
    grey = pixels(render_frame(synthetic(values), 1, sigmoid))[0]
    assert grey[0] < grey[1] < grey[2] < grey[3] <= grey[4]
    assert grey[2] == 127  # 255 / 2, truncated


def test_rescale_is_applied_before_window() -> None:
    values = np.array([[0, 50, 100]], dtype=np.int16)
    ds = synthetic(values, RescaleSlope=2, RescaleIntercept=-100)  # -> -100, 0, 100
    options = RenderOptions(media_type=PNG, window=(0, 200), window_function="linear-exact")
    assert pixels(render_frame(ds, 1, options)).tolist() == [[0, 128, 255]]


def test_header_window_is_the_default() -> None:
    ds = load("MR_small.dcm")  # WindowCenter 600, WindowWidth 1600
    header = pixels(render_frame(ds, 1, PNG_OPTIONS))
    explicit = pixels(render_frame(ds, 1, RenderOptions(media_type=PNG, window=(600, 1600))))
    assert np.array_equal(header, explicit)


def test_min_max_when_no_window() -> None:
    values = np.array([[-500, 0, 1500]], dtype=np.int16)
    assert pixels(render_frame(synthetic(values), 1, PNG_OPTIONS)).tolist() == [[0, 64, 255]]


def test_monochrome1_is_inverted() -> None:
    ds = load("MR_small.dcm")
    normal = pixels(render_frame(ds, 1, PNG_OPTIONS))
    inverted = copy.deepcopy(ds)
    inverted.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(pixels(render_frame(inverted, 1, PNG_OPTIONS)), 255 - normal)


def test_bits_stored_and_sign() -> None:
    clean = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    raw = clean.astype("<u2") & 0x0FFF
    raw[0, 2] |= 0x3000  # garbage above HighBit must be ignored
    ds = synthetic(clean, BitsStored=12, HighBit=11)
    ds.PixelData = raw.astype("<u2").tobytes()
    options = RenderOptions(media_type=PNG, window=(0, 4096), window_function="linear-exact")
    expected = render_frame(synthetic(clean), 1, options)
    assert np.array_equal(pixels(render_frame(ds, 1, options)), pixels(expected))


def test_compressed_lossless_renders_like_uncompressed() -> None:
    reference = pixels(render_frame(load("MR_small.dcm"), 1, PNG_OPTIONS))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(pixels(render_frame(load(name), 1, PNG_OPTIONS)), reference), name


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"],
)
def test_ybr_is_converted_to_rgb(name: str) -> None:
    reference = pixels(render_frame(load("SC_rgb_rle.dcm"), 1, PNG_OPTIONS))
    image = open_image(render_frame(load(name), 1, PNG_OPTIONS))
    assert image.mode == "RGB"
    # Unconverted YCbCr would be off by ~90 levels on average.
    assert np.abs(np.asarray(image).astype(np.int64) - reference).mean() < 5


def test_planar_configuration() -> None:
    red, green = [255, 0, 0], [0, 255, 0]
    rgb = np.array([[red, green], [green, red]], dtype=np.uint8)
    ds = synthetic(np.zeros((2, 2), dtype=np.int16))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 1
    ds.PixelData = rgb.transpose(2, 0, 1).tobytes()  # RRRR GGGG BBBB
    assert pixels(render_frame(ds, 1, PNG_OPTIONS)).tolist() == rgb.tolist()


def test_sixteen_bit_colour_and_palette() -> None:
    for name in ("SC_rgb_rle_16bit.dcm", "examples_palette.dcm"):
        image = open_image(render_frame(load(name), 1, PNG_OPTIONS))
        assert image.mode == "RGB"
        assert np.asarray(image).std() > 10, name


def test_multi_frame() -> None:
    ds = load("examples_ybr_color.dcm")  # 30 frames of JPEG baseline
    first = pixels(render_frame(ds, 1, PNG_OPTIONS))
    last = pixels(render_frame(ds, 30, PNG_OPTIONS))
    assert first.shape == last.shape == (240, 320, 3)
    assert not np.array_equal(first, last)
    dose = load("rtdose.dcm")  # 15 grey frames
    assert open_image(render_frame(dose, 15, PNG_OPTIONS)).size == (10, 10)


@pytest.mark.parametrize("frame", [0, 2, -1])
def test_missing_frame_is_not_found(frame: int) -> None:
    with pytest.raises(NotFound):
        render_frame(load("CT_small.dcm"), frame, RenderOptions())


def test_no_pixel_data_is_not_found() -> None:
    ds = load("CT_small.dcm")
    del ds.PixelData
    with pytest.raises(NotFound):
        render_frame(ds, 1, RenderOptions())


def test_no_decoder_is_unavailable() -> None:
    ds = load("CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.110")  # JPEG XL Lossless
    with pytest.raises(Unavailable, match=r"1\.2\.840\.10008\.1\.2\.4\.110"):
        render_frame(ds, 1, RenderOptions())


def test_corrupt_pixel_data_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        render_frame(load("JPEG-lossy.dcm"), 1, RenderOptions())


def test_region_crops_and_flips() -> None:
    values = np.arange(16, dtype=np.int16).reshape(4, 4) * 10
    ds = synthetic(values)
    window = RenderOptions(media_type=PNG, window=(75, 150), window_function="linear-exact")
    full = pixels(render_frame(ds, 1, window))
    crop = RenderOptions(
        media_type=PNG,
        window=(75, 150),
        window_function="linear-exact",
        viewport=(2, 2),
        region=Region(1, 2, -2, None),
    )
    assert np.array_equal(pixels(render_frame(ds, 1, crop)), full[2:4, 1:3][:, ::-1])
    relative = RenderOptions(
        media_type=PNG,
        window=(75, 150),
        window_function="linear-exact",
        region=Region(0.5, 0.0, 0.5, 0.5, relative=True),
    )
    assert np.array_equal(pixels(render_frame(ds, 1, relative)), full[0:2, 2:4])
    outside = RenderOptions(region=Region(10, 10, None, None))
    with pytest.raises(BadRequest):
        render_frame(ds, 1, outside)


def test_render_is_fast() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(-1024, 3000, size=(512, 512)).astype(np.int16)
    ds = synthetic(values, RescaleSlope=1, RescaleIntercept=-1024, BitsStored=12, HighBit=11)
    render_frame(ds, 1, RenderOptions())
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        render_frame(ds, 1, RenderOptions())
        timings.append(time.perf_counter() - start)
    # Typically ~2-5 ms; the bound only catches an accidental per-pixel Python loop.
    assert sorted(timings)[2] < 0.1
