"""Logging as every Lightbox process sets it up: one line per event, our own
messages saying what happened, the libraries' chatter below that kept out."""

from __future__ import annotations

import logging
import warnings

# Where pydicom logs each decoding plugin's failure on a frame.
_DECODER_ATTEMPTS = "pydicom.pixels.decoders.base"
# Where pynetdicom logs what it could not decode of what a peer sent: a PDU, an
# AE title or UID, a DIMSE message. (Its other modules log the tracebacks of
# exceptions in our handlers, which stay.)
_PEER_INPUT = ("pynetdicom.dul", "pynetdicom.utils", "pynetdicom.dimse")


def configure(level: str) -> None:
    """Log at ``level`` (a server process; replaces what the CLI set up)."""
    logging.basicConfig(level=level.upper(), format="%(message)s", force=True)
    # pynetdicom logs every PDU at INFO; our association log says what happened.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl …" at every start
    quiet_decoder_attempts()
    quiet_pydicom_warnings()
    for name in _PEER_INPUT:
        logger = logging.getLogger(name)
        if _one_line not in logger.filters:
            logger.addFilter(_one_line)


def _one_line(record: logging.LogRecord) -> bool:
    """An exception pynetdicom met decoding a peer's bytes, as one line (its
    type and message) instead of a traceback of pynetdicom's own code."""
    if record.exc_info is not None and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        record.msg, record.args = f"{type(exc).__name__}: {exc}", None
        record.exc_info, record.exc_text = None, None
    return True


def quiet_pydicom_warnings() -> None:
    """Keep one line per problem pydicom meets in what a peer sent. pydicom
    says each twice: on its logger (kept) and as a Python warning, which
    prints two more lines (pydicom's file and source line) for every odd
    value, character set or length: a hostile peer could fill the log with
    them. Every warning pydicom raises also goes to its logger."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def quiet_decoder_attempts() -> None:
    """Drop the traceback pydicom logs for each decoding plugin that fails on a
    frame: the error naming every plugin's reason reaches our code, which
    answers it (a 503 with the reason, an instance left out) and logs it once."""
    attempts = logging.getLogger(_DECODER_ATTEMPTS)
    if _not_an_attempt not in attempts.filters:
        attempts.addFilter(_not_an_attempt)


def _not_an_attempt(record: logging.LogRecord) -> bool:
    return record.exc_info is None  # its other messages (a plugin changed...) stay
