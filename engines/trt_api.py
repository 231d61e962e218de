"""Which TensorRT version has which Python names, and what the installed one can do.

This is the only module that knows TensorRT's version differences. It holds:

* `API`: every TensorRT Python name jetagent uses (and a few it deliberately
  avoids), with the version families that have it: "8.5" (8.5-8.6, JetPack 5),
  "10" (10.x, JetPack 6) and "11" (11.x, JetPack 7.2.2+ with TensorRT 11.4.1).
* `ROUTES` and `CODE_PATHS`: which families a build route (or a version-specific
  piece of code, tagged with `code_path`) runs on. A test walks the code's AST
  and checks every TensorRT name it touches against `API` for those families.
* `detect_capabilities(trt)`: what the *installed* module actually has, found by
  `hasattr`, never by version strings alone.
* `choose_route(...)`: the route rules. Which route builds a precision depends on the
  installed module and on the ONNX itself (`inspect_onnx`: Q/DQ nodes? float16 tensors?),
  and a request that cannot be met raises `PrecisionUnavailable` saying why.

It is a little over 400 lines because the table is data (one row group per API family);
keeping every version difference in one file is the point of the module.

Sources for the table (read, not run: no GPU here):
  [bind-X]  NVIDIA/TensorRT python/src/infer/pyCore.cpp, pyInt8.cpp, pyOnnx.cpp and
            python/packaging/.../__init__.py at tags 8.5.3, v8.6.1, v10.3.0, v11.1.
  [mig10]   TensorRT docs, "Migrating Python Code from TensorRT 8.x to 10.x" (removed APIs).
  [mig11]   TensorRT 11.4 docs, "Removed Python APIs and Replacements" (10.x -> 11.x).
  [dep]     TensorRT C++ API "Deprecated List" (calibrators deprecated 10.1,
            platformHasFast* deprecated 10.5) and NvInfer.h at v10.16
            (BuilderFlag kFP16/kINT8 deprecated in 10.12).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from engines.errors import BackendUnavailable, JetagentError, ModelLoadError

logger = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = ("8.5", "10", "11")
ALL = frozenset(FAMILIES)
UP_TO_10 = frozenset({"8.5", "10"})
FROM_10 = frozenset({"10", "11"})
ONLY_8 = frozenset({"8.5"})

INSTALL_HINT = (
    "On a Jetson, TensorRT's Python bindings come with JetPack (apt package nvidia-tensorrt / "
    "python3-libnvinfer); device buffers need cuda-python (pip install 'cuda-python==<CUDA major.minor>.*') "
    "or pycuda (built from source against JetPack's CUDA). scripts/install_jetson.sh sets up whichever "
    "works. Create the agent's venv with 'python3 -m venv --system-site-packages' so the system "
    "tensorrt module is visible."
)


@dataclass(frozen=True)
class ApiName:
    """One Python name of the `tensorrt` module: "Class", "Class.member" or "function"."""

    name: str
    families: frozenset[str]
    source: str


def _rows(families: frozenset[str], source: str, *names: str) -> tuple[ApiName, ...]:
    return tuple(ApiName(n, families, source) for n in names)


# Enum classes: their dotted members are enum values, not methods.
ENUMS = frozenset({
    "BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType", "DeviceType",
    "TensorIOMode", "DataType", "TensorLocation",
})

API: tuple[ApiName, ...] = (
    # module level
    *_rows(ALL, "bind-X", "__version__", "nptype", "volume"),
    # the plugin library (EfficientNMS_TRT, ...) registers itself only when asked, once per process,
    # with a logger that must outlive it (a free function: no keep_alive) [bind-X pyPlugin.cpp]
    *_rows(ALL, "bind-X", "init_libnvinfer_plugins"),
    *_rows(ALL, "bind-X", "Logger", "Logger.WARNING", "ILogger", "ILogger.log",
           "ILogger.INTERNAL_ERROR", "ILogger.ERROR", "ILogger.WARNING", "ILogger.INFO",
           "ILogger.VERBOSE"),
    # build phase, common to every family
    *_rows(ALL, "bind-X", "Builder", "Builder.create_network", "Builder.create_builder_config",
           "Builder.create_optimization_profile", "Builder.build_serialized_network",
           "Builder.num_DLA_cores"),
    *_rows(ALL, "bind-X", "INetworkDefinition.num_inputs", "INetworkDefinition.get_input",
           "ITensor.name", "ITensor.shape", "ITensor.dtype"),
    *_rows(ALL, "bind-X", "OnnxParser", "OnnxParser.parse", "OnnxParser.parse_from_file",
           "OnnxParser.num_errors", "OnnxParser.get_error"),
    *_rows(ALL, "bind-X", "IBuilderConfig.set_flag", "IBuilderConfig.set_memory_pool_limit",
           "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache",
           "IBuilderConfig.get_timing_cache", "IBuilderConfig.add_optimization_profile",
           "IBuilderConfig.default_device_type", "IBuilderConfig.DLA_core",
           "ITimingCache.serialize", "IOptimizationProfile.set_shape", "IHostMemory",
           "MemoryPoolType.WORKSPACE", "BuilderFlag.GPU_FALLBACK", "DeviceType.GPU",
           "DeviceType.DLA"),
    # TF32 is on by default ("Enabled by default", NvInfer.h at 8.6.1, 10.3.0 and 11.1): an FP32
    # engine clears it [bind-X; NvInfer.h]
    *_rows(ALL, "bind-X", "BuilderFlag.TF32", "IBuilderConfig.clear_flag", "IBuilderConfig.get_flag"),
    # weak typing and implicit quantization: gone in 11.x [mig11]
    *_rows(UP_TO_10, "bind-X, mig11", "BuilderFlag.INT8", "BuilderFlag.FP16",
           "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "IBuilderConfig.int8_calibrator",
           "IBuilderConfig.set_calibration_profile", "Builder.platform_has_fast_int8",
           "Builder.platform_has_fast_fp16", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
           "IInt8Calibrator", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator"),
    *_rows(UP_TO_10, "bind-X", *(f"{cls}.{m}" for cls in ("IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator")
                                 for m in ("get_batch_size", "get_batch", "read_calibration_cache",
                                           "write_calibration_cache"))),
    # strong typing arrived in 10.0; in 11.x it is always on and the flag is accepted [bind-X v11.1]
    *_rows(FROM_10, "bind-X", "NetworkDefinitionCreationFlag.STRONGLY_TYPED"),
    # run phase: the tensor-name API exists from 8.5 on, so one path covers 8.5-11 [bind-X]
    *_rows(ALL, "bind-X", "Runtime", "Runtime.deserialize_cuda_engine", "Runtime.DLA_core",
           "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name", "ICudaEngine.get_tensor_mode",
           "ICudaEngine.get_tensor_shape", "ICudaEngine.get_tensor_dtype",
           "ICudaEngine.create_execution_context", "IExecutionContext.set_input_shape",
           "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3",
           "IExecutionContext.get_tensor_shape", "TensorIOMode.INPUT", "TensorIOMode.OUTPUT"),
    # shape tensors live on the host: their address must be a host pointer [NvInferRuntime.h
    # setTensorAddress; bind-X get_tensor_location, 8.5 on]
    *_rows(ALL, "bind-X", "ICudaEngine.get_tensor_location", "TensorLocation.DEVICE", "TensorLocation.HOST"),
    *_rows(ALL, "bind-X", "DataType.FLOAT", "DataType.HALF", "DataType.INT8", "DataType.INT32",
           "DataType.BOOL", "DataType.UINT8"),
    *_rows(FROM_10, "bind-X", "DataType.INT64"),
    # types numpy cannot hold: trt.nptype raises a bare TypeError on them (8.6 has FP8 too; the table
    # lists it from 10 on, where the families agree) [bind-X pyFoundationalTypes.cpp, __init__.py]
    *_rows(FROM_10, "bind-X", "DataType.BF16", "DataType.FP8", "DataType.INT4"),
    # the binding API, removed in 10.0 [mig10]; listed so nobody reaches for it
    *_rows(ONLY_8, "bind-X, mig10", "ICudaEngine.num_bindings", "ICudaEngine.get_binding_shape",
           "IExecutionContext.execute_async_v2", "Builder.build_engine",
           "IBuilderConfig.max_workspace_size", "BuilderFlag.STRICT_TYPES"),
)

API_BY_NAME: dict[str, ApiName] = {row.name: row for row in API}

# Build routes: precision -> how TensorRT is told about it. Families are where the route works.
ROUTES: dict[str, tuple[str, frozenset[str]]] = {
    # weakly typed network + BuilderFlag.INT8 + an IInt8 calibrator (removed in 11.0) [mig11]
    "implicit-calibrator": ("int8", UP_TO_10),
    # a Q/DQ ONNX parsed into a STRONGLY_TYPED network, no precision flags [mig11; explicit-quantization]
    "explicit-qdq": ("int8", FROM_10),
    # weakly typed network + BuilderFlag.FP16 (removed in 11.0) [mig11]
    "fp16-flag": ("fp16", UP_TO_10),
    # an FP16-typed ONNX (ModelOpt AutoCast) in a STRONGLY_TYPED network [mig11 Python patterns]
    "fp16-onnx": ("fp16", FROM_10),
    # an FP32 ONNX with no precision flags: weakly typed on 8.5/10, strongly typed on 11
    "fp32": ("fp32", ALL),
}

# Version-specific code, tagged with @code_path(name). The AST test checks the TensorRT names
# a tagged function uses against these families; untagged code must work on all families.
CODE_PATHS: dict[str, frozenset[str]] = {
    **{route: families for route, (_, families) in ROUTES.items()},
    "strong-typing": FROM_10,
    "platform-queries": UP_TO_10,
    "explicit-batch-flag": ONLY_8,
}

_F = TypeVar("_F", bound=Callable[..., Any])


def code_path(name: str) -> Callable[[_F], _F]:
    """Mark a function as running only on `CODE_PATHS[name]` families. Changes nothing at run time."""
    if name not in CODE_PATHS:
        raise ValueError(f"unknown code path {name!r}; add it to CODE_PATHS")

    def mark(func: _F) -> _F:
        func.__dict__["trt_code_path"] = name
        return func

    return mark


def family_of(version: str) -> str:
    """Map a TensorRT version string to a table family ("8.5", "10", "11") or "unknown"."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return "unknown"
    if major == 8 and minor >= 5:
        return "8.5"
    if major in (9, 10):  # 9.x was never a JetPack release; its API is 10's
        return "10"
    if major >= 11:
        return "11"
    return "unknown"


