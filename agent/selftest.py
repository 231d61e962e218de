"""`jetagent selftest --out report.json`: prove this device's inference paths, for a bug report.

What a Jetson's owner runs after installing: the demo model (models/person-ssdlite.onnx)
is calibrated on the first half of the demo video (clips/vtest.avi) and every engine is
checked on the second half against ONNX Runtime FP32 with the gate's metric (detection F1
for the demo detector), timed, and run for `--loop-seconds` of the real camera loop on
the video:

* GPU parts, when TensorRT is usable (asked of a child process): FP32, FP16 (each FP16
  route the installed TensorRT has) and INT8 through every route it has (the implicit
  calibrator where it exists, explicit Q/DQ), each built in a child process exactly as a
  deployment builds it (`calibration.trt_target`), timed against `trtexec` when present.
* CPU parts: ONNX Runtime FP32 and INT8 (the CPU target's first candidate, or all).

Everything goes into the report: versions, device, timings, agreement, and each error
with TensorRT's last messages. Without a usable TensorRT the report says so and the CPU
parts still run. Verdicts: "passed" (GPU and CPU parts passed), "passed-cpu-only" (no
TensorRT here, off a Jetson, not required), "failed" (an engine errored, FP32/FP16 fell
below the bound, no INT8 engine ran at all, or TensorRT is missing on a Jetson or with
--require-gpu). An INT8 candidate below the bound is not a failure of the device: it is
what the gate refuses; the report says which one the gate would serve.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import JetagentError

log = logging.getLogger(__name__)

FORMAT = 1
SEARCH = (Path(__file__).resolve().parent.parent, Path("/opt/jetagent"))  # the source tree, an install
DEMO_MODEL = Path("models/person-ssdlite.onnx")
DEMO_VIDEO = Path("clips/vtest.avi")
TRTEXEC = ("trtexec", "/usr/src/tensorrt/bin/trtexec")
_TRTEXEC_LINE = re.compile(r"(Latency|GPU Compute Time): min = ([\d.]+) ms, max = ([\d.]+) ms, "
                           r"mean = ([\d.]+) ms, median = ([\d.]+) ms")


@dataclass(frozen=True)
class SelftestOptions:
    out: Path
    model: Path | None = None
    video: Path | None = None
    frames: int = 64
    holdout: int = 48
    loop_seconds: float = 60.0
    minimum: float = 0.95
    require_gpu: bool = False
    cpu: bool = True
    all_candidates: bool = False
    launcher: tuple[str, ...] | None = None  # the TensorRT build child (tests)
    state_dir: Path | None = None  # keep engines here between runs (default: a fresh temp dir)


def _find(given: Path | None, relative: Path, what: str, hint: str) -> Path:
    if given is not None:
        if not given.is_file():
            raise JetagentError(f"{what} {given}: no such file")
        return given
    for root in SEARCH:
        if (root / relative).is_file():
            return root / relative
    raise JetagentError(f"no {what} at {', '.join(str(r / relative) for r in SEARCH)}; {hint}")


def _run(argv: list[str], timeout: float) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout + done.stderr if done.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Versions and the device, for the report."""
    from agent import __version__
    from agent.doctor import check_jetson
    from engines.cuda_mem import available_implementations

    versions: dict[str, Any] = {"jetagent": __version__, "python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "cv2", "onnx"):
        try:
            versions[name] = str(__import__(name).__version__)
        except Exception as exc:  # missing or broken: say which
            versions[name] = f"unavailable: {exc}"
    try:
        import onnxruntime

        providers: Any = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    cpu = _run(["lscpu"], 10) or ""
    flags = next((ln.split(":", 1)[1].split() for ln in cpu.splitlines() if ln.startswith("Flags")), [])
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")),
                 platform.processor())
    jetson = check_jetson()
    return {"versions": versions, "onnxruntime_providers": providers, "cuda_memory": available_implementations(),
            "platform": platform.platform(), "machine": platform.machine(), "cpu": model,
            "cpu_flags": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimd",
                                                          "asimddp", "i8mm", "fp16", "sve")),
            "load_average": list(os.getloadavg()), "jetson": jetson.to_dict(),
            "trtexec": next((p for p in (shutil.which(t) or (t if Path(t).is_file() else None) for t in TRTEXEC)
                             if p), None)}


