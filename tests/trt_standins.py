"""Stand-in `tensorrt` (8.5/8.6, 10.3, 11.4) and `pycuda.driver` modules for tests without a GPU.

Each stand-in `tensorrt` module is generated from `engines.trt_api.API` and exposes
ONLY the names that version's real Python bindings have: a name the code uses that
a version lacks raises AttributeError here, as it would on the device, and setting an
unknown attribute fails as it does on pybind11 objects. Every public call is recorded
in `module._calls`, with whether the CUDA context was current.

Behaviour is a small simulation, not TensorRT: the "plan" is JSON naming the ONNX
file, and an execution context runs that ONNX with ONNX Runtime on bytes kept in a
fake device memory, so the whole build -> plan -> open -> infer path runs for real
data. Rules the real library enforces that the code must respect are enforced here:
EXPLICIT_BATCH on 8.x, no precision flags on strongly typed networks, a calibrator
whose TensorRT base was initialised, tensor addresses set before execution, plans
only loading in the TensorRT version that built them.
"""

from __future__ import annotations

import contextlib
import enum
import json
import types
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engines.cuda_mem import DeviceBuffer, DeviceInfo
from engines.trt_api import API, ENUMS, family_of

PLAN_MAGIC = b"STANDIN-PLAN\n"
CACHE_MAGIC = b"STANDIN-TIMING"

ENUM_VALUES: dict[str, dict[str, int]] = {
    "BuilderFlag": {"FP16": 0, "INT8": 1, "GPU_FALLBACK": 3, "STRICT_TYPES": 5,
                    "OBEY_PRECISION_CONSTRAINTS": 9},
    "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
    "MemoryPoolType": {"WORKSPACE": 0},
    "DeviceType": {"GPU": 0, "DLA": 1},
    "TensorIOMode": {"INPUT": 1, "OUTPUT": 2},
    "DataType": {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "INT64": 8},
}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
         "UINT8": np.uint8, "INT64": np.int64}
_P = onnx.TensorProto
ONNX_TYPES = {_P.FLOAT: "FLOAT", _P.FLOAT16: "HALF", _P.INT8: "INT8", _P.INT32: "INT32", _P.INT64: "INT64",
              _P.BOOL: "BOOL", _P.UINT8: "UINT8"}


@dataclass
class FakeGpu:
    """Device memory as a dict of bytearrays, shared by the stand-in TensorRT and memory seam."""

    blocks: dict[int, bytearray] = field(default_factory=dict)
    next_ptr: int = 0x1000
    active: int = 0  # depth of activate() blocks: TensorRT calls must happen inside one

    def alloc(self, nbytes: int) -> int:
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + max(nbytes, 1) + 0x100
        self.blocks[ptr] = bytearray(nbytes)
        return ptr

    def read(self, ptr: int, nbytes: int) -> bytes:
        if ptr not in self.blocks or len(self.blocks[ptr]) < nbytes:
            raise RuntimeError(f"illegal device read of {nbytes} bytes at {ptr:#x}")
        return bytes(self.blocks[ptr][:nbytes])

    def write(self, ptr: int, data: bytes) -> None:
        if ptr not in self.blocks or len(self.blocks[ptr]) < len(data):
            raise RuntimeError(f"illegal device write of {len(data)} bytes at {ptr:#x}")
        self.blocks[ptr][: len(data)] = data


