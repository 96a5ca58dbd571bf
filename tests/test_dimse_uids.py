"""UIDs checked once per process: pynetdicom's behaviour, kept.

The association set-up checks every proposed UID; Lightbox remembers those
that passed (``contexts.configure_pynetdicom``). These tests hold the
remembering versions to what pynetdicom's own functions do with the same
input: the same value, the same error, the same warning.
"""

from __future__ import annotations

import logging

import pytest
from pydicom.uid import UID
from pynetdicom import dimse_primitives, pdu_items, presentation
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext
from pynetdicom.utils import set_uid

from lightbox.dimse import contexts

contexts.configure_pynetdicom()

CASES: list[str | bytes] = [
    "1.2.840.10008.1.2.1",  # a transfer syntax
    "1.2.840.10008.5.1.4.1.1.2",  # a SOP class
    "1.2.826.0.1.3680043.8.498.1",  # private
    "1.2.840.10008.1.2.01",  # non-conformant (a leading zero)
    "1.2.840.10008.1.2.1.",  # invalid
    "1.2.abc",  # invalid
    "1." + "2" * 70,  # too long
    "",  # empty
    b"1.2.840.10008.1.2\x00",  # bytes, with its padding
]


def _outcome(call: object) -> tuple[str, object]:
    try:
        result = call()  # type: ignore[operator]
    except (ValueError, TypeError) as exc:
        return "raised", type(exc)
    return "returned", (type(result), result)


# Some of CASES are invalid on purpose; pydicom warns as it makes them UIDs.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length .* allowed for VR UI")
@pytest.mark.parametrize("value", CASES, ids=repr)
@pytest.mark.parametrize("allow_empty", [True, False])
def test_set_uid_does_what_pynetdicoms_does(
    value: str | bytes, allow_empty: bool, caplog: pytest.LogCaptureFixture
) -> None:
    assert pdu_items.set_uid is not set_uid  # the remembering version is in place
    for _ in range(2):  # the second time from what was remembered
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ours = _outcome(lambda: pdu_items.set_uid(value, "x", allow_empty, False, True))
        said = [r.getMessage() for r in caplog.records]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            expected = _outcome(lambda: set_uid(value, "x", allow_empty, False, True))
        assert ours == expected
        assert said == [r.getMessage() for r in caplog.records]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length .* allowed for VR UI")
def test_a_primitive_still_refuses_what_pynetdicom_refuses() -> None:
    assert dimse_primitives.set_uid is pdu_items.set_uid
    request = C_STORE()
    for _ in range(2):
        with pytest.raises(ValueError, match="Invalid 'Affected SOP Class UID'"):
            request.AffectedSOPClassUID = "1." + "2" * 70
        with pytest.raises(TypeError):
            request.AffectedSOPClassUID = 12  # type: ignore[assignment]
    request.AffectedSOPClassUID = b"1.2.840.10008.5.1.4.1.1.2"
    assert request.AffectedSOPClassUID == UID("1.2.840.10008.5.1.4.1.1.2")
    assert isinstance(request.AffectedSOPClassUID, UID)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length .* allowed for VR UI")
@pytest.mark.parametrize("value", CASES, ids=repr)
def test_adding_a_transfer_syntax_does_what_pynetdicoms_does(
    value: str | bytes, caplog: pytest.LogCaptureFixture
) -> None:
    assert PresentationContext.add_transfer_syntax is not contexts._add_checked_syntax

    def add(method: object) -> tuple[tuple[str, object], list[str], list[str]]:
        context = PresentationContext()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            outcome = _outcome(lambda: [method(context, value),  # type: ignore[operator]
                                        method(context, value)])  # type: ignore[operator]
        return outcome, list(context.transfer_syntax), [r.getMessage() for r in caplog.records]

    for _ in range(2):
        assert add(PresentationContext.add_transfer_syntax) == add(contexts._add_checked_syntax)


def test_uids_added_are_uids_and_private_encodings_are_kept_apart() -> None:
    context = PresentationContext()
    context.add_transfer_syntax("1.2.840.10008.1.2")
    context.add_transfer_syntax(UID("1.2.840.10008.1.2"))
    assert context.transfer_syntax == ["1.2.840.10008.1.2"]
    assert all(isinstance(uid, UID) for uid in context.transfer_syntax)
    private = UID("1.2.826.0.1.3680043.8.498.99")
    private.set_private_encoding(False, True)
    marked, plain = PresentationContext(), PresentationContext()
    marked.add_transfer_syntax(private)
    plain.add_transfer_syntax("1.2.826.0.1.3680043.8.498.99")
    assert marked.transfer_syntax[0]._PRIVATE_TS_ENCODING == (False, True)
    assert not hasattr(plain.transfer_syntax[0], "_PRIVATE_TS_ENCODING")
    plain.add_transfer_syntax(private)  # equal: not added twice
    assert len(plain.transfer_syntax) == 1
    assert presentation.set_uid is pdu_items.set_uid
