"""What Lightbox negotiates: SOP classes, transfer syntaxes, presentation contexts,
and the process-wide pynetdicom configuration."""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from typing import Any

import pynetdicom.ae
import pynetdicom.dimse_primitives
import pynetdicom.pdu_items
import pynetdicom.pdu_primitives
import pynetdicom.presentation
from pydicom.uid import RE_VALID_UID, UID
from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, _config
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.utils import decode_bytes, set_uid, validate_uid

from lightbox.dicom import uids
from lightbox.dimse import matches, outgoing, responses
from lightbox.settings import Settings

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1387.1.1"
IMPLEMENTATION_VERSION_NAME = "LIGHTBOX_01"

# A proposed presentation context may list several transfer syntaxes; pynetdicom as
# acceptor picks the first of *these* that the requestor listed, so native syntaxes
# come first: when a sender offers both, nothing is compressed (or lost) on the way.
NATIVE_SYNTAXES: tuple[str, ...] = (
    uids.EXPLICIT_VR_LITTLE_ENDIAN,
    uids.IMPLICIT_VR_LITTLE_ENDIAN,
)
TRANSFER_SYNTAXES: tuple[str, ...] = (
    *NATIVE_SYNTAXES,
    uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    uids.EXPLICIT_VR_BIG_ENDIAN,
    uids.JPEG_BASELINE,
    uids.JPEG_EXTENDED,
    uids.JPEG_LOSSLESS,
    uids.JPEG_LOSSLESS_SV1,
    uids.JPEG_LS_LOSSLESS,
    uids.JPEG_LS_NEAR_LOSSLESS,
    uids.JPEG_2000_LOSSLESS,
    uids.JPEG_2000,
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    uids.RLE_LOSSLESS,
    *uids.VIDEO_MEDIA_TYPES,  # MPEG-2, H.264, HEVC: stored as sent, served as streams
)

STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)
# The classes pynetdicom picked to fit in one association (at most 128 contexts).
COMMON_STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in StoragePresentationContexts
)

# SOP Classes (PS3.4 Annex A.1, C.6, J.3; UIDs from PS3.6 Annex A).
VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"

PATIENT_ROOT = frozenset({PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET})
QUERY_RETRIEVE = PATIENT_ROOT | {STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET}

MAX_REQUESTED_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings Lightbox relies on.

    Received datasets go straight to a file instead of memory, and pynetdicom's
    per-message logging (identifiers, PDU dumps) stays off: our own association
    log says what happened.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    for module in _SETS_UIDS:
        module.set_uid = _set_uid  # type: ignore[attr-defined]
    PresentationContext.add_transfer_syntax = _add_transfer_syntax  # type: ignore[method-assign]
    matches.install()
    outgoing.install()
    responses.install()


# pynetdicom checks every UID it is given three times over with regular
# expressions: on the way into pydicom's UID, against its own validator, and
# for conformance. A storage SCU proposes some 120 SOP Classes with a few
# transfer syntaxes each, so that was some 7 ms of processor time in every
# association's set-up, more than storing an instance takes. The UIDs met
# are few and come again on every association: a conformant UID is checked
# once per process. Anything else goes pynetdicom's way every time, with its
# warnings and errors.
_SETS_UIDS = (pynetdicom.ae, pynetdicom.dimse_primitives, pynetdicom.pdu_items,
              pynetdicom.pdu_primitives, pynetdicom.presentation)
_CONFORMANT = re.compile(RE_VALID_UID)
_add_checked_syntax = PresentationContext.add_transfer_syntax


def _remembered(value: object) -> str | None:
    """``value`` if it is a conformant UID string that may be shared (a UID
    marked with a private encoding is not); None otherwise."""
    if (isinstance(value, str) and len(value) <= 64 and _CONFORMANT.match(value)
            and not hasattr(value, "_PRIVATE_TS_ENCODING")):
        return str(value)
    return None


@functools.lru_cache(maxsize=4096)
def _checked_uid(value: str, name: str, allow_empty: bool, allow_none: bool,
                 validate: bool) -> UID | None:
    return set_uid(value, name, allow_empty, allow_none, validate)


def _set_uid(value: str | bytes | UID | None, name: str, allow_empty: bool = True,
             allow_none: bool = True, validate: bool = True) -> UID | None:
    """pynetdicom's ``set_uid``, remembering conformant UIDs (a UID is an
    immutable string: one object may serve every caller)."""
    known = _remembered(decode_bytes(value) if isinstance(value, bytes) else value)
    if known is None:
        return set_uid(value, name, allow_empty, allow_none, validate)
    return _checked_uid(known, name, allow_empty, allow_none, validate)


