"""Stored instances sent as they are stored, by C-GET, C-MOVE and C-STORE SCU.

Given a file's path, pynetdicom sends a C-STORE's data set from the file in
fragments, after reading only its File Meta Information; given a Dataset, it
has pydicom encode the whole instance first, which cost more processor time
than anything else per instance sent. Its C-GET and C-MOVE services take a
Dataset from the handler, though: a stored instance goes to them as a
``StoredFile``, a Dataset that names the instance and carries the path of
its file, and ``send_c_store`` (``install``) sends the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom.association import Association

_Source = tuple[Path, Callable[[], Dataset]]


class StoredFile(Dataset):
    """A stored instance to send from its file. ``read`` gives it as a Dataset
    instead, for when the file cannot go as it is (no context for its
    transfer syntax, incomplete File Meta Information)."""

    def __init__(self, path: Path, sop_class: str, sop_instance: str,
                 read: Callable[[], Dataset]) -> None:
        super().__init__()
        self.SOPClassUID = sop_class  # pynetdicom names a failed sub-operation by these
        self.SOPInstanceUID = sop_instance
        # Not through Dataset.__setattr__, which looks names up as DICOM keywords.
        object.__setattr__(self, "_lightbox_source", (path, read))

    def source(self) -> _Source:
        return cast(_Source, object.__getattribute__(self, "_lightbox_source"))


def install() -> None:
    """Make ``Association.send_c_store`` send a ``StoredFile`` from its file."""
    original = Association.send_c_store
    if getattr(original, "lightbox", False):
        return

    def send_c_store(self: Association, dataset: Any, msg_id: int = 1, priority: int = 2,
                     originator_aet: str | None = None, originator_id: int | None = None,
                     ) -> Dataset:
        if isinstance(dataset, StoredFile):
            path, read = dataset.source()
            try:
                return original(self, path, msg_id, priority, originator_aet, originator_id)
            except (AttributeError, ValueError, InvalidDicomError):
                # Raised before anything is sent: no presentation context for
                # the stored transfer syntax, or File Meta Information lacking.
                dataset = read()
        return original(self, dataset, msg_id, priority, originator_aet, originator_id)

    send_c_store.lightbox = True  # type: ignore[attr-defined]
    Association.send_c_store = send_c_store  # type: ignore[method-assign]
