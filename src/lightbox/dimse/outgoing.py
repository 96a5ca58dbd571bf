"""Stored instances sent as they are stored, by C-GET, C-MOVE and C-STORE SCU.

Given a file's path, pynetdicom sends a C-STORE's data set from the file in
fragments, after reading only its File Meta Information; given a Dataset, it
has pydicom encode the whole instance first, which cost more processor time
than anything else per instance sent. Its C-GET and C-MOVE services take a
Dataset from the handler, though: a stored instance goes to them as a
``StoredFile``, a Dataset that names the instance and carries the path of
its file, and ``send_c_store`` (``install``) sends the file.

For a file of the usual form, ``send_c_store`` does its work per instance
more cheaply too (``_send_file``): the File Meta Information is read straight
from its bytes rather than by pydicom, and the presentation context found in
a table made once per association rather than by sorting and searching every
accepted context (a peer such as ``getscu`` has over a hundred). The rest is
pynetdicom's: the request primitive, pausing the reactor, sending, waiting
for the response and checking it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from lightbox.dicom import fastheader

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
            status = _send_file(self, path, msg_id, priority, originator_aet, originator_id)
            if status is not None:
                return status
            try:
                return original(self, path, msg_id, priority, originator_aet, originator_id)
            except (AttributeError, ValueError, InvalidDicomError):
                # Raised before anything is sent: no presentation context for
                # the stored transfer syntax, or File Meta Information lacking.
                dataset = read()
        return original(self, dataset, msg_id, priority, originator_aet, originator_id)

    send_c_store.lightbox = True  # type: ignore[attr-defined]
    Association.send_c_store = send_c_store  # type: ignore[method-assign]


_CONTEXTS = "_lightbox_scu_contexts"


def _send_file(assoc: Association, path: Path, msg_id: int, priority: int,
               originator_aet: str | None, originator_id: int | None) -> Dataset | None:
    """``Association.send_c_store`` of the file at ``path`` as pynetdicom
    sends it (its data set as it is, no conversion); None when the file or
    the association is out of the ordinary, for pynetdicom to do it all."""
    if not assoc.is_established:
        return None
    try:
        meta = fastheader.file_meta(path)
    except OSError:
        return None  # pynetdicom says what is wrong with it
    if meta is None:
        return None
    context_id = _scu_contexts(assoc).get((meta.sop_class_uid, meta.transfer_syntax_uid))
    if context_id is None:
        return None
    request = C_STORE()
    request.MessageID = msg_id
    request.Priority = priority
    request.MoveOriginatorApplicationEntityTitle = originator_aet
    request.MoveOriginatorMessageID = originator_id
    request.AffectedSOPClassUID = meta.sop_class_uid
    request.AffectedSOPInstanceUID = meta.sop_instance_uid
    request._dataset_path = (path, meta.data_set_offset)
    # As pynetdicom does: the reactor paused, so that the response is ours.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    assoc.dimse.send_msg(request, context_id)
    _context, response = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    if response is None:  # the DIMSE timeout expired
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(response)


def _scu_contexts(assoc: Association) -> dict[tuple[str, str], int]:
    """The context ID to send each (SOP Class, transfer syntax) on as SCU, as
    pynetdicom's ``_get_valid_context`` finds it when no conversion is
    allowed: the accepted context of lowest ID with both exactly."""
    table = cast(dict[tuple[str, str], int] | None, getattr(assoc, _CONTEXTS, None))
    if table is None:
        table = {}
        for cx in assoc.accepted_contexts:
            if cx.as_scu is True and cx.transfer_syntax:
                table.setdefault((str(cx.abstract_syntax), str(cx.transfer_syntax[0])),
                                 cast(int, cx.context_id))
        setattr(assoc, _CONTEXTS, table)
    return table
