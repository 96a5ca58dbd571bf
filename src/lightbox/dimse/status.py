"""DIMSE status codes by name (PS3.7 Annex C, PS3.4 B.2.3, C.4, J.3) and the
mapping from domain errors and ingest outcomes to them, in one place."""

from __future__ import annotations

import enum

from pydicom.dataset import Dataset

from lightbox.errors import (
    BadRequest,
    Forbidden,
    LightboxError,
    NotFound,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from lightbox.services.ingest import FailureReason

MAX_COMMENT = 64  # Error Comment is LO: at most 64 characters


class General(enum.IntEnum):
    SUCCESS = 0x0000
    PENDING = 0xFF00
    CANCEL = 0xFE00
    PROCESSING_FAILURE = 0x0110
    NOT_AUTHORIZED = 0x0124


class Store(enum.IntEnum):
    """C-STORE (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    NOT_AUTHORIZED = 0x0124
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class Find(enum.IntEnum):
    """C-FIND (PS3.4 C.4.1.1.4)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01  # optional keys not supported for matching
    CANCEL = 0xFE00
    NOT_AUTHORIZED = 0x0124
    OUT_OF_RESOURCES = 0xA700
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000


class Retrieve(enum.IntEnum):
    """C-MOVE and C-GET (PS3.4 C.4.2.1.5, C.4.3.1.4)."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    CANCEL = 0xFE00
    WARNING_SUBOPERATIONS_FAILED = 0xB000
    NOT_AUTHORIZED = 0x0124
    OUT_OF_RESOURCES_MATCHES = 0xA701
    OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
    MOVE_DESTINATION_UNKNOWN = 0xA801
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000


class Action(enum.IntEnum):
    """N-ACTION (PS3.7 10.1.4.1.10)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    INVALID_ARGUMENT_VALUE = 0x0115
    MISSING_ATTRIBUTE = 0x0120
    NO_SUCH_ACTION_TYPE = 0x0123
    NOT_AUTHORIZED = 0x0124


class CommitmentFailure(enum.IntEnum):
    """Failure Reason (0008,1197) of a Storage Commitment item (PS3.4 J.3.3.1.1)."""

    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    CLASS_INSTANCE_CONFLICT = 0x0119


class EventType(enum.IntEnum):
    """Event Type ID of the Storage Commitment N-EVENT-REPORT (PS3.4 J.3.3)."""

    ALL_COMMITTED = 1
    FAILURES_EXIST = 2


STORE_FAILURES: dict[FailureReason, Store] = {
    FailureReason.PROCESSING_FAILURE: Store.PROCESSING_FAILURE,
    FailureReason.OUT_OF_RESOURCES: Store.OUT_OF_RESOURCES,
    FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS: Store.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    FailureReason.CANNOT_UNDERSTAND: Store.CANNOT_UNDERSTAND,
    FailureReason.STUDY_UID_MISMATCH: Store.CANNOT_UNDERSTAND,
    FailureReason.NOT_AUTHORIZED: Store.NOT_AUTHORIZED,
}


def comment(text: str) -> str:
    """``text`` fit for Error Comment: printable ASCII without backslash, 64 characters."""
    clean = "".join(ch if " " <= ch <= "~" and ch != "\\" else "?" for ch in text)
    return clean[:MAX_COMMENT]


def status_dataset(code: int, error_comment: str | None = None) -> Dataset:
    """A status as pynetdicom handlers return it: Status plus an optional Error Comment."""
    ds = Dataset()
    ds.Status = int(code)
    if error_comment:
        ds.ErrorComment = comment(error_comment)
    return ds


def find_failure(exc: LightboxError) -> Find:
    """The C-FIND failure status for a domain error."""
    if isinstance(exc, Unauthenticated | Forbidden):
        return Find.NOT_AUTHORIZED
    if isinstance(exc, BadRequest):
        return Find.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, TooLarge | Unavailable):
        return Find.OUT_OF_RESOURCES
    return Find.UNABLE_TO_PROCESS


def retrieve_failure(exc: LightboxError) -> Retrieve:
    """The C-MOVE / C-GET failure status for a domain error."""
    if isinstance(exc, Unauthenticated | Forbidden):
        return Retrieve.NOT_AUTHORIZED
    if isinstance(exc, BadRequest | NotFound):
        return Retrieve.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, TooLarge):
        return Retrieve.OUT_OF_RESOURCES_MATCHES
    return Retrieve.UNABLE_TO_PROCESS
