"""The instance cache behind frame retrieval: one miss loads the whole series."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightbox.archive import Archive
from lightbox.errors import NotFound
from lightbox.services.auth import Principal
from lightbox.services.ingest import Offer, Status, store_instances
from lightbox.services.retrieve import InstanceCache, find_instance
from tests.factories import ROOT, ct_dataset, write

ADMIN = Principal(user="admin", is_admin=True)


def _series(archive: Archive, tmp_path: Path, count: int) -> tuple[str, str, list[str]]:
    study, series = f"{ROOT}71.1", f"{ROOT}71.2"
    sops = [f"{ROOT}71.3.{n}" for n in range(1, count + 1)]
    offers = []
    for n, sop in enumerate(sops, start=1):
        ds = ct_dataset(study=study, series=series, sop=sop, instance_number=n)
        offers.append(Offer(write(ds, tmp_path / f"{n}.dcm"), "test"))
    assert all(o.status is Status.STORED for o in store_instances(archive, offers))
    return study, series, sops


def test_a_miss_caches_every_instance_of_the_series(archive: Archive, tmp_path: Path) -> None:
    study, series, sops = _series(archive, tmp_path, 4)
    cache = InstanceCache()
    first = find_instance(archive, cache, ADMIN, study, series, sops[2])
    assert first.sop_instance_uid == sops[2]
    for sop in sops:
        cached = cache.get((study, series, sop))
        assert cached is not None and cached.sop_instance_uid == sop
    assert find_instance(archive, cache, ADMIN, study, series, sops[0]) == cache.get(
        (study, series, sops[0]))


def test_an_instance_missing_from_a_known_series_is_not_found(
    archive: Archive, tmp_path: Path
) -> None:
    study, series, _ = _series(archive, tmp_path, 2)
    with pytest.raises(NotFound):
        find_instance(archive, InstanceCache(), ADMIN, study, series, f"{ROOT}71.3.99")


def test_a_small_cache_still_answers_from_a_large_series(
    archive: Archive, tmp_path: Path
) -> None:
    study, series, sops = _series(archive, tmp_path, 5)
    found = find_instance(archive, InstanceCache(size=2), ADMIN, study, series, sops[0])
    assert found.sop_instance_uid == sops[0]
