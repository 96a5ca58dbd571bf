"""Key images: a Key Object Selection Document stored through the ingest path."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from lightbox.services import auth
from tests.conftest import RunningServer
from tests.factories import ROOT, ct_dataset, stow_body, to_bytes
from tests.grants import grant

KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def _store(server: RunningServer, **attributes: Any) -> Any:
    ds = ct_dataset(**attributes)
    body, content_type = stow_body([to_bytes(ds)])
    answer = httpx.post(server.dicomweb + "/studies", content=body,
                        headers={**server.headers, "Content-Type": content_type})
    assert answer.status_code == 200, answer.text
    return ds


def _mark(server: RunningServer, ds: Any, frame: str = "", **override: str) -> httpx.Response:
    form = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID,
            "sop": ds.SOPInstanceUID, "frame": frame, **override}
    return httpx.post(server.url + "/key-images", data=form, headers=server.headers)


def _ko_series(server: RunningServer, study: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{server.dicomweb}/studies/{study}/series",
                       params={"Modality": "KO"}, headers=server.headers)
    assert answer.status_code in (200, 204)
    return answer.json() if answer.status_code == 200 else []


def _value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


@pytest.mark.parametrize("frames", [1, 4])
def test_key_image_is_a_ko_referencing_the_image(server: RunningServer, frames: int) -> None:
    ds = _store(server, frames=frames)
    answer = _mark(server, ds, frame="3" if frames > 1 else "")
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/browse/studies/{ds.StudyInstanceUID}"
    series = _ko_series(server, ds.StudyInstanceUID)
    assert len(series) == 1
    assert _value(series[0], "00080060") == "KO"
    ko_series = _value(series[0], "0020000E")
    assert ko_series != ds.SeriesInstanceUID
    meta = httpx.get(f"{server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ko_series}"
                     "/metadata", headers=server.headers).json()
    assert len(meta) == 1
    ko = meta[0]
    assert _value(ko, "00080016") == KO_CLASS
    assert _value(ko, "00100020") == ds.PatientID
    title = _value(ko, "0040A043")
    assert (_value(title, "00080100"), _value(title, "00080102")) == ("113000", "DCM")
    evidence = _value(ko, "0040A375")
    ref_series = _value(evidence, "00081115")
    assert _value(ref_series, "0020000E") == ds.SeriesInstanceUID
    assert _value(_value(ref_series, "00081199"), "00081155") == ds.SOPInstanceUID
    images = [i for i in ko["0040A730"]["Value"] if _value(i, "0040A040") == "IMAGE"]
    assert len(images) == 1
    ref = _value(images[0], "00081199")
    assert _value(ref, "00081155") == ds.SOPInstanceUID
    assert _value(ref, "00081150") == ds.SOPClassUID
    if frames > 1:
        assert _value(ref, "00081160") == 3
    else:
        assert "00081160" not in ref


def test_bad_references_store_nothing(server: RunningServer) -> None:
    ds = _store(server, frames=2)
    other = generate_uid(prefix=ROOT)
    assert _mark(server, ds, sop=other).status_code == 404
    assert _mark(server, ds, series=other).status_code == 404
    assert _mark(server, ds, study=other).status_code == 404
    assert _mark(server, ds, frame="3").status_code == 400
    assert _mark(server, ds, frame="0").status_code == 400
    assert _mark(server, ds, frame="x").status_code == 400
    assert _mark(server, ds, sop="../etc").status_code == 400
    read_only = auth.create_token(server.archive, read_only=True)
    denied = httpx.post(server.url + "/key-images",
                        headers={"Authorization": f"Bearer {read_only}"},
                        data={"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID,
                              "sop": ds.SOPInstanceUID})
    assert denied.status_code == 403
    assert _ko_series(server, ds.StudyInstanceUID) == []
    assert _mark(server, ds).status_code == 303
    ko = _ko_series(server, ds.StudyInstanceUID)[0]
    ko_sop = httpx.get(f"{server.dicomweb}/studies/{ds.StudyInstanceUID}/series/"
                       f"{_value(ko, '0020000E')}/instances", headers=server.headers).json()[0]
    not_an_image = _mark(server, ds, series=_value(ko, "0020000E"),
                         sop=_value(ko_sop, "00080018"))
    assert not_an_image.status_code == 400
    assert len(_ko_series(server, ds.StudyInstanceUID)) == 1
    count = httpx.get(f"{server.dicomweb}/studies",
                      params={"StudyInstanceUID": ds.StudyInstanceUID},
                      headers=server.headers).json()
    assert _value(count[0], "00201208") == 2


def test_cookie_mark_needs_same_origin(server: RunningServer) -> None:
    ds = _store(server)
    auth.add_user(server.archive, "dana", "correct horse", is_admin=False)
    grant(server.archive, "dana", ds.StudyInstanceUID, role="uploader")
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as client:
        assert client.post("/login", data={"username": "dana",
                                           "password": "correct horse"}).status_code == 303
        form = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID,
                "sop": ds.SOPInstanceUID}
        forged = client.post("/key-images", data=form, headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403
        assert _ko_series(server, ds.StudyInstanceUID) == []
        assert client.post("/key-images", data=form).status_code == 303
    assert len(_ko_series(server, ds.StudyInstanceUID)) == 1
