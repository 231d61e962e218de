"""Build a TensorRT engine (plan) from an ONNX file, on the device that will run it.

Plain functions on plain data, so a child process can run them. `build_engine`
builds exactly the precision asked for or raises; the fallback order
(INT8 -> FP16 -> FP32) is the caller's. Routes (see `engines.trt_api.ROUTES`):

* int8 "implicit-calibrator" (TensorRT 8.5-10.x): a float ONNX, a weakly typed network,
  BuilderFlag.INT8 and an IInt8EntropyCalibrator2/IInt8MinMaxCalibrator fed from
  calibration batches (`engines.trt_calib`). Deprecated in 10.1 and removed in 11.0
  [TensorRT 11 migration guide, "Removed Python APIs and Replacements"]. DLA requires the
  entropy calibrator.
* int8 "explicit-qdq" (10.x and 11.x; the only INT8 route on 11): the ONNX already holds
  QuantizeLinear/DequantizeLinear pairs; it is parsed into a STRONGLY_TYPED network and no
  precision flag is set ("Use explicit quantization with Strong Typing. Precision-control
  build flags are not required and should not be specified" [Explicit Quantization page]).
* fp16 "fp16-flag" (8.5-10.x): BuilderFlag.FP16 on a weakly typed network.
* fp16 "fp16-onnx" (10.x and 11.x; the only FP16 route on 11): BuilderFlag.FP16 is gone
  in 11.0, whose migration guide says to convert the ONNX to FP16 with ModelOpt AutoCast
  (`python -m modelopt.onnx.autocast --onnx_path m.onnx --output_path m_fp16.onnx`) and
  build it strongly typed. We require the ONNX to hold float16 tensors, so an FP32 ONNX is
  never reported as FP16.
* fp32: no precision flags (weakly typed on 8.5/10, strongly typed on 11), and TF32
  cleared: TensorRT enables it by default, which would round FP32 matrix inputs to 10 bits.

Every build sets a workspace limit (TensorRT's default is all device memory, which on a
Jetson is all of the shared RAM: the build process is OOM-killed), gives TensorRT the
process's one logger (`engines.trt_logger`), and adds an optimization profile when the
network has dynamic inputs (`engines.trt_profiles`). The ONNX is inspected first, so a
QDQ model is never built as "fp32" and a float model never as "explicit-qdq". The plan
and its sidecar `<plan>.json` (the BuildReport) are written atomically; the sidecar is
how `engines.tensorrt` learns the precision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engines import trt_api
from engines.base import PRECISIONS
from engines.cuda_mem import DeviceMemory, open_device_memory
from engines.errors import BackendUnavailable, JetagentError, ModelLoadError
from engines.fileio import atomic_write_bytes, sha256_file
from engines.tensorrt import SIDECAR_FORMAT, write_sidecar
from engines.trt_api import (
    FP16_ROUTES,
    INT8_ROUTES,
    BuildUnsupported,
    Capabilities,
    EngineBuildError,
    OnnxKinds,
    PrecisionUnavailable,
    choose_route,
    code_path,
    inspect_onnx,
    numpy_dtype,
)
from engines.trt_calib import CALIBRATORS, BatchSource, CalibrationFeed, calibration_batches, calibrator_class
from engines.trt_logger import LogRelay, plugins_ready, process_logger
from engines.trt_profiles import ProfileError, ProfileShapes, calibration_shape, resolve_profile

__all__ = [
    "FP16_ROUTES", "INT8_ROUTES", "BuildReport", "BuildRequest", "BuildUnsupported", "CalibrationFeed",
    "EngineBuildError", "OnnxKinds", "PrecisionUnavailable", "ProfileShapes", "build_engine",
    "calibration_batches", "choose_route", "default_workspace_bytes", "inspect_onnx",
]

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]

MIN_DEFAULT_WORKSPACE = 256 << 20
MAX_DEFAULT_WORKSPACE = 2 << 30


def default_workspace_bytes(total_memory: int) -> int:
    """The WORKSPACE limit when none is asked for: an eighth of device memory, 256 MiB to 2 GiB.

    TensorRT's own default is all of it; on a Jetson device memory is the system's RAM
    (8 GB on an Orin Nano/NX), so an unbounded build gets the build process OOM-killed.
    """
    return int(min(max(total_memory // 8, MIN_DEFAULT_WORKSPACE), MAX_DEFAULT_WORKSPACE))


@dataclass(frozen=True)
class BuildRequest:
    """What to build. `calibration` is a directory of .npy (single-input models) or .npz
    (one array per input name) batches, or a callable returning an iterable of batches.

    `profile_shapes`: {input name: ProfileShapes or (min, opt, max)}; needed for every input
    with a dynamic dimension (static inputs not named keep their shape). `cuda_memory`:
    "cuda-python", "pycuda" or None (auto, see `engines.cuda_mem.open_device_memory`).
    """

    precision: str = "fp32"
    int8_route: str = "auto"
    fp16_route: str = "auto"
    calibration: BatchSource | None = None
    calibration_cache: Path | None = None  # read if present, written after calibration
    calibrator: str = "entropy"
    max_calibration_batches: int | None = None
    int8_fp16_fallback: bool = True  # implicit route: layers left out of INT8 may run FP16
    workspace_bytes: int | None = None  # None: default_workspace_bytes(device memory)
    dla_core: int | None = None  # with GPU fallback for layers DLA cannot run
    timing_cache: Path | None = None  # loaded if present, saved after the build
    profile_shapes: Mapping[str, ProfileShapes | tuple[Shape, Shape, Shape]] | None = None
    device_index: int = 0
    cuda_memory: str | None = None

    def validate(self) -> None:
        """Raise JetagentError naming the first bad field."""
        choices = (("precision", PRECISIONS), ("int8_route", INT8_ROUTES), ("fp16_route", FP16_ROUTES),
                   ("calibrator", CALIBRATORS))
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise JetagentError(f"build request {key}={getattr(self, key)!r}; choose one of: "
                                    f"{', '.join(allowed)}")
        for key in ("workspace_bytes", "max_calibration_batches"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise JetagentError(f"build request {key} must be positive, got {value}")
        if self.dla_core is not None and self.dla_core < 0:
            raise JetagentError(f"build request dla_core must be >= 0, got {self.dla_core}")
        self.profiles()

    def profiles(self) -> dict[str, ProfileShapes] | None:
        """`profile_shapes` as ProfileShapes (raises ProfileError, a JetagentError, when malformed)."""
        if not self.profile_shapes:
            return None
        return {name: ProfileShapes.coerce(value, name) for name, value in self.profile_shapes.items()}


@dataclass
class BuildReport:
    """What was built, written as the plan's sidecar JSON."""

    precision_requested: str
    precision_built: str
    route: str
    tensorrt_version: str
    device: str
    compute_capability: str
    dla_core: int | None
    build_seconds: float
    onnx_path: str
    plan_path: str
    plan_sha256: str
    plan_bytes: int
    calibration_batches: int = 0
    calibration_cache_used: bool = False
    timing_cache: str = "none"  # none | loaded | fresh | rejected-fresh
    mixed_with: list[str] = field(default_factory=list)  # lower precisions TensorRT may also use
    warnings: list[str] = field(default_factory=list)
    workspace_bytes: int = 0
    tf32: bool = False  # FP32 layers may compute in TF32
    profile: dict[str, list[list[int]]] | None = None  # input -> [min, opt, max]
    plugins: bool = False  # init_libnvinfer_plugins succeeded in the build process
    cuda_memory: str = ""  # the CUDA seam that held the calibration buffers

    def to_dict(self) -> dict[str, Any]:
        return {"format": SIDECAR_FORMAT, **asdict(self)}


