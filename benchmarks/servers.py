"""Start and stop the servers under test (Orthanc, Lightbox, nginx) on loopback ports.

Every process started here is registered and stopped at interpreter exit (SIGTERM, then
SIGKILL), so an interrupted benchmark leaves nothing running behind it.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ORTHANC_BIN = "Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
NGINX_BIN = "/usr/sbin/nginx"
HOST = "127.0.0.1"
START_TIMEOUT_S = 90.0

_RUNNING: list[subprocess.Popen[bytes]] = []


class ServerError(RuntimeError):
    """A server did not start, or a command around it failed."""


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            # The process leads its own session (start_new_session), so its group id is its
            # pid: this reaches its children (uvicorn or nginx workers) and nothing else.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace_s)
    if proc in _RUNNING:
        _RUNNING.remove(proc)


def stop_all() -> None:
    """Stop every process this module started and that is still registered."""
    for proc in list(reversed(_RUNNING)):
        _stop_process(proc)


atexit.register(stop_all)


def _spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    _RUNNING.append(proc)
    return proc


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _probe(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


def _wait_ready(
    proc: subprocess.Popen[bytes],
    port: int,
    path: str,
    log_path: Path,
    what: str,
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with {proc.returncode}:\n{_log_tail(log_path)}")
        if _probe(port, path) == 200:
            wait_quiet(proc.pid, what)
            return
        time.sleep(0.2)
    _stop_process(proc)
    raise ServerError(
        f"{what} not ready on port {port} after {timeout_s:.0f}s:\n{_log_tail(log_path)}"
    )


@dataclass
class Server:
    """A running HTTP server under test."""

    label: str
    kind: str  # "orthanc", "lightbox" or "nginx"
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    prefix: str = ""  # path prefix of the DICOMweb root, e.g. "/dicom-web"
    token: str | None = None
    info: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}{self.prefix}"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        _stop_process(self.proc)


# --------------------------------------------------------------------------- Orthanc


def orthanc_version() -> str:
    try:
        out = subprocess.run(
            [ORTHANC_BIN, "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def start_orthanc(workdir: Path, label: str = "orthanc") -> Server:
    """Orthanc with the DICOMweb plugin, SQLite index and fsync'ed storage, in ``workdir``."""
    if shutil.which(ORTHANC_BIN) is None:
        raise ServerError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    if not Path(ORTHANC_DICOMWEB_PLUGIN).exists():
        raise ServerError(f"DICOMweb plugin missing: {ORTHANC_DICOMWEB_PLUGIN}")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": f"bench-{label}",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "BENCH",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        # Durability on: Orthanc fsyncs every stored file (Lightbox always does).
        "SyncStorageArea": True,
        "StorageCompression": False,
        # Orthanc gzips responses by default when asked; the clients here never ask, and
        # switching it off keeps the comparison about storage and DICOM work.
        "HttpCompressionEnabled": False,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "SaveJobs": False,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    proc = _spawn([ORTHANC_BIN, str(cfg_path)], log_path, cwd=workdir)
    _wait_ready(proc, http_port, "/system", log_path, f"Orthanc ({label})")
    return Server(
        label=label,
        kind="orthanc",
        port=http_port,
        proc=proc,
        workdir=workdir,
        log_path=log_path,
        prefix="/dicom-web",
        info={"version": orthanc_version()},
    )


# --------------------------------------------------------------------------- Lightbox


