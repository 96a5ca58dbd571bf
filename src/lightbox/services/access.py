"""What a member sees: the studies in the folders they collaborate on.

Administrators, DIMSE nodes and the operator see the whole archive; a member
sees a study only through a folder grant (their inbox, or a folder they were
invited into), with that folder's rights. Answers are cached briefly per
process: a change made here clears the cache at once, one made by another
server process is seen within CACHE_SECONDS.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, select

from lightbox.archive import Archive
from lightbox.errors import Forbidden
from lightbox.index import folders as index
from lightbox.index.folders import Grant
from lightbox.index.schema import studies
from lightbox.services.auth import Principal

CACHE_SECONDS = 5.0
_MAX_CACHED = 50_000

_cache: dict[tuple[int, str], tuple[float, tuple[Grant, ...]]] = {}
_lock = threading.Lock()


def invalidate() -> None:
    """Forget cached grants (after any change to folders, members or their studies)."""
    with _lock:
        _cache.clear()


@dataclass(frozen=True)
class FolderGrants:
    """A member's reach, as the Principal carries it."""

    archive: Archive
    user_id: int

    def on(self, study_instance_uid: str) -> tuple[Grant, ...]:
        key = (self.user_id, study_instance_uid)
        now = time.monotonic()
        with _lock:
            hit = _cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        with self.archive.db.read() as conn:
            found = tuple(index.grants_on_study(conn, self.user_id, study_instance_uid))
        with _lock:
            if len(_cache) > _MAX_CACHED:
                _cache.clear()
            _cache[key] = (now + CACHE_SECONDS, found)
        return found

    def may_read(self, study_instance_uid: str) -> bool:
        return bool(self.on(study_instance_uid))

    def study_pks(self) -> Select[Any]:
        return index.visible_study_pks(self.user_id)


def study_scope(principal: Principal) -> Select[Any] | None:
    """The study rows ``principal`` may see as a subquery (None: all of them)."""
    grants = principal.grants
    if principal.studies is None:
        return grants.study_pks() if grants is not None else None
    scope = select(studies.c.pk).where(studies.c.study_instance_uid.in_(sorted(principal.studies)))
    if grants is not None:
        scope = scope.where(studies.c.pk.in_(grants.study_pks()))
    return scope


def grants_on(principal: Principal, study_instance_uid: str) -> tuple[Grant, ...] | None:
    """The folder grants through which ``principal`` reaches a study; None when
    they see the whole archive (no folder needed)."""
    if principal.grants is None:
        return None
    return principal.grants.on(study_instance_uid)


def _granted(principal: Principal, study_instance_uid: str,
             allows: Callable[[Grant], bool]) -> bool:
    """Whole-archive callers may; members when a folder holding the study allows
    it, or they own one (owners may everything in their folders)."""
    found = grants_on(principal, study_instance_uid)
    return found is None or any(g.role == "owner" or allows(g) for g in found)


def may_download(principal: Principal, study_instance_uid: str) -> bool:
    """Whole studies as files (ZIP, WADO-RS/URI retrieve, desktop viewers, C-GET):
    allowed when one of the folders holding the study allows downloads, or the
    caller owns one of them."""
    if not principal.download or not principal.may_read(study_instance_uid):
        return False
    return _granted(principal, study_instance_uid, lambda g: g.allow_download)


def require_download(principal: Principal, study_instance_uid: str) -> None:
    principal.require_read(study_instance_uid)
    if not may_download(principal, study_instance_uid):
        raise Forbidden("downloads are not allowed in the folders that hold this study")


_CONTRIBUTORS = frozenset({"uploader", "editor", "owner"})


def may_add_to(principal: Principal, study_instance_uid: str) -> bool:
    """Adding objects to an existing study (uploads, key images, reports):
    an uploader, editor or owner of a folder holding it."""
    if principal.read_only or not principal.may_read(study_instance_uid):
        return False
    return _granted(principal, study_instance_uid, lambda g: g.role in _CONTRIBUTORS)


def require_add_to(principal: Principal, study_instance_uid: str) -> None:
    principal.require_read(study_instance_uid)
    if not may_add_to(principal, study_instance_uid):
        raise Forbidden("adding to this study needs the uploader role in a folder holding it")


def may_reshare(principal: Principal, study_instance_uid: str) -> bool:
    """Passing a study on (share links, other folders): administrators and
    whole-archive callers; members who own a folder holding it, or are in one
    that allows re-sharing."""
    if principal.read_only or principal.studies is not None:
        return False
    return _granted(principal, study_instance_uid, lambda g: g.allow_reshare)


def require_reshare(principal: Principal, study_instance_uid: str) -> None:
    principal.require_read(study_instance_uid)
    if not may_reshare(principal, study_instance_uid):
        raise Forbidden("the folders that hold this study do not allow sharing it on")
