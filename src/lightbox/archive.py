"""The composition root: builds the backends from Settings, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from lightbox.errors import BadRequest, Unavailable
from lightbox.index.db import Database
from lightbox.services.atna import SyslogSender
from lightbox.services.audit import Auditor
from lightbox.settings import Settings
from lightbox.storage.blobs import FileBlobStore


@dataclass
class Archive:
    """An open archive: settings, index and blob store, shared by every adapter."""

    settings: Settings
    db: Database
    blobs: FileBlobStore
    audit: Auditor = field(init=False)

    def __post_init__(self) -> None:
        sender = None
        if self.settings.audit_syslog:
            sender = SyslogSender(self.settings.audit_syslog, self.settings.aet)
        self.audit = Auditor(self.db, sender)

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True) -> Archive:
        """The archive the settings name; BadRequest when its data folder cannot
        be made, Unavailable when its database cannot be reached."""
        try:
            settings.data.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise BadRequest(f"data folder {settings.data} is a file, not a folder") from exc
        except OSError as exc:
            raise BadRequest(f"data folder {settings.data}: {exc.strerror or exc}") from exc
        where = make_url(settings.database_url).render_as_string(hide_password=True)
        try:
            db = Database(settings.database_url)
        except OSError as exc:  # SQLite's folder, for its write lock
            raise BadRequest(f"database {where}: {exc.strerror or exc}") from exc
        if migrate:
            try:
                db.migrate()
            except OperationalError as exc:
                db.dispose()
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                raise Unavailable(f"database {where} cannot be opened: {reason}") from exc
        return cls(settings=settings, db=db, blobs=FileBlobStore(settings.blob_root))

    def close(self) -> None:
        self.audit.close()
        self.blobs.close()
        self.db.dispose()