def trtexec_timing(binary: str, plan: Path, dla_core: int | None = None, timeout: float = 300.0) -> dict[str, Any]:
    """`trtexec --loadEngine` on our plan: its Latency and GPU Compute Time (ms), or why not."""
    argv = [binary, f"--loadEngine={plan}", "--warmUp=500", "--duration=5", "--iterations=100"]
    if dla_core is not None:
        argv.append(f"--useDLACore={dla_core}")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"trtexec did not run: {exc}"}
    found = {m.group(1): {"min": float(m.group(2)), "max": float(m.group(3)), "mean": float(m.group(4)),
                          "median": float(m.group(5))} for m in _TRTEXEC_LINE.finditer(done.stdout)}
    if done.returncode != 0 or not found:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return {"error": f"trtexec exited {done.returncode}: {' | '.join(tail)}"}
    return {"latency_ms": found.get("Latency"), "gpu_compute_ms": found.get("GPU Compute Time"),
            "command": " ".join(argv)}


def camera_loop(runner: Any, video: Path, seconds: float) -> dict[str, Any]:
    """`seconds` of the real camera loop on the video, looping and paced like a camera."""
    from agent.camera.grabber import Grabber
    from agent.camera.pipeline import CameraPipeline
    from agent.camera.sources import parse_source

    grabber = Grabber(parse_source(str(video)), mode="latest", loop=True, paced=True, name="selftest")
    pipeline = CameraPipeline("selftest", grabber, runner)
    pipeline.snapshot(window=True)  # opens the window the report closes
    grabber.start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            pipeline.run_once(timeout=0.5)
    finally:
        grabber.stop()
    report = pipeline.snapshot(window=True).report()
    keep = ("fps", "frames", "latency_ms", "objects", "errors", "last_error", "dropped", "state")
    return {"seconds": seconds, **{k: report.get(k) for k in keep}}


def _row(backend: str, candidate: Any, route: str) -> dict[str, Any]:
    return {"backend": backend, "precision": candidate.precision, "route": route, "candidate": candidate.name,
            "status": "error"}


def _evaluate(row: dict[str, Any], target: Any, candidate: Any, reference: Any, dataset: Any, metric: str,
              opts: SelftestOptions, video: Path, trtexec: str | None) -> dict[str, Any]:
    """Prepare, open, compare with FP32, time, (trtexec), loop; every failure lands in the row."""
    from calibration.candidates import TimingPlan, time_runners
    from calibration.gate import compare, observe

    started = time.monotonic()
    try:
        prepared = target.prepare(candidate, lambda event: None)
        row["prepare_seconds"] = round(time.monotonic() - started, 2)
        row["artifact"] = str(prepared.artifact)
        if prepared.metadata:
            row["build"] = {k: prepared.metadata.get(k) for k in ("route", "precision_built", "build_seconds",
                                                                  "workspace_bytes", "tf32", "profile",
                                                                  "plugins", "cuda_memory") if k in prepared.metadata}
            warnings = prepared.metadata.get("warnings") or []
            row["tensorrt_messages"] = list(warnings)[-10:]
        runner = target.open(candidate, prepared)
    except JetagentError as exc:
        row["error"] = str(exc)
        return row
    try:
        agreement = compare(metric, reference, observe(runner, dataset, keep_outputs=True))
        row["agreement"] = agreement.to_dict()
        row["passed_gate"] = agreement.passes(opts.minimum)
        tensors = [dataset.holdout[i] for i in range(dataset.size[1])]
        row["latency_ms"] = time_runners({candidate.name: runner}, tensors, TimingPlan(3, 8, 3))[candidate.name]
        if trtexec and backend_is_trt(row):
            row["trtexec"] = trtexec_timing(trtexec, Path(prepared.artifact))
        row["camera_loop"] = camera_loop(runner, video, opts.loop_seconds)
        loop_errors = int(row["camera_loop"].get("errors") or 0)
        row["status"] = ("error" if loop_errors else "passed" if row["passed_gate"] else "below-gate")
        if loop_errors:
            row["error"] = f"{loop_errors} inference error(s) in the camera loop: {row['camera_loop']['last_error']}"
    except JetagentError as exc:
        row["error"] = str(exc)
    finally:
        runner.close()
    return row


def backend_is_trt(row: dict[str, Any]) -> bool:
    return row.get("backend") == "tensorrt"


