"""Domain errors.

Services raise these; the edges map them: the web layer to an HTTP status with
the message as reason, the DIMSE layer to a failure status with an error
comment, the CLI to a message naming the input. Nothing in a service knows
about HTTP or DIMSE.
"""


class LightboxError(Exception):
    """Base class of every error that is safe to show to the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(LightboxError):
    """The request itself is malformed (query parameters, multipart framing, ...)."""


class InvalidInstance(LightboxError):
    """A DICOM object failed validation and was not stored."""


class NotFound(LightboxError):
    """The named resource does not exist, or the caller may not know it exists."""


class Unauthenticated(LightboxError):
    """No valid credentials were presented."""


class Forbidden(LightboxError):
    """The caller is known but not allowed to do this."""


class Conflict(LightboxError):
    """The request conflicts with the archive's state (e.g. another study's instance)."""


class NotAcceptable(LightboxError):
    """None of the media types or transfer syntaxes the caller accepts can be produced."""


class TooLarge(LightboxError):
    """A size limit (upload, part, element length, query) was exceeded."""


class Unavailable(LightboxError):
    """A needed resource (codec, storage) is not available right now."""


class UnsupportedMediaType(BadRequest):
    """The body's media type is not one this endpoint accepts."""
