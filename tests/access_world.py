"""A small archive with people in two organisations, folders with every role,
studies they do and do not see, a launch token, and DIMSE nodes acting as
users: built once per test module and backend for the access-control matrix.

- Organisation A (the default one): admin; alice owns folder F1 (downloads
  off, re-sharing off) holding S1 and S4; bob is its viewer, carol its
  uploader, dave its editor; mallory is in no folder.
- Organisation B: erin, whose study S2 landed in her inbox when she uploaded it.
- S3 is in no folder (only administrators and whole-archive nodes see it);
  S5 is there to be deleted by the administrator.
- ``launch``: the read-only token alice's "open in 3D Slicer" made for S1.
- Nodes: BOBNODE acts as bob, ERINNODE as erin, ALLNODE as nobody (the whole
  archive); STORESCP is a move destination.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
from pydicom.uid import generate_uid

from lightbox.archive import Archive
from lightbox.services import auth, folders, nodes, sharing
from lightbox.services.auth import Principal
from tests.conftest import RunningServer, database_url, make_settings, serving
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes

ORG_B = "Organisation B"
MEMBERS = ("alice", "bob", "carol", "dave", "mallory")
ROLES = {"bob": "viewer", "carol": "uploader", "dave": "editor"}


@dataclass(frozen=True)
class Study:
    """A stored study: its UIDs and the patient it is recognisable by."""

    uid: str
    series: str
    sops: tuple[str, ...]
    patient_id: str
    patient_name: str

    @property
    def sop(self) -> str:
        return self.sops[0]

    @property
    def tells(self) -> tuple[str, str]:
        """Values that must never reach a caller who may not see the study."""
        return self.patient_id, self.patient_name.split("^")[0]


@dataclass
class World:
    server: RunningServer
    studies: dict[str, Study]
    tokens: dict[str, str]  # caller name -> bearer token
    folder: str  # F1's public id
    client: httpx.Client
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def archive(self) -> Archive:
        return self.server.archive

    @property
    def url(self) -> str:
        return self.server.url

    def headers(self, caller: str) -> dict[str, str]:
        token = self.tokens.get(caller)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def principal(self, user: str) -> Principal:
        return sharing.acting_as(self.archive, user)


def study_parts(name: str, patient_id: str, *, instances: int = 2,
                study: str | None = None, series: str | None = None) -> tuple[Study, list[bytes]]:
    """Part 10 bytes of a one-series study (or more instances of a given one)."""
    study = study or str(generate_uid(prefix=ROOT))
    series = series or str(generate_uid(prefix=ROOT))
    parts, sops = [], []
    for n in range(instances):
        ds = ct_dataset(study=study, series=series, patient_id=patient_id,
                        patient_name=name, instance_number=n + 1)
        parts.append(to_bytes(ds))
        sops.append(str(ds.SOPInstanceUID))
    return Study(study, series, tuple(sops), patient_id, name), parts


def stow(client: httpx.Client, url: str, token: str | None, parts: list[bytes]) -> httpx.Response:
    body, content_type = stow_body(parts)
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return client.post(url + "/dicom-web/studies", content=body, headers=headers)


def _store(world: World, key: str, caller: str, name: str, patient_id: str) -> None:
    found, parts = study_parts(name, patient_id)
    answer = stow(world.client, world.url, world.tokens[caller], parts)
    assert answer.status_code == 200, answer.text
    world.studies[key] = found


def _people(archive: Archive) -> dict[str, str]:
    auth.add_user(archive, "admin", None, is_admin=True)
    auth.add_organisation(archive, ORG_B)
    for name in MEMBERS:
        auth.add_user(archive, name, None, is_admin=False, email=f"{name}@a.example")
    auth.add_user(archive, "erin", None, is_admin=False, organisation=ORG_B,
                  email="erin@b.example")
    return {name: auth.create_token(archive, user=name)
            for name in ("admin", *MEMBERS, "erin")}


def _folder(world: World) -> str:
    """F1: made by alice, filled by the administrator, collaborators added by alice."""
    archive = world.archive
    alice, admin = world.principal("alice"), world.principal("admin")
    f1 = folders.create_folder(archive, alice, "F1").public_id
    folders.add_studies(archive, admin, f1, [world.studies["S1"].uid, world.studies["S4"].uid])
    for user, role in ROLES.items():
        folders.set_collaborator(archive, alice, f1, user, folders.Role(role))
    folders.update_folder(archive, alice, f1, allow_download=False, allow_reshare=False)
    return f1


def _launch_token(world: World) -> str:
    """What alice's study page hands to 3D Slicer for S1."""
    answer = world.client.post(f"{world.url}/launch/slicer/{world.studies['S1'].uid}",
                               headers=world.headers("alice"))
    assert answer.status_code == 303, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    return query["access_token"][0]


def _warm_frames(world: World) -> None:
    """Every study's first instance in the frames cache, so that the fast path
    answers (or declines) the frame requests of the matrix."""
    for study in world.studies.values():
        answer = world.client.get(
            f"{world.url}/dicom-web/studies/{study.uid}/series/{study.series}"
            f"/instances/{study.sop}/frames/1", headers={**world.headers("admin"), "Accept": "*/*"})
        assert answer.status_code == 200


def _nodes(archive: Archive) -> None:
    nodes.add_node(archive, name="bob-node", ae_title="BOBNODE", host="127.0.0.1", port=1,
                   acts_as="bob")
    nodes.add_node(archive, name="erin-node", ae_title="ERINNODE", host="127.0.0.1", port=1,
                   acts_as="erin")
    nodes.add_node(archive, name="all-node", ae_title="ALLNODE", host="127.0.0.1", port=1)


@contextmanager
def build(backend: str, data: Path) -> Iterator[World]:
    with database_url(backend, data) as url:
        archive = Archive.open(make_settings(data, url))
        try:
            tokens = _people(archive)
            with serving(archive) as server, httpx.Client(timeout=60) as client:
                world = World(server, {}, tokens, "", client)
                _store(world, "S1", "admin", "Hawkins^One", "PAT-S1")
                _store(world, "S2", "erin", "Ibsen^Two", "PAT-S2")  # to erin's inbox
                _store(world, "S3", "admin", "Jansky^Three", "PAT-S3")
                _store(world, "S4", "admin", "Kepler^Four", "PAT-S4")
                _store(world, "S5", "admin", "Lorentz^Five", "PAT-S5")
                world.folder = _folder(world)
                world.tokens["launch"] = _launch_token(world)
                world.tokens["forged"] = auth.TOKEN_PREFIX + "x" * 43
                _nodes(archive)
                _warm_frames(world)
                yield world
        finally:
            archive.close()