def has_name(trt: Any, dotted: str) -> bool:
    """True when the installed module has `dotted` ("BuilderFlag.INT8"), found by attribute lookup."""
    obj: Any = trt
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


@dataclass(frozen=True)
class Capabilities:
    """What the installed TensorRT module can do, found by inspecting it (no GPU needed)."""

    version: str
    family: str
    routes: tuple[str, ...]            # build routes whose names are all present
    tensor_io_api: bool                # the one inference path (num_io_tensors ... execute_async_v3)
    strongly_typed: bool               # NetworkDefinitionCreationFlag.STRONGLY_TYPED exists
    platform_queries: bool             # Builder.platform_has_fast_int8/fp16 exist (gone in 11.0)
    weak_typing: bool                  # BuilderFlag.FP16/INT8 exist, so strong typing must be asked for
    explicit_batch_flag: bool          # 8.x: networks default to implicit batch, pass EXPLICIT_BATCH
    missing: tuple[str, ...]           # names of the common path that this module lacks
    route_missing: dict[str, tuple[str, ...]] = field(default_factory=dict)  # route -> absent names

    def routes_for(self, precision: str) -> tuple[str, ...]:
        """Routes available here for one precision, in preference order."""
        return tuple(r for r in self.routes if ROUTES[r][0] == precision)

    @property
    def int8_routes(self) -> tuple[str, ...]:
        return self.routes_for("int8")

    @property
    def fp16_routes(self) -> tuple[str, ...]:
        return self.routes_for("fp16")

    def as_dict(self) -> dict[str, object]:
        return {
            "version": self.version, "family": self.family, "routes": list(self.routes),
            "tensor_io_api": self.tensor_io_api, "strongly_typed": self.strongly_typed,
            "platform_queries": self.platform_queries, "weak_typing": self.weak_typing,
            "explicit_batch_flag": self.explicit_batch_flag, "missing": list(self.missing),
        }


