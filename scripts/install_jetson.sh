#!/usr/bin/env bash
# Install jetagent on a Jetson (JetPack 6: Python 3.10, TensorRT 10.x, CUDA 12.x, GStreamer OpenCV).
#   sudo scripts/install_jetson.sh [--config FILE] [--no-start] [--cuda-memory auto|cuda-python|pycuda]
#                                  [--cpu-only] [--prefix DIR] [--cuda-home DIR] [--dry-run]
# --dry-run prints every action (and the CUDA memory seam it would set up) and changes nothing;
# it needs no root. Its exit status says whether the real run would get past its checks.
#
# The venv sees JetPack's own tensorrt and GStreamer-enabled cv2 (--system-site-packages); pip's
# OpenCV is NOT installed (it has no GStreamer), and numpy stays < 2 (JetPack's cv2 does not import
# under NumPy 2). TensorRT needs device buffers from Python, and JetPack ships neither binding:
# cuda-python is installed from its wheels, matched to JetPack's CUDA (major.minor), and checked on
# the GPU; if that fails, pycuda is built from source (python3-dev, JetPack's nvcc) and checked.
# If neither works the install stops (--cpu-only skips this and the agent serves ONNX Runtime).
set -euo pipefail

prefix=/opt/jetagent
config=""
start=1
dry=0
seam=auto
cpu_only=0
cuda_home=${CUDA_HOME:-/usr/local/cuda}
src=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: $0 [--config FILE] [--no-start] [--cuda-memory auto|cuda-python|pycuda] [--cpu-only] [--prefix DIR] [--cuda-home DIR] [--dry-run]"

while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --no-start) start=0; shift ;;
    --dry-run) dry=1; shift ;;
    --cuda-memory) seam=${2:?--cuda-memory needs auto, cuda-python or pycuda}; shift 2 ;;
    --cpu-only) cpu_only=1; shift ;;
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --cuda-home) cuda_home=${2:?--cuda-home needs a directory}; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
case "$seam" in auto|cuda-python|pycuda) ;; *) echo "install_jetson: --cuda-memory $seam: choose auto, cuda-python or pycuda" >&2; exit 2 ;; esac

venv="$prefix/venv"
py="$venv/bin/python"
blocked=0  # dry run: a check the real run would stop at

say() { echo "install_jetson: $*"; }
warn() { echo "install_jetson: warning: $*" >&2; }
# A check failed: the real run stops here; a dry run says so and goes on printing the plan.
stop() {
  if [ "$dry" -eq 1 ]; then
    echo "install_jetson: the real run would STOP here: $*" >&2
    blocked=1
  else
    echo "install_jetson: error: $*" >&2
    exit 1
  fi
}
# Every action goes through run: printed (shell-quoted) in a dry run, executed otherwise.
run() {
  if [ "$dry" -eq 1 ]; then
    local line="+" arg q="'"
    for arg in "$@"; do
      if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
        line+=" $arg"
      else
        line+=" $q${arg//$q/$q\\$q$q}$q"
      fi
    done
    echo "$line"
  else
    "$@"
  fi
}

if [ "$dry" -eq 1 ]; then
  say "dry run: printing every action, changing nothing (source $src, prefix $prefix; a real run needs root)"
elif [ "$(id -u)" -ne 0 ]; then
  echo "install_jetson: run as root (sudo), or with --dry-run to see what it would do" >&2
  exit 1
fi

# ---- checks (read-only, also in a dry run) ------------------------------------------------------
if ! python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  stop "Python 3.10 or later is required (JetPack 6)"
fi
python3 -c 'import tensorrt' 2>/dev/null ||
  warn "system python has no 'tensorrt' (JetPack's python3-libnvinfer); without it the agent serves ONNX Runtime on the CPU"
python3 -c 'import cv2' 2>/dev/null ||
  warn "system python has no 'cv2' (JetPack's python3-opencv, with GStreamer); CSI cameras need it"

# CUDA major.minor from JetPack's toolkit: version.json (CUDA 11.1+), else nvcc.
cuda_mm=""
if [ -f "$cuda_home/version.json" ]; then
  cuda_mm=$(python3 -c 'import json, sys; v = json.load(open(sys.argv[1]))["cuda"]["version"]; print(".".join(v.split(".")[:2]))' "$cuda_home/version.json" 2>/dev/null || true)
fi
if [ -z "$cuda_mm" ] && [ -x "$cuda_home/bin/nvcc" ]; then
  cuda_mm=$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p' | head -n 1)
fi

check_seam() {  # check_seam NAME: open device memory on the GPU with that seam, in the venv
  run "$py" -c "from engines.cuda_mem import open_device_memory as o; m = o(0, \"$1\"); print(\"install_jetson: CUDA memory seam:\", m.implementation, \"on\", m.info.name); m.close()"
}
install_cuda_python() {
  run "$venv/bin/pip" install -q "cuda-python==$cuda_mm.*" && check_seam cuda-python
}
install_pycuda() {
  run apt-get install -y -qq --no-install-recommends python3-dev build-essential &&
    run env "PATH=$cuda_home/bin:$PATH" "CUDA_ROOT=$cuda_home" "$venv/bin/pip" install -q pycuda &&
    check_seam pycuda
}

