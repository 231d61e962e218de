"""The child-process side of TensorRT builds: `python -m calibration.trt_child build|probe ...`.

The parent (`calibration.build`) starts this module in a fresh interpreter so that a
TensorRT crash, an out-of-memory kill or a hung build cannot take the daemon down.
It speaks JSON lines on stdout:

    {"event": "progress", "stage": "calibration", "done": 3, "total": 64}
    {"event": "done", "report": {...BuildReport...}}      (build)
    {"event": "probe", "tensorrt_version": ..., "routes": [...], "device": {...}, "dla_cores": N,
     "plugins": true, "cuda_memory": "cuda-python 12.6.2"}  (probe)
    {"event": "error", "type": "PrecisionUnavailable", "message": "..."}

Exit status 0 on success, 3 after an expected (JetagentError) failure; anything else
is a crash, and its traceback is on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

EXPECTED_FAILURE = 3


def emit(event: str, **fields: Any) -> None:
    """Write one protocol line and flush it (the parent reads line by line)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _calibration_source(directory: str) -> Any:
    from calibration.dataset import CalibrationSet

    dataset = CalibrationSet.load(Path(directory))
    total = dataset.size[0]

    def batches() -> Iterator[np.ndarray]:
        for index in range(total):
            emit("progress", stage="calibration", done=index, total=total)
            yield dataset.calibration[index]

    return batches


def build(request_path: Path) -> dict[str, Any]:
    """Run engines.trt_build.build_engine as the request file says; return the report."""
    from engines.trt_build import BuildRequest, build_engine
    from engines.trt_profiles import profile_from_json

    job = json.loads(request_path.read_text())
    fields = dict(job["request"])
    calib_dir = fields.pop("calibration_set", None)
    for key in ("calibration_cache", "timing_cache"):
        if fields.get(key):
            fields[key] = Path(fields[key])
    fields["profile_shapes"] = profile_from_json(fields.get("profile_shapes"))
    request = BuildRequest(**fields, calibration=_calibration_source(calib_dir) if calib_dir else None)
    emit("progress", stage="build", message=f"building {request.precision} engine")
    report = build_engine(job["onnx"], job["plan"], request)
    return report.to_dict()


def probe(device_index: int, cuda_memory: str | None = None) -> dict[str, Any]:
    """What this TensorRT and GPU are: version, routes, the device (name, compute capability, SM
    count, memory, CUDA versions), DLA cores, whether the plugin library loaded, the CUDA seam."""
    from engines import trt_api
    from engines.cuda_mem import open_device_memory
    from engines.trt_logger import plugins_ready, process_logger

    trt = trt_api.import_tensorrt()
    caps = trt_api.detect_capabilities(trt)
    memory = open_device_memory(device_index, cuda_memory)
    try:
        info = memory.info
        with memory.activate():
            dla_cores = int(trt.Builder(process_logger(trt)).num_DLA_cores)
        seam = memory.implementation
    finally:
        memory.close()
    return {"tensorrt_version": caps.version, "family": caps.family, "routes": list(caps.routes),
            "missing": list(caps.missing), "device": info.as_dict(), "dla_cores": dla_cores,
            "plugins": plugins_ready(trt), "cuda_memory": seam}


def main(argv: list[str] | None = None) -> int:
    """`build REQUEST.json` or `probe [--device N]`; see the module docstring for the protocol."""
    from engines.errors import JetagentError

    parser = argparse.ArgumentParser(prog="python -m calibration.trt_child")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("request", type=Path)
    p = sub.add_parser("probe")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--cuda-memory", default=None, help="cuda-python | pycuda (default: auto)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            emit("done", report=build(args.request))
        else:
            emit("probe", **probe(args.device, args.cuda_memory))
    except JetagentError as exc:
        emit("error", type=type(exc).__name__, message=str(exc))
        return EXPECTED_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