@functools.lru_cache(maxsize=1024)
def _plain_syntax(value: str) -> UID | None:
    """The conformant UID ``value``, if pynetdicom adds it to a context without
    a word (a transfer syntax, or a private UID); None otherwise."""
    uid = UID(value)
    return uid if validate_uid(uid) and (uid.is_private or uid.is_transfer_syntax) else None


def _add_transfer_syntax(self: PresentationContext, syntax: str | bytes | UID | None) -> None:
    """pynetdicom's ``PresentationContext.add_transfer_syntax``, with the
    checks of a conformant UID it met before remembered."""
    known = _remembered(syntax)
    uid = _plain_syntax(known) if known is not None else None
    if uid is None:
        _add_checked_syntax(self, syntax)
    elif uid not in self._transfer_syntax:
        self._transfer_syntax.append(uid)


class _SharedUIDs(PresentationContext):
    """A presentation context whose deep copy shares its UIDs.

    pynetdicom deep-copies the acceptor's contexts for every association. A
    UID is an immutable string, but a deep copy builds each one anew and
    validates it again: for the SCP's 2,700-odd transfer syntaxes that took
    some 18 ms of every association's set-up. The copy made here is the same
    but for the UIDs, which it shares; its lists are its own.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedUIDs:
        clone = copy.copy(self)
        for name, value in vars(clone).items():
            if isinstance(value, list):
                setattr(clone, name, list(value))
        return clone


def _shared(cx: PresentationContext) -> PresentationContext:
    shared = _SharedUIDs()
    vars(shared).update(vars(cx))
    return shared


def scp_contexts() -> list[PresentationContext]:
    """Everything the SCP accepts.

    Storage contexts allow both roles: a C-GET requestor takes the Storage SCP
    role and Lightbox sends it C-STOREs over the same association.
    """
    contexts = [build_context(VERIFICATION, list(NATIVE_SYNTAXES))]
    for uid in STORAGE_SOP_CLASSES:
        cx = build_context(uid, list(TRANSFER_SYNTAXES))
        cx.scu_role = True
        cx.scp_role = True
        contexts.append(cx)
    for uid in sorted(QUERY_RETRIEVE):
        contexts.append(build_context(uid, list(NATIVE_SYNTAXES)))
    contexts.append(build_context(STORAGE_COMMITMENT, list(NATIVE_SYNTAXES)))
    return [_shared(cx) for cx in contexts]


def storage_proposals(
    classes_and_syntaxes: Iterable[tuple[str, str]], *, limit: int = MAX_REQUESTED_CONTEXTS
) -> list[PresentationContext]:
    """Contexts to send stored objects: per SOP class, one with each stored
    compressed syntax as is, and one with the native syntaxes (which compressed
    objects fall back to, decompressed, when the peer refuses their syntax)."""
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, str]] = set()
    for sop_class, syntax in classes_and_syntaxes:
        wanted = [(sop_class, "native")]
        if syntax not in NATIVE_SYNTAXES:
            wanted.insert(0, (sop_class, syntax))
        for key in wanted:
            if key in seen or len(contexts) >= limit:
                continue
            seen.add(key)
            if key[1] == "native":
                contexts.append(build_context(sop_class, list(NATIVE_SYNTAXES)))
            else:
                contexts.append(build_context(sop_class, [key[1]]))
    return contexts


def receiving_proposals(sop_classes: Iterable[str], *, reserved: int) -> list[PresentationContext]:
    """Storage contexts for a C-GET requestor (Lightbox takes the Storage SCP role).

    The sender has to find an accepted context in its object's own transfer
    syntax (many peers cannot transcode, JPEG 2000 least of all), and an
    acceptor picks one syntax per context: so each syntax gets a context of its
    own when the SOP classes are few enough, else each class one with them all.
    """
    classes = list(dict.fromkeys(sop_classes))
    room = MAX_REQUESTED_CONTEXTS - reserved
    if len(classes) * len(TRANSFER_SYNTAXES) <= room:
        return [build_context(uid, [syntax]) for uid in classes for syntax in TRANSFER_SYNTAXES]
    return [build_context(uid, list(TRANSFER_SYNTAXES)) for uid in classes[:room]]


def make_ae(settings: Settings) -> AE:
    """An AE titled and timed as the settings say (for the SCP and the SCU alike)."""
    configure_pynetdicom()
    ae = AE(ae_title=settings.aet)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = settings.dicom_acse_timeout
    ae.dimse_timeout = settings.dicom_dimse_timeout
    ae.network_timeout = settings.dicom_network_timeout
    ae.connection_timeout = settings.dicom_connection_timeout
    return ae
