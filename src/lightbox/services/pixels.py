"""Pixel work off the hot path: decoding frames, transcoding and rendering.

These open the stored file with pydicom, so they run in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset

from lightbox.archive import Archive
from lightbox.dicom import render, transcode, uids, video
from lightbox.dicom.render import RenderOptions
from lightbox.errors import NotFound
from lightbox.index.instances import StoredInstance
from lightbox.services.retrieve import Frame, stored_frame


def _dataset(archive: Archive, instance: StoredInstance) -> Dataset:
    ds: Dataset = dcmread(archive.blobs.path(instance.blob_key))
    return ds


def frame(archive: Archive, instance: StoredInstance, number: int, *, native: bool) -> Frame:
    """Frame ``number``: as stored when ``native`` is False and possible, else
    decoded to Explicit VR Little Endian pixel bytes."""
    found = stored_frame(archive, instance, number)
    if found is not None and (not native or found.transfer_syntax_uid in uids.NATIVE_SYNTAXES):
        return found
    if is_video(instance):
        rgb = video_frame(archive, instance, number)
        return Frame(rgb.tobytes(), uids.EXPLICIT_VR_LITTLE_ENDIAN)
    ds = _dataset(archive, instance)
    if "PixelData" not in ds:
        raise NotFound(f"instance {instance.sop_instance_uid} has no pixel data")
    return Frame(transcode.decode_frame(ds, number), uids.EXPLICIT_VR_LITTLE_ENDIAN)


def is_video(instance: StoredInstance) -> bool:
    """Whether the instance's Pixel Data is one video stream (MPEG-2, H.264, HEVC)."""
    return instance.transfer_syntax_uid in uids.VIDEO_MEDIA_TYPES and instance.layout is not None


def video_frame(archive: Archive, instance: StoredInstance, number: int) -> npt.NDArray[np.uint8]:
    """Frame ``number`` of a video instance, decoded to RGB from the stored stream."""
    assert instance.layout is not None
    if not 1 <= number <= instance.number_of_frames:
        raise NotFound(f"frame {number} not in instance (it has {instance.number_of_frames})")
    segments = instance.layout.frames[0]

    def source() -> tuple[BinaryIO, Sequence[tuple[int, int]]]:
        return archive.blobs.open(instance.blob_key), segments

    return video.cursors.frame(instance.blob_key, number, source)


def representative_frame(instance: StoredInstance) -> int:
    """The frame that stands for a multi-frame instance: the middle one, but the
    first of a video (reaching a later one means decoding all before it)."""
    return 1 if is_video(instance) else max(1, (instance.number_of_frames + 1) // 2)


def can_convert(instance: StoredInstance) -> bool:
    """Whether :func:`explicit_little_endian` can handle the stored transfer syntax
    (native ones always; compressed ones when a decoder is installed)."""
    return transcode.can_decode(instance.transfer_syntax_uid)


def explicit_little_endian(archive: Archive, instance: StoredInstance) -> bytes:
    """The whole instance as an Explicit VR Little Endian Part 10 file."""
    with archive.blobs.open(instance.blob_key) as fh:
        return transcode.to_explicit_little_endian(fh)


def rendered(
    archive: Archive, instance: StoredInstance, number: int, options: RenderOptions
) -> bytes:
    """A rendered frame (JPEG/PNG); cached on disk for thumbnails and repeats."""
    key = hashlib.sha256(f"{instance.blob_key}|{number}|{options!r}".encode()).hexdigest()
    cache = Path(archive.settings.data) / "cache" / "rendered" / key[:2] / key
    try:
        return cache.read_bytes()
    except FileNotFoundError:
        pass
    if is_video(instance):
        data = render.render_rgb(video_frame(archive, instance, number), options)
    else:
        ds = _dataset(archive, instance)
        if "PixelData" not in ds:
            raise NotFound(f"instance {instance.sop_instance_uid} has no image to render")
        data = render.render_frame(ds, number, options)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cache)  # a cache: no fsync needed, a lost entry is re-rendered
    return data


def bulk_value(archive: Archive, instance: StoredInstance, tag_path: str) -> bytes:
    """The value of a binary element named by a BulkDataURI path
    (``TTTTTTTT`` or ``SQTAG/ITEM/TTTTTTTT/...``, items counted from 1)."""
    parts = tag_path.strip("/").split("/")
    if len(parts) % 2 != 1 or len(parts) > 15:
        raise NotFound(f"no bulk data at {tag_path[:80]!r}")
    ds = _dataset(archive, instance)
    node: object = ds
    try:
        for i, part in enumerate(parts):
            # Even parts name a tag, odd parts an item (counted from 1).
            node = node[int(part, 16)].value if i % 2 == 0 else node[int(part) - 1]  # type: ignore[index]
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise NotFound(f"no bulk data at {tag_path[:80]!r}") from exc
    if not isinstance(node, bytes | bytearray):
        raise NotFound(f"{tag_path[:80]!r} is not a binary value")
    return bytes(node)
