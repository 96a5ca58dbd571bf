"""Video instances (MPEG-2, H.264, HEVC): their frames rendered, thumbnailed and
decoded from the stored stream, with real streams encoded by FFmpeg.

Each frame of the test videos is one solid colour (``video_colour``), so what
comes back can be told apart frame by frame, lossy coding notwithstanding.
"""

from __future__ import annotations

import io
import itertools
import time
from pathlib import Path
from typing import BinaryIO

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lightbox.dicom.video import Cursors
from lightbox.errors import NotFound
from tests.conftest import RunningServer
from tests.factories import ROOT, encoded_video, video_colour, video_dataset

VIDEOS = {  # transfer syntax, FFmpeg encoder and container
    "h264": ("1.2.840.10008.1.2.4.102", "libx264", "h264"),
    "mpeg2": ("1.2.840.10008.1.2.4.100", "mpeg2video", "mpeg"),
    "hevc": ("1.2.840.10008.1.2.4.107", "hevc", "hevc"),
}
FRAMES = 12


def _stored(server: RunningServer, kind: str) -> tuple[Dataset, str]:
    syntax, codec, container = VIDEOS[kind]
    ds = video_dataset(generate_uid(prefix=ROOT), encoded_video(codec, container, FRAMES),
                       syntax=syntax, frames=FRAMES)
    DICOMwebClient(server.dicomweb, headers=server.headers).store_instances([ds])
    series = f"{server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    return ds, series


def _colour(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).reshape(-1, 3).mean(axis=0)


def _close(got: np.ndarray, number: int) -> bool:
    return bool(np.all(np.abs(got - np.array(video_colour(number))) < 8))


@pytest.mark.parametrize("kind", sorted(VIDEOS))
def test_frames_of_a_video_render_from_its_stream(server: RunningServer, kind: str) -> None:
    ds, series = _stored(server, kind)
    instance = f"{series}/instances/{ds.SOPInstanceUID}"
    get = lambda path, **h: httpx.get(path, headers={**server.headers, **h})  # noqa: E731
    first = get(f"{instance}/rendered", Accept="image/jpeg")
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/jpeg" and _close(_colour(first.content), 1)
    for number in (2, 7, FRAMES):
        answer = get(f"{instance}/frames/{number}/rendered", Accept="image/png")
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(answer.content))
        assert image.format == "PNG" and image.size == (64, 64)
        assert _close(_colour(answer.content), number), (number, _colour(answer.content))
    # A video's thumbnail is its first frame, at series and at instance level.
    for thumb in (get(f"{series}/thumbnail"), get(f"{instance}/thumbnail?viewport=32,32")):
        assert thumb.status_code == 200 and _close(_colour(thumb.content), 1)
    assert Image.open(io.BytesIO(thumb.content)).size == (32, 32)
    missing = get(f"{instance}/frames/{FRAMES + 1}/rendered")
    assert missing.status_code == 404, missing.text


def test_a_video_frame_is_given_decoded_and_by_wado_uri(server: RunningServer) -> None:
    ds, series = _stored(server, "h264")
    instance = f"{series}/instances/{ds.SOPInstanceUID}"
    decoded = httpx.get(f"{instance}/frames/5", headers={**server.headers,
                                                          "Accept": "application/octet-stream"})
    assert decoded.status_code == 200, decoded.text
    assert decoded.headers["content-type"].startswith("application/octet-stream")
    assert "transfer-syntax=1.2.840.10008.1.2.1" in decoded.headers["content-type"]
    pixels = np.frombuffer(decoded.content, dtype=np.uint8)
    assert pixels.size == 64 * 64 * 3  # RGB, as every decoded colour frame
    assert _close(pixels.reshape(-1, 3).mean(axis=0), 5)
    uri = httpx.get(f"{server.url}/wado", headers=server.headers, params={
        "requestType": "WADO", "studyUID": ds.StudyInstanceUID,
        "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID,
        "contentType": "image/jpeg", "frameNumber": "9"})
    assert uri.status_code == 200, uri.text
    assert _close(_colour(uri.content), 9)


