"""Viewer benchmark: the same OHIF build on Lightbox and on Orthanc, in headless Chromium.

    .venv/bin/python benchmarks/viewer.py [--slices 500] [--rounds 2] [--work DIR] [--keep]

A synthetic CT series (512x512, ``--slices`` slices) is stored in both servers.
OHIF (the pinned build fetched by ``make install``) is opened on a study:

- Lightbox serves it itself under ``/viewer/`` (same origin as ``/dicom-web``);
- for Orthanc, nginx serves the same build at ``/`` and proxies ``/dicom-web/``
  to Orthanc's DICOMweb plugin, so it too is same-origin, with no CORS.

Measured from navigation, in Chromium's clock (``performance.now()``):

- ``app started``: the viewer's first DICOMweb request (the app has booted);
- ``first image``: the first frame a viewport canvas shows (non-blank pixels);
- ``all slices``: the last of the series' pixel responses (OHIF prefetches the
  whole stack of the displayed series);
- slices/s over the series, from app start.

Both servers keep durability on (Lightbox always; Orthanc ``SyncStorageArea``).
Chromium runs with software rendering, on the same 2 cores as the servers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus
import servers
from bench import stow_bodies
from dicomweb_clients import Conn, stow_requests

REPO = Path(__file__).resolve().parents[1]
VIEWER = REPO / ".viewer" / "ohif-3.13.2"
CHROMIUM = os.environ.get("LIGHTBOX_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
USER, PASSWORD = "reader", "viewer-load-test-1"

NGINX_PROXY_CONF = """\
daemon off;
master_process on;
{user}worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 65;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include /etc/nginx/mime.types;
    types {{ application/wasm wasm; }}
    upstream orthanc {{ server 127.0.0.1:{orthanc}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location = /app-config.js {{ alias {dir}/app-config.js; }}
        location /dicom-web/ {{
            proxy_pass http://orthanc;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
        location / {{ try_files $uri /index.html; }}
    }}
}}
"""

APP_CONFIG = """\
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc',
      name: 'orthanc',
      wadoUriRoot: window.location.origin + '/dicom-web',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      bulkDataURI: { enabled: true },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""

# Watches every viewport canvas from the first script on; records when one
# first shows non-blank pixels.
PAINT_PROBE = """
(() => {
  window.__lbx = { firstImage: null };
  performance.setResourceTimingBufferSize(100000);
  // The canvas is scaled down to 64x64 before reading, so a check is cheap.
  const probe = document.createElement('canvas');
  probe.width = probe.height = 64;
  const pctx = probe.getContext('2d', { willReadFrequently: true });
  const blank = (canvas) => {
    try {
      if (canvas === probe || canvas.width < 16 || canvas.height < 16) return true;
      pctx.clearRect(0, 0, 64, 64);
      pctx.drawImage(canvas, 0, 0, 64, 64);
      const data = pctx.getImageData(0, 0, 64, 64).data;
      for (let i = 0; i < data.length; i += 4) {
        if (data[i] > 8 || data[i + 1] > 8 || data[i + 2] > 8) return false;
      }
    } catch (e) { return true; }
    return true;
  };
  const tick = () => {
    if (window.__lbx.firstImage === null) {
      for (const c of document.querySelectorAll('canvas.cornerstone-canvas')) {
        if (!blank(c)) { window.__lbx.firstImage = performance.now(); break; }
      }
      requestAnimationFrame(tick);
    }
  };
  requestAnimationFrame(tick);
})();
"""

# Read from the page's own Resource Timing entries: no per-request traffic
# between the browser and this script while the viewer loads.
PROGRESS = """
(() => {
  const entries = performance.getEntriesByType('resource');
  const isPixel = (u) => u.includes('/frames/') || u.includes('/bulkdata') ||
                         u.endsWith('/pixeldata');
  let appStarted = null, lastPixel = 0; const pixels = new Set();
  for (const e of entries) {
    if (!e.name.includes('/dicom-web/')) continue;
    if (appStarted === null || e.startTime < appStarted) appStarted = e.startTime;
    if (isPixel(e.name) && e.responseEnd > 0) {
      pixels.add(e.name); lastPixel = Math.max(lastPixel, e.responseEnd);
    }
  }
  return { appStarted, lastPixel, pixels: pixels.size, firstImage: window.__lbx.firstImage };
})()
"""


@dataclass
class Load:
    app_started_ms: float
    first_image_ms: float
    all_slices_ms: float
    slices: int

    @property
    def first_image_after_start_ms(self) -> float:
        return self.first_image_ms - self.app_started_ms

    @property
    def slices_per_second(self) -> float:
        return self.slices / max(1e-9, (self.all_slices_ms - self.app_started_ms) / 1000)


