"""Settings: defaults, then a TOML file, then LIGHTBOX_* environment, then flags."""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from lightbox.dicom.node import Node, as_tables, declared_nodes, require_ae_title
from lightbox.errors import BadRequest

ENV_PREFIX = "LIGHTBOX_"


@dataclass(frozen=True)
class Settings:
    """Everything that configures one Lightbox process."""

    data: Path = Path("lightbox-data")
    database: str = ""  # empty: SQLite inside ``data``
    host: str = "127.0.0.1"
    http_port: int = 8042
    dicom_port: int = 11112
    aet: str = "LIGHTBOX"
    # DIMSE: who may call ("loopback": unknown callers from 127.0.0.1/::1 may echo
    # and store; "all": unknown callers from anywhere may; "none": known nodes only).
    dicom_accept_unknown: str = "loopback"
    dicom_acse_timeout: int = 30  # seconds to wait for association messages
    dicom_dimse_timeout: int = 60  # seconds to wait for a DIMSE response
    dicom_network_timeout: int = 120  # seconds an association may stay idle
    dicom_connection_timeout: int = 10  # seconds to connect to a peer (SCU)
    dicom_max_associations: int = 32
    dicom_max_pdu: int = 1024 * 1024  # largest PDU we accept, in bytes
    dicom_find_max_results: int = 10_000  # C-FIND matches returned per request
    # Known nodes declared here ([nodes.NAME] tables in the config file, or
    # LIGHTBOX_NODES as a JSON object of the same tables), besides those that
    # `lightbox node add` registers in the index.
    nodes: tuple[Node, ...] = field(default_factory=tuple)
    tls_cert: str = ""  # PEM certificate chain: DICOM TLS on dicom_port when set
    tls_key: str = ""  # PEM private key of tls_cert
    tls_ca: str = ""  # PEM CA bundle: verify peers' certificates (SCP: require one)
    public_url: str = ""  # e.g. https://images.example.org when behind a proxy
    # HTTPS on http_port when both are set (PEM files); HSTS and Secure cookies follow.
    https_cert: str = ""
    https_key: str = ""
    # Invitations by e-mail. Without smtp_host the inviter is shown the link to pass on.
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_security: str = "starttls"  # starttls, tls (implicit) or none
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_from: str = ""  # the sender address, e.g. lightbox@hospital.example
    # Single sign-on with OpenID Connect. Empty oidc_issuer: SSO off.
    oidc_issuer: str = ""  # e.g. https://login.hospital.example/realms/staff
    oidc_client_id: str = ""
    oidc_client_secret: str = ""  # empty: a public client (PKCE only)
    oidc_scopes: str = "openid email profile"
    oidc_username_claim: str = "preferred_username"  # then "email", then "sub"
    oidc_organisation: str = ""  # new SSO users join it; empty: the default one
    oidc_create_users: bool = True  # first sign-in makes a member without a password
    oidc_button: str = "Sign in with your organisation account"
    overwrite: bool = False
    qido_max_results: int = 1000
    max_upload_bytes: int = 8 * 1024**3
    max_instance_bytes: int = 4 * 1024**3
    max_parts: int = 100_000
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    workers: int = 0  # HTTP worker processes; 0: one per core, at most 4
    log_level: str = "info"
    # Audit messages (DICOM PS3.15 / IHE ATNA) also go to this syslog collector:
    # udp://host:port or tcp://host:port. Empty: kept in the index only.
    audit_syslog: str = ""
    # The unpacked OHIF build served under /viewer/ (fetched by `make install`).
    viewer_dir: Path = Path(".viewer/ohif-3.13.2")

    @property
    def database_url(self) -> str:
        if self.database:
            return self.database
        return f"sqlite:///{self.data.resolve() / 'index.sqlite'}"

    @property
    def http_workers(self) -> int:
        if self.workers > 0:
            return self.workers
        return max(1, min(os.cpu_count() or 1, 4))

    @property
    def blob_root(self) -> Path:
        return self.data / "blobs"


def environment(settings: Settings) -> dict[str, str]:
    """Every setting as a LIGHTBOX_* variable, as ``load`` reads them back."""
    out = {}
    for item in fields(settings):
        value = getattr(settings, item.name)
        if item.name == "nodes":
            value = json.dumps(as_tables(value))
        elif isinstance(value, tuple):
            value = ",".join(value)
        out[ENV_PREFIX + item.name.upper()] = str(value)
    return out


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """A setting's value as its field holds it, from TOML's types or the
    environment's text; BadRequest for one of another kind (a fraction for a
    port, a word that is not yes or no, a list for a path)."""
    if isinstance(value, str) and "\x00" in value:
        raise BadRequest(f"setting {name}: holds a NUL character")
    if kind in (int, "int"):
        return _integer(name, value)
    if kind in (bool, "bool"):
        return _switch(name, value)
    if kind == "tuple[Node, ...]":
        return declared_nodes(_json_tables(name, value) if isinstance(value, str) else value)
    if kind in ("tuple[str, ...]",):
        if isinstance(value, list | tuple):
            return tuple(str(v) for v in value)
        if not isinstance(value, str):
            raise _wrong(name, value)
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if not isinstance(value, str | int | os.PathLike) or isinstance(value, bool):
        raise _wrong(name, value)  # a table, a list, a date or a fraction for text or a path
    text = str(os.fspath(value)) if isinstance(value, os.PathLike) else str(value)
    return Path(text) if kind in (Path, "Path") else text


