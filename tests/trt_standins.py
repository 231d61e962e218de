"""Stand-in `tensorrt` modules (8.5/8.6, 10.3, 11.4) for tests without a GPU.

Each stand-in `tensorrt` module is generated from `engines.trt_api.API` and exposes
ONLY the names that version's real Python bindings have: a name the code uses that
a version lacks raises AttributeError here, as it would on the device, and setting an
unknown attribute fails as it does on pybind11 objects. Every public call is recorded
in `module._calls`, with whether a CUDA context was current on the calling thread.
(The CUDA side, fake device memory, pycuda and cuda-python, is in `cuda_standins`.)

Behaviour is a small simulation, not TensorRT: the "plan" is JSON naming the ONNX
file, and an execution context runs that ONNX with ONNX Runtime on bytes kept in a
fake device memory (or, for host-located tensors, in real host memory at the address
given), so the whole build -> plan -> open -> infer path runs for real data. Rules
the real library enforces and the code must respect are enforced here:

* one logger per process: the first ILogger given to a Builder, Runtime, OnnxParser or
  init_libnvinfer_plugins receives every message; a later, different one is ignored with
  TensorRT's warning; if the first is garbage-collected, the next message "segfaults";
* a plugin registry: ONNX ops named *_TRT (EfficientNMS_TRT, ...) parse, and plans holding
  them deserialize, only after init_libnvinfer_plugins ran in the module ("process");
* EXPLICIT_BATCH on 8.x, no precision flags on strongly typed networks, a calibrator whose
  TensorRT base was initialised; DLA calibrates only with the entropy calibrator;
* calibration reads each input with the network's static shape or the calibration
  profile's OPT shape; dynamic inputs need a profile, and set_input_shape stays inside it;
* a build without a WORKSPACE limit takes all device memory (raises MemoryError, as the
  OOM killer would end the build on a Jetson); TF32 is on by default;
* tensor addresses must be 256-byte aligned; host-located (shape) tensors need host
  addresses and device-located ones device addresses; all must be set before execution;
* BF16/FP8/INT4 have no numpy type (nptype raises a bare TypeError, as the real one);
* plans only load in the TensorRT version that built them.

(Longer than our ~400-line modules: it simulates a library, one class per TensorRT class.)
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cuda_standins import FakeGpu, StandinMemory, install_cudart, install_pycuda, make_pycuda_driver
from engines.trt_api import API, ENUMS, family_of

__all__ = ["FakeGpu", "StandinMemory", "install_cudart", "install_pycuda", "make_pycuda_driver",
           "make_tensorrt", "plan_json", "public_names"]

PLAN_MAGIC = b"STANDIN-PLAN\n"
CACHE_MAGIC = b"STANDIN-TIMING"
ALIGN = 256

ENUM_VALUES: dict[str, dict[str, int]] = {
    "BuilderFlag": {"FP16": 0, "INT8": 1, "GPU_FALLBACK": 3, "STRICT_TYPES": 5, "TF32": 7,
                    "OBEY_PRECISION_CONSTRAINTS": 9},
    "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
    "MemoryPoolType": {"WORKSPACE": 0},
    "DeviceType": {"GPU": 0, "DLA": 1},
    "TensorIOMode": {"INPUT": 1, "OUTPUT": 2},
    "TensorLocation": {"DEVICE": 0, "HOST": 1},
    "DataType": {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6, "BF16": 7,
                 "INT64": 8, "INT4": 9},
}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
         "UINT8": np.uint8, "INT64": np.int64}
_P = onnx.TensorProto
ONNX_TYPES = {_P.FLOAT: "FLOAT", _P.FLOAT16: "HALF", _P.INT8: "INT8", _P.INT32: "INT32", _P.INT64: "INT64",
              _P.BOOL: "BOOL", _P.UINT8: "UINT8", _P.BFLOAT16: "BF16", _P.FLOAT8E4M3FN: "FP8", _P.INT4: "INT4"}
# ONNX ops whose listed inputs are shape tensors (TensorRT keeps them on the host).
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,)}
LOGGER_DIFFERS = ("The logger passed into createInferBuilder differs from one already provided for the previous "
                  "builder, runtime, or refitter. If a different logger is required, please create a new logger.")


# ---- behaviour of the stand-in classes (superset); make_tensorrt copies per version --------------

def _removed_api(*args: Any) -> Any:
    raise NotImplementedError("binding-era API (8.x only, removed in 10.0): jetagent must not use it")


class _Base:
    _trt: Any  # the generated module, set per generated class

    def __setattr__(self, name: str, value: Any) -> None:
        # pybind11 objects reject attributes their class does not define (Python subclasses may add them)
        generated = "_trt" in type(self).__dict__
        if generated and not name.startswith("_") and not hasattr(type(self), name):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        object.__setattr__(self, name, value)

    def _enum(self, kind: str, member: str) -> Any:
        return getattr(getattr(self._trt, kind), member)


class _ILogger(_Base):
    Severity = enum.IntEnum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"], start=0)
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self, min_severity: Any = None) -> None:
        self._base_init = True

    def log(self, severity: Any, msg: str) -> None:
        pass


class _Calibrator(_Base):
    def __init__(self) -> None:
        self._base_init = True

    def get_batch_size(self) -> int:
        raise NotImplementedError("pure virtual")

    def get_batch(self, names: list[str]) -> Any:
        raise NotImplementedError("pure virtual")

    def read_calibration_cache(self) -> Any:
        raise NotImplementedError("pure virtual")

    def write_calibration_cache(self, cache: Any) -> None:
        raise NotImplementedError("pure virtual")


class _ITensor(_Base):
    def __init__(self, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self._name, self._shape, self._dtype = name, shape, dtype

    name = property(lambda self: self._name)
    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)


class _INetworkDefinition(_Base):
    def __init__(self, flags: int) -> None:
        self._flags, self._onnx = flags, None
        self._inputs: list[Any] = []
        self._outputs: list[Any] = []
        self._locations: dict[str, str] = {}
        self._plugins: list[str] = []

    num_inputs = property(lambda self: len(self._inputs))

    def get_input(self, index: int) -> Any:
        return self._inputs[index]

    def _strongly_typed(self) -> bool:
        return bool(self._flags & 2) or family_of(self._trt.__version__) == "11"


class _OnnxParser(_Base):
    def __init__(self, network: Any, logger: Any) -> None:
        self._trt._adopt_logger(logger, "OnnxParser")
        self._network, self._logger = network, logger  # keep_alive, as the binding does
        self._errors: list[str] = []

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index: int) -> str:
        return self._errors[index]

    def parse(self, model: bytes, path: str | None = None) -> bool:
        return self._parse(onnx.load_from_string(model), path)

    def parse_from_file(self, model: str) -> bool:
        try:
            proto = onnx.load(model)
        except Exception as exc:
            self._errors.append(f"could not read {model}: {exc}")
            return False
        return self._parse(proto, model)

    def _parse(self, proto: Any, path: str | None) -> bool:
        network = self._network
        if family_of(self._trt.__version__) == "8.5" and not network._flags & 1:
            self._errors.append("ONNX parser only supports networks with an explicit batch dimension")
            return False
        plugins = sorted({n.op_type for n in proto.graph.node if n.op_type.endswith("_TRT")})
        if plugins and not self._trt._plugins:
            self._errors.append(f"No importer registered for op: {plugins[0]}. Attempting to import as plugin. "
                                "Plugin not found, are the plugin name, version, and namespace correct?")
            return False
        names = {init.name for init in proto.graph.initializer}
        host = {node.input[i] for node in proto.graph.node for i in SHAPE_INPUTS.get(node.op_type, ())
                if i < len(node.input)}
        host |= {out for node in proto.graph.node if node.op_type == "Shape" for out in node.output}

        def tensor(value: Any) -> Any:
            shape = value.type.tensor_type.shape
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim)
            kind = ONNX_TYPES.get(value.type.tensor_type.elem_type, "?")
            if kind == "INT64" and not hasattr(self._trt.DataType, "INT64"):
                kind = "INT32"  # 8.x casts INT64 I/O down
            if not hasattr(self._trt.DataType, kind):
                raise _ParseError(f"{value.name}: data type {kind} is not supported by this TensorRT")
            network._locations[value.name] = "HOST" if value.name in host else "DEVICE"
            return self._trt.ITensor(value.name, dims, self._enum("DataType", kind))

        try:
            network._inputs = [tensor(v) for v in proto.graph.input if v.name not in names]
            network._outputs = [tensor(v) for v in proto.graph.output]
        except _ParseError as exc:
            self._errors.append(str(exc))
            return False
        network._onnx, network._plugins = path, plugins
        return True


class _ParseError(Exception):
    pass


class _IOptimizationProfile(_Base):
    def __init__(self) -> None:
        self._shapes: dict[str, Any] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # the binding's argument names
        self._shapes[input] = [list(min), list(opt), list(max)]


class _ITimingCache(_Base):
    def __init__(self, data: bytes) -> None:
        self._data = bytes(data) or CACHE_MAGIC

    def serialize(self) -> bytes:
        return self._data


class _IBuilderConfig(_Base):
    def __init__(self) -> None:
        tf32 = getattr(self._trt.BuilderFlag, "TF32", None)
        self._flags: set[Any] = {tf32} if tf32 is not None else set()  # TF32: "Enabled by default"
        self._pools: dict[Any, int] = {}
        self._profiles: list[Any] = []
        self._calibrator: Any = None
        self._calibration_profile: Any = None
        self._timing: Any = None
        self._device_type = self._enum("DeviceType", "GPU")
        self._dla_core = -1

    def _check_flag(self, flag: Any) -> None:
        if not isinstance(flag, self._trt.BuilderFlag):
            raise TypeError(f"incompatible argument {flag!r}")

    def set_flag(self, flag: Any) -> None:
        self._check_flag(flag)
        self._flags.add(flag)

    def clear_flag(self, flag: Any) -> None:
        self._check_flag(flag)
        self._flags.discard(flag)

    def get_flag(self, flag: Any) -> bool:
        self._check_flag(flag)
        return flag in self._flags

    def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
        self._pools[pool] = pool_size

    def create_timing_cache(self, serialized_timing_cache: bytes) -> Any:
        return self._trt.ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        if not cache._data.startswith(CACHE_MAGIC):
            return False
        self._timing = cache
        return True

    def get_timing_cache(self) -> Any:
        return self._timing

    def add_optimization_profile(self, profile: Any) -> int:
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def set_calibration_profile(self, profile: Any) -> bool:
        if self._trt._refuse_calibration_profile or not profile._shapes:
            return False
        self._calibration_profile = profile
        return True

    def _set_calibrator(self, value: Any) -> None:
        self._calibrator = value

    int8_calibrator = property(lambda self: self._calibrator, _set_calibrator)
    max_workspace_size = property(_removed_api, _removed_api)  # 8.x only; jetagent must not use it
    default_device_type = property(lambda self: self._device_type,
                                   lambda self, v: object.__setattr__(self, "_device_type", v))
    DLA_core = property(lambda self: self._dla_core, lambda self, v: object.__setattr__(self, "_dla_core", v))


class _Builder(_Base):
    def __init__(self, logger: Any) -> None:
        self._trt._adopt_logger(logger, "Builder")
        self._logger = logger  # py::keep_alive<1, 2>: the builder keeps its logger alive, nothing more

    platform_has_fast_int8 = property(lambda self: self._trt._platform["int8"])
    platform_has_fast_fp16 = property(lambda self: self._trt._platform["fp16"])
    num_DLA_cores = property(lambda self: self._trt._platform["dla_cores"])

    build_engine = _removed_api

    def create_network(self, flags: int = 0) -> Any:
        return self._trt.INetworkDefinition(flags)

    def create_builder_config(self) -> Any:
        return self._trt.IBuilderConfig()

    def create_optimization_profile(self) -> Any:
        return self._trt.IOptimizationProfile()

    def build_serialized_network(self, network: Any, config: Any) -> bytes | None:
        trt = self._trt
        for index in range(trt._chatter):
            trt._log(trt.ILogger.WARNING, f"stand-in builder chatter {index + 1}")
        failure = self._check(network, config) or trt._build_error
        if failure:
            trt._log(trt.ILogger.ERROR, failure)
            return None
        if config._timing is not None:
            config._timing._data += b"+layer"
        flags = sorted(f.name for f in config._flags)
        profiles = [p._shapes for p in config._profiles]
        plan = {"version": trt.__version__, "onnx": network._onnx, "flags": flags, "profiles": profiles,
                "strongly_typed": network._strongly_typed(), "dla_core": config._dla_core,
                "workspace": {pool.name: size for pool, size in config._pools.items()},
                "plugins": network._plugins, "locations": network._locations,
                "inputs": [[t.name, list(t.shape), t.dtype.name] for t in network._inputs],
                "outputs": [[t.name, list(t.shape), t.dtype.name] for t in network._outputs]}
        trt._log(trt.ILogger.WARNING, "stand-in builder: plan is a simulation")
        return PLAN_MAGIC + json.dumps(plan).encode()

    def _check(self, network: Any, config: Any) -> str | None:
        if network._onnx is None:
            return "network is empty"
        if self._enum("MemoryPoolType", "WORKSPACE") not in config._pools:
            raise MemoryError("stand-in: no WORKSPACE limit, so the builder may take all device memory; on a "
                              "Jetson that is the shared RAM and the OOM killer ends the build process")
        flag_names = {f.name for f in config._flags}
        if network._strongly_typed() and flag_names & {"INT8", "FP16"}:
            return "precision flags must not be set on a strongly typed network"
        dynamic = {t.name: t.shape for t in network._inputs if -1 in t.shape}
        profile = config._profiles[0]._shapes if config._profiles else {}
        for name, shape in dynamic.items():
            if name not in profile:
                return f"Network has dynamic or shape inputs, but no optimization profile has been defined for {name}"
            if not all((d == -1 or lo == d == hi) and lo <= mid <= hi
                       for d, lo, mid, hi in zip(shape, *profile[name], strict=True)):
                return f"optimization profile for {name} {profile[name]} does not fit its shape {list(shape)}"
        if config._device_type.name == "DLA" and (config._dla_core >= self.num_DLA_cores
                                                 or "GPU_FALLBACK" not in flag_names):
            return "bad DLA configuration"
        if "INT8" in flag_names and not network._strongly_typed():
            if config._device_type.name == "DLA" and isinstance(config._calibrator, self._trt.IInt8MinMaxCalibrator):
                return "DLA requires the IInt8EntropyCalibrator2 calibrator"
            return self._calibrate(network, config)
        return None

    def _calibrate(self, network: Any, config: Any) -> str | None:
        calibrator = config._calibrator
        if calibrator is None:
            return "INT8 without a calibrator"
        if not getattr(calibrator, "_base_init", False):
            raise RuntimeError("segfault: calibrator trampoline base was not initialised")
        if calibrator.read_calibration_cache() is not None:
            return None
        shapes = {}
        for tensor in network._inputs:
            if -1 in tensor.shape:
                profile = config._calibration_profile
                if profile is None:
                    return "Calibration profile must be set for networks with dynamic shapes"
                shapes[tensor.name] = profile._shapes[tensor.name][1]  # "MIN and MAX ... overwritten by kOPT"
            else:
                shapes[tensor.name] = list(tensor.shape)
        calibrator.get_batch_size()
        names = [t.name for t in network._inputs]
        batches = 0
        while (pointers := calibrator.get_batch(names)) is not None:
            for ptr, tensor in zip(pointers, network._inputs, strict=True):
                nbytes = int(np.prod(shapes[tensor.name])) * np.dtype(NUMPY[tensor.dtype.name]).itemsize
                self._trt._gpu.read(ptr, nbytes)
            batches += 1
        if batches == 0:
            return "calibration failed: no batches"
        self._trt._calibrated.append(batches)
        calibrator.write_calibration_cache(memoryview(b"standin-calibration-table"))
        return None


class _Runtime(_Base):
    def __init__(self, logger: Any) -> None:
        self._trt._adopt_logger(logger, "Runtime")
        self._logger, self._dla = logger, -1  # keep_alive

    DLA_core = property(lambda self: self._dla, lambda self, v: object.__setattr__(self, "_dla", v))

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> Any:
        trt = self._trt
        data = bytes(serialized_engine)
        if not data.startswith(PLAN_MAGIC):
            trt._log(trt.ILogger.ERROR, "invalid plan magic")
            return None
        plan = json.loads(data[len(PLAN_MAGIC):])
        if plan["version"] != trt.__version__:
            trt._log(trt.ILogger.ERROR, f"plan built by {plan['version']}")
            return None
        if plan.get("plugins") and not trt._plugins:
            trt._log(trt.ILogger.ERROR, f"getPluginCreator could not find plugin: {plan['plugins'][0]} version: 1")
            trt._log(trt.ILogger.ERROR, "Cannot deserialize plugin since corresponding IPluginCreator not found "
                                        "in Plugin Registry")
            return None
        return trt.ICudaEngine(plan)


class _ICudaEngine(_Base):
    def __init__(self, plan: dict[str, Any]) -> None:
        self._plan = plan
        modes = (("INPUT", "inputs"), ("OUTPUT", "outputs"))
        self._io = {name: (mode, tuple(shape), dtype)
                    for mode, key in modes for name, shape, dtype in plan[key]}

    num_io_tensors = property(lambda self: len(self._io))
    num_bindings = property(_removed_api)
    get_binding_shape = _removed_api

    def get_tensor_name(self, index: int) -> str:
        return list(self._io)[index]

    def get_tensor_mode(self, name: str) -> Any:
        return self._enum("TensorIOMode", self._io[name][0])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._io[name][1]

    def get_tensor_dtype(self, name: str) -> Any:
        return self._enum("DataType", self._io[name][2])

    def get_tensor_location(self, name: str) -> Any:
        return self._enum("TensorLocation", self._plan.get("locations", {}).get(name, "DEVICE"))

    def create_execution_context(self) -> Any:
        return self._trt.IExecutionContext(self)


class _IExecutionContext(_Base):
    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._session: Any = None  # made at the first run: a plugin op is not something ORT can load

    execute_async_v2 = _removed_api

    def _location(self, name: str) -> str:
        return str(self._engine._plan.get("locations", {}).get(name, "DEVICE"))

    def set_input_shape(self, name: str, shape: Any) -> bool:
        fixed = self._engine._io[name][1]
        if len(shape) != len(fixed) or any(f not in (-1, s) for f, s in zip(fixed, shape, strict=True)):
            return False
        profiles = self._engine._plan.get("profiles") or [{}]
        low_opt_high = profiles[0].get(name)
        if low_opt_high is not None and not all(lo <= s <= hi for s, lo, hi in
                                                zip(shape, low_opt_high[0], low_opt_high[2], strict=True)):
            self._trt._log(self._trt.ILogger.ERROR, f"{name}: shape {list(shape)} is outside the optimization "
                                                    f"profile {low_opt_high}")
            return False
        self._shapes[name] = tuple(int(s) for s in shape)
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if int(memory) % ALIGN:
            self._trt._log(self._trt.ILogger.ERROR, f"{name}: address {int(memory):#x} is not {ALIGN}-byte aligned")
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        mode, shape, _ = self._engine._io[name]
        if mode == "INPUT":
            return self._shapes.get(name, shape)
        outputs = self._run(probe=True)
        return tuple(outputs[name].shape) if outputs is not None else shape

    def execute_async_v3(self, stream_handle: int) -> bool:
        trt = self._trt
        if set(self._addresses) != set(self._engine._io):
            trt._log(trt.ILogger.ERROR, f"addresses not set for {sorted(set(self._engine._io) - set(self._addresses))}")
            return False
        for name, address in self._addresses.items():
            on_device = trt._gpu.owns(address)
            if self._location(name) == "HOST" and on_device:
                trt._log(trt.ILogger.ERROR, f"{name} is a host (shape) tensor, but its address is device memory")
                return False
            if self._location(name) == "DEVICE" and not on_device:
                trt._log(trt.ILogger.ERROR, f"{name} is a device tensor, but its address is not device memory")
                return False
        outputs = self._run(probe=False)
        if outputs is None:
            return False
        for name, array in outputs.items():
            data = np.ascontiguousarray(array, dtype=NUMPY[self._engine._io[name][2]]).tobytes()
            if self._location(name) == "HOST":
                ctypes.memmove(self._addresses[name], data, len(data))
            else:
                trt._gpu.write(self._addresses[name], data)
        return True

    def _run(self, probe: bool) -> dict[str, np.ndarray] | None:
        """Run the ONNX. probe=True (output shapes): device inputs are zeros, host (shape) inputs are read."""
        import onnxruntime

        if self._session is None:
            self._session = onnxruntime.InferenceSession(self._engine._plan["onnx"],
                                                         providers=["CPUExecutionProvider"])
        feeds = {}
        for name, (mode, _, dtype) in self._engine._io.items():
            if mode != "INPUT":
                continue
            if name not in self._shapes:
                return None
            shape, np_type = self._shapes[name], np.dtype(NUMPY[dtype])
            nbytes = int(np.prod(shape)) * np_type.itemsize
            if self._location(name) == "HOST":
                if name not in self._addresses or self._trt._gpu.owns(self._addresses[name]):
                    return None  # shape values unknown (or unreadable) yet
                raw = ctypes.string_at(self._addresses[name], nbytes)
            else:
                raw = bytes(nbytes) if probe else self._trt._gpu.read(self._addresses[name], nbytes)
            onnx_type = {i.name: i.type for i in self._session.get_inputs()}[name]
            value = np.frombuffer(raw, np_type).reshape(shape)
            feeds[name] = value.astype(np.int64) if onnx_type == "tensor(int64)" else value
        names = [o.name for o in self._session.get_outputs()]
        return dict(zip(names, self._session.run(names, feeds), strict=True))


IMPLS: dict[str, type] = {
    "ILogger": _ILogger, "Logger": _ILogger, "Builder": _Builder, "IBuilderConfig": _IBuilderConfig,
    "INetworkDefinition": _INetworkDefinition, "ITensor": _ITensor, "OnnxParser": _OnnxParser,
    "IOptimizationProfile": _IOptimizationProfile, "ITimingCache": _ITimingCache, "Runtime": _Runtime,
    "ICudaEngine": _ICudaEngine, "IExecutionContext": _IExecutionContext, "IInt8Calibrator": _Calibrator,
    "IInt8EntropyCalibrator2": _Calibrator, "IInt8MinMaxCalibrator": _Calibrator, "IHostMemory": _Base,
}
BASES = {"Logger": "ILogger", "IInt8EntropyCalibrator2": "IInt8Calibrator",
         "IInt8MinMaxCalibrator": "IInt8Calibrator"}
_SKIP = {"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__"}


def _recording(module: Any, owner: str, name: str, func: Any) -> Any:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        module._calls.append((f"{owner}.{name}", args, module._gpu.active > 0))
        return func(self, *args, **kwargs)

    call.__name__ = name
    return call


def _member(module: Any, owner: str, impl: type, name: str) -> Any:
    for klass in impl.__mro__:
        if name in klass.__dict__:
            value = klass.__dict__[name]
            if isinstance(value, property) and value.fset is not None:
                return property(value.fget, _recording(module, owner, name, value.fset))
            return _recording(module, owner, name, value) if callable(value) and not isinstance(
                value, type | enum.Enum) else value
    raise AssertionError(f"stand-in {impl.__name__} lacks {name}; extend trt_standins")


def make_tensorrt(version: str, *, fast_int8: bool = True, fast_fp16: bool = True, dla_cores: int = 0,
                  gpu: FakeGpu | None = None, chatter: int = 0, refuse_calibration_profile: bool = False,
                  build_error: str | None = None) -> types.ModuleType:
    """A `tensorrt` module with exactly the names `version` has, per engines.trt_api.API.

    One module stands for one process's TensorRT: its logger, plugin registry and device.
    chatter: warnings each build logs before its outcome; refuse_calibration_profile: make
    set_calibration_profile return False (as TensorRT does for a profile it cannot use);
    build_error: every build fails with this error (a TensorRT-internal failure, e.g. out of memory).
    """
    family = family_of(version)
    module = types.ModuleType("tensorrt")
    module.__dict__.update(_calls=[], _gpu=gpu or FakeGpu(), _calibrated=[], __version__=version,
                           _platform={"int8": fast_int8, "fp16": fast_fp16, "dla_cores": dla_cores},
                           _logger_ref=None, _ignored_loggers=0, _plugins=False, _chatter=chatter,
                           _refuse_calibration_profile=refuse_calibration_profile, _build_error=build_error)
    members: dict[str, list[str]] = defaultdict(list)
    top: list[str] = []
    for row in API:
        if family in row.families:
            owner, _, member = row.name.partition(".")
            (members[owner].append(member) if member else top.append(owner))
    for owner in sorted(set(members) | {t for t in top if t[0].isupper()}, key=lambda n: n in BASES):
        if owner in ENUMS:
            setattr(module, owner, enum.IntEnum(owner, {m: ENUM_VALUES[owner][m] for m in members[owner]}))
            continue
        impl = IMPLS[owner]
        namespace: dict[str, Any] = {"_trt": module}
        for klass in reversed(impl.__mro__):
            private = {k: v for k, v in klass.__dict__.items() if k.startswith("_") and k not in _SKIP}
            namespace.update(private)
        namespace.update({m: _member(module, owner, impl, m) for m in members[owner]})
        base = getattr(module, BASES[owner]) if owner in BASES else object
        setattr(module, owner, type(owner, (base,), namespace))

    def first_logger() -> Any:
        ref = module._logger_ref
        if ref is None:
            return None
        logger = ref()
        if logger is None:
            raise RuntimeError("segfault: TensorRT logs through the first logger it was given, and that logger "
                               "was garbage-collected (a logger per Builder/Runtime, freed with it)")
        return logger

    def log(severity: Any, msg: str) -> None:
        logger = first_logger()
        if logger is not None:
            logger.log(severity, msg)

    def adopt_logger(logger: Any, who: str) -> None:
        if not getattr(logger, "_base_init", False):
            raise TypeError(f"{who}(): logger is not an initialised ILogger")
        first = first_logger()
        if first is None:
            module._logger_ref = weakref.ref(logger)
        elif first is not logger:
            module._ignored_loggers += 1
            first.log(module.ILogger.WARNING, LOGGER_DIFFERS)

    def init_libnvinfer_plugins(logger: Any, namespace: str) -> bool:
        module._calls.append(("init_libnvinfer_plugins", (namespace,), module._gpu.active > 0))
        adopt_logger(logger, "init_libnvinfer_plugins")  # a free function: no keep_alive on the logger
        module._plugins = True
        return True

    def nptype(trt_type: Any) -> Any:
        if trt_type.name not in NUMPY:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return NUMPY[trt_type.name]

    module.__dict__.update(nptype=nptype, volume=lambda shape: int(np.prod(list(shape))), _log=log,
                           _adopt_logger=adopt_logger)
    if "init_libnvinfer_plugins" in top:
        module.init_libnvinfer_plugins = init_libnvinfer_plugins  # type: ignore[attr-defined]
    return module


def public_names(module: types.ModuleType) -> set[str]:
    """Every public name a stand-in module exposes, as "Class.member" / "function"."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_") and name != "__version__":
            continue
        names.add(name)
        if isinstance(value, enum.EnumMeta):
            names.update(f"{name}.{m}" for m in value.__members__)
        elif isinstance(value, type):  # own members only: Logger inherits ILogger's, as in the bindings
            names.update(f"{name}.{m}" for m in value.__dict__ if not m.startswith("_"))
    return names


def plan_json(plan_path: Path) -> dict[str, Any]:
    """Decode a stand-in plan file."""
    data = plan_path.read_bytes()
    assert data.startswith(PLAN_MAGIC)
    result: dict[str, Any] = json.loads(data[len(PLAN_MAGIC):])
    return result
