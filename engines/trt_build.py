"""Build a TensorRT engine (plan) from an ONNX file, on the device that will run it.

Plain functions on plain data, so a child process can run them. `build_engine`
builds exactly the precision asked for or raises; the fallback order
(INT8 -> FP16 -> FP32) is the caller's. Routes (see `engines.trt_api.ROUTES`):

* int8 "implicit-calibrator" (TensorRT 8.5-10.x): a float ONNX, a weakly typed network,
  BuilderFlag.INT8 and an IInt8EntropyCalibrator2/IInt8MinMaxCalibrator fed from
  calibration batches. Deprecated in 10.1 and removed in 11.0 [TensorRT 11 migration
  guide, "Removed Python APIs and Replacements"].
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
* fp32: no precision flags (weakly typed on 8.5/10, strongly typed on 11).

The ONNX is inspected first, so a QDQ model is never built as "fp32" and a float model
never as "explicit-qdq". The plan and its sidecar `<plan>.json` (the BuildReport) are
written atomically; the sidecar is how `engines.tensorrt` learns the precision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines import trt_api
from engines.base import PRECISIONS
from engines.cuda_mem import DeviceBuffer, DeviceMemory, open_device_memory
from engines.errors import BackendUnavailable, JetagentError, ModelLoadError
from engines.fileio import atomic_write_bytes, sha256_file
from engines.tensorrt import SIDECAR_FORMAT, compose, new_log_relay, write_sidecar
from engines.trt_api import (
    FP16_ROUTES,
    INT8_ROUTES,
    BuildUnsupported,
    Capabilities,
    OnnxKinds,
    PrecisionUnavailable,
    choose_route,
    code_path,
    inspect_onnx,
)

__all__ = [
    "FP16_ROUTES", "INT8_ROUTES", "BuildReport", "BuildRequest", "BuildUnsupported", "CalibrationFeed",
    "EngineBuildError", "OnnxKinds", "PrecisionUnavailable", "build_engine", "calibration_batches",
    "choose_route", "inspect_onnx",
]

logger = logging.getLogger(__name__)


class EngineBuildError(JetagentError):
    """TensorRT failed while calibrating or building."""


Shape = tuple[int, ...]
Batch = np.ndarray | Mapping[str, np.ndarray]
BatchSource = str | Path | Callable[[], Iterable[Batch]]

CALIBRATORS = ("entropy", "minmax")


@dataclass(frozen=True)
class BuildRequest:
    """What to build. `calibration` is a directory of .npy (single-input models) or .npz
    (one array per input name) batches, or a callable returning an iterable of batches."""

    precision: str = "fp32"
    int8_route: str = "auto"
    fp16_route: str = "auto"
    calibration: BatchSource | None = None
    calibration_cache: Path | None = None  # read if present, written after calibration
    calibrator: str = "entropy"
    max_calibration_batches: int | None = None
    int8_fp16_fallback: bool = True  # implicit route: layers left out of INT8 may run FP16
    workspace_bytes: int | None = None
    dla_core: int | None = None  # with GPU fallback for layers DLA cannot run
    timing_cache: Path | None = None  # loaded if present, saved after the build
    profile_shapes: Mapping[str, tuple[Shape, Shape, Shape]] | None = None  # name -> (min, opt, max)
    device_index: int = 0

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
        for name, triple in (self.profile_shapes or {}).items():
            if len(triple) != 3 or len({len(s) for s in triple}) != 1 or not all(
                    lo <= mid <= hi for lo, mid, hi in zip(*triple, strict=True)):
                raise JetagentError(f"build request profile_shapes[{name!r}] must be (min, opt, max) "
                                    f"shapes of one rank with min <= opt <= max, got {triple}")


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

    def to_dict(self) -> dict[str, Any]:
        return {"format": SIDECAR_FORMAT, **asdict(self)}


def calibration_batches(source: BatchSource, inputs: Mapping[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Yield {input name: array} batches from a directory of .npy/.npz files or a callable."""
    single = next(iter(inputs)) if len(inputs) == 1 else None
    if callable(source):
        items: Iterable[Batch] = source()
    else:
        folder = Path(source)
        files = sorted(p for p in folder.glob("*") if p.suffix in (".npy", ".npz")) if folder.is_dir() else []
        if not files:
            raise EngineBuildError(f"{folder}: no .npy or .npz calibration batches")
        items = (_load_batch(p) for p in files)
    for item in items:
        if isinstance(item, np.ndarray):
            if single is None:
                raise EngineBuildError(f"a bare array cannot feed a model with inputs {sorted(inputs)}; "
                                       "give {name: array} batches (.npz)")
            item = {single: item}
        missing = sorted(set(inputs) - set(item))
        if missing:
            raise EngineBuildError(f"calibration batch lacks inputs {missing}")
        yield {name: np.asarray(item[name]) for name in inputs}