def _dims(dims: Any) -> Shape:
    return tuple(int(d) for d in dims)


@code_path("explicit-batch-flag")
def _explicit_batch_flag(trt: Any) -> int:
    # 8.x networks default to implicit batch, which the ONNX parser does not accept.
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


@code_path("strong-typing")
def _strongly_typed_flag(trt: Any) -> int:
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _create_network(trt: Any, builder: Any, caps: Capabilities, route: str) -> Any:
    flags = 0
    if route in ("explicit-qdq", "fp16-onnx") and caps.weak_typing:
        flags |= _strongly_typed_flag(trt)  # on 11.x every network is strongly typed; the flag is moot
    elif caps.explicit_batch_flag:
        flags |= _explicit_batch_flag(trt)
    return builder.create_network(flags)


@code_path("platform-queries")
def _check_platform(builder: Any, precision: str, device: str) -> None:
    if precision == "int8" and not builder.platform_has_fast_int8:
        raise PrecisionUnavailable(f"INT8 requested but this GPU ({device}) has no fast INT8")
    if precision == "fp16" and not builder.platform_has_fast_fp16:
        raise PrecisionUnavailable(f"FP16 requested but this GPU ({device}) has no fast FP16")


def _configure_dla(trt: Any, builder: Any, config: Any, request: BuildRequest, warnings: list[str]) -> None:
    core = request.dla_core
    if core is None:
        return
    cores = int(builder.num_DLA_cores)
    if core >= cores:
        # TensorRT 11.0-11.4.0 has no DLA on Jetson; 11.4.1 restores it on AGX Orin with JetPack 7.2.2+
        # ["Migrating TensorRT from 10.x to 11.x on Jetson/JetPack", TensorRT 11.4.1 docs].
        raise BuildUnsupported(f"DLA core {core} requested but TensorRT {trt.__version__} sees {cores} "
                               "DLA core(s) here")
    if request.precision == "fp32":
        raise PrecisionUnavailable("DLA runs FP16 or INT8 only; FP32 was requested")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    warnings.append(f"DLA core {core}: layers DLA cannot run fall back to the GPU")


