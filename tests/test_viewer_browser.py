"""OHIF in headless Chromium against a real Lightbox: images show, scroll and
window; a length measurement is saved as DICOM SR and comes back; local files
are viewed without leaving the browser."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from lightbox.archive import Archive
from lightbox.cli.importer import import_paths
from lightbox.samples import write_samples
from lightbox.services import auth
from tests.browser import shot, sign_in
from tests.conftest import VIEWER_DIR, RunningServer, database_url, make_settings, serving
from tests.grants import grant

USER, PASSWORD = "rad", "viewer test pass"
VIEWPORT = ".cornerstone-viewport-element"
IMAGE_INDEX = "[data-cy=viewport-overlay-bottom-right]"
WINDOW_LEVEL = "[data-cy=viewport-overlay-bottom-left]"
REPORT = "Lightbox length report"


class Demo:
    """A server with the demo CT imported; the demo MR stays on 'this computer'."""

    def __init__(self, server: RunningServer, ct: str, mr_files: list[Path]) -> None:
        self.server = server
        self.ct = ct
        self.mr_files = mr_files


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    if not (VIEWER_DIR / "index.html").is_file():
        pytest.fail(f"the OHIF viewer is not in {VIEWER_DIR}: run `make install` first")
    root = tmp_path_factory.mktemp("viewer-demo")
    files = list(write_samples(root / "samples"))
    by_modality: dict[str, list[Path]] = {}
    for path in files:
        modality = str(dcmread(path, stop_before_pixels=True).Modality)
        by_modality.setdefault(modality, []).append(path)
    ct = str(dcmread(by_modality["CT"][0], stop_before_pixels=True).StudyInstanceUID)
    with database_url("sqlite", root / "data") as url:
        archive = Archive.open(make_settings(root / "data", url))
        try:
            import_paths(archive, by_modality["CT"], progress=False)
            auth.add_user(archive, USER, PASSWORD, is_admin=False)
            grant(archive, USER, ct, role="owner")  # owners may add reports (SR) to it
            with serving(archive) as server:
                yield Demo(server, ct, sorted(by_modality["MR"]))
        finally:
            archive.close()


@pytest.fixture
def page(demo: Demo, browser: Any) -> Iterator[Any]:
    opened = sign_in(browser, demo.server.url, USER, PASSWORD)
    try:
        yield opened
    finally:
        opened.context.close()


def _pixels(page: Any) -> np.ndarray:
    """The first viewport as the user sees it (grey levels)."""
    png = page.locator(VIEWPORT).first.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)


def _wait_pixels(page: Any, ok: Callable[[np.ndarray], bool], what: str) -> np.ndarray:
    """Poll the viewport until ``ok`` holds (rendering is asynchronous)."""
    deadline = time.monotonic() + 20
    while True:
        seen = _pixels(page)
        if ok(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"viewport never showed {what}")
        page.wait_for_timeout(200)


def _open_study(page: Any, study: str, slices: int) -> np.ndarray:
    page.goto(f"/viewer/viewer?StudyInstanceUIDs={study}")
    page.locator(VIEWPORT).first.wait_for()
    page.locator(IMAGE_INDEX, has_text=f"/{slices})").wait_for()
    return _wait_pixels(page, lambda px: float(px.std()) > 10, "an image")


def _centre(page: Any) -> tuple[float, float]:
    box = page.locator(VIEWPORT).first.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def _drag(page: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=12)
    page.mouse.up()


def _changed(before: np.ndarray) -> Callable[[np.ndarray], bool]:
    return lambda now: now.shape == before.shape and float(np.abs(now - before).mean()) > 1.0


def test_viewer_shows_scrolls_and_windows_a_ct(page: Any, demo: Demo) -> None:
    first = _open_study(page, demo.ct, 48)
    shot(page, "viewer-01-first-slice")
    assert page.evaluate("window.crossOriginIsolated") is True

    centre = _centre(page)
    page.mouse.move(*centre)
    for _ in range(8):
        page.mouse.wheel(0, 120)
    page.wait_for_function(
        "s => !document.querySelector(s).textContent.includes('I:1 (')", arg=IMAGE_INDEX
    )
    scrolled = _wait_pixels(page, _changed(first), "another slice after scrolling")
    shot(page, "viewer-02-scrolled")

    window_before = page.locator(WINDOW_LEVEL).text_content()
    _drag(page, centre, (centre[0] + 160, centre[1] + 90))  # window/level is the left button
    page.wait_for_function(
        "([s, t]) => document.querySelector(s).textContent !== t", arg=[WINDOW_LEVEL, window_before]
    )
    _wait_pixels(page, _changed(scrolled), "a new window/level")
    shot(page, "viewer-03-windowed")


def _measure_length(page: Any) -> float:
    """Draw a length on the viewport, accept tracking; the length in mm."""
    page.click("[data-cy=MeasurementTools-split-button-primary]")
    x, y = _centre(page)
    _drag(page, (x - 120, y - 10), (x + 100, y + 60))
    page.get_by_text("Track measurements for this series?").wait_for()
    page.get_by_role("button", name="Yes", exact=True).click()
    label = page.locator("svg text", has_text="mm").first
    label.wait_for()
    return _millimetres(label.text_content())


def _millimetres(text: str) -> float:
    found = re.search(r"([\d.]+)\s*mm", text)
    assert found, text
    return float(found.group(1))


def _show_measurements(page: Any) -> None:
    """Open the measurement panel unless it is open already (the button toggles)."""
    panel = page.locator("[data-cy=trackedMeasurements-btn]")
    panel.wait_for()
    if not page.get_by_role("button", name="Create SR").is_visible():
        panel.click()


def _save_report(page: Any) -> int:
    _show_measurements(page)
    page.get_by_role("button", name="Create SR").click()
    page.get_by_placeholder("Report name").fill(REPORT)
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith("/dicom-web/studies")
    ) as stored:
        page.get_by_role("button", name="Save", exact=True).click()
    return int(stored.value.status)


def test_length_measurement_is_saved_as_sr_and_comes_back(page: Any, demo: Demo) -> None:
    _open_study(page, demo.ct, 48)
    length = _measure_length(page)
    assert length > 10
    shot(page, "viewer-04-length")
    assert _save_report(page) == 200
    shot(page, "viewer-05-saved")

    series = httpx.get(
        f"{demo.server.dicomweb}/studies/{demo.ct}/series",
        params={"Modality": "SR", "includefield": "0008103E"},
        headers=demo.server.headers,
    )
    assert series.status_code == 200
    descriptions = [s["0008103E"]["Value"][0] for s in series.json()]
    assert REPORT in descriptions

    # Reopen the study: the report is listed; opening it brings the same length
    # back. OHIF offers to track the report's measurements again (hydration);
    # once tracked, the length is listed and drawn on its image. (Before that,
    # the report's own view sometimes draws nothing: OHIF drops a measurement
    # it finds "invalidated" while the viewport settles.)
    _open_study(page, demo.ct, 48)
    report = page.locator("[data-cy=study-browser-thumbnail-no-image]", has_text=REPORT)
    report.first.dblclick()
    page.get_by_text("continue tracking measurements").wait_for()
    shot(page, "viewer-06-report-reopened")
    page.get_by_role("button", name="Yes", exact=True).click()
    _show_measurements(page)
    page.get_by_text("Measurements (1)").wait_for()
    tracked = page.get_by_text(re.compile(r"^\s*[\d.]+ mm\s*$")).first
    assert abs(_millimetres(tracked.text_content()) - length) < 0.5
    label = page.locator("svg text", has_text="mm").first
    label.wait_for()
    assert abs(_millimetres(label.text_content()) - length) < 0.5
    shot(page, "viewer-07-report-tracked")


def test_local_files_are_viewed_without_upload(page: Any, demo: Demo) -> None:
    sent: list[str] = []
    page.context.on(
        "request", lambda r: sent.append(f"{r.method} {r.url}") if "/dicom-web" in r.url else None
    )
    page.goto("/viewer/local")
    page.locator("input[type=file]").first.set_input_files([str(p) for p in demo.mr_files])
    page.wait_for_url(re.compile(r"datasources=dicomlocal"))
    page.get_by_text("DEMO, HEAD").click()
    shot(page, "viewer-08-local-list")
    page.get_by_role("button", name="Basic Viewer").click()
    page.locator(IMAGE_INDEX, has_text="/24)").wait_for()
    _wait_pixels(page, lambda px: float(px.std()) > 10, "the local image")
    shot(page, "viewer-09-local-image")
    assert "/viewer/viewer/dicomlocal" in page.url
    assert sent == []  # nothing went to the archive
    study = str(dcmread(demo.mr_files[0], stop_before_pixels=True).StudyInstanceUID)
    found = httpx.get(
        f"{demo.server.dicomweb}/studies",
        params={"StudyInstanceUID": study},
        headers=demo.server.headers,
    )
    assert found.status_code in (200, 204) and (found.status_code == 204 or found.json() == [])


@pytest.mark.parametrize("deidentify", [False, True], ids=["plain", "de-identified"])
def test_a_share_link_opens_the_study_in_the_viewer(
    demo: Demo, browser: Any, deidentify: bool
) -> None:
    """Anonymous: the link's page, its passcode, then OHIF on the link's scoped root."""
    from lightbox.services import sharing

    archive = demo.server.archive
    made = sharing.create_share(archive, sharing.acting_as(archive, None), study=demo.ct,
                                passcode=None if deidentify else "tulip-42",
                                deidentify=deidentify)
    context = browser.new_context(base_url=demo.server.url,
                                  viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(f"/s/{made.token}/view")
        if deidentify:  # no passcode: straight into the viewer; back to the link's page
            page.wait_for_url(re.compile(r"/view/viewer\?StudyInstanceUIDs="))
            page.goto(f"/s/{made.token}")
        else:  # the viewer waits behind the passcode
            page.get_by_label("Passcode").fill("tulip-42")
            page.get_by_role("button", name=re.compile("open|unlock", re.I)).click()
            page.wait_for_url(re.compile(rf"/s/{re.escape(made.token)}$"))
        page.locator("#open-viewer").click()
        page.wait_for_url(re.compile(r"/view/viewer\?StudyInstanceUIDs="))
        page.locator(VIEWPORT).first.wait_for()
        page.locator(IMAGE_INDEX, has_text="/48)").wait_for()
        _wait_pixels(page, lambda px: float(px.std()) > 10, "an image")
        shot(page, f"share-viewer-{'deid' if deidentify else 'plain'}")
        shown = page.url.split("StudyInstanceUIDs=")[1]
        assert (shown != demo.ct) == deidentify
    finally:
        context.close()
    sharing.revoke(archive, sharing.acting_as(archive, None), made.link.id)
    gone = httpx.get(f"{demo.server.url}/s/{made.token}/view/viewer")
    assert gone.status_code == 404