class StandinMemory:
    """`engines.cuda_mem.DeviceMemory` over a FakeGpu; records what happened."""

    def __init__(self, gpu: FakeGpu, name: str = "Stand-in Orin") -> None:
        self.gpu = gpu
        self.info = DeviceInfo(0, name, (8, 7), 8 << 30)
        self.stream_handle = 0x5EED
        self.closed = False
        self.syncs = 0
        self.allocated: list[int] = []

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        if self.closed:
            raise RuntimeError("memory used after close")
        self.gpu.active += 1
        try:
            yield
        finally:
            self.gpu.active -= 1

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = self.gpu.alloc(nbytes)
        self.allocated.append(ptr)
        return DeviceBuffer(ptr=ptr, nbytes=nbytes)

    def free(self, buffer: DeviceBuffer) -> None:
        self.gpu.blocks.pop(buffer.ptr, None)

    def pagelocked_empty(self, shape: Any, dtype: Any) -> np.ndarray:
        return np.empty(tuple(shape), dtype)

    def copy_to_device(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        self.gpu.write(dst.ptr, np.ascontiguousarray(src).tobytes())

    def copy_to_host(self, dst: np.ndarray, src: DeviceBuffer) -> None:
        dst[...] = np.frombuffer(self.gpu.read(src.ptr, dst.nbytes), dst.dtype).reshape(dst.shape)

    def synchronize(self) -> None:
        self.syncs += 1

    def close(self) -> None:
        self.closed = True


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

    num_inputs = property(lambda self: len(self._inputs))

    def get_input(self, index: int) -> Any:
        return self._inputs[index]

    def _strongly_typed(self) -> bool:
        return bool(self._flags & 2) or family_of(self._trt.__version__) == "11"


class _OnnxParser(_Base):
    def __init__(self, network: Any, logger: Any) -> None:
        self._network = network
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
        names = {init.name for init in proto.graph.initializer}

        def tensor(value: Any) -> Any:
            shape = value.type.tensor_type.shape
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim)
            kind = ONNX_TYPES[value.type.tensor_type.elem_type]
            if kind == "INT64" and not hasattr(self._trt.DataType, "INT64"):
                kind = "INT32"  # 8.x casts INT64 I/O down
            return self._trt_tensor(value.name, dims, self._enum("DataType", kind))

        network._inputs = [tensor(v) for v in proto.graph.input if v.name not in names]
        network._outputs = [tensor(v) for v in proto.graph.output]
        network._onnx = path
        return True

    def _trt_tensor(self, name: str, dims: tuple[int, ...], dtype: Any) -> Any:
        return self._trt.ITensor(name, dims, dtype)


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
        self._flags: set[Any] = set()
        self._pools: dict[Any, int] = {}
        self._profiles: list[Any] = []
        self._calibrator: Any = None
        self._calibration_profile: Any = None
        self._timing: Any = None
        self._device_type = self._enum("DeviceType", "GPU")
        self._dla_core = -1

    def set_flag(self, flag: Any) -> None:
        if not isinstance(flag, self._trt.BuilderFlag):
            raise TypeError(f"set_flag(): incompatible argument {flag!r}")
        self._flags.add(flag)

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
        if not getattr(logger, "_base_init", False):
            raise TypeError("Builder(): logger is not an initialised ILogger")
        self._logger = logger

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
        failure = self._check(network, config)
        if failure:
            self._logger.log(self._trt.ILogger.ERROR, failure)
            return None
        if config._timing is not None:
            config._timing._data += b"+layer"
        flags = sorted(f.name for f in config._flags)
        profiles = [p._shapes for p in config._profiles]
        plan = {"version": self._trt.__version__, "onnx": network._onnx, "flags": flags, "profiles": profiles,
                "strongly_typed": network._strongly_typed(), "dla_core": config._dla_core,
                "inputs": [[t.name, list(t.shape), t.dtype.name] for t in network._inputs],
                "outputs": [[t.name, list(t.shape), t.dtype.name] for t in network._outputs]}
        self._logger.log(self._trt.ILogger.WARNING, "stand-in builder: plan is a simulation")
        return PLAN_MAGIC + json.dumps(plan).encode()

    def _check(self, network: Any, config: Any) -> str | None:
        if network._onnx is None:
            return "network is empty"
        flag_names = {f.name for f in config._flags}
        if network._strongly_typed() and flag_names & {"INT8", "FP16"}:
            return "precision flags must not be set on a strongly typed network"
        if any(-1 in t.shape for t in network._inputs) and not config._profiles:
            return "dynamic inputs need an optimization profile"
        if config._device_type.name == "DLA" and (config._dla_core >= self.num_DLA_cores
                                                 or "GPU_FALLBACK" not in flag_names):
            return "bad DLA configuration"
        if "INT8" in flag_names and not network._strongly_typed():
            return self._calibrate(network, config._calibrator)
        return None

    def _calibrate(self, network: Any, calibrator: Any) -> str | None:
        if calibrator is None:
            return "INT8 without a calibrator"
        if not getattr(calibrator, "_base_init", False):
            raise RuntimeError("segfault: calibrator trampoline base was not initialised")
        if calibrator.read_calibration_cache() is not None:
            return None
        batch_size = calibrator.get_batch_size()
        names = [t.name for t in network._inputs]
        batches = 0
        while (pointers := calibrator.get_batch(names)) is not None:
            for ptr, tensor in zip(pointers, network._inputs, strict=True):
                shape = [batch_size if d == -1 else d for d in tensor.shape]
                self._trt._gpu.read(ptr, int(np.prod(shape)) * np.dtype(NUMPY[tensor.dtype.name]).itemsize)
            batches += 1
        if batches == 0:
            return "calibration failed: no batches"
        self._trt._calibrated.append(batches)
        calibrator.write_calibration_cache(memoryview(b"standin-calibration-table"))
        return None


class _Runtime(_Base):
    def __init__(self, logger: Any) -> None:
        self._logger, self._dla = logger, -1

    DLA_core = property(lambda self: self._dla, lambda self, v: object.__setattr__(self, "_dla", v))

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> Any:
        data = bytes(serialized_engine)
        if not data.startswith(PLAN_MAGIC):
            self._logger.log(self._trt.ILogger.ERROR, "invalid plan magic")
            return None
        plan = json.loads(data[len(PLAN_MAGIC):])
        if plan["version"] != self._trt.__version__:
            self._logger.log(self._trt.ILogger.ERROR, f"plan built by {plan['version']}")
            return None
        return self._trt.ICudaEngine(plan)


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

    def create_execution_context(self) -> Any:
        return self._trt.IExecutionContext(self)


