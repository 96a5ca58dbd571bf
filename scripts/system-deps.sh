#!/usr/bin/env bash
# Debian packages the tests and benchmarks talk to: DICOM peers, a static server
# and the browser that drives the viewer tests.
# Installs only what is missing; needs root (or sudo) the first time.
set -euo pipefail
packages=(dcmtk orthanc orthanc-dicomweb nginx-light chromium fonts-dejavu-core unzip)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm fetches the viewer (make install); any npm will do, Debian's if there is none.
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
# Package scripts may try to start services; we run our own instances.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