def _gpu_candidates(routes: list[str], task: str, all_int8: bool, fp16_onnx: bool) -> list[tuple[Any, str]]:
    """(candidate, route) for FP32, each FP16 route, and the first (or every) INT8 candidate per route.
    fp16-onnx builds only an FP16 ONNX (ModelOpt AutoCast); with an FP32 model it is listed as skipped."""
    from calibration.candidates import Candidate
    from calibration.trt_target import trt_candidates

    out: list[tuple[Any, str]] = [(Candidate("fp32-trt", "fp32", None, {}), "fp32")]
    for route in ("fp16-flag", "fp16-onnx"):
        if route in routes and (route != "fp16-onnx" or fp16_onnx):
            out.append((Candidate(f"fp16-trt-{route}", "fp16", None, {"fp16_route": route}), route))
    seen: set[str] = set()
    for candidate in trt_candidates(task, routes):
        route = str(candidate.options.get("int8_route"))
        if all_int8 or route not in seen:
            out.append((candidate, route))
            seen.add(route)
    return out


def run_selftest(opts: SelftestOptions) -> dict[str, Any]:
    """Run everything (see the module docstring), write `opts.out`, return the report."""
    from calibration.build import DEFAULT_LAUNCHER, probe_tensorrt
    from calibration.dataset import set_from_video
    from calibration.engine_cache import EngineCache
    from calibration.gate import observe, resolve_metric
    from calibration.ort_target import OnnxRuntimeTarget
    from calibration.trt_target import TensorRTTarget
    from engines.base import BackendOptions
    from engines.fileio import atomic_write_json
    from engines.modelcard import card_path_for, load_card
    from engines.runner import file_sha256, open_model
    from engines.trt_api import inspect_onnx

    started = time.monotonic()
    model = _find(opts.model, DEMO_MODEL, "model", "pass --model FILE (with its card beside it)")
    video = _find(opts.video, DEMO_VIDEO, "demo video",
                  "pass --video FILE, or fetch it: scripts/fetch_footage.sh clips")
    card = load_card(card_path_for(model))
    sha = file_sha256(model)
    env = environment()
    on_jetson = env["jetson"]["status"] != "skip"
    report: dict[str, Any] = {
        "format": FORMAT, "kind": "jetagent.selftest", "created": round(time.time(), 3), "environment": env,
        "model": {"path": str(model), "name": card.name, "sha256": sha, "task": card.task},
        "video": str(video), "bound": {"minimum": opts.minimum}, "results": [], "gpu": {}, "command": sys.argv,
    }
    dataset = set_from_video(card.input, video, calibration=opts.frames, holdout=opts.holdout)
    metric = resolve_metric(card.task, "auto")
    report["bound"]["metric"] = metric
    report["calibration"] = {"calibration_frames": dataset.size[0], "holdout_frames": dataset.size[1],
                             "sha256": dataset.content_hash}
    reference_runner = open_model(model, card=card, backend="onnxruntime", sha256=sha, options=BackendOptions())
    try:
        reference = observe(reference_runner, dataset, keep_outputs=True)
    finally:
        reference_runner.close()
    with tempfile.TemporaryDirectory(prefix="jetagent-selftest-") as scratch:
        cache = EngineCache((opts.state_dir or Path(scratch)) / "engines")
        results: list[dict[str, Any]] = report["results"]
        try:
            probe = probe_tensorrt(launcher=opts.launcher or DEFAULT_LAUNCHER)
            report["gpu"] = {"available": True, "probe": {k: v for k, v in probe.items() if k != "event"}}
        except JetagentError as exc:
            report["gpu"] = {"available": False, "reason": str(exc),
                             "required": bool(opts.require_gpu or on_jetson)}
        if report["gpu"]["available"]:
            target = TensorRTTarget(model, card, sha, dataset, cache, launcher=opts.launcher or DEFAULT_LAUNCHER)
            routes = list(report["gpu"]["probe"].get("routes", []))
            kinds = inspect_onnx(model)
            fp16_onnx = kinds is not None and kinds.has_fp16
            if "fp16-onnx" in routes and not fp16_onnx:
                results.append({"backend": "tensorrt", "precision": "fp16", "route": "fp16-onnx",
                                "candidate": "fp16-trt-fp16-onnx", "status": "skipped",
                                "note": "fp16-onnx builds an FP16 ONNX (ModelOpt AutoCast); this model is FP32"})
            for candidate, route in _gpu_candidates(routes, card.task, opts.all_candidates, fp16_onnx):
                log.info("selftest: TensorRT %s via %s", candidate.precision, route)
                results.append(_evaluate(_row("tensorrt", candidate, route), target, candidate, reference, dataset,
                                         metric, opts, video, env["trtexec"]))
        if opts.cpu:
            cpu = OnnxRuntimeTarget(model, card, sha, dataset, cache)
            fp32 = cpu.fallbacks()[0]
            int8 = cpu.candidates(card.task)
            for candidate in [fp32, *(int8 if opts.all_candidates else int8[:1])]:
                log.info("selftest: ONNX Runtime %s (%s)", candidate.precision, candidate.name)
                results.append(_evaluate(_row("onnxruntime", candidate, "qdq" if candidate.profile else "fp32"),
                                         cpu, candidate, reference, dataset, metric, opts, video, None))
    report["summary"], report["verdict"] = _verdict(report)
    report["seconds"] = round(time.monotonic() - started, 1)
    atomic_write_json(opts.out, report)
    return report


