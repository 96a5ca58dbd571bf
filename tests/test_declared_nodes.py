"""Known nodes declared in the settings (the config file's ``[nodes.NAME]`` tables,
or ``LIGHTBOX_NODES``) next to those ``lightbox node add`` registers: read,
checked, listed, trusted as callers, used as C-MOVE destinations, and checked
by ``lightbox serve`` before it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from lightbox import settings as settings_module
from lightbox.archive import Archive
from lightbox.cli.main import main
from lightbox.dicom.node import Node, declared_nodes
from lightbox.errors import BadRequest
from lightbox.services import auth, nodes
from lightbox.services.ingest import Offer, Status, store_instances
from tests.conftest import free_port
from tests.dimse_peers import dcmtk, make_corpus, scp, storescp, with_settings
from tests.test_dimse_cli import _wait_port

CONFIG = """
dicom_accept_unknown = "none"

[nodes.pacs]
aet = "PACS"
host = "pacs.hospital.example"
port = 104
tls = true

[nodes.reading-room]
aet = "VIEWER"
host = "10.1.2.3"
port = 11112
user = "radiologist"
"""


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lightbox.toml"
    path.write_text(text)
    return path


def test_node_tables_in_the_config_file_are_nodes_and_survive_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith(settings_module.ENV_PREFIX):
            monkeypatch.delenv(key)
    loaded = settings_module.load(_config(tmp_path, CONFIG))
    assert loaded.nodes == (
        Node("pacs", "PACS", "pacs.hospital.example", 104, tls=True),
        Node("reading-room", "VIEWER", "10.1.2.3", 11112, acts_as="radiologist"),
    )
    assert all(node.declared for node in loaded.nodes)
    assert [str(node) for node in loaded.nodes] == [
        "pacs: PACS@pacs.hospital.example:104 (TLS) [settings]",
        "reading-room: VIEWER@10.1.2.3:11112 as user radiologist [settings]",
    ]
    # Processes started with these settings read them back from the environment.
    for key, value in settings_module.environment(loaded).items():
        monkeypatch.setenv(key, value)
    assert settings_module.load().nodes == loaded.nodes
    monkeypatch.setenv("LIGHTBOX_NODES", '{"ct": {"aet": "CT01", "host": "::1", "port": 4242}}')
    assert settings_module.load().nodes == (Node("ct", "CT01", "::1", 4242),)


BAD_TABLES = [
    ('[nodes.pacs]\naet = "PACS"\nhost = "h"\nport = 104\nhots = "x"\n',
     "setting nodes.pacs: unknown key 'hots'"),
    ('[nodes.pacs]\naet = "PACS"\nhost = "h"\n', "setting nodes.pacs: 'port' is missing"),
    ('[nodes.pacs]\naet = "PACS"\nhost = "h"\nport = "104"\n', "'port' must be a whole number"),
    ('[nodes.pacs]\naet = "PACS"\nhost = "h"\nport = 0\n', "a port is between 1 and 65535"),
    ('[nodes.pacs]\naet = "PACS"\nhost = "h"\nport = 104\ntls = "yes"\n',
     "'tls' must be true or false"),
    ('[nodes.pacs]\naet = "A\\\\B"\nhost = "h"\nport = 104\n', "without backslash"),
    ('[nodes.pacs]\naet = "ABCDEFGHIJKLMNOPQ"\nhost = "h"\nport = 104\n',
     "1 to 16 characters"),
    ('[nodes.pacs]\naet = 7\nhost = "h"\nport = 104\n', "'aet' must be a string"),
    ('[nodes.pacs]\naet = "PACS"\nhost = "a b"\nport = 104\n', "not a host name"),
    ('[nodes."pa cs"]\naet = "PACS"\nhost = "h"\nport = 104\n', "a node name needs"),
    ('nodes = ["pacs"]\n', "expected [nodes.NAME] tables"),
    ("nodes = { pacs = 1 }\n", "setting nodes.pacs: expected a table"),
    ("[nodes.pacs\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TABLES)
def test_a_bad_node_table_stops_the_command_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    data = tmp_path / "data"
    code = main(["node", "list", "--config", str(_config(tmp_path, text)), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lightbox: ") and message in err, err
    assert not data.exists()  # refused before anything was opened


def test_a_bad_lightbox_nodes_variable_is_refused() -> None:
    with pytest.raises(BadRequest, match="not a JSON object of node tables"):
        settings_module.load(overrides={"nodes": '{"ct": '})
    with pytest.raises(BadRequest, match=r"setting nodes\.ct: 'host' is missing"):
        settings_module.load(overrides={"nodes": '{"ct": {"aet": "CT", "port": 1}}'})


def test_declared_and_registered_nodes_are_listed_together(
    archive: Archive, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, CONFIG)

    def run(*argv: str, with_config: bool = True) -> tuple[int, str]:
        extra = ["--config", str(config)] if with_config else []
        code = main([*argv, *extra, "--data", str(archive.settings.data),
                     "--database", archive.settings.database_url])
        out = capsys.readouterr()
        return code, out.out + out.err

    # Registered before the config file named a node "pacs" too.
    assert run("node", "add", "pacs", "--aet", "OLDPACS", "--host", "10.9.9.9", "--port", "104",
               with_config=False)[0] == 0
    assert run("node", "add", "ct", "--aet", "CT01", "--host", "10.0.0.7",
               "--port", "11112")[0] == 0
    code, listed = run("node", "list")
    assert code == 0
    assert listed.splitlines() == [
        "ct: CT01@10.0.0.7:11112",
        "pacs: PACS@pacs.hospital.example:104 (TLS) [settings]",
        "reading-room: VIEWER@10.1.2.3:11112 as user radiologist [settings]",
    ]
    code, message = run("node", "add", "reading-room", "--aet", "X", "--host", "h", "--port", "1")
    assert code == 2 and "is declared in the settings" in message
    code, message = run("node", "remove", "pacs")
    assert code == 2 and "remove it from the config file" in message
    # Without the config file the registered "pacs" is there again, untouched.
    assert run("node", "list", with_config=False)[1].splitlines() == [
        "ct: CT01@10.0.0.7:11112", "pacs: OLDPACS@10.9.9.9:104"]
    assert run("node", "remove", "ct")[0] == 0

    declared = with_settings(archive, nodes=declared_nodes(
        {"pacs": {"aet": "PACS", "host": "pacs.hospital.example", "port": 104}}))
    assert nodes.get_node(declared, "pacs").ae_title == "PACS"
    assert nodes.nodes_with_ae_title(declared, "OLDPACS") == []  # hidden by the declared one
    assert [n.name for n in nodes.nodes_with_ae_title(declared, " PACS ")] == ["pacs"]
    assert nodes.shadowed(declared) == ["pacs"]


def test_declared_nodes_may_call_and_receive_when_unknown_callers_may_not(
    archive: Archive, tmp_path: Path
) -> None:
    files = make_corpus(tmp_path / "corpus", "--slices", "2", "--size", "32", "--seed", "7")
    assert all(o.status is Status.STORED
               for o in store_instances(archive, [Offer(f, "test") for f in files]))
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    auth.add_user(archive, "outsider", None, is_admin=False)  # sees no study
    with storescp(tmp_path / "received") as peer_port:
        declared = with_settings(archive, dicom_accept_unknown="none", nodes=declared_nodes({
            "finder": {"aet": "FINDSCU", "host": "127.0.0.1", "port": 1},
            "limited": {"aet": "LIMITED", "host": "127.0.0.1", "port": 1, "user": "outsider"},
            "viewer": {"aet": "STORESCP", "host": "127.0.0.1", "port": peer_port},
        }))
        with scp(declared) as server:
            port = str(server.port)

            def find(calling: str) -> str:
                done = dcmtk("findscu", "-v", "-S", "-aet", calling, "-aec", "LIGHTBOX",
                             "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                             "127.0.0.1", port, check=False)
                return done.stdout + done.stderr

            assert study_uid in find("FINDSCU")
            limited = find("LIMITED")
            assert "Association Accepted" in limited and study_uid not in limited
            assert "Calling AE Title Not Recognized" in find("STRANGER")

            dcmtk("movescu", "-S", "-aet", "FINDSCU", "-aec", "LIGHTBOX", "-aem", "STORESCP",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                  "127.0.0.1", port)
    received = {pydicom.dcmread(f).SOPInstanceUID for f in (tmp_path / "received").iterdir()}
    assert received == {pydicom.dcmread(f).SOPInstanceUID for f in files}


def _serve(tmp_path: Path, config: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "lightbox", "serve", "--config", str(config),
            "--data", str(tmp_path / "data"), "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTBOX_")}
    log = (tmp_path / "serve.log").open("wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def test_serve_uses_the_nodes_of_its_config_file(tmp_path: Path) -> None:
    http_port, dicom_port = free_port(), free_port()
    main(["node", "add", "echoer", "--aet", "OLDECHO", "--host", "127.0.0.1", "--port", "1",
          "--data", str(tmp_path / "data")])
    config = _config(tmp_path, f"""
