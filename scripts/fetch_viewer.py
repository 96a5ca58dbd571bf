"""Fetch the prebuilt OHIF viewer from the npm registry into ``.viewer/``.

Usage: ``python scripts/fetch_viewer.py [--dest DIR]``

The package ``@ohif/app`` is pinned to one version and its tarball is checked
against the pinned sha512 integrity before anything is unpacked. Only
``package/dist`` is extracted, into a temporary folder next to the target that
is renamed into place once complete, so an interrupted run never leaves a
half-unpacked viewer behind. Running it again when the viewer is present does
nothing. Needs ``npm`` (it downloads through npm so that the user's registry,
proxy and cache settings apply).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

PACKAGE = "@ohif/app"
VERSION = "3.13.2"
INTEGRITY = (
    "sha512-"
    "WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / ".viewer" / f"ohif-{VERSION}"
PREFIX = PurePosixPath("package/dist")
# Written last: its presence means every file before it was unpacked.
COMPLETE_MARK = ".complete"


class FetchError(Exception):
    """Why the viewer could not be fetched, in words for the person at the terminal."""


def is_complete(dest: Path) -> bool:
    return (dest / COMPLETE_MARK).is_file() and (dest / "index.html").is_file()


def download(workdir: Path) -> Path:
    """The package tarball, fetched with ``npm pack`` into ``workdir``."""
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(
            "npm is not installed: it is needed to fetch the OHIF viewer "
            "(Debian/Ubuntu: apt-get install npm)"
        )
    done = subprocess.run(
        [npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(workdir), "--silent"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise FetchError(f"npm pack {PACKAGE}@{VERSION} failed:\n{done.stderr.strip()}")
    found = sorted(workdir.glob("*.tgz"))
    if len(found) != 1:
        raise FetchError(f"npm pack left {len(found)} tarballs, expected one")
    return found[0]


def verify(tarball: Path, integrity: str = INTEGRITY) -> None:
    """Refuse a tarball whose sha512 differs from the pinned integrity."""
    algorithm, _, expected = integrity.partition("-")
    digest = hashlib.new(algorithm)
    with open(tarball, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    got = base64.b64encode(digest.digest()).decode()
    if got != expected:
        raise FetchError(
            f"{tarball.name}: integrity mismatch, refusing to unpack\n"
            f"  expected {integrity}\n  got      {algorithm}-{got}"
        )


def _target(member: tarfile.TarInfo) -> PurePosixPath | None:
    """Where a member goes inside dist, or None if it is outside dist.

    Raises FetchError for anything that could escape the folder or is not a
    plain file or directory.
    """
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or "\\" in member.name:
        raise FetchError(f"unsafe path in tarball: {member.name!r}")
    try:
        relative = name.relative_to(PREFIX)
    except ValueError:
        return None
    if not (member.isfile() or member.isdir()):
        raise FetchError(f"refusing non-regular entry in tarball: {member.name!r}")
    return relative


def extract(tarball: Path, into: Path) -> int:
    """Unpack ``package/dist`` of ``tarball`` into the empty folder ``into``."""
    count = 0
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            relative = _target(member)
            if relative is None or relative == PurePosixPath("."):
                continue
            out = into.joinpath(*relative.parts)
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            if source is None:
                raise FetchError(f"cannot read {member.name!r} from tarball")
            with source, open(out, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            count += 1
    if count == 0 or not (into / "index.html").is_file():
        raise FetchError(f"{tarball.name} has no {PREFIX}/index.html")
    (into / COMPLETE_MARK).write_text(f"{PACKAGE}@{VERSION}\n{INTEGRITY}\n")
    return count


def fetch(dest: Path = DEFAULT_DEST) -> bool:
    """Make sure the viewer is unpacked at ``dest``; True if it was fetched now."""
    if is_complete(dest):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        work = Path(tmp)
        tarball = download(work)
        verify(tarball)
        staged = work / "dist"
        staged.mkdir()
        count = extract(tarball, staged)
        if dest.exists():  # an incomplete earlier attempt (no completion mark)
            shutil.rmtree(dest)
        staged.rename(dest)
    print(f"{PACKAGE}@{VERSION}: {count} files in {dest}")
    return True


def compress(dest: Path) -> None:
    """Compress the build's text files once, for every server process to send
    (a no-op for files already done)."""
    try:
        from lightbox.web.viewer_build import ViewerBuild
    except ImportError:
        return  # not installed into this Python: the server compresses on first use
    count = ViewerBuild(dest).prepare()
    print(f"{count} viewer files compressed for serving")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"Fetch {PACKAGE}@{VERSION} (prebuilt OHIF).")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="target folder")
    args = parser.parse_args(argv)
    try:
        if not fetch(args.dest):
            print(f"{PACKAGE}@{VERSION} already in {args.dest}")
        compress(args.dest)
    except FetchError as exc:
        print(f"fetch_viewer: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
