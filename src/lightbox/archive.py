"""The composition root: builds the backends from Settings, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        settings.data.mkdir(parents=True, exist_ok=True)
        db = Database(settings.database_url)
        if migrate:
            db.migrate()
        return cls(settings=settings, db=db, blobs=FileBlobStore(settings.blob_root))

    def close(self) -> None:
        self.audit.close()
        self.blobs.close()
        self.db.dispose()