class _IExecutionContext(_Base):
    def __init__(self, engine: Any) -> None:
        import onnxruntime

        self._engine = engine
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._session = onnxruntime.InferenceSession(engine._plan["onnx"], providers=["CPUExecutionProvider"])

    execute_async_v2 = _removed_api

    def set_input_shape(self, name: str, shape: Any) -> bool:
        fixed = self._engine._io[name][1]
        if len(shape) != len(fixed) or any(f not in (-1, s) for f, s in zip(fixed, shape, strict=True)):
            return False
        self._shapes[name] = tuple(int(s) for s in shape)
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._addresses[name] = int(memory)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        mode, shape, _ = self._engine._io[name]
        if mode == "INPUT":
            return self._shapes.get(name, shape)
        return tuple(self._run(zeros=True)[name].shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        if set(self._addresses) != set(self._engine._io):
            return False
        for name, array in self._run(zeros=False).items():
            self._trt._gpu.write(self._addresses[name], np.ascontiguousarray(array).tobytes())
        return True

    def _run(self, zeros: bool) -> dict[str, np.ndarray]:
        feeds = {}
        for name, (mode, _, dtype) in self._engine._io.items():
            if mode == "INPUT":
                shape, np_type = self._shapes[name], np.dtype(NUMPY[dtype])
                nbytes = int(np.prod(shape)) * np_type.itemsize
                raw = bytes(nbytes) if zeros else self._trt._gpu.read(self._addresses[name], nbytes)
                feeds[name] = np.frombuffer(raw, np_type).reshape(shape)
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
                  gpu: FakeGpu | None = None) -> types.ModuleType:
    """A `tensorrt` module with exactly the names `version` has, per engines.trt_api.API."""
    family = family_of(version)
    module = types.ModuleType("tensorrt")
    module.__dict__.update(_calls=[], _gpu=gpu or FakeGpu(), _calibrated=[], __version__=version,
                           _platform={"int8": fast_int8, "fp16": fast_fp16, "dla_cores": dla_cores})
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

    def nptype(trt_type: Any) -> Any:
        if trt_type.name not in NUMPY:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return NUMPY[trt_type.name]

    module.__dict__.update(nptype=nptype, volume=lambda shape: int(np.prod(list(shape))))
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


# ---- pycuda.driver stand-in, for engines.cuda_mem.PyCudaMemory -------------------------------------

def make_pycuda_driver(gpu: FakeGpu | None = None) -> types.ModuleType:
    """The pycuda.driver names PyCudaMemory uses (read from pycuda's wrap_cudadrv.cpp and docs)."""
    memory = gpu or FakeGpu()
    driver = types.ModuleType("pycuda.driver")
    calls: list[str] = []
    stack: list[Any] = []

    class Error(Exception):
        pass

    class Context:
        def push(self) -> None:
            calls.append("push")
            stack.append(self)

        @staticmethod
        def pop() -> None:
            calls.append("pop")
            stack.pop()

        def detach(self) -> None:
            calls.append("detach")

    class Device:
        def __init__(self, index: int) -> None:
            if index != 0:
                raise Error("invalid device ordinal")

        def name(self) -> str:
            return "Stand-in Orin"

        def compute_capability(self) -> tuple[int, int]:
            return (8, 7)

        def total_memory(self) -> int:
            return 8 << 30

        def retain_primary_context(self) -> Context:
            calls.append("retain_primary_context")
            return Context()

    class Stream:
        handle = 0x5EED

        def __init__(self) -> None:
            if not stack:
                raise Error("no current context")

        def synchronize(self) -> None:
            calls.append("synchronize")

    class Allocation:
        def __init__(self, nbytes: int) -> None:
            self.ptr = memory.alloc(nbytes)

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            calls.append("free")
            memory.blocks.pop(self.ptr, None)

    def needs_context(name: str) -> None:
        calls.append(name)
        if not stack:
            raise Error(f"{name}: no current context")

    def mem_alloc(nbytes: int) -> Allocation:
        needs_context("mem_alloc")
        return Allocation(nbytes)

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        needs_context("pagelocked_empty")
        return np.empty(shape, dtype)

    def memcpy_htod_async(dest: int, src: np.ndarray, stream: Any = None) -> None:
        needs_context("memcpy_htod_async")
        memory.write(int(dest), np.ascontiguousarray(src).tobytes())

    def memcpy_dtoh_async(dest: np.ndarray, src: int, stream: Any = None) -> None:
        needs_context("memcpy_dtoh_async")
        dest[...] = np.frombuffer(memory.read(int(src), dest.nbytes), dest.dtype).reshape(dest.shape)

    driver.__dict__.update(
        init=lambda: calls.append("init"), Device=Device, Context=Context, Stream=Stream, Error=Error,
        mem_alloc=mem_alloc, pagelocked_empty=pagelocked_empty, memcpy_htod_async=memcpy_htod_async,
        memcpy_dtoh_async=memcpy_dtoh_async, _calls=calls, _stack=stack, _gpu=memory)
    return driver


def plan_json(plan_path: Path) -> dict[str, Any]:
    """Decode a stand-in plan file."""
    data = plan_path.read_bytes()
    assert data.startswith(PLAN_MAGIC)
    result: dict[str, Any] = json.loads(data[len(PLAN_MAGIC):])
    return result
