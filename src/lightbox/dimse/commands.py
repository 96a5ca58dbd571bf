"""Command sets read without pydicom.

Command sets are always implicit VR little endian (PS3.7 6.3.1), and the
few elements of a C-STORE request or response are read off their bytes in a
tenth of the time it takes pydicom to decode them into a Dataset and
pynetdicom to make that a primitive (about 0.16 ms for a C-STORE-RSP, which
C-GET and C-MOVE receive for every instance they send). What is read here is
what pynetdicom would have made of the same bytes (tests compare the two);
anything unusual (a UID that is not well formed, say) is left to pynetdicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode

from lightbox.dicom import uids

C_STORE_RQ_FIELD = 0x0001
C_STORE_RSP_FIELD = 0x8001
NO_DATA_SET = 0x0101

_ELEMENT = struct.Struct("<HHL")  # group, element, value length (implicit VR little endian)
# The elements of a C-STORE-RSP read here (PS3.7 Table 9.3-2): Command Group
# Length, Affected SOP Class UID, Command Field, Message ID Being Responded
# To, Command Data Set Type, Status, Affected SOP Instance UID. A response
# with anything else (an Error Comment, an Offending Element) goes to pynetdicom.
_STORE_RESPONSE = frozenset({0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000})


@dataclass(frozen=True)
class Command:
    """A command set's elements, read off its bytes."""

    encoded: bytes
    values: dict[int, bytes]  # element number (all are in group 0000) -> value

    @classmethod
    def read(cls, encoded: bytes) -> Command | None:
        """The command's elements; None for anything unusual (an element
        outside group 0000, a length past the end): pydicom then decodes it."""
        values: dict[int, bytes] = {}
        position = 0
        while position < len(encoded):
            if position + _ELEMENT.size > len(encoded):
                return None
            group, element, length = _ELEMENT.unpack_from(encoded, position)
            position += _ELEMENT.size
            if group != 0x0000 or position + length > len(encoded):
                return None
            values[element] = encoded[position:position + length]
            position += length
        return cls(encoded, values)

    def number(self, element: int) -> int | None:
        """A US element's value (None if absent or not two bytes)."""
        raw = self.values.get(element)
        return int.from_bytes(raw, "little") if raw is not None and len(raw) == 2 else None

    def text(self, element: int) -> str:
        """A UI or AE element's value, without its padding ("" if absent)."""
        return self.values.get(element, b"").decode("ascii", "replace").strip("\x00 ")

    def dataset(self) -> Dataset:
        return decode(BytesIO(self.encoded), True, True)

    def request(self, context_id: int) -> C_STORE:
        """The C-STORE request primitive, as pynetdicom's C_STORE_RQ message
        makes it from the same command set."""
        request = C_STORE()
        request.MessageID = self.number(0x0110)
        request.AffectedSOPClassUID = self.text(0x0002)
        request.AffectedSOPInstanceUID = self.text(0x1000)
        priority = self.number(0x0700)
        if priority is not None:
            request.Priority = priority
        if 0x1030 in self.values:
            request.MoveOriginatorApplicationEntityTitle = self.text(0x1030)
        if 0x1031 in self.values:
            request.MoveOriginatorMessageID = self.number(0x1031)
        request.DataSet = BytesIO()  # as pynetdicom's message leaves it: the dataset is staged
        request._context_id = context_id
        return request


def store_response(encoded: bytes, context_id: int) -> C_STORE | None:
    """The C-STORE response primitive that pynetdicom's C_STORE_RSP message
    makes of the command set ``encoded``, when it is one of the usual form
    (no data set, its status alone, every value well formed); None otherwise."""
    command = Command.read(encoded)
    if (
        command is None
        or not command.values.keys() <= _STORE_RESPONSE
        or command.number(0x0100) != C_STORE_RSP_FIELD
        or command.number(0x0800) != NO_DATA_SET
    ):
        return None
    message_id, status = command.number(0x0120), command.number(0x0900)
    if message_id is None or status is None:
        return None
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    for element, name in ((0x0002, "AffectedSOPClassUID"), (0x1000, "AffectedSOPInstanceUID")):
        if element in command.values:
            uid = uids.from_bytes(command.values[element])
            if uid is None:
                return None
            setattr(response, name, uid)
    response.Status = status
    response._context_id = context_id
    return response