def _wrong(name: str, value: Any) -> BadRequest:
    return BadRequest(f"setting {name}: {value!r} is not valid")


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _wrong(name, value)
    try:
        return int(value)
    except ValueError as exc:
        raise _wrong(name, value) from exc


def _switch(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _TRUE + _FALSE:
        raise BadRequest(f"setting {name}: {value!r} is not true or false")
    return text in _TRUE


def _json_tables(name: str, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise BadRequest(f"setting {name}: not a JSON object of node tables: {exc}") from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise BadRequest(f"config file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"config file {path}: not valid TOML: {exc}") from exc


def load(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build Settings from the layers, each overriding the one before."""
    values: dict[str, Any] = {}
    known = {f.name: f.type for f in fields(Settings)}
    path = config_file or (
        Path(os.environ[f"{ENV_PREFIX}CONFIG"]) if f"{ENV_PREFIX}CONFIG" in os.environ else None
    )
    if path is not None:
        for key, value in _read_toml(path).items():
            key = key.replace("-", "_")
            if key not in known:
                raise BadRequest(f"{path}: unknown setting {key!r}")
            values[key] = value
    for key in known:
        env = os.environ.get(ENV_PREFIX + key.upper())
        if env is not None:
            values[key] = env
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    coerced = {k: _coerce(k, known[k], v) for k, v in values.items()}
    for key, value in coerced.items():
        _check(key, value)
    return replace(Settings(), **coerced)


# Settings with a few allowed values (the first ones are named in messages; the
# rest are accepted spellings) and numbers with bounds, checked as they are
# read so that a typo stops the command that read them, not a process later.
# dicom_accept_unknown's values, and the switch-like spellings taken for two of them.
ACCEPT_UNKNOWN = {"loopback": "loopback", "all": "all", "none": "none",
                  "true": "all", "yes": "all", "1": "all", "false": "none", "no": "none",
                  "0": "none"}
SMTP_SECURITY = ("starttls", "tls", "none")
_CHOICES = {
    "dicom_accept_unknown": tuple(ACCEPT_UNKNOWN),
    "smtp_security": SMTP_SECURITY,
    "log_level": ("debug", "info", "warning", "error", "critical"),
}
_NAMED_CHOICES = {"dicom_accept_unknown": 3}
_PORT = (0, 65535)
_BOUNDS = {
    "http_port": _PORT, "dicom_port": _PORT, "smtp_port": (1, 65535), "workers": (0, 64),
    "dicom_acse_timeout": (1, 86_400), "dicom_dimse_timeout": (1, 86_400),
    "dicom_network_timeout": (1, 86_400), "dicom_connection_timeout": (1, 86_400),
    "dicom_max_associations": (1, 10_000), "dicom_max_pdu": (4096, 2**32 - 1),
    "dicom_find_max_results": (1, 10**9), "qido_max_results": (1, 10**9),
    "max_upload_bytes": (1, 2**63 - 1), "max_instance_bytes": (1, 2**63 - 1),
    "max_parts": (1, 10**9),
}


def _check(name: str, value: Any) -> None:
    if name == "database" and value:
        _check_database(value)
    if name == "public_url" and value:
        _check_url(name, value, path=True)
    if name == "cors_origins":
        for origin in value:
            if origin != "*":
                _check_url(name, origin, path=False)
    if name == "aet":
        try:
            require_ae_title(value)
        except BadRequest as exc:
            raise BadRequest(f"setting aet: {exc.message}") from exc
    choices = _CHOICES.get(name)
    if choices is not None and str(value).strip().lower() not in choices:
        named = choices[:_NAMED_CHOICES.get(name, len(choices))]
        raise BadRequest(f"setting {name}: {value!r} is not one of {', '.join(named)}")
    bounds = _BOUNDS.get(name)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise BadRequest(f"setting {name}: {value} is not between {bounds[0]:,} and "
                         f"{bounds[1]:,}")


def _check_database(url: str) -> None:
    """An SQLAlchemy URL of a database Lightbox runs on (SQLite or PostgreSQL)."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError as exc:
        raise BadRequest(f"setting database: {url!r} is not a database URL "
                         "(postgresql://user@host/name, or empty for SQLite)") from exc
    if backend not in ("sqlite", "postgresql"):
        raise BadRequest(f"setting database: {backend!r} is not supported "
                         "(postgresql://…, or empty for SQLite in the data folder)")


def _check_url(name: str, value: str, *, path: bool) -> None:
    """An http(s) URL of a host: with a path for ``public_url``, as a bare origin
    (``https://viewer.example.org``) for ``cors_origins``."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"setting {name}: {value!r} is not a URL: {exc}") from exc
    what = "an http(s) URL such as https://images.example.org" if path else (
        "an origin such as https://viewer.example.org (scheme, host and port only)")
    bad = (parts.scheme not in ("http", "https") or not parts.hostname
           or parts.username is not None or parts.query or parts.fragment
           or (not path and parts.path not in ("", "/"))
           or any(ch.isspace() or ch in "<>\"'\\" for ch in value))
    if bad or (port is not None and not 1 <= port <= 65535):
        raise BadRequest(f"setting {name}: {value!r} is not {what}")