# Names each route needs from the module, probed with has_name().
_ROUTE_NEEDS: dict[str, tuple[str, ...]] = {
    "implicit-calibrator": ("BuilderFlag.INT8", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
                            "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile"),
    "explicit-qdq": ("NetworkDefinitionCreationFlag.STRONGLY_TYPED",),
    "fp16-flag": ("BuilderFlag.FP16",),
    "fp16-onnx": ("NetworkDefinitionCreationFlag.STRONGLY_TYPED",),
    "fp32": (),
}
_INFERENCE_NEEDS = (
    "init_libnvinfer_plugins", "ICudaEngine.get_tensor_location",
    "Runtime.deserialize_cuda_engine", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_shape", "ICudaEngine.get_tensor_dtype",
    "IExecutionContext.set_input_shape", "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3", "IExecutionContext.get_tensor_shape", "nptype",
)
_BUILD_NEEDS = (
    "Builder.build_serialized_network", "IBuilderConfig.set_memory_pool_limit", "MemoryPoolType.WORKSPACE",
    "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "OnnxParser",
)


def detect_capabilities(trt: Any) -> Capabilities:
    """Inspect an imported `tensorrt` module (real or stand-in) and say what it supports."""
    version = str(getattr(trt, "__version__", "unknown"))
    family = family_of(version)
    route_missing = {r: tuple(n for n in needs if not has_name(trt, n)) for r, needs in _ROUTE_NEEDS.items()}
    strongly_typed = has_name(trt, "NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    caps = Capabilities(
        version=version,
        family=family,
        routes=tuple(r for r, absent in route_missing.items() if not absent),
        tensor_io_api=all(has_name(trt, n) for n in _INFERENCE_NEEDS),
        strongly_typed=strongly_typed,
        platform_queries=has_name(trt, "Builder.platform_has_fast_int8")
        and has_name(trt, "Builder.platform_has_fast_fp16"),
        weak_typing=has_name(trt, "BuilderFlag.FP16") or has_name(trt, "BuilderFlag.INT8"),
        # EXPLICIT_BATCH without STRONGLY_TYPED means 8.x, where implicit batch is the default.
        # 10.x keeps the flag but ignores it ("networks are always explicit batch"), 11.x removed it.
        explicit_batch_flag=not strongly_typed
        and has_name(trt, "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"),
        missing=tuple(n for n in _INFERENCE_NEEDS + _BUILD_NEEDS if not has_name(trt, n)),
        route_missing=route_missing,
    )
    logger.debug("TensorRT capabilities: %s", caps)
    return caps


