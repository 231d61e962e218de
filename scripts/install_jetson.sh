#!/usr/bin/env bash
# Install jetagent on a Jetson (JetPack 6: Python 3.10, TensorRT 10.x, GStreamer OpenCV).
#   sudo scripts/install_jetson.sh [--config FILE] [--no-start]
# The venv sees JetPack's own tensorrt, pycuda and GStreamer-enabled cv2
# (--system-site-packages); pip's OpenCV is NOT installed because it has no
# GStreamer, and numpy stays < 2 because JetPack's cv2 does not import under NumPy 2.
set -euo pipefail
prefix=/opt/jetagent
config=""
start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    *) echo "usage: $0 [--config FILE] [--no-start]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "install_jetson: run as root (sudo)" >&2; exit 1; }
src=$(cd "$(dirname "$0")/.." && pwd)
python3 - <<'PY' || { echo "install_jetson: Python 3.10 or later is required (JetPack 6)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
for mod in tensorrt cv2; do
  python3 -c "import $mod" 2>/dev/null || echo "install_jetson: warning: system python has no '$mod' (install JetPack's python3-libnvinfer / python3-opencv); the agent will fall back to ONNX Runtime on the CPU" >&2
done
id jetagent >/dev/null 2>&1 || useradd --system --home-dir /var/lib/jetagent --shell /usr/sbin/nologin jetagent
for g in video render; do getent group "$g" >/dev/null && usermod -aG "$g" jetagent; done
python3 -m venv --system-site-packages "$prefix/venv"
"$prefix/venv/bin/pip" install -q --upgrade pip
"$prefix/venv/bin/pip" install -q "numpy<2" "$src"
mkdir -p "$prefix/docs" /etc/jetagent
cp -r "$src/docs/." "$prefix/docs/" 2>/dev/null || true
if [ -n "$config" ]; then
  install -m 0640 -g jetagent "$config" /etc/jetagent/agent.toml
elif [ ! -f /etc/jetagent/agent.toml ]; then
  echo "install_jetson: no /etc/jetagent/agent.toml yet; copy docs/agent.example.toml there and edit it" >&2
  start=0
fi
install -m 0644 "$src/systemd/jetagent.service" /etc/systemd/system/jetagent.service
systemctl daemon-reload
if [ "$start" -eq 1 ]; then
  "$prefix/venv/bin/jetagent" run --config /etc/jetagent/agent.toml --check-config
  systemctl enable --now jetagent.service
  systemctl --no-pager status jetagent.service | head -n 5
fi