def _add_profile(builder: Any, config: Any, ranges: Mapping[str, ProfileShapes] | None) -> Any:
    if ranges is None:
        return None
    profile = builder.create_optimization_profile()
    for name, shapes in ranges.items():
        profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
    if config.add_optimization_profile(profile) < 0:
        raise BuildUnsupported(f"TensorRT rejected the optimization profile "
                               f"{ {n: p.to_json() for n, p in ranges.items()} }")
    return profile


@code_path("fp16-flag")
def _configure_fp16_flag(trt: Any, config: Any) -> None:
    config.set_flag(trt.BuilderFlag.FP16)


@code_path("implicit-calibrator")
def _configure_implicit_int8(trt: Any, config: Any, profile: Any, request: BuildRequest,
                             memory: DeviceMemory, inputs: Mapping[str, tuple[Shape, Any]],
                             ranges: Mapping[str, ProfileShapes] | None) -> CalibrationFeed:
    dtypes = {name: numpy_dtype(dtype, f"input {name!r}") for name, (_, dtype) in inputs.items()}
    shapes = {name: calibration_shape(shape, (ranges or {}).get(name)) for name, (shape, _) in inputs.items()}
    why = "the calibration profile's OPT shape" if profile is not None else "the network's input shape"
    source = request.calibration
    batches = calibration_batches(source, inputs) if source is not None else iter(())
    feed: CalibrationFeed = calibrator_class(trt, request.calibrator)(
        batches, memory, dtypes, shapes, request.calibration_cache, request.max_calibration_batches, why)
    config.set_flag(trt.BuilderFlag.INT8)
    if request.int8_fp16_fallback:
        config.set_flag(trt.BuilderFlag.FP16)
    config.int8_calibrator = feed
    if profile is not None and not config.set_calibration_profile(profile):
        # Dynamic shapes: TensorRT calibrates with this profile's OPT shapes, or not at all.
        raise EngineBuildError(f"TensorRT refused the calibration profile "
                               f"{ {n: p.to_json() for n, p in (ranges or {}).items()} }")
    return feed


def _attach_timing_cache(config: Any, path: Path | None) -> str:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    timing_cache = config.create_timing_cache(data)
    if timing_cache is not None and config.set_timing_cache(timing_cache, False):
        return "loaded" if data else "fresh"
    # Corrupt, or from another TensorRT version or device: start empty rather than fail the build.
    timing_cache = config.create_timing_cache(b"")
    config.set_timing_cache(timing_cache, False)
    return "rejected-fresh"


def _parse(trt: Any, network: Any, relay: LogRelay, onnx_path: Path, version: str) -> dict[str, tuple[Shape, Any]]:
    parser = trt.OnnxParser(network, relay)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelLoadError(f"{onnx_path}: TensorRT {version}'s ONNX parser rejected it: {errors}")
    inputs = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        inputs[tensor.name] = (_dims(tensor.shape), tensor.dtype)
    return inputs