def _verdict(report: dict[str, Any]) -> tuple[dict[str, Any], str]:
    results = report["results"]
    problems = []
    for row in results:
        if row["status"] == "error":
            problems.append(f"{row['backend']} {row['candidate']}: {row.get('error', 'error')}"[:300])
        elif row["status"] == "below-gate" and row["precision"] != "int8":
            problems.append(f"{row['backend']} {row['candidate']}: {row['agreement']['metric']} "
                            f"{row['agreement']['value']:.3f} < {report['bound']['minimum']}")
    for backend in sorted({r["backend"] for r in results}):
        int8 = [r for r in results if r["backend"] == backend and r["precision"] == "int8"]
        if int8 and not any(r["status"] in ("passed", "below-gate") for r in int8):
            problems.append(f"{backend}: no INT8 engine ran")
    gpu = report["gpu"]
    if not gpu.get("available") and gpu.get("required"):
        problems.append(f"TensorRT is not usable here: {gpu.get('reason')}")
    counts = {s: sum(1 for r in results if r["status"] == s) for s in ("passed", "below-gate", "error", "skipped")}
    served = {b: next((r["candidate"] for r in results if r["backend"] == b and r["precision"] == "int8"
                       and r["status"] == "passed"), None) for b in sorted({r["backend"] for r in results})}
    summary = {**counts, "problems": problems, "int8_the_gate_would_serve": served}
    if problems:
        return summary, "failed"
    return summary, "passed" if gpu.get("available") else "passed-cpu-only"


def format_selftest(report: dict[str, Any]) -> str:
    env = report["environment"]
    gpu = report["gpu"]
    lines = [f"jetagent selftest  {report['model']['name']} on {report['video']}  "
             f"({report['calibration']['calibration_frames']} calibration + {report['calibration']['holdout_frames']} "
             f"held-out frames; bound {report['bound']['metric']} >= {report['bound']['minimum']})",
             f"device: {env['jetson']['detail']}; cpu {env['cpu']}; load {env['load_average']}"]
    if gpu.get("available"):
        probe = gpu["probe"]
        lines.append(f"GPU: TensorRT {probe.get('tensorrt_version')} on {probe.get('device', {}).get('name')}, "
                     f"routes {', '.join(probe.get('routes', []))}")
    else:
        reason = str(gpu.get("reason", "")).split(". ")[0]
        lines.append(f"GPU: NOT TESTED: {reason}" + (" (required here)" if gpu.get("required") else
                                                     "; the CPU parts ran"))
    lines.append(f"{'backend':12}{'precision':10}{'route':22}{'p50 ms':>8}{'value':>8}{'loop fps':>9}  status")
    for row in report["results"]:
        if row["status"] == "skipped":
            lines.append(f"{row['backend']:12}{row['precision']:10}{row['route'][:21]:22}  skipped: {row['note']}")
            continue
        lat = (row.get("latency_ms") or {}).get("p50")
        value = (row.get("agreement") or {}).get("value")
        fps = (row.get("camera_loop") or {}).get("fps")
        nan = float("nan")
        lines.append(f"{row['backend']:12}{row['precision']:10}{row['route'][:21]:22}"
                     f"{lat if lat is not None else nan:8.2f}{value if value is not None else nan:8.3f}"
                     f"{fps if fps is not None else nan:9.1f}  {row['status']}")
        if row.get("error"):
            lines.append(f"    {row['error'][:200]}")
        trtexec = row.get("trtexec") or {}
        if trtexec.get("gpu_compute_ms"):
            lines.append(f"    trtexec: GPU compute median {trtexec['gpu_compute_ms']['median']:.2f} ms, latency "
                         f"median {trtexec['latency_ms']['median']:.2f} ms")
    for problem in report["summary"]["problems"]:
        lines.append(f"problem: {problem}")
    lines.append(f"verdict: {report['verdict']} ({report['seconds']} s)")
    return "\n".join(lines)
