"""Giving a member studies to see: a folder made by the first administrator,
holding the studies, with the member as a collaborator."""

from __future__ import annotations

from lightbox.archive import Archive
from lightbox.services import folders, sharing


def grant(archive: Archive, user: str, *studies: str, role: str = "viewer",
          download: bool = True, reshare: bool = False) -> str:
    """The public id of a new folder holding ``studies`` that ``user`` collaborates on."""
    admin = sharing.acting_as(archive, None)
    folder = folders.create_folder(archive, admin, f"for {user}")
    folders.add_studies(archive, admin, folder.public_id, list(studies))
    folders.set_collaborator(archive, admin, folder.public_id, user, folders.parse_role(role))
    folders.update_folder(archive, admin, folder.public_id, allow_download=download,
                          allow_reshare=reshare)
    return folder.public_id
