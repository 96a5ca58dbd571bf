"""OHIF under /viewer/: rewritten for the prefix, configured for this server,
behind the login, safe against path tricks; and the script that fetches it."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import io
import re
import tarfile
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import httpx
import pytest

from lightbox.archive import Archive
from lightbox.web.viewer_build import ViewerBuild, packed_folder
from tests.conftest import VIEWER_DIR, RunningServer, serving

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_PATH = re.compile(rb'__webpack_require__\.p\s*=\s*"([^"]*)"')
SECRET = "lightbox-test-secret-outside-the-viewer"


@pytest.fixture(scope="session")
def viewer_dir() -> Path:
    """The fetched OHIF build; a run without it fails (``make test`` fetches it)."""
    if not (VIEWER_DIR / "index.html").is_file():
        pytest.fail(
            f"the OHIF viewer is not in {VIEWER_DIR}: run `make install` "
            "(or python scripts/fetch_viewer.py) before the viewer tests"
        )
    return VIEWER_DIR


@pytest.fixture
def client(server: RunningServer, viewer_dir: Path) -> Iterator[httpx.Client]:
    """A client with the admin token (the viewer page accepts any credential)."""
    with httpx.Client(base_url=server.url, headers=server.headers) as signed_in:
        yield signed_in


@contextmanager
def _serving_viewer_from(archive: Archive, folder: Path) -> Iterator[RunningServer]:
    """A second server over the same archive, with the viewer read from ``folder``."""
    moved = Archive.open(replace(archive.settings, viewer_dir=folder), migrate=False)
    try:
        with serving(moved) as running:
            yield running
    finally:
        moved.close()


def _raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET exactly ``path``: no client-side clean-up of dots or escapes."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def _script_names(index: str) -> list[str]:
    return re.findall(r'src="/viewer/([^"]+\.js)"', index)


def test_viewer_page_needs_a_session(server: RunningServer, viewer_dir: Path) -> None:
    target = "/viewer/viewer?StudyInstanceUIDs=1.2.3"
    answer = httpx.get(server.url + target)
    assert answer.status_code == 303
    assert (
        answer.headers["location"] == "/login?next=%2Fviewer%2Fviewer%3FStudyInstanceUIDs%3D1.2.3"
    )
    # The viewer's own files carry no patient data and are public.
    assert httpx.get(server.url + "/viewer/app-config.js").status_code == 200


def test_signed_in_browser_gets_the_viewer_page(server: RunningServer, viewer_dir: Path) -> None:
    from lightbox.services import auth

    auth.add_user(server.archive, "dana", "viewer pass 1", is_admin=False)
    with httpx.Client(base_url=server.url, headers={"Origin": server.url}) as browser:
        login = browser.post(
            "/login", data={"username": "dana", "password": "viewer pass 1", "next": "/viewer/"}
        )
        assert login.status_code == 303 and login.headers["location"] == "/viewer/"
        page = browser.get("/viewer/")
    assert page.status_code == 200
    assert 'window.PUBLIC_URL="/viewer/"' in page.text


def test_index_is_rewritten_for_the_prefix(client: httpx.Client) -> None:
    page = client.get("/viewer/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert 'PUBLIC_URL="/"' not in page.text
    assert page.text.count('window.PUBLIC_URL="/viewer/"') == 2
    assert not re.search(r'(?:href|src)="/(?!viewer/)', page.text)
    assert 'src="/viewer/app-config.js"' in page.text
    assert any(name.startswith("app.bundle.") for name in _script_names(page.text))


def test_client_side_routes_answer_the_viewer_page(client: httpx.Client) -> None:
    index = client.get("/viewer/").text
    for path in (
        "/viewer/viewer?StudyInstanceUIDs=1.2.840.113619.2.55.3",
        "/viewer/local",
        "/viewer/localbasic",
        "/viewer/viewer/dicomlocal",
        "/viewer/index.html",
    ):
        answer = client.get(path)
        assert answer.status_code == 200, path
        assert answer.text == index, path
    assert client.get("/viewer", follow_redirects=False).headers["location"] == "/viewer/"
    # A missing file is not a route: scripts and styles get a 404, never HTML.
    assert client.get("/viewer/no-such-bundle.js").status_code == 404
    assert client.get("/viewer/assets/none.png").status_code == 404


def test_app_config_points_at_this_servers_dicomweb(client: httpx.Client) -> None:
    answer = client.get("/viewer/app-config.js")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/javascript")
    assert answer.headers["cache-control"] == "no-store"
    config = answer.text
    assert "routerBasename: '/viewer'" in config
    assert "window.location.origin" in config
    for root in ("qidoRoot: root + '/dicom-web'", "wadoRoot: root + '/dicom-web'"):
        assert root in config
    for key in (
        "qidoSupportsIncludeField: true",
        "supportsWildcard: true",
        "supportsFuzzyMatching: true",
        "enableStudyLazyLoad: true",
        "imageRendering: 'wadors'",
        "staticWado: false",
        "supportsStow: true",
        "showStudyList: true",
        "investigationalUseDialog: { option: 'never' }",
        "'ohif.tours': { $set: [] }",
        "dataSourcesModule.dicomlocal",
    ):
        assert key in config, key
    assert "cloudfront" not in config  # not the package's demo configuration


def test_service_worker_is_disabled(client: httpx.Client) -> None:
    setup = client.get("/viewer/init-service-worker.js")
    assert setup.status_code == 200
    assert "unregister" in setup.text and "Workbox" not in setup.text
    assert client.get("/viewer/sw.js").status_code == 404


def test_every_webpack_public_path_is_rewritten(client: httpx.Client, viewer_dir: Path) -> None:
    bundles = [p for p in viewer_dir.glob("*.js") if PUBLIC_PATH.search(p.read_bytes())]
    assert any(p.name.startswith("app.bundle.") for p in bundles)
    for bundle in bundles:
        answer = client.get(f"/viewer/{bundle.name}")
        assert answer.status_code == 200, bundle.name
        assert set(PUBLIC_PATH.findall(answer.content)) == {b"/viewer/"}, bundle.name
    # The files on disk are left as they came.
    assert b'__webpack_require__.p = "/"' in bundles[0].read_bytes()


def test_stylesheet_fonts_are_under_the_prefix(client: httpx.Client) -> None:
    sheet = client.get("/viewer/app.bundle.css")
    assert sheet.status_code == 200
    assert sheet.headers["content-type"].startswith("text/css")
    fonts = re.findall(r"url\(([^)]*)\)", sheet.text)
    assert fonts and all(url.lstrip("'\"").startswith("/viewer/") for url in fonts)
    for url in fonts:
        font = client.get(url.strip("'\""))
        assert font.status_code == 200 and font.headers["content-type"] == "font/woff2"


def test_hashed_bundles_are_immutable_and_compressed(client: httpx.Client) -> None:
    name = next(n for n in _script_names(client.get("/viewer/").text) if "bundle" in n)
    plain = client.get(f"/viewer/{name}", headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200
    assert plain.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert plain.headers["content-type"].startswith("text/javascript")
    packed = client.get(f"/viewer/{name}", headers={"Accept-Encoding": "gzip"})
    assert packed.headers["content-encoding"] == "gzip"
    assert int(packed.headers["content-length"]) < len(plain.content) // 2
    assert packed.content == plain.content  # httpx decodes the gzip body
    again = client.get(f"/viewer/{name}", headers={"If-None-Match": plain.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_binary_assets_have_their_types(client: httpx.Client, viewer_dir: Path) -> None:
    wasm = sorted(viewer_dir.glob("*.wasm"))[0]
    answer = client.get(f"/viewer/{wasm.name}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/wasm"
    assert answer.headers["cache-control"].endswith("immutable")
    assert hashlib.sha256(answer.content).digest() == hashlib.sha256(wasm.read_bytes()).digest()
    again = client.get(f"/viewer/{wasm.name}", headers={"If-None-Match": answer.headers["etag"]})
    assert again.status_code == 304
    icon = client.get("/viewer/assets/favicon.ico")
    assert icon.status_code == 200 and icon.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    "path",
    [
        "/viewer/../pyproject.toml",
        "/viewer/../../../../etc/passwd",
        "/viewer/%2e%2e/pyproject.toml",
        "/viewer/%2E%2E%2F%2E%2E%2Fpyproject.toml",
        "/viewer/assets/..%2f..%2f..%2fpyproject.toml",
        "/viewer/..%5c..%5cpyproject.toml",
        "/viewer/.complete",
        "/viewer/%00",
        "/viewer//etc/passwd",
    ],
)
def test_path_tricks_do_not_leave_the_folder(
    server: RunningServer, viewer_dir: Path, path: str
) -> None:
    status, body = _raw_get(server.url, path)
    assert status in (400, 404, 303), (path, status)
    assert b"[project]" not in body and b"root:" not in body


def test_symlink_out_of_the_folder_is_refused(archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "viewer"
    folder.mkdir()
    (folder / "index.html").write_text('<script>window.PUBLIC_URL="/"</script>')
    (tmp_path / "secret.js").write_text(SECRET)
    (folder / "leak.js").symlink_to(tmp_path / "secret.js")
    with _serving_viewer_from(archive, folder) as running:
        answer = httpx.get(running.url + "/viewer/leak.js")
    assert answer.status_code == 404
    assert SECRET not in answer.text


def test_missing_viewer_answers_503_and_the_server_still_runs(
    archive: Archive, tmp_path: Path
) -> None:
    with _serving_viewer_from(archive, tmp_path / "not-fetched") as running:
        page = httpx.get(running.url + "/viewer/viewer?StudyInstanceUIDs=1.2.3")
        asset = httpx.get(running.url + "/viewer/app.bundle.css")
        health = httpx.get(running.url + "/healthz")
        studies = httpx.get(running.dicomweb + "/studies", headers=running.headers)
    assert page.status_code == 503
    assert page.headers["content-type"].startswith("text/html")
    assert "make install" in page.text
    assert str(tmp_path) not in page.text  # no server paths in public pages
    assert asset.status_code == 503
    assert health.status_code == 200
    assert studies.status_code in (200, 204)


# The fetch script: integrity pinned, only package/dist unpacked, nothing escapes.


def _fetch_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_viewer", ROOT / "scripts/fetch_viewer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tarball(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as out:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            out.addfile(info)
    return path


def _integrity(path: Path) -> str:
    return "sha512-" + b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_fetch_unpacks_only_dist_and_checks_integrity(tmp_path: Path) -> None:
    fetch = _fetch_module()
    good = _tarball(
        tmp_path / "good.tgz",
        {
            "package/package.json": b"{}",
            "package/dist/index.html": b"<html></html>",
            "package/dist/assets/a.png": b"png",
        },
    )
    fetch.verify(good, _integrity(good))
    with pytest.raises(fetch.FetchError, match="integrity mismatch"):
        fetch.verify(good, "sha512-" + b64encode(b"\0" * 64).decode())
    into = tmp_path / "out"
    into.mkdir()
    assert fetch.extract(good, into) == 2
    assert sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file()) == [
        ".complete",
        "assets/a.png",
        "index.html",
    ]
    assert fetch.is_complete(into)


@pytest.mark.parametrize(
    ("members", "link"),
    [
        ({"package/dist/../../evil.txt": b"x"}, None),
        ({"/package/dist/abs.txt": b"x"}, None),
        ({"package/dist/index.html": b"x"}, "package/dist/passwd"),
    ],
)
def test_fetch_refuses_unsafe_tarballs(
    tmp_path: Path, members: dict[str, bytes], link: str | None
) -> None:
    fetch = _fetch_module()
    bad = _tarball(tmp_path / "bad.tgz", members, link)
    into = tmp_path / "out"
    into.mkdir()
    with pytest.raises(fetch.FetchError):
        fetch.extract(bad, into)
    assert not (tmp_path / "evil.txt").exists()


def test_fetch_explains_a_missing_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetch = _fetch_module()
    monkeypatch.setattr(fetch.shutil, "which", lambda _name: None)
    with pytest.raises(fetch.FetchError, match="npm is not installed"):
        fetch.download(tmp_path)
    assert fetch.main(["--dest", str(tmp_path / "viewer")]) == 1
    assert not (tmp_path / "viewer").exists()


def test_pinned_build_is_complete(viewer_dir: Path) -> None:
    fetch = _fetch_module()
    assert fetch.is_complete(viewer_dir)
    assert fetch.INTEGRITY in (viewer_dir / ".complete").read_text()


def _small_build(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "index.html").write_text('<html><script src="/app.js"></script></html>')
    (root / "app.js").write_text("var x = 1;\n" * 2000)
    (root / "logo.png").write_bytes(b"\x89PNG")
    return root


def test_install_compresses_the_build_once_for_every_process(tmp_path: Path) -> None:
    build = ViewerBuild(_small_build(tmp_path / "ohif"))
    assert build.prepare() == 2  # index.html and app.js; the image is sent as it is
    packed = sorted(packed_folder(build.root).glob("*.gz"))
    assert len(packed) == 2
    stamps = [p.stat().st_mtime_ns for p in packed]
    asset = ViewerBuild(build.root).text(build.root / "app.js")  # another process
    assert asset is not None and asset.gzipped is not None
    assert gzip.decompress(asset.gzipped) == (build.root / "app.js").read_bytes()
    assert asset.gzipped in [p.read_bytes() for p in packed]
    assert [p.stat().st_mtime_ns for p in packed] == stamps  # read, not compressed again


def test_a_damaged_compressed_copy_is_made_again(tmp_path: Path) -> None:
    build = ViewerBuild(_small_build(tmp_path / "ohif"))
    build.prepare()
    for copy in packed_folder(build.root).glob("*.gz"):
        copy.write_bytes(copy.read_bytes()[:20])  # cut off, as by a crash
    asset = ViewerBuild(build.root).text(build.root / "app.js")
    assert asset is not None and asset.gzipped is not None
    assert gzip.decompress(asset.gzipped) == (build.root / "app.js").read_bytes()


def test_an_unwritable_cache_still_serves_compressed(tmp_path: Path) -> None:
    root = _small_build(tmp_path / "ohif")
    packed_folder(root.resolve()).write_text("not a folder")
    asset = ViewerBuild(root).text(root.resolve() / "app.js")
    assert asset is not None and asset.gzipped is not None
    assert gzip.decompress(asset.gzipped) == (root / "app.js").read_bytes()