def measure(browser: Any, url: str, slices: int, sign_in: str | None, timeout_s: float) -> Load:
    """Open ``url`` in a fresh context; time the first image and every slice."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        if sign_in is not None:
            page = context.new_page()
            page.goto(sign_in)
            page.fill('input[name="username"]', USER)
            page.fill('input[name="password"]', PASSWORD)
            page.click('button[type="submit"]')
            page.wait_for_load_state()
            page.close()
        page = context.new_page()
        page.add_init_script(PAINT_PROBE)
        page.goto(url)
        deadline = time.monotonic() + timeout_s
        progress: dict[str, Any] = {}
        while time.monotonic() < deadline:
            progress = page.evaluate(PROGRESS)
            if progress["pixels"] >= slices and progress["firstImage"] is not None:
                break
            page.wait_for_timeout(250)
        else:
            raise RuntimeError(f"{url}: did not finish: {progress}")
        return Load(
            app_started_ms=progress["appStarted"],
            first_image_ms=progress["firstImage"],
            all_slices_ms=progress["lastPixel"],
            slices=progress["pixels"],
        )
    finally:
        context.close()


def start_nginx_proxy(workdir: Path, orthanc_port: int) -> servers.Server:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "app-config.js").write_text(APP_CONFIG)
    port = servers.free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = NGINX_PROXY_CONF.format(
        user=user, dir=workdir, port=port, root=VIEWER, orthanc=orthanc_port
    )
    (workdir / "nginx.conf").write_text(conf)
    argv = [servers.NGINX_BIN, "-p", str(workdir), "-e", str(workdir / "error.log"),
            "-c", str(workdir / "nginx.conf")]
    proc = servers._spawn(argv, workdir / "nginx.stdout.log", cwd=workdir)
    servers._wait_ready(proc, port, "/index.html", workdir / "error.log", "nginx")
    return servers.Server(label="nginx", kind="nginx", port=port, proc=proc,
                          workdir=workdir, log_path=workdir / "nginx.stdout.log")


def load_series(files: list[Path], tag: str, server: servers.Server) -> str:
    instances = corpus.relabelled(files, tag, patient_prefix=tag.upper()[:8])
    study = corpus.read_ref(instances[0]).study
    conn = Conn(servers.HOST, server.port, server.auth_headers())
    try:
        stow_requests(conn, f"{server.prefix}/studies", stow_bodies(instances, tag), 900)
    finally:
        conn.close()
    return study


def add_user(lightbox: servers.Server, command: str) -> None:
    env = dict(os.environ, LIGHTBOX_DATA=str(lightbox.workdir / "data"))
    done = subprocess.run(
        [*command.split(), "user", "add", USER, "--admin"], input=PASSWORD + "\n", text=True,
        capture_output=True, env=env, cwd=lightbox.workdir, timeout=60, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"user add failed: {done.stderr}")


def summarize(name: str, loads: list[Load]) -> dict[str, float]:
    row = {
        "app_started_ms": statistics.median(x.app_started_ms for x in loads),
        "first_image_ms": statistics.median(x.first_image_ms for x in loads),
        "first_image_after_start_ms": statistics.median(
            x.first_image_after_start_ms for x in loads
        ),
        "all_slices_ms": statistics.median(x.all_slices_ms for x in loads),
        "slices_per_second": statistics.median(x.slices_per_second for x in loads),
    }
    print(
        f"  {name:9s} app started {row['app_started_ms']:7.0f} ms | first image "
        f"{row['first_image_ms']:7.0f} ms ({row['first_image_after_start_ms']:6.0f} after start)"
        f" | all slices {row['all_slices_ms']:8.0f} ms | {row['slices_per_second']:6.1f} slices/s",
        flush=True,
    )
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per page load")
    parser.add_argument("--work", type=Path, default=REPO / "bench-work")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--only", choices=["lightbox", "orthanc"], help="measure one side")
    parser.add_argument("--lightbox-cmd", default=str(REPO / ".venv/bin/lightbox"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (VIEWER / "index.html").exists():
        print(f"viewer not fetched: run `make install` ({VIEWER.relative_to(REPO)})")
        return 2
    from playwright.sync_api import sync_playwright

    args.work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="viewer-", dir=args.work))
    os.environ["LIGHTBOX_VIEWER_DIR"] = str(VIEWER)
    try:
        print(f"generating a {args.slices}-slice 512x512 CT series", flush=True)
        files = corpus.generate(corpus.default_corpus_script(), tmp / "corpus", 1, args.slices, 5)
        lightbox = servers.start_lightbox(tmp / "lightbox", args.lightbox_cmd)
        orthanc = servers.start_orthanc(tmp / "orthanc")
        nginx = start_nginx_proxy(tmp / "nginx", orthanc.port)
        add_user(lightbox, args.lightbox_cmd)
        lb_study = load_series(files, "viewlb", lightbox)
        or_study = load_series(files, "viewor", orthanc)
        root = f"http://{servers.HOST}:{lightbox.port}"
        targets = {
            "orthanc": (f"http://{servers.HOST}:{nginx.port}/viewer?StudyInstanceUIDs={or_study}",
                        None),
            "lightbox": (
                f"{root}/viewer/viewer?StudyInstanceUIDs={lb_study}",
                f"{root}/login",
            ),
        }
        if args.only:
            targets = {args.only: targets[args.only]}
        results: dict[str, list[Load]] = {name: [] for name in targets}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                for round_no in range(args.rounds):
                    order = list(targets) if round_no % 2 == 0 else list(reversed(targets))
                    for name in order:
                        url, sign_in = targets[name]
                        load = measure(browser, url, args.slices, sign_in, args.timeout)
                        results[name].append(load)
                        print(f"  round {round_no + 1} {name}: {load}", flush=True)
            finally:
                browser.close()
        print(f"\nOHIF, {args.slices}-slice 512x512 CT, medians of {args.rounds} rounds:")
        rows = {name: summarize(name, loads) for name, loads in results.items()}
        ratio = None
        if len(rows) == 2:
            ratio = rows["lightbox"]["slices_per_second"] / rows["orthanc"]["slices_per_second"]
            print(f"  slices/s ratio lightbox/orthanc: {ratio:.1f}x")
        out = args.work / "viewer-results.json"
        out.write_text(json.dumps({"slices": args.slices, "rows": rows, "ratio": ratio}, indent=2))
        print(f"  written to {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
        return 0
    finally:
        servers.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