http_port = {http_port}
dicom_port = {dicom_port}
dicom_accept_unknown = "none"

[nodes.echoer]
aet = "ECHOER"
host = "127.0.0.1"
port = 1
""")
    proc = _serve(tmp_path, config)
    try:
        _wait_port(dicom_port, proc)
        _wait_port(http_port, proc)
        dcmtk("echoscu", "-aet", "ECHOER", "-aec", "LIGHTBOX", "127.0.0.1", str(dicom_port))
        for stranger in ("OLDECHO", "STRANGER"):  # the hidden registered node, and nobody
            done = dcmtk("echoscu", "-aet", stranger, "-aec", "LIGHTBOX", "127.0.0.1",
                         str(dicom_port), check=False)
            assert done.returncode != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output
    assert "node 'echoer' declared in the settings hides the registered node" in output
    assert "from ECHOER@127.0.0.1" in output and "rejected" in output


def test_serve_refuses_a_declared_node_acting_as_nobody(tmp_path: Path) -> None:
    config = _config(tmp_path, f"""
http_port = {free_port()}
dicom_port = {free_port()}

[nodes.reading-room]
aet = "VIEWER"
host = "127.0.0.1"
port = 11112
user = "radiologist"
""")
    proc = _serve(tmp_path, config)
    code = proc.wait(timeout=60)
    output = (tmp_path / "serve.log").read_text()
    assert code == 2, output
    assert ("lightbox: node 'reading-room' in the settings acts as user 'radiologist', "
            "who does not exist") in output
