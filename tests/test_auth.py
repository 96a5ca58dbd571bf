"""Tokens: expiry is honoured even while a token is cached."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from lightbox.archive import Archive
from lightbox.errors import Unauthenticated
from lightbox.services import auth


def test_a_cached_token_stops_working_when_it_expires(archive: Archive) -> None:
    token = auth.create_token(archive, expires=timedelta(seconds=1))
    authenticator = auth.Authenticator(archive)
    assert authenticator.authenticate(token).is_admin  # now cached
    time.sleep(1.2)
    with pytest.raises(Unauthenticated, match="expired"):
        authenticator.authenticate(token)


def test_an_unknown_token_is_refused(archive: Archive) -> None:
    with pytest.raises(Unauthenticated):
        auth.Authenticator(archive).authenticate("lbx_not-a-token")