if [ "$cpu_only" -eq 1 ]; then
  say "CUDA memory seam: none (--cpu-only): the agent serves ONNX Runtime; TensorRT stays unused"
elif [ -z "$cuda_mm" ]; then
  stop "no CUDA toolkit at $cuda_home (no version.json, no bin/nvcc): TensorRT needs JetPack's CUDA (sudo apt install nvidia-jetpack), or use --cpu-only"
else
  case "$seam" in
    auto) say "CUDA $cuda_mm at $cuda_home: CUDA memory seam: cuda-python (pip install 'cuda-python==$cuda_mm.*'), checked on the GPU; if that fails, pycuda built from source (python3-dev, $cuda_home/bin/nvcc), checked; if neither works the install stops" ;;
    cuda-python) say "CUDA $cuda_mm at $cuda_home: CUDA memory seam: cuda-python (pip install 'cuda-python==$cuda_mm.*'), checked on the GPU (asked for: no pycuda fallback)" ;;
    pycuda) say "CUDA $cuda_mm at $cuda_home: CUDA memory seam: pycuda built from source (python3-dev, $cuda_home/bin/nvcc), checked on the GPU (asked for: no cuda-python)" ;;
  esac
fi

# ---- the install ----------------------------------------------------------------------------------
if ! id jetagent >/dev/null 2>&1; then
  run useradd --system --home-dir /var/lib/jetagent --shell /usr/sbin/nologin jetagent
fi
for g in video render; do
  if getent group "$g" >/dev/null; then run usermod -aG "$g" jetagent; fi
done
run python3 -m venv --system-site-packages "$venv"
run "$venv/bin/pip" install -q --upgrade pip
run "$venv/bin/pip" install -q "numpy<2" "$src"

if [ "$cpu_only" -eq 0 ] && [ -n "$cuda_mm" ] && [ "$dry" -eq 1 ]; then
  # A dry run cannot check a seam on the GPU: print both branches of the plan.
  if [ "$seam" != pycuda ]; then install_cuda_python; fi
  if [ "$seam" = auto ]; then say "if cuda-python fails its check:"; fi
  if [ "$seam" = auto ]; then run "$venv/bin/pip" uninstall -q -y cuda-python cuda-bindings; fi
  if [ "$seam" != cuda-python ]; then install_pycuda; fi
  say "the first seam that passes its check is kept ([backend] cuda_memory = \"auto\" finds it); none: the install stops"
elif [ "$cpu_only" -eq 0 ] && [ -n "$cuda_mm" ]; then
  chosen=""
  if [ "$seam" != pycuda ]; then
    if install_cuda_python; then
      chosen=cuda-python
    elif [ "$seam" = auto ]; then
      warn "cuda-python does not work here; removing it (auto would pick it) and trying pycuda"
      run "$venv/bin/pip" uninstall -q -y cuda-python cuda-bindings || true
    fi
  fi
  if [ -z "$chosen" ] && [ "$seam" != cuda-python ]; then
    if install_pycuda; then chosen=pycuda; fi
  fi
  if [ -z "$chosen" ]; then
    stop "no CUDA memory seam works here (cuda-python==$cuda_mm.* and pycuda both failed above); TensorRT cannot run. Fix the CUDA install, or re-run with --cpu-only"
  fi
  say "CUDA memory seam: $chosen (the agent's [backend] cuda_memory = \"auto\" picks it)"
fi

run mkdir -p "$prefix/docs" "$prefix/models" /etc/jetagent
run cp -r "$src/docs/." "$prefix/docs/"
run cp -r "$src/models/." "$prefix/models/"  # the demo model `jetagent selftest` uses
if [ -f "$src/clips/vtest.avi" ]; then
  run mkdir -p "$prefix/clips"
  run cp "$src/clips/vtest.avi" "$prefix/clips/vtest.avi"
else
  run "$src/scripts/fetch_footage.sh" "$prefix/clips" || warn "no demo video (jetagent selftest needs --video FILE)"
fi
if [ -n "$config" ]; then
  run install -m 0640 -g jetagent "$config" /etc/jetagent/agent.toml
elif [ ! -f /etc/jetagent/agent.toml ]; then
  warn "no /etc/jetagent/agent.toml yet; copy docs/agent.example.toml there and edit it"
  start=0
fi
run install -m 0644 "$src/systemd/jetagent.service" /etc/systemd/system/jetagent.service
run systemctl daemon-reload
if [ "$start" -eq 1 ]; then
  run "$venv/bin/jetagent" run --config /etc/jetagent/agent.toml --check-config
  run systemctl enable --now jetagent.service
  run systemctl --no-pager status jetagent.service
fi
say "check the device: $venv/bin/jetagent doctor --config /etc/jetagent/agent.toml"
say "prove the GPU paths: $venv/bin/jetagent selftest --out selftest.json (attach it to bug reports)"
if [ "$dry" -eq 1 ] && [ "$blocked" -eq 1 ]; then
  exit 1
fi