def _build_with_tensorrt(trt: Any, caps: Capabilities, onnx_path: Path, plan_path: Path,
                         request: BuildRequest, route: str, memory: DeviceMemory) -> BuildReport:
    """The TensorRT part of build_engine; the CUDA context is current."""
    started = time.monotonic()
    info = memory.info
    device = f"{info.name} (sm_{info.compute_capability[0]}{info.compute_capability[1]})"
    warnings: list[str] = []
    relay = process_logger(trt)
    mark = relay.mark()
    builder = trt.Builder(relay)
    if request.precision != "fp32":
        if caps.platform_queries:
            _check_platform(builder, request.precision, device)
        else:
            warnings.append(f"TensorRT {caps.version} cannot report fast {request.precision.upper()} "
                            f"(platform queries were removed in 11.0); trusting {device}")
    network = _create_network(trt, builder, caps, route)
    inputs = _parse(trt, network, relay, onnx_path, caps.version)
    try:
        ranges = resolve_profile({name: shape for name, (shape, _) in inputs.items()}, request.profiles())
    except ProfileError as exc:
        raise BuildUnsupported(str(exc)) from None
    config = builder.create_builder_config()
    workspace = request.workspace_bytes or default_workspace_bytes(info.total_memory)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if route == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # "fp32" means FP32, not TF32
    profile = _add_profile(builder, config, ranges)
    _configure_dla(trt, builder, config, request, warnings)
    feed = None
    mixed_with = []
    if route == "implicit-calibrator":
        feed = _configure_implicit_int8(trt, config, profile, request, memory, inputs, ranges)
        mixed_with = ["fp16"] if request.int8_fp16_fallback else []
    elif route == "fp16-flag":
        _configure_fp16_flag(trt, config)
    tf32 = bool(config.get_flag(trt.BuilderFlag.TF32))
    timing = _attach_timing_cache(config, request.timing_cache) if request.timing_cache else "none"
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if feed is not None:
            feed.free()
    if feed is not None and feed.error is not None:
        raise EngineBuildError(f"INT8 calibration failed: {feed.error}")
    if feed is not None and feed.batches_fed == 0 and not feed.cache_read:
        raise EngineBuildError("INT8 calibration got no batches and no calibration cache")
    said = relay.since(mark)
    if plan is None:
        raise EngineBuildError(f"TensorRT {caps.version} could not build {onnx_path.name} as "
                               f"{request.precision} via {route}: {' | '.join(said[-5:]) or 'no message'}")
    data = bytes(plan)
    atomic_write_bytes(plan_path, data)
    if request.timing_cache is not None:
        timing_cache = config.get_timing_cache()
        atomic_write_bytes(request.timing_cache, bytes(timing_cache.serialize()))
    return BuildReport(
        precision_requested=request.precision, precision_built=request.precision, route=route,
        tensorrt_version=caps.version, device=info.name,
        compute_capability="{}.{}".format(*info.compute_capability), dla_core=request.dla_core,
        build_seconds=round(time.monotonic() - started, 3), onnx_path=str(onnx_path),
        plan_path=str(plan_path), plan_sha256=sha256_file(plan_path), plan_bytes=len(data),
        calibration_batches=feed.batches_fed if feed else 0,
        calibration_cache_used=bool(feed and feed.cache_read), timing_cache=timing,
        mixed_with=mixed_with, warnings=warnings + said, workspace_bytes=workspace, tf32=tf32,
        profile={n: p.to_json() for n, p in ranges.items()} if ranges else None,
        plugins=plugins_ready(trt), cuda_memory=getattr(memory, "implementation", ""),
    )


def build_engine(onnx_path: str | Path, plan_path: str | Path, request: BuildRequest) -> BuildReport:
    """Build `onnx_path` into `plan_path` (+ sidecar) exactly as requested, or raise.

    Raises BackendUnavailable (no tensorrt/CUDA seam/GPU), ModelLoadError (unreadable ONNX
    or rejected by TensorRT's parser), PrecisionUnavailable / BuildUnsupported (not possible
    here; says why), EngineBuildError (calibration or the build failed).
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    request.validate()
    if not onnx_path.is_file():
        raise ModelLoadError(f"{onnx_path}: no such ONNX file")
    trt = trt_api.import_tensorrt()
    caps = trt_api.detect_capabilities(trt)
    if caps.missing:
        raise BackendUnavailable(f"TensorRT {caps.version} lacks {', '.join(caps.missing)}; "
                                 "jetagent builds with TensorRT 8.5 or later")
    kinds = inspect_onnx(onnx_path)
    route = choose_route(caps, request.precision, kinds, request.int8_route, request.fp16_route)
    if route == "implicit-calibrator":
        if request.dla_core is not None and request.calibrator != "entropy":
            raise BuildUnsupported(f"DLA requires the entropy calibrator (IInt8EntropyCalibrator2); "
                                   f"calibrator={request.calibrator!r} was asked for with dla_core="
                                   f"{request.dla_core}")
        if request.calibration is None and not (request.calibration_cache and request.calibration_cache.is_file()):
            raise BuildUnsupported("implicit INT8 calibration needs calibration batches or an existing "
                                   "calibration cache")
    memory = open_device_memory(request.device_index, request.cuda_memory)
    try:
        with memory.activate():
            report = _build_with_tensorrt(trt, caps, onnx_path, plan_path, request, route, memory)
    finally:
        memory.close()
    if kinds is None:
        report.warnings.append("onnx is not importable: the ONNX's own precision was not checked")
    write_sidecar(plan_path, report.to_dict())
    logger.info("built %s: %s via %s in %.1f s", plan_path, report.precision_built, route,
                report.build_seconds)
    return report
