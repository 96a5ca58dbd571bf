"""The upload page in headless Chromium: a folder goes up, results per file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from lightbox.services import auth
from tests.browser import shot, sign_in
from tests.conftest import RunningServer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "make_corpus.py"
PASSWORD = "correct horse"
pytestmark = pytest.mark.parametrize("backend", ["sqlite"])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A synthetic study (CT and MR series) plus a note and a CD's DICOMDIR."""
    out = tmp_path / "cd"
    subprocess.run(
        [sys.executable, str(CORPUS), str(out), "--patients", "1", "--slices", "12",
         "--size", "64", "--mr"],
        check=True, capture_output=True,
    )
    (out / "README.txt").write_text("not an image\n")
    dicomdir = get_testdata_file("DICOMDIR")
    assert dicomdir is not None
    shutil.copy(dicomdir, out / "DICOMDIR")
    return out


@pytest.fixture
def page(server: RunningServer, browser: Any) -> Iterator[Any]:
    auth.add_user(server.archive, "tech", PASSWORD, is_admin=False)
    opened = sign_in(browser, server.url, "tech", PASSWORD)
    try:
        yield opened
    finally:
        opened.context.close()  # type: ignore[attr-defined]


def _instances(folder: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in folder.rglob("*.dcm"):
        study = dcmread(path, stop_before_pixels=True).StudyInstanceUID
        counts[study] = counts.get(study, 0) + 1
    return counts


def _upload(page: Any, folder: Path) -> None:
    page.set_input_files("#pick-folder", str(folder))
    page.wait_for_selector("#summary:not([hidden])", timeout=60_000)
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")


def _rows(page: Any, status: str) -> int:
    return int(page.locator(f'tr.file[data-status="{status}"]').count())


def test_folder_upload_stores_studies_and_reports_each_file(
    server: RunningServer, page: Any, folder: Path
) -> None:
    expected = _instances(folder)
    total = sum(expected.values())
    page.goto("/upload")
    _upload(page, folder)
    shot(page, "upload-1-done")
    assert _rows(page, "stored") == total
    skipped = page.locator('tr.file[data-status="skipped"]')
    assert skipped.count() == 2
    reasons = " ".join(skipped.locator("td.reason").all_inner_texts())
    assert "not a DICOM file" in reasons and "DICOMDIR" in reasons
    assert f"{total} stored" in page.inner_text("#summary-text")
    links = page.locator("#summary-studies a")
    assert links.count() == len(expected)
    for study, count in expected.items():
        assert page.locator(f'#summary-studies a[href="/browse/studies/{study}"]').count() == 1
        found = httpx.get(server.dicomweb + "/studies", params={"StudyInstanceUID": study},
                          headers=server.headers).json()
        assert found[0]["00201208"]["Value"][0] == count

    page.goto("/upload")
    _upload(page, folder)
    shot(page, "upload-2-duplicates")
    assert _rows(page, "duplicate") == total
    assert _rows(page, "stored") == 0
    assert f"{total} already there" in page.inner_text("#summary-text")


def test_retry_resends_only_failed_batches(
    server: RunningServer, page: Any, folder: Path
) -> None:
    total = sum(_instances(folder).values())
    posts: list[str] = []

    def first_fails(route: Any) -> None:
        posts.append(route.request.method)
        if len(posts) == 1:
            route.abort()
        else:
            route.continue_()

    page.goto("/upload")
    page.route("**/dicom-web/studies", first_fails)
    _upload(page, folder)
    failed = _rows(page, "failed")
    assert 0 < failed < total
    assert _rows(page, "stored") == total - failed
    assert page.is_visible("#retry")
    shot(page, "upload-3-failed-batch")
    sent_before = len(posts)
    page.click("#retry")
    page.wait_for_selector("#summary:not([hidden])", timeout=60_000)
    shot(page, "upload-4-retried")
    assert len(posts) == sent_before + 1  # only the failed batch went again
    assert _rows(page, "stored") == total
    assert _rows(page, "duplicate") == 0
    assert not page.is_visible("#retry")


def test_read_only_user_cannot_upload(server: RunningServer) -> None:
    token = auth.create_token(server.archive, read_only=True)
    answer = httpx.get(server.url + "/upload", cookies={"lightbox_session": token})
    assert answer.status_code == 403
    assert "may view studies but not add them" in answer.text
    assert "upload.js" not in answer.text