class BuildUnsupported(JetagentError):
    """This TensorRT or device cannot build what was asked. Nothing was built."""


class PrecisionUnavailable(BuildUnsupported):
    """The requested precision, or the route asked for, is not available here. Nothing was built."""


class EngineBuildError(JetagentError):
    """TensorRT failed while calibrating or building."""


INT8_ROUTES = ("auto", "implicit-calibrator", "explicit-qdq")
FP16_ROUTES = ("auto", "fp16-flag", "fp16-onnx")


@dataclass(frozen=True)
class OnnxKinds:
    """What the ONNX itself says about precision."""

    has_qdq: bool
    has_fp16: bool


def load_onnx(path: Path) -> Any | None:
    """The ONNX ModelProto (no external data), None when the onnx package is missing;
    ModelLoadError when the file is not a readable ONNX model."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelLoadError(f"{path}: not a readable ONNX model: {exc}") from exc


def inspect_onnx(path: Path) -> OnnxKinds | None:
    """Look for Q/DQ nodes and float16 tensors. None when the onnx package is missing."""
    model = load_onnx(path)
    if model is None:
        return None
    import onnx

    graph, fp16 = model.graph, onnx.TensorProto.FLOAT16
    ops = {node.op_type for node in graph.node}
    typed = [*graph.input, *graph.output, *graph.value_info]
    has_fp16 = (any(t.data_type == fp16 for t in graph.initializer)
                or any(v.type.tensor_type.elem_type == fp16 for v in typed)
                or any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute)
                       for n in graph.node))
    return OnnxKinds(has_qdq=bool(ops & {"QuantizeLinear", "DequantizeLinear"}), has_fp16=has_fp16)


_ROUTE_HINTS = {
    "implicit-calibrator": "implicit INT8 calibration was removed in TensorRT 11; use explicit-qdq "
                           "with a QDQ ONNX (calibration module's QDQ export)",
    "explicit-qdq": "explicit-qdq needs strongly typed networks (TensorRT 10+); use implicit-calibrator",
    "fp16-flag": "BuilderFlag.FP16 was removed in TensorRT 11; convert the ONNX to FP16 "
                 "(ModelOpt AutoCast) and use fp16-onnx",
    "fp16-onnx": "fp16-onnx needs strongly typed networks (TensorRT 10+); use fp16-flag",
}


def choose_route(caps: Capabilities, precision: str, kinds: OnnxKinds | None, int8_route: str = "auto",
                 fp16_route: str = "auto") -> str:
    """Pick the build route for `precision` on this TensorRT and this ONNX, or raise PrecisionUnavailable.

    kinds=None (onnx not importable) skips the checks of the ONNX's own types.
    """
    qdq = kinds is not None and kinds.has_qdq
    fp16 = kinds is not None and kinds.has_fp16
    if precision == "int8":
        route = int8_route
        if route == "auto":
            if kinds is None:
                raise PrecisionUnavailable("int8_route='auto' needs the onnx package to tell a QDQ model "
                                           "from a float one; name the route")
            route = "explicit-qdq" if qdq else "implicit-calibrator"
    elif precision == "fp16":
        route = fp16_route
        if route == "auto":
            route = "fp16-onnx" if fp16 and "fp16-onnx" in caps.routes else "fp16-flag"
    else:
        route = "fp32"
    if route not in caps.routes:
        missing = ", ".join(caps.route_missing.get(route, ()))
        raise PrecisionUnavailable(f"{precision.upper()} via {route} is not available in TensorRT "
                                   f"{caps.version} (missing {missing}): {_ROUTE_HINTS.get(route, '')}")
    if qdq and route != "explicit-qdq":
        raise PrecisionUnavailable(f"the ONNX holds Q/DQ nodes, which always build INT8; {precision} via "
                                   f"{route} would not be what was asked (ask for int8 via explicit-qdq)")
    if route == "explicit-qdq" and kinds is not None and not qdq:
        raise PrecisionUnavailable("explicit-qdq needs a QDQ ONNX; this one has no QuantizeLinear/"
                                   "DequantizeLinear nodes")
    if route == "fp16-onnx" and kinds is not None and not fp16:
        raise PrecisionUnavailable("fp16-onnx needs an ONNX with float16 tensors (ModelOpt AutoCast); "
                                   "this one has none")
    if route == "fp32" and fp16:
        raise PrecisionUnavailable("the ONNX holds float16 tensors; FP32 needs the FP32 model")
    return route


def import_tensorrt() -> Any:
    """Import the installed `tensorrt` module, or raise BackendUnavailable saying how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT is not importable here ({exc}). {INSTALL_HINT}") from exc


# TensorRT DataType member name -> numpy dtype. BF16, FP8, INT4, FP4 and E8M0 have no numpy type.
NUMPY_TYPES: dict[str, str] = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32",
                               "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


def numpy_dtype(trt_type: Any, what: str) -> np.dtype[Any]:
    """The numpy dtype of a TensorRT DataType, or ModelLoadError naming `what` and the type.

    `trt.nptype` raises a bare TypeError on BF16/FP8/INT4 ("Could not resolve TensorRT
    datatype"), which would escape as an internal error; this says which tensor and why.
    """
    name = str(getattr(trt_type, "name", trt_type))
    if name not in NUMPY_TYPES:
        raise ModelLoadError(f"{what} has TensorRT type {name}, which numpy cannot hold; jetagent feeds and "
                             f"reads {', '.join(sorted(NUMPY_TYPES))} tensors only (export the model with "
                             "float32 or float16 inputs and outputs)")
    return np.dtype(NUMPY_TYPES[name])
