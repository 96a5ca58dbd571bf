"""Settings as every command reads them: a value that cannot work stops the
command with a message naming the setting, before anything is opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightbox import settings as settings_module
from lightbox.cli.main import main
from tests.conftest import free_port

BAD_VALUES = [
    ("DICOM_ACCEPT_UNKNOWN", "foo",
     "dicom_accept_unknown: 'foo' is not one of loopback, all, none"),
    ("LOG_LEVEL", "loud", "log_level: 'loud' is not one of debug, info, warning"),
    ("SMTP_SECURITY", "maybe", "smtp_security: 'maybe' is not one of starttls, tls, none"),
    ("HTTP_PORT", "70000", "http_port: 70000 is not between 0 and 65,535"),
    ("DICOM_PORT", "-1", "dicom_port: -1 is not between 0 and 65,535"),
    ("SMTP_PORT", "0", "smtp_port: 0 is not between 1 and 65,535"),
    ("DICOM_MAX_PDU", "10", "dicom_max_pdu: 10 is not between 4,096 and 4,294,967,295"),
    ("DICOM_DIMSE_TIMEOUT", "0", "dicom_dimse_timeout: 0 is not between 1 and 86,400"),
    ("QIDO_MAX_RESULTS", "0", "qido_max_results: 0 is not between 1"),
    ("MAX_PARTS", "-5", "max_parts: -5 is not between 1"),
    ("WORKERS", "-1", "workers: -1 is not between 0 and 64"),
    ("WORKERS", "two", "setting workers: 'two' is not valid"),
    ("AET", "A\\B", "setting aet: AE title 'A\\\\B' may hold only printable ASCII"),
    ("AET", "ABCDEFGHIJKLMNOPQ", "setting aet: an AE title needs 1 to 16 characters"),
]


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith(settings_module.ENV_PREFIX):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize(("name", "value", "message"), BAD_VALUES)
def test_a_setting_that_cannot_work_stops_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_environment: pytest.MonkeyPatch,
    name: str, value: str, message: str,
) -> None:
    clean_environment.setenv(settings_module.ENV_PREFIX + name, value)
    data = tmp_path / "data"
    assert main(["stats", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightbox: setting ") and message in err, err
    assert not data.exists()


def test_choices_are_read_whatever_their_case(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("LIGHTBOX_DICOM_ACCEPT_UNKNOWN", " ALL ")
    clean_environment.setenv("LIGHTBOX_LOG_LEVEL", "Warning")
    loaded = settings_module.load()
    assert (loaded.dicom_accept_unknown, loaded.log_level) == (" ALL ", "Warning")
    clean_environment.setenv("LIGHTBOX_PUBLIC_URL", "https://[::1]:8443/pacs/")
    clean_environment.setenv("LIGHTBOX_CORS_ORIGINS", "*, https://viewer.example.org:8443")
    assert settings_module.load().cors_origins == ("*", "https://viewer.example.org:8443")
    clean_environment.setenv("LIGHTBOX_OVERWRITE", "Off")
    clean_environment.setenv("LIGHTBOX_HTTP_PORT", " 8043 ")
    assert not settings_module.load().overwrite
    assert settings_module.load().http_port == 8043


@pytest.mark.parametrize(("text", "message"), [
    ("http_port = 8042.5\n", "setting http_port: 8042.5 is not valid"),
    ("workers = true\n", "setting workers: True is not valid"),
    ('overwrite = "maybe"\n', "setting overwrite: 'maybe' is not true or false"),
    ("aet = [1]\n", "setting aet: [1] is not valid"),
    ("public_url = 2024-01-01\n", "setting public_url: datetime.date(2024, 1, 1) is not valid"),
    ("cors_origins = 5\n", "setting cors_origins: 5 is not valid"),
    ("dicom_port = [104]\n", "setting dicom_port: [104] is not valid"),
    ("max_parts = { n = 1 }\n", "setting max_parts: {'n': 1} is not valid"),
    ('aet = "A\\u0000B"\n', "setting aet: holds a NUL character"),
    ('database = " "\n', "setting database: ' ' is not a database URL"),
    ('database = "mysql://db/x"\n', "setting database: 'mysql' is not supported"),
    ('public_url = "javascript:alert(1)"\n', "setting public_url: 'javascript:alert(1)' is not"),
    ('public_url = "https://images.example.org/?next=x"\n', "is not an http(s) URL"),
    ('public_url = "https://user:pw@images.example.org"\n', "is not an http(s) URL"),
    ('cors_origins = ["https://viewer.example.org/app"]\n', "is not an origin such as"),
    (None, "No such file or directory"),
    ("http_port = \n", "not valid TOML"),
    ("htp_port = 8042\n", "unknown setting 'htp_port'"),
    ("http_port = 99999\n", "http_port: 99999 is not between 0 and 65,535"),
    (b"\xff\xfe", "not valid TOML"),
])
def test_a_config_file_that_cannot_be_read_or_used_stops_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_environment: pytest.MonkeyPatch,
    text: str | bytes | None, message: str,
) -> None:
    config = tmp_path / "lightbox.toml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    elif text is not None:
        config.write_text(text)
    data = tmp_path / "data"
    assert main(["stats", "--config", str(config), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightbox: ") and message in err, err
    assert not data.exists()


def test_an_archive_that_cannot_be_opened_is_named_in_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_environment: pytest.MonkeyPatch,
) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    cases = [
        (["--data", str(a_file)], f"data folder {a_file} is a file, not a folder"),
        (["--data", str(tmp_path / "d1"), "--database",
          f"sqlite:///{tmp_path}/missing/index.sqlite"], "cannot be opened"),
        # Nothing listens on that port; the password is not shown.
        (["--data", str(tmp_path / "d2"), "--database",
          f"postgresql://someone:s3cret@127.0.0.1:{free_port()}/lightbox"],
         "database postgresql://someone:***@127.0.0.1:"),
    ]
    for argv, message in cases:
        assert main(["stats", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lightbox: ") and message in err, err
        assert "s3cret" not in err and "Traceback" not in err