def test_the_study_browser_shows_a_video_series_by_its_first_frame(server: RunningServer) -> None:
    ds, _series = _stored(server, "mpeg2")
    thumb = httpx.get(f"{server.url}/browse/thumbnails/{ds.StudyInstanceUID}/"
                      f"{ds.SeriesInstanceUID}.jpg", headers=server.headers)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert _close(_colour(thumb.content), 1)


def test_a_stream_that_is_not_video_is_refused_clearly(server: RunningServer) -> None:
    """Bytes in a video transfer syntax that no decoder can read: 503 with the
    reason for rendering, while the stored stream is still served as sent."""
    stream = bytes(range(256)) * 40
    ds = video_dataset(generate_uid(prefix=ROOT), stream, frames=FRAMES)
    DICOMwebClient(server.dicomweb, headers=server.headers).store_instances([ds])
    instance = (f"{server.dicomweb}/studies/{ds.StudyInstanceUID}/series/"
                f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    answer = httpx.get(f"{instance}/rendered", headers=server.headers)
    assert answer.status_code == 503 and "video" in answer.text
    played = httpx.get(f"{instance}/bulkdata/7FE00010?accept=video/mp4", headers=server.headers)
    assert played.status_code == 200 and played.content == stream


def test_frames_asked_for_in_order_reuse_the_open_decoder(tmp_path: Path) -> None:
    """Frame N costs decoding the N-1 before it; a decoder kept where it
    stopped makes frames asked for in order cost one decode each. The stream
    lies in three fragments of a larger file, as in a stored instance."""
    stream = encoded_video("libx264", "h264", FRAMES)
    cuts = [0, len(stream) // 3, 2 * len(stream) // 3, len(stream)]
    path, segments, offset = tmp_path / "stored", list[tuple[int, int]](), 100
    with path.open("wb") as out:
        out.write(bytes(offset))
        for start, end in itertools.pairwise(cuts):
            out.write(stream[start:end] + bytes(8))
            segments.append((offset, end - start))
            offset += end - start + 8
    opened: list[BinaryIO] = []

    def source() -> tuple[BinaryIO, list[tuple[int, int]]]:
        opened.append(path.open("rb"))
        return opened[-1], segments

    cursors = Cursors()
    for number in range(1, FRAMES + 1):
        assert _close(cursors.frame("k", number, source).reshape(-1, 3).mean(axis=0), number)
    assert (cursors.hits, cursors.misses, len(opened)) == (FRAMES - 1, 1, 1)
    # Going back starts again from the first frame; the old decoder's file is closed.
    assert _close(cursors.frame("k", 3, source).reshape(-1, 3).mean(axis=0), 3)
    assert (cursors.misses, len(opened)) == (2, 2) and opened[0].closed
    # Past the end: the decoder is dropped, and the next frame opens a new one.
    with pytest.raises(NotFound, match="not in the video"):
        cursors.frame("k", FRAMES + 1, source)
    assert opened[1].closed
    assert _close(cursors.frame("k", 4, source).reshape(-1, 3).mean(axis=0), 4)
    # At most KEEP streams stay open; the least recently used goes first.
    for key in ("a", "b"):
        cursors.frame(key, 1, source)
    assert opened[2].closed and not opened[-1].closed
    cursors.close()
    assert all(fh.closed for fh in opened)
    # One left unused is closed after IDLE seconds, without another frame asked for.
    quick = Cursors()
    quick.IDLE = 0.2
    quick.frame("k", 1, source)
    deadline = time.monotonic() + 10
    while not opened[-1].closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened[-1].closed


def test_several_frames_of_a_video_in_one_request(server: RunningServer) -> None:
    ds, series = _stored(server, "mpeg2")
    instance = f"{series}/instances/{ds.SOPInstanceUID}"
    client = DICOMwebClient(server.dicomweb, headers=server.headers)
    frames = client.retrieve_instance_frames(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [4, 5, 6, 2],
        media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),))
    assert len(frames) == 4
    for number, data in zip([4, 5, 6, 2], frames, strict=True):
        assert _close(np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).mean(axis=0), number)
    assert httpx.get(f"{instance}/frames/3,{FRAMES + 1}", headers=server.headers).status_code == 404
