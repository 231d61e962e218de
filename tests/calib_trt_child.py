"""Start `calibration.trt_child` with stand-in TensorRT and pycuda modules (tests only).

    python tests/calib_trt_child.py VERSION MODE LOG -- build REQUEST.json

VERSION: the stand-in TensorRT version. MODE: "ok", or a way to fail: "crash" (SIGKILL
itself, as the OOM killer would), "hang" (never finish), "silent" (exit 0 with no
output). LOG: a file that gets one line per command run ("-" for none), so tests can
count builds.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import trt_standins  # noqa: E402
from calibration import trt_child  # noqa: E402


def install(version: str) -> None:
    gpu = trt_standins.FakeGpu()
    sys.modules["tensorrt"] = trt_standins.make_tensorrt(version, gpu=gpu)
    driver = trt_standins.make_pycuda_driver(gpu)
    package = types.ModuleType("pycuda")
    package.driver = driver  # type: ignore[attr-defined]
    sys.modules["pycuda"] = package
    sys.modules["pycuda.driver"] = driver


def main() -> int:
    version, mode, log = sys.argv[1:4]
    args = sys.argv[sys.argv.index("--") + 1:]
    if log != "-":
        with open(log, "a") as handle:
            handle.write(args[0] + "\n")
    if args[0] == "build":
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":
            time.sleep(3600)
        if mode == "silent":
            return 0
    install(version)
    return trt_child.main(args)


if __name__ == "__main__":
    sys.exit(main())