def _load_batch(path: Path) -> Batch:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    array: np.ndarray = np.load(path, allow_pickle=False)
    return array


class CalibrationFeed:
    """Behaviour of jetagent's INT8 calibrator: batches -> device memory -> TensorRT.

    TensorRT needs a subclass of its own IInt8EntropyCalibrator2 (or MinMax) class, which
    exists only once tensorrt is imported, and this module must import without it. So the
    whole calibrator lives here at module level, and `_calibrator_class` only composes it
    with the TensorRT base (this class first in the MRO, so its methods are the overrides).
    TensorRT calls these methods from C++; an exception there is only printed, so errors
    are kept in `self.error` and checked after the build.
    """

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], memory: DeviceMemory,
                 dtypes: Mapping[str, np.dtype[Any]], cache_path: Path | None,
                 max_batches: int | None) -> None:
        super().__init__()  # the TensorRT (pybind11) base must be initialised explicitly
        self._batches, self._memory, self._dtypes = batches, memory, dict(dtypes)
        self._cache_path, self._max = cache_path, max_batches
        self._buffers: dict[str, DeviceBuffer] = {}
        self._peeked: dict[str, np.ndarray] | None = None
        self.batches_fed = 0
        self.cache_read = False
        self.error: str | None = None

    def _next(self) -> dict[str, np.ndarray] | None:
        if self._peeked is not None:
            batch, self._peeked = self._peeked, None
            return batch
        return next(self._batches, None)

    def get_batch_size(self) -> int:
        # Explicit-batch networks carry the batch in the input shape; report the leading dimension.
        try:
            if self._peeked is None:
                self._peeked = next(self._batches, None)
            first = next(iter(self._peeked.values())) if self._peeked else None
            return int(first.shape[0]) if first is not None and first.ndim else 1
        except Exception as exc:
            self.error = f"reading the first calibration batch: {exc}"
            return 1

    def get_batch(self, names: list[str]) -> list[int] | None:
        if self.error is not None or (self._max is not None and self.batches_fed >= self._max):
            return None
        try:
            batch = self._next()
            if batch is None:
                return None
            pointers = []
            for name in names:
                array = np.ascontiguousarray(batch[name], dtype=self._dtypes.get(name, np.float32))
                buffer = self._buffers.get(name)
                if buffer is None or buffer.nbytes < array.nbytes:
                    if buffer is not None:
                        self._memory.free(buffer)
                    buffer = self._buffers[name] = self._memory.alloc(array.nbytes)
                self._memory.copy_to_device(buffer, array)
                pointers.append(buffer.ptr)
            self._memory.synchronize()  # TensorRT reads the buffers as soon as we return
            self.batches_fed += 1
            return pointers
        except Exception as exc:
            self.error = f"calibration batch {self.batches_fed + 1}: {exc}"
            logger.error("%s", self.error)
            return None

    def read_calibration_cache(self) -> bytes | None:
        path = self._cache_path
        if path is None or not path.is_file() or path.stat().st_size == 0:
            return None
        self.cache_read = True
        return path.read_bytes()

    def write_calibration_cache(self, cache: Any) -> None:
        if self._cache_path is not None:
            try:
                atomic_write_bytes(self._cache_path, bytes(cache))
            except OSError as exc:
                self.error = f"writing calibration cache {self._cache_path}: {exc}"

    def free(self) -> None:
        for buffer in self._buffers.values():
            self._memory.free(buffer)
        self._buffers.clear()


@code_path("implicit-calibrator")
def _calibrator_class(trt: Any, algorithm: str) -> type:
    return compose(CalibrationFeed, trt.IInt8MinMaxCalibrator if algorithm == "minmax"
                    else trt.IInt8EntropyCalibrator2)


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


