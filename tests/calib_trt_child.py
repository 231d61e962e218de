"""Start `calibration.trt_child` with stand-in TensorRT and pycuda modules (tests only).

    python tests/calib_trt_child.py VERSION MODE LOG -- build REQUEST.json

VERSION: the stand-in TensorRT version. MODE: "ok", or a way to fail: "crash" (SIGKILL
itself, as the OOM killer would), "hang" (never finish), "silent" (exit 0 with no
output), "exit-crash" (finish the build, report it, then die of SIGSEGV at exit, as a
TensorRT teardown can), "exit-crash-torn" (the same, but the plan on disk is cut short
first). LOG: a file that gets one line per command run ("-" for none), so tests can
count builds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import trt_standins  # noqa: E402
from calibration import trt_child  # noqa: E402


def install(version: str) -> None:
    gpu = trt_standins.FakeGpu()
    sys.modules["tensorrt"] = trt_standins.make_tensorrt(version, gpu=gpu)
    trt_standins.install_pycuda(sys.modules, gpu)


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
    status = trt_child.main(args)
    if args[0] == "build" and mode.startswith("exit-crash"):
        if mode == "exit-crash-torn":
            plan = Path(json.loads(Path(args[1]).read_text())["plan"])
            plan.write_bytes(plan.read_bytes()[:5])
        os.kill(os.getpid(), signal.SIGSEGV)
    return status


if __name__ == "__main__":
    sys.exit(main())
