"""Operations endpoints and cross-cutting HTTP behaviour: health, metrics,
request ids, CORS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lightbox.archive import Archive
from tests.conftest import RunningServer, database_url, make_settings, serving


def test_healthz_answers_ok(server: RunningServer) -> None:
    response = httpx.get(server.url + "/healthz")
    assert response.status_code == 200 and response.text == "ok"


def test_metrics_count_requests_by_family_never_by_uid(server: RunningServer) -> None:
    httpx.get(server.dicomweb + "/studies", headers=server.headers)
    httpx.get(server.dicomweb + "/studies")  # 401
    text = httpx.get(server.url + "/metrics").text
    assert 'lightbox_http_requests_total{family="dicom-web",method="GET",status="200"}' in text
    assert 'lightbox_http_requests_total{family="dicom-web",method="GET",status="401"}' in text
    assert "lightbox_http_request_seconds_bucket" in text
    assert "1.2." not in text  # no UIDs in label values


def test_every_response_carries_its_own_request_id(server: RunningServer) -> None:
    ids = {httpx.get(server.url + "/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 16 for i in ids)


@pytest.fixture
def cors_server(backend: str, tmp_path: Path) -> Iterator[RunningServer]:
    data = tmp_path / "data"
    with database_url(backend, data) as url:
        archive = Archive.open(
            make_settings(data, url, cors_origins=("https://viewer.example.org",))
        )
        try:
            with serving(archive) as running:
                yield running
        finally:
            archive.close()


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(
        url + "/dicom-web/studies",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "Authorization",
        },
    )


def test_cors_allows_only_configured_origins(cors_server: RunningServer) -> None:
    allowed = _preflight(cors_server.url, "https://viewer.example.org")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://viewer.example.org"
    refused = _preflight(cors_server.url, "https://evil.example.com")
    assert "access-control-allow-origin" not in refused.headers
    response = httpx.get(
        cors_server.dicomweb + "/studies",
        headers={**cors_server.headers, "Origin": "https://viewer.example.org"},
    )
    assert response.headers["access-control-allow-origin"] == "https://viewer.example.org"


def test_without_cors_settings_no_origin_is_allowed(server: RunningServer) -> None:
    response = httpx.get(
        server.dicomweb + "/studies",
        headers={**server.headers, "Origin": "https://viewer.example.org"},
    )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
