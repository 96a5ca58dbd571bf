"""Browser sessions: login sets an HttpOnly cookie that DICOMweb accepts;
state-changing requests with the cookie need a same-origin Origin; logout revokes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from lightbox.services import auth
from tests.conftest import RunningServer
from tests.factories import ct_dataset, make_instance, stow_body, to_bytes
from tests.grants import grant


@pytest.fixture
def member(server: RunningServer) -> tuple[str, str]:
    auth.add_user(server.archive, "carol", "correct horse", is_admin=False)
    return "carol", "correct horse"


@contextmanager
def _login(server: RunningServer, name: str, password: str) -> Iterator[httpx.Client]:
    client = httpx.Client(base_url=server.url, headers={"Origin": server.url})
    answer = client.post("/login", data={"username": name, "password": password, "next": "/x"})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/x"
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    try:
        yield client
    finally:
        client.close()


def test_login_cookie_reads_dicomweb_and_fast_frames(
    server: RunningServer, member: tuple[str, str]
) -> None:
    ds = ct_dataset()
    body, content_type = stow_body([to_bytes(ds)])
    stored = httpx.post(
        server.dicomweb + "/studies",
        content=body,
        headers={**server.headers, "Content-Type": content_type},
    )
    assert stored.status_code == 200
    grant(server.archive, member[0], ds.StudyInstanceUID)
    frame = (
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/1"
    )
    with _login(server, *member) as client:
        assert client.get("/dicom-web/studies").status_code == 200
        for _ in range(2):  # the second answer comes from the fast path
            got = client.get(
                frame, headers={"Accept": "multipart/related; type=application/octet-stream"}
            )
            assert got.status_code == 200
            assert bytes(ds.PixelData) in got.content
    assert httpx.get(server.url + frame).status_code == 401


def test_wrong_password_and_unknown_user_look_the_same(
    server: RunningServer, member: tuple[str, str]
) -> None:
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as client:
        wrong = client.post("/login", data={"username": "carol", "password": "nope nope"})
        unknown = client.post("/login", data={"username": "mallory", "password": "nope nope"})
    assert wrong.status_code == unknown.status_code == 401
    assert "wrong user name or password" in wrong.text
    assert "set-cookie" not in wrong.headers


def test_cookie_post_needs_same_origin(server: RunningServer, member: tuple[str, str]) -> None:
    body, content_type = stow_body([make_instance()])
    with _login(server, *member) as client:
        forged = client.post(
            "/dicom-web/studies",
            content=body,
            headers={"Content-Type": content_type, "Origin": "http://evil.example"},
        )
        assert forged.status_code == 403
        bare = httpx.post(
            server.url + "/dicom-web/studies",
            content=body,
            headers={"Content-Type": content_type},
            cookies=client.cookies,
        )
        assert bare.status_code == 403
        assert client.get("/dicom-web/studies").json() == []
        same = client.post(
            "/dicom-web/studies", content=body, headers={"Content-Type": content_type}
        )
        assert same.status_code == 200, same.text


def test_logout_revokes_the_session(server: RunningServer, member: tuple[str, str]) -> None:
    with _login(server, *member) as client:
        cookies = dict(client.cookies)
        assert client.post("/logout").status_code == 303
        again = httpx.get(server.url + "/dicom-web/studies", cookies=cookies)
        assert again.status_code == 401


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil"])
def test_login_never_redirects_off_site(
    server: RunningServer, member: tuple[str, str], target: str
) -> None:
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as client:
        answer = client.post(
            "/login", data={"username": member[0], "password": member[1], "next": target}
        )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/"


def test_login_page_renders_and_pages_redirect_to_it(server: RunningServer) -> None:
    page = httpx.get(server.url + "/login?next=/browse")
    assert page.status_code == 200 and 'name="password"' in page.text
    assert page.headers["x-content-type-options"] == "nosniff"


def test_demo_login_is_stable(server: RunningServer) -> None:
    first = auth.demo_login(server.archive)
    assert auth.demo_login(server.archive) == first
    assert auth.login(server.archive, *first).startswith(auth.TOKEN_PREFIX)
