"""The ``lightbox`` command, run as a user would: as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from tests.conftest import free_port
from tests.factories import ct_dataset, write

LIGHTBOX = [sys.executable, "-m", "lightbox"]


def run(data: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIGHTBOX_DATA": str(data)}
    return subprocess.run(
        [*LIGHTBOX, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120
    )


def study_files(folder: Path, count: int, **kwargs: object) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    first = ct_dataset(**kwargs)  # type: ignore[arg-type]
    files = [write(first, folder / "1.dcm")]
    for n in range(2, count + 1):
        ds = ct_dataset(
            study=first.StudyInstanceUID, series=first.SeriesInstanceUID, instance_number=n
        )
        files.append(write(ds, folder / f"{n}.dcm"))
    return files


def test_import_reports_stored_duplicate_rejected_and_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    study_files(folder / "nested" / "deeper", 3)
    (folder / "notes.txt").write_text("not an image")
    broken = ct_dataset()
    del broken.SOPInstanceUID
    write(broken, folder / "broken.dcm")
    result = run(tmp_path / "data", "import", "--quiet", str(folder))
    assert result.returncode == 1  # something was rejected
    assert "stored 3, duplicate 0, rejected 1, skipped 1" in result.stdout
    assert "notes.txt: not a DICOM file" in result.stdout
    assert "broken.dcm" in result.stdout and "SOPInstanceUID" in result.stdout
    again = run(tmp_path / "data", "import", "--quiet", str(folder / "nested"))
    assert "stored 0, duplicate 3" in again.stdout
    stats = run(tmp_path / "data", "stats")
    assert "instances  3" in stats.stdout and "studies    1" in stats.stdout


def test_import_shows_its_progress(tmp_path: Path) -> None:
    study_files(tmp_path / "in", 5)
    result = run(tmp_path / "data", "import", str(tmp_path / "in"))
    assert result.returncode == 0, result.stderr
    # A running count on stderr (files are found while they are stored: no total).
    assert "importing: 5file" in result.stderr
    assert "stored 5" in result.stdout


def test_import_reads_zip_archives_without_trusting_member_names(tmp_path: Path) -> None:
    files = study_files(tmp_path / "src", 2)
    archive = tmp_path / "cd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(files[0], "../../escape.dcm")
        zf.write(files[1], "/abs/two.dcm")
    result = run(tmp_path / "data", "import", "--quiet", str(archive))
    assert "stored 2" in result.stdout, result.stdout + result.stderr
    assert not (tmp_path / "escape.dcm").exists()


def test_import_skips_what_it_cannot_or_must_not_open_and_says_why(tmp_path: Path) -> None:
    files = study_files(tmp_path / "src", 3)
    os.mkfifo(tmp_path / "pipe.dcm")  # opening it would wait for a writer forever
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        zf.write(files[0], "a.dcm")
    outer = tmp_path / "outer.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(files[1], "series/b.dcm")
        zf.write(inner, "inner.zip")  # a zip in a zip is not opened
        zf.writestr("readme.txt", "not an image")
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w") as zf:
        zf.write(files[2], "c.dcm")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside c.dcm's bytes: its CRC no longer matches
    damaged.write_bytes(bytes(data))
    (tmp_path / "cd").mkdir()
    (tmp_path / "cd" / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + b"\xff" * 40)

    argv = [str(p) for p in (tmp_path / "pipe.dcm", "/dev/zero", outer, damaged,
                             tmp_path / "cd" / "DICOMDIR")]
    result = run(tmp_path / "data", "import", "--quiet", *argv)
    out = result.stdout
    assert "stored 1, duplicate 0, rejected 0, skipped 6" in out, out + result.stderr
    assert f"{tmp_path / 'pipe.dcm'}: not a regular file" in out
    assert "/dev/zero: not a regular file" in out
    assert f"{outer}:inner.zip: a zip archive inside another" in out
    assert f"{outer}:readme.txt: not a DICOM file" in out  # named as the user knows it
    assert f"{damaged}: zip archive cannot be read further: Bad CRC-32" in out
    assert "DICOMDIR: DICOMDIR refers to no file in its folder" in out
    assert "Traceback" not in result.stderr


def test_a_zip_member_larger_than_an_instance_may_be_is_not_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = study_files(tmp_path / "src", 1, size=8)[0]
    big = write(ct_dataset(size=64), tmp_path / "big.dcm")
    assert small.stat().st_size < 4096 < big.stat().st_size
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(small, "small.dcm")
        zf.write(big, "big.dcm")
    monkeypatch.setenv("LIGHTBOX_MAX_INSTANCE_BYTES", "4096")
    result = run(tmp_path / "data", "import", "--quiet", str(archive))
    assert "stored 1, duplicate 0, rejected 0, skipped 1" in result.stdout, result.stdout
    assert f"{archive}:big.dcm: larger than 4,096 bytes" in result.stdout


def test_import_does_not_follow_links_out_of_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    inside = study_files(folder / "series", 2)
    elsewhere = study_files(tmp_path / "elsewhere", 3)  # another patient's study
    (folder / "escape.dcm").symlink_to(elsewhere[0])
    (folder / "escape-folder").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "again.dcm").symlink_to(inside[0])  # within the folder: the same file
    (folder / "series-again").symlink_to(folder / "series", target_is_directory=True)
    (folder / "dangling.dcm").symlink_to(tmp_path / "gone.dcm")
    result = run(tmp_path / "data", "import", "--quiet", str(folder))
    out = result.stdout
    assert "stored 2, duplicate 0, rejected 0, skipped 3" in out, out + result.stderr
    assert f"{folder / 'escape.dcm'}: a link to {elsewhere[0].resolve()}, outside {folder}" in out
    assert f"{folder / 'escape-folder'}: a link to" in out
    assert f"{folder / 'dangling.dcm'}: a link to" in out
    # Named on the command line, a link is what the user asked for.
    named = run(tmp_path / "data", "import", "--quiet", str(folder / "escape.dcm"))
    assert "stored 1, duplicate 0" in named.stdout, named.stdout + named.stderr


def test_import_follows_a_dicomdir(tmp_path: Path) -> None:
    fileset = FileSet()
    for path in study_files(tmp_path / "src", 3):
        ds = dcmread(path)
        ds.StudyID = "1"
        fileset.add(ds)
    media = tmp_path / "cd"
    fileset.write(media)
    result = run(tmp_path / "data", "import", "--quiet", str(media / "DICOMDIR"))
    assert "stored 3" in result.stdout, result.stdout + result.stderr


def test_user_and_token_commands_work_from_the_environment(tmp_path: Path) -> None:
    data = tmp_path / "data"
    added = run(data, "user", "add", "alice", "--admin", stdin="correct horse battery\n")
    assert added.returncode == 0, added.stderr
    duplicate = run(data, "user", "add", "alice", stdin="another password\n")
    assert duplicate.returncode == 2 and "already exists" in duplicate.stderr
    short = run(data, "user", "add", "bob", stdin="short\n")
    assert short.returncode == 2 and "10 characters" in short.stderr
    token = run(data, "token", "create", "--user", "alice", "--expires", "1h")
    assert token.returncode == 0 and token.stdout.strip().startswith("lbx_")
    bad = run(data, "token", "create", "--expires", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_demo_loads_samples_and_serves_them(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "LIGHTBOX_DATA": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [*LIGHTBOX, "demo", "--http-port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        token = ""
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while not token and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "token" in line:
                token = line.rsplit(" ", 1)[-1].strip()
        assert token.startswith("lbx_")
        url = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        found = httpx.get(
            url + "/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert {s["00100020"]["Value"][0] for s in found} == {"LB-DEMO-001", "LB-DEMO-002"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_an_empty_list_says_so_on_stderr_and_prints_no_rows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for command, nothing in ((("node", "list"), "no nodes"), (("token", "list"), "no tokens"),
                             (("user", "list"), "no users"),
                             (("share", "list"), "no share links")):
        done = run(data, *command)
        assert done.returncode == 0, done.stderr
        assert (done.stdout, done.stderr.strip()) == ("", nothing), command
    added = run(data, "node", "add", "pacs", "--aet", "PACS", "--host", "127.0.0.1",
                "--port", "104")
    assert added.returncode == 0, added.stderr
    listed = run(data, "node", "list")
    assert "PACS" in listed.stdout and listed.stderr == ""


def test_a_reader_that_stops_reading_gets_no_traceback(tmp_path: Path) -> None:
    # `lightbox stats | head -1`, with the reader gone before anything is written.
    data = tmp_path / "data"
    assert run(data, "stats").returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([*LIGHTBOX, "stats"], env={**os.environ, "LIGHTBOX_DATA": str(data)},
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert done.stderr == ""