def _add_profile(builder: Any, config: Any, inputs: Mapping[str, tuple[Shape, Any]],
                 shapes: Mapping[str, tuple[Shape, Shape, Shape]] | None) -> Any:
    dynamic = sorted(name for name, (shape, _) in inputs.items() if any(d < 0 for d in shape))
    if not shapes:
        if dynamic:
            raise BuildUnsupported(f"inputs {dynamic} have dynamic dimensions; give profile_shapes "
                                   "(min, opt, max) for them")
        return None
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise BuildUnsupported(f"profile_shapes names unknown inputs {unknown}; inputs are {sorted(inputs)}")
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    if config.add_optimization_profile(profile) < 0:
        raise BuildUnsupported(f"TensorRT rejected the optimization profile {dict(shapes)}")
    return profile


@code_path("fp16-flag")
def _configure_fp16_flag(trt: Any, config: Any) -> None:
    config.set_flag(trt.BuilderFlag.FP16)


@code_path("implicit-calibrator")
def _configure_implicit_int8(trt: Any, config: Any, profile: Any, request: BuildRequest, memory: DeviceMemory,
                             inputs: Mapping[str, tuple[Shape, Any]]) -> CalibrationFeed:
    dtypes = {name: np.dtype(trt.nptype(dtype)) for name, (_, dtype) in inputs.items()}
    source = request.calibration
    batches = calibration_batches(source, inputs) if source is not None else iter(())
    feed: CalibrationFeed = _calibrator_class(trt, request.calibrator)(
        batches, memory, dtypes, request.calibration_cache, request.max_calibration_batches)
    config.set_flag(trt.BuilderFlag.INT8)
    if request.int8_fp16_fallback:
        config.set_flag(trt.BuilderFlag.FP16)
    config.int8_calibrator = feed
    if profile is not None:
        config.set_calibration_profile(profile)  # dynamic shapes: calibrate with the build profile
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


def _build_with_tensorrt(trt: Any, caps: Capabilities, onnx_path: Path, plan_path: Path,
                        request: BuildRequest, route: str, memory: DeviceMemory) -> BuildReport:
    """The TensorRT part of build_engine; the CUDA context is current."""
    started = time.monotonic()
    info = memory.info
    device = f"{info.name} (sm_{info.compute_capability[0]}{info.compute_capability[1]})"
    warnings: list[str] = []
    relay = new_log_relay(trt)
    builder = trt.Builder(relay)
    if request.precision != "fp32":
        if caps.platform_queries:
            _check_platform(builder, request.precision, device)
        else:
            warnings.append(f"TensorRT {caps.version} cannot report fast {request.precision.upper()} "
                            f"(platform queries were removed in 11.0); trusting {device}")
    network = _create_network(trt, builder, caps, route)
    parser = trt.OnnxParser(network, relay)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelLoadError(f"{onnx_path}: TensorRT {caps.version}'s ONNX parser rejected it: {errors}")
    inputs = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        inputs[tensor.name] = (_dims(tensor.shape), tensor.dtype)
    config = builder.create_builder_config()
    if request.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace_bytes)
    profile = _add_profile(builder, config, inputs, request.profile_shapes)
    _configure_dla(trt, builder, config, request, warnings)
    feed = None
    mixed_with = []
    if route == "implicit-calibrator":
        feed = _configure_implicit_int8(trt, config, profile, request, memory, inputs)
        mixed_with = ["fp16"] if request.int8_fp16_fallback else []
    elif route == "fp16-flag":
        _configure_fp16_flag(trt, config)
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
    if plan is None:
        raise EngineBuildError(f"TensorRT {caps.version} could not build {onnx_path.name} as "
                               f"{request.precision} via {route}: {' | '.join(relay.messages[-5:])}")
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
        mixed_with=mixed_with, warnings=warnings + relay.messages,
    )


def build_engine(onnx_path: str | Path, plan_path: str | Path, request: BuildRequest) -> BuildReport:
    """Build `onnx_path` into `plan_path` (+ sidecar) exactly as requested, or raise.

    Raises BackendUnavailable (no tensorrt/pycuda/GPU), ModelLoadError (unreadable ONNX or
    rejected by TensorRT's parser), PrecisionUnavailable / BuildUnsupported (not possible
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
    if route == "implicit-calibrator" and request.calibration is None and not (
            request.calibration_cache and request.calibration_cache.is_file()):
        raise BuildUnsupported("implicit INT8 calibration needs calibration batches or an existing "
                               "calibration cache")
    memory = open_device_memory(request.device_index)
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
