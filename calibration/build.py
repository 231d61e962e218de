"""TensorRT engine builds in a child process, with a timeout and progress.

An engine build can take minutes, allocate most of a Jetson's shared memory, and a
TensorRT bug can abort the process. So `build_in_child` runs
`engines.trt_build.build_engine` in a fresh interpreter (`calibration.trt_child`):
the daemon waits with a timeout, relays the child's progress, kills the whole child
process group when the time is up, and turns every way the child can end into a
specific error. Nothing of TensorRT or CUDA is ever loaded into the caller's process.
A child that reported its plan and then died at interpreter exit (TensorRT teardown)
is not a failed build when the plan on disk matches the sha256 its report gives.
Profile shapes (models with dynamic inputs) travel to the child as JSON.

The command that starts the child (`launcher`) is a parameter: tests point it at a
script that installs the stand-in TensorRT modules first.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from calibration.progress import ProgressEvent, ProgressFn, safe
from engines.errors import BackendUnavailable, JetagentError, ModelLoadError
from engines.fileio import sha256_file
from engines.trt_build import BuildRequest, BuildUnsupported, EngineBuildError, PrecisionUnavailable
from engines.trt_profiles import profile_to_json

log = logging.getLogger(__name__)

DEFAULT_LAUNCHER: tuple[str, ...] = (sys.executable, "-m", "calibration.trt_child")
DEFAULT_TIMEOUT_S = 1800.0
HEARTBEAT_S = 15.0

# Errors the child reports by name -> the class the caller gets.
_ERRORS: dict[str, type[JetagentError]] = {
    "PrecisionUnavailable": PrecisionUnavailable, "BuildUnsupported": BuildUnsupported,
    "ModelLoadError": ModelLoadError, "BackendUnavailable": BackendUnavailable,
    "EngineBuildError": EngineBuildError,
}


def request_fields(request: BuildRequest, calibration_set: Path | None) -> dict[str, Any]:
    """A BuildRequest as the child's JSON (calibration comes as a stored set's directory)."""
    if request.calibration is not None:
        raise EngineBuildError("build_in_child takes calibration as a stored calibration set directory")
    return {"profile_shapes": profile_to_json(request.profiles()), "cuda_memory": request.cuda_memory,
            "precision": request.precision, "int8_route": request.int8_route, "fp16_route": request.fp16_route,
            "calibration_set": str(calibration_set) if calibration_set else None,
            "calibration_cache": str(request.calibration_cache) if request.calibration_cache else None,
            "calibrator": request.calibrator, "max_calibration_batches": request.max_calibration_batches,
            "int8_fp16_fallback": request.int8_fp16_fallback, "workspace_bytes": request.workspace_bytes,
            "dla_core": request.dla_core, "timing_cache": str(request.timing_cache) if request.timing_cache else None,
            "device_index": request.device_index}


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _run_child(args: Sequence[str], launcher: Sequence[str], timeout_s: float, progress: ProgressFn,
               what: str, candidate: str | None) -> dict[str, Any]:
    """Run the child, relay progress, return its final event (done/probe). Raises on failure."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen([*launcher, *args], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                start_new_session=True)  # own process group: a timeout kills all of it
        lines: queue.Queue[str | None] = queue.Queue()
        if proc.stdout is None:  # Popen with stdout=PIPE always sets it; mypy cannot know
            _kill(proc)
            raise EngineBuildError(f"{what}: no output pipe to the build process")
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True, name="trt-child-out")
        reader.start()
        started = time.monotonic()
        next_beat = started + HEARTBEAT_S
        final: dict[str, Any] | None = None
        eof = False
        while not eof:
            now = time.monotonic()
            if now - started > timeout_s:
                _kill(proc)
                raise EngineBuildError(f"{what} took longer than {timeout_s:g} s and was stopped")
            if now >= next_beat:
                progress(ProgressEvent("build", f"{what}: {now - started:.0f} s so far", candidate))
                next_beat = now + HEARTBEAT_S
            try:
                line = lines.get(timeout=min(1.0, max(0.01, timeout_s - (now - started))))
            except queue.Empty:
                continue
            if line is None:
                eof = True
                continue
            event = _parse(line)
            if event is None:
                log.debug("trt child: %s", line.rstrip())
            elif event.get("event") == "progress":
                progress(_progress_event(event, candidate))
            else:
                final = event
        try:
            code = proc.wait(timeout=max(1.0, timeout_s - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise EngineBuildError(f"{what} did not exit after finishing its output; stopped") from None
        reader.join(timeout=1.0)
        stderr.seek(0)
        tail = stderr.read()[-2000:].strip()
    if final is not None and final.get("event") == "error":
        error = _ERRORS.get(str(final.get("type")), EngineBuildError)
        raise error(str(final.get("message", "unknown error")))
    if code != 0 and final is not None and _finished_whole(final):
        # TensorRT teardown can crash at interpreter exit after the work is done and on disk;
        # the plan was checked against the sha256 in its report, so the build stands.
        log.warning("%s: the process exited with %s after reporting %s; its result is whole, keeping it",
                    what, _exit_text(code), final.get("event"))
        return final
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
        raise EngineBuildError(f"{what}: the build process died from signal {name}{hint}"
                               + (f"; stderr: {tail.splitlines()[-1]}" if tail else ""))
    if code != 0 or final is None:
        last = tail.splitlines()[-1] if tail else "no output"
        raise EngineBuildError(f"{what}: the build process failed (exit status {code}): {last}")
    return final


def _exit_text(code: int) -> str:
    if code >= 0:
        return f"status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def _finished_whole(final: Mapping[str, Any]) -> bool:
    """True when the child's last word was a result that stands on its own: a probe, or a build
    whose plan and sidecar are on disk and whose plan matches the sha256 the report gives."""
    if final.get("event") == "probe":
        return True
    report = final.get("report")
    if final.get("event") != "done" or not isinstance(report, dict):
        return False
    plan = Path(str(report.get("plan_path", "")))
    try:
        return (plan.with_name(plan.name + ".json").is_file()
                and sha256_file(plan) == report.get("plan_sha256"))
    except OSError:
        return False


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "event" in value else None


def _progress_event(event: Mapping[str, Any], candidate: str | None) -> ProgressEvent:
    stage = str(event.get("stage", "build"))
    if "done" in event and "total" in event:
        message = f"{stage}: batch {int(event['done']) + 1} of {event['total']}"
    else:
        message = str(event.get("message", stage))
    return ProgressEvent("build", message, candidate)


def _kill(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("TensorRT build process %d did not die after SIGKILL", proc.pid)


def build_in_child(onnx_path: Path, plan_path: Path, request: BuildRequest, *,
                   calibration_set: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                   progress: ProgressFn | None = None, launcher: Sequence[str] = DEFAULT_LAUNCHER,
                   candidate: str | None = None) -> dict[str, Any]:
    """Build `onnx_path` into `plan_path` (+ its `<plan>.json` report) in a child process.

    Returns the BuildReport as a dict. Raises what `build_engine` raises (PrecisionUnavailable,
    BuildUnsupported, ModelLoadError, BackendUnavailable, EngineBuildError), or EngineBuildError
    when the child crashed, was killed or ran past `timeout_s`.
    """
    request.validate()
    job = {"onnx": str(onnx_path), "plan": str(plan_path), "request": request_fields(request, calibration_set)}
    notify = safe(progress)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="jetagent-build-", delete=False) as handle:
        json.dump(job, handle)
        request_file = Path(handle.name)
    try:
        what = f"TensorRT {request.precision} build of {onnx_path.name}"
        notify(ProgressEvent("build", f"{what} started", candidate))
        final = _run_child(["build", str(request_file)], launcher, timeout_s, notify, what, candidate)
    finally:
        request_file.unlink(missing_ok=True)
    report = final.get("report")
    if final.get("event") != "done" or not isinstance(report, dict):
        raise EngineBuildError(f"build process gave no report (last event {final.get('event')!r})")
    return report


def probe_tensorrt(device_index: int = 0, *, timeout_s: float = 120.0,
                   launcher: Sequence[str] = DEFAULT_LAUNCHER, cuda_memory: str | None = None) -> dict[str, Any]:
    """Ask a child process what TensorRT and GPU are here: version, routes, the device (name,
    compute capability, SM count, memory, CUDA versions), DLA cores, plugins, the CUDA seam.
    Raises BackendUnavailable when there is no usable TensorRT/GPU."""
    args = ["probe", "--device", str(device_index)] + (["--cuda-memory", cuda_memory] if cuda_memory else [])
    try:
        final = _run_child(args, launcher, timeout_s, safe(None), "TensorRT probe", None)
    except EngineBuildError as exc:
        raise BackendUnavailable(f"TensorRT is not usable here: {exc}") from exc
    if final.get("event") != "probe":
        raise BackendUnavailable("TensorRT probe gave no answer")
    return final