def start_lightbox(
    workdir: Path, command: str, database: str | None = None, label: str = "lightbox"
) -> Server:
    """``lightbox serve`` on a free port with its data in ``workdir``, plus a bearer token."""
    argv0 = shlex.split(command)
    if not argv0 or shutil.which(argv0[0]) is None:
        raise ServerError(f"Lightbox command not found: {command!r} (see --lightbox-cmd)")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    argv = [
        *argv0,
        "serve",
        "--data",
        str(data),
        "--host",
        HOST,
        "--http-port",
        str(http_port),
        "--dicom-port",
        "0",
    ]
    env = dict(os.environ, LIGHTBOX_DATA=str(data))
    if database:
        argv += ["--database", database]
        env["LIGHTBOX_DATABASE"] = database
    log_path = workdir / "lightbox.log"
    proc = _spawn(argv, log_path, env=env, cwd=workdir)
    _wait_ready(proc, http_port, "/healthz", log_path, f"Lightbox ({label})")
    try:
        done = subprocess.run(
            [*argv0, "token", "create"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=workdir,
        )
    except subprocess.TimeoutExpired as exc:
        _stop_process(proc)
        raise ServerError("`lightbox token create` timed out") from exc
    lines = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
    if done.returncode != 0 or not lines:
        _stop_process(proc)
        raise ServerError(
            f"`lightbox token create` failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return Server(
        label=label,
        kind="lightbox",
        port=http_port,
        proc=proc,
        workdir=workdir,
        log_path=log_path,
        prefix="/dicom-web",
        token=lines[-1],
        info={"command": command, "database": database or "sqlite"},
    )


# --------------------------------------------------------------------------- nginx

NGINX_CONF = """\
daemon off;
master_process on;
{user}worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 256;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    types {{ }}
    server {{
        listen {host}:{port} backlog=512;
        root {root};
        location / {{ }}
    }}
}}
"""


def nginx_version() -> str:
    try:
        out = subprocess.run(
            [NGINX_BIN, "-v"], capture_output=True, text=True, timeout=20, check=False
        ).stderr
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().split(":", 1)[-1].strip() or "unknown"


def start_nginx(workdir: Path, root: Path, probe_path: str, workers: int = 2) -> Server:
    """nginx serving ``root`` as static files (sendfile, keep-alive), no logging."""
    if not Path(NGINX_BIN).exists():
        raise ServerError(f"nginx not found at {NGINX_BIN} (apt-get install nginx-light)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # As root the workers would drop to 'nobody', which may not read the temp dirs.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = NGINX_CONF.format(
        user=user, workers=workers, dir=workdir, host=HOST, port=port, root=root
    )
    conf_path = workdir / "nginx.conf"
    conf_path.write_text(conf)
    log_path = workdir / "nginx.stdout.log"
    argv = [NGINX_BIN, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf_path)]
    proc = _spawn(argv, log_path, cwd=workdir)
    _wait_ready(proc, port, probe_path, workdir / "error.log", "nginx")
    return Server(
        label="nginx",
        kind="nginx",
        port=port,
        proc=proc,
        workdir=workdir,
        log_path=log_path,
        info={"version": nginx_version()},
    )


# --------------------------------------------------------------------------- memory


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            kids.extend(int(k) for k in text)
    except OSError:
        pass
    return kids


def process_tree(pid: int, limit: int = 256) -> list[int]:
    """``pid`` and its descendants (bounded)."""
    seen: list[int] = []
    todo = [pid]
    while todo and len(seen) < limit:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.append(cur)
        todo.extend(_children(cur))
    return seen


def _status_kb(pid: int, key: str, table: str = "status") -> int:
    """The ``key: N kB`` line of ``/proc/<pid>/<table>``, in KiB (0 if absent)."""
    try:
        for line in Path(f"/proc/{pid}/{table}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` and its descendants, in KiB."""
    return sum(_status_kb(p, "VmRSS") for p in process_tree(pid))


def pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` and its descendants, in KiB: a page shared
    by n processes (a library, say) counts 1/n in each, so the sum counts it once."""
    return sum(_status_kb(p, "Pss", "smaps_rollup") for p in process_tree(pid))


def hwm_kb(pid: int) -> int:
    """Peak resident set size (VmHWM) of ``pid`` and its descendants, in KiB."""
    return sum(_status_kb(p, "VmHWM") for p in process_tree(pid))


def largest_kb(pid: int, key: str = "VmRSS") -> int:
    """The largest ``key`` (VmRSS, VmHWM) of one process among ``pid`` and its
    descendants, in KiB."""
    return max((_status_kb(p, key) for p in process_tree(pid)), default=0)


def cpu_ticks(pid: int) -> int:
    """CPU time (user + system, in clock ticks) of ``pid`` and its descendants."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total


def wait_quiet(pid: int, what: str, window_s: float = 0.5, busy: float = 0.05,
               timeout_s: float = 30.0) -> bool:
    """Wait until ``pid``'s process tree is idle: under ``busy`` of one core over
    ``window_s``. A server answering its readiness probe may still be starting
    worker or helper processes; timing must not start before they are done.
    False, said on the console, if ``what`` was still busy after ``timeout_s``
    (timing then starts anyway)."""
    tick = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu_ticks(pid)
        time.sleep(window_s)
        if (cpu_ticks(pid) - before) / tick < busy * window_s:
            return True
    print(f"note: {what} was still busy {timeout_s:.0f} s after it became ready", flush=True)
    return False


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs '5'); False where not allowed."""
    ok = True
    for p in process_tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok
