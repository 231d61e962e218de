#!/usr/bin/env bash
# Fetch the demo footage: vtest.avi (768x576, 795 frames, pedestrians) from
# Debian's opencv-doc package (Apache-2.0 / BSD-3-Clause). Extracts just that
# file from the .deb; installs nothing. Usage: scripts/fetch_footage.sh [DIR]
set -euo pipefail
dest=${1:-clips}
want=45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf
out="$dest/vtest.avi"
if [ -f "$out" ]; then exit 0; fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download opencv-doc >/dev/null 2>&1; then
  echo "fetch_footage: refreshing apt lists" >&2
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
  apt-get download opencv-doc >/dev/null
fi
dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -x ./usr/share/doc/opencv-doc/examples/data/vtest.avi
cd - >/dev/null
got=$(sha256sum "$tmp/usr/share/doc/opencv-doc/examples/data/vtest.avi" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
  echo "fetch_footage: vtest.avi has sha256 $got, expected $want" >&2
  exit 1
fi
mv "$tmp/usr/share/doc/opencv-doc/examples/data/vtest.avi" "$out.part"
mv "$out.part" "$out"
echo "fetch_footage: $out"
