"""Native TensorRT backend: run a serialized engine (plan) built on this device.

One inference path serves TensorRT 8.5 through 11: the tensor-name API
(`num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `set_input_shape`,
`set_tensor_address`, `execute_async_v3`). Every one of those names is in the
8.5.3, 8.6.1, 10.3.0 and 11.1 Python bindings (see `engines.trt_api`); the binding
API (`execute_async_v2`, `num_bindings`) was removed in 10.0.

The precision is read from the sidecar `<plan>.json` that `engines.trt_build`
writes next to the plan, never from the plan file itself, so other loaders
(trtexec, Polygraphy) still read our plans. The sidecar also carries the TensorRT
version and the plan's sha256: a plan from another TensorRT version, or a plan
whose sidecar is stale, is refused with a clear ModelLoadError before
deserialization is even tried.

TensorRT is given the process's one logger (`engines.trt_logger.process_logger`, which
also initialises the plugin library), never one per backend. Host-located tensors
(shape tensors) get 256-byte-aligned host memory, device-located ones device buffers;
dtypes numpy cannot hold (BF16, FP8, INT4) are refused with the tensor's name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines import trt_api
from engines.base import PRECISIONS, BackendOptions, TensorSpec
from engines.cuda_mem import DeviceBuffer, DeviceMemory, open_device_memory
from engines.errors import BackendUnavailable, InferenceError, ModelLoadError, ModelMismatch
from engines.fileio import atomic_write_bytes, sha256_file
from engines.trt_logger import plugins_ready, process_logger

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = 1
ALIGNMENT = 256  # setTensorAddress: "The pointer must have at least 256-byte alignment" (host ones too)


def aligned_host_bytes(nbytes: int) -> np.ndarray:
    """`nbytes` of ordinary host memory starting on a 256-byte boundary (for host-located tensors)."""
    raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + nbytes]


def sidecar_path(plan_path: Path) -> Path:
    """`model.plan` -> `model.plan.json`."""
    return plan_path.with_name(plan_path.name + ".json")


def write_sidecar(plan_path: Path, record: Mapping[str, Any]) -> Path:
    """Write `<plan>.json` atomically (the builder's report). Returns its path."""
    path = sidecar_path(plan_path)
    atomic_write_bytes(path, (json.dumps(dict(record), indent=2, sort_keys=True) + "\n").encode())
    return path


def read_sidecar(plan_path: Path) -> dict[str, Any]:
    """Read and check the builder's sidecar. Raises ModelLoadError when missing, corrupt or stale."""
    path = sidecar_path(plan_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{plan_path}: no sidecar {path.name}; only plans built by jetagent "
                             "(engines.trt_build) can report their precision") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable sidecar: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: sidecar is not a JSON object")
    for key in ("format", "precision_built", "tensorrt_version", "plan_sha256"):
        if key not in data:
            raise ModelLoadError(f"{path}: sidecar lacks {key!r}")
    if data["format"] != SIDECAR_FORMAT or data["precision_built"] not in PRECISIONS:
        raise ModelLoadError(f"{path}: unsupported sidecar (format {data['format']!r}, "
                             f"precision {data['precision_built']!r})")
    if sha256_file(plan_path) != data["plan_sha256"]:
        raise ModelLoadError(f"{plan_path}: the plan does not match its sidecar (stale or partial write); "
                             "rebuild the engine")
    return data


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


class TensorRTBackend:
    """A deserialized engine with one execution context. Not thread-safe: one caller at a time.

    Device-located tensors get device buffers and page-locked staging copies; host-located
    ones (shape tensors: an output of a Shape op, an input that feeds a Reshape's shape) get
    256-byte-aligned host memory, whose address TensorRT reads and writes directly.
    """

    def __init__(self, trt: Any, plan_path: Path, sidecar: Mapping[str, Any], memory: DeviceMemory,
                 dla_core: int | None) -> None:
        self._trt = trt
        self._path = plan_path
        self._sidecar = dict(sidecar)
        self._memory = memory
        self._dla_core = dla_core
        self._closed = False
        self._log: Any = None
        self._device: dict[str, DeviceBuffer] = {}
        self._staging: dict[str, np.ndarray] = {}  # bytes, one per tensor, grown on demand
        self._host: dict[str, np.ndarray] = {}  # typed views into the staging bytes
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._on_host: set[str] = set()
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        with memory.activate():
            try:
                self._log = process_logger(trt)  # the process's one logger: never freed (engines.trt_logger)
                self._runtime = trt.Runtime(self._log)
                if dla_core is not None:
                    # The runtime must know the DLA core before it deserializes a DLA engine.
                    self._runtime.DLA_core = dla_core
                self._engine = self._deserialize(plan_path.read_bytes())
                self._context = self._engine.create_execution_context()
                if self._context is None:
                    raise ModelLoadError(f"{plan_path}: TensorRT could not create an execution context "
                                         "(out of device memory?)")
                self._inputs, self._outputs = self._io_specs()
            except BaseException:
                # Drop TensorRT objects while the context is current, before the caller closes it.
                self._context = self._engine = self._runtime = None
                raise

    def _deserialize(self, plan: bytes) -> Any:
        mark = self._log.mark()
        try:
            engine = self._runtime.deserialize_cuda_engine(plan)
        except Exception as exc:  # the bindings raise on some corrupt plans instead of returning None
            raise ModelLoadError(f"{self._path}: TensorRT {self._trt.__version__} rejected the plan: {exc}") \
                from exc
        if engine is None:
            said = " | ".join(self._log.since(mark)[-3:]) or "no message"
            raise ModelLoadError(f"{self._path}: TensorRT {self._trt.__version__} could not deserialize the "
                                 "plan (built by another TensorRT version or GPU, or corrupt, or a plugin is "
                                 f"missing; TensorRT: {said}); rebuild it")
        return engine

    def _io_specs(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        trt, engine = self._trt, self._engine
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            shape = _dims(engine.get_tensor_shape(name))
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = trt_api.numpy_dtype(engine.get_tensor_dtype(name),
                                        f"{self._path}: {'input' if is_input else 'output'} {name!r}")
            if engine.get_tensor_location(name) == trt.TensorLocation.HOST:
                self._on_host.add(name)
            spec = TensorSpec(name, tuple(d if d >= 0 else None for d in shape), dtype.name)
            (inputs if is_input else outputs).append(spec)
        return tuple(inputs), tuple(outputs)

    @property
    def name(self) -> str:
        return "tensorrt"

    @property
    def precision(self) -> str:
        return str(self._sidecar["precision_built"])

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def host_tensors(self) -> frozenset[str]:
        """Names of the host-located (shape) tensors."""
        return frozenset(self._on_host)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs in, run once on the stream, copy outputs out. Raises InferenceError."""
        if self._closed:
            raise InferenceError("the TensorRT backend is closed")
        arrays = self._check_feeds(feeds)
        mark = self._log.mark()
        try:
            with self._memory.activate():
                return self._run(arrays)
        except (InferenceError, ModelMismatch):
            raise
        except Exception as exc:
            said = " | ".join(self._log.since(mark)[-3:])
            raise InferenceError(f"TensorRT inference failed: {exc}" + (f" (TensorRT: {said})" if said else "")) \
                from exc

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {spec.name: spec for spec in self._inputs}
        missing = sorted(set(expected) - set(feeds))
        extra = sorted(set(feeds) - set(expected))
        if missing or extra:
            raise InferenceError(f"inputs do not match the engine: missing {missing}, unexpected {extra}")
        arrays = {}
        for name, spec in expected.items():
            array = np.asarray(feeds[name])
            want = np.dtype(spec.dtype)
            if not np.can_cast(array.dtype, want, casting="same_kind"):
                raise InferenceError(f"input {name!r}: dtype {array.dtype} cannot feed {want}")
            fixed = spec.shape
            fits = len(array.shape) == len(fixed) and all(
                d is None or d == a for d, a in zip(fixed, array.shape, strict=True))
            if not fits:
                raise InferenceError(f"input {name!r}: shape {array.shape} does not fit {fixed}")
            arrays[name] = np.ascontiguousarray(array, dtype=want)
        return arrays

    def _run(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, memory = self._context, self._memory
        for name, array in arrays.items():
            if self._shapes.get(name) != array.shape:
                if not context.set_input_shape(name, array.shape):
                    raise InferenceError(f"input {name!r}: TensorRT refused shape {array.shape} "
                                         "(outside the engine's optimization profile?)")
                self._shapes[name] = array.shape
            self._ensure_buffer(name, array.shape, array.dtype)
            np.copyto(self._host[name], array)  # host-located: TensorRT reads it from here
            if name not in self._on_host:
                memory.copy_to_device(self._device[name], self._host[name])
        for spec in self._outputs:
            shape = _dims(context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise ModelMismatch(f"output {spec.name!r} has a data-dependent shape {shape}; "
                                    "this backend needs output shapes known from the input shapes")
            self._ensure_buffer(spec.name, shape, np.dtype(spec.dtype))
        if not context.execute_async_v3(memory.stream_handle):
            raise InferenceError("TensorRT execute_async_v3 reported failure")
        for spec in self._outputs:
            if spec.name not in self._on_host:
                memory.copy_to_host(self._host[spec.name], self._device[spec.name])
        memory.synchronize()
        # Copies: the buffers are reused by the next call.
        return {spec.name: self._host[spec.name].copy() for spec in self._outputs}

    def _ensure_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        host = self._host.get(name)
        if host is not None and host.shape == shape and host.dtype == dtype:
            return
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        staging = self._staging.get(name)
        if name in self._on_host:
            if staging is None or staging.nbytes < nbytes:
                staging = self._staging[name] = aligned_host_bytes(max(nbytes, 1))
                self._set_address(name, int(staging.ctypes.data))
        else:
            device = self._device.get(name)
            if device is None or device.nbytes < nbytes:
                # Grow only: a shape that fits the current buffers reuses them and their address.
                if device is not None:
                    self._memory.free(device)
                device = self._device[name] = self._memory.alloc(nbytes)
                self._set_address(name, device.ptr)
                staging = self._staging[name] = self._memory.pagelocked_empty((nbytes,), np.dtype(np.uint8))
        if staging is None:  # for mypy: both branches leave a staging buffer
            raise InferenceError(f"internal: no staging buffer for {name!r}")
        self._host[name] = staging[:nbytes].view(dtype).reshape(shape)

    def _set_address(self, name: str, address: int) -> None:
        if not self._context.set_tensor_address(name, address):
            where = "host" if name in self._on_host else "device"
            raise InferenceError(f"TensorRT refused the {where} address {address:#x} for {name!r}")

    def describe(self) -> dict[str, object]:
        info = self._memory.info
        return {
            "runtime": "tensorrt",
            "tensorrt_version": str(self._trt.__version__),
            "device": info.name,
            "compute_capability": "{}.{}".format(*info.compute_capability),
            "dla_core": self._dla_core,
            "precision": self.precision,
            "route": self._sidecar.get("route"),
            "plan": str(self._path),
            "cuda_memory": self._memory.implementation,
            "plugins": plugins_ready(self._trt),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # TensorRT objects go before the buffers and the context they were created in.
        with self._memory.activate():
            self._context = None
            self._engine = None
            self._runtime = None
            for buffer in self._device.values():
                self._memory.free(buffer)
            self._device.clear()
            self._host.clear()
            self._staging.clear()
        self._memory.close()


def _option_int(options: BackendOptions, key: str) -> int | None:
    value = options.extra.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"backend option {key!r} must be an integer, got {value!r}")
    return value


def open_tensorrt(path: Path, options: BackendOptions) -> TensorRTBackend:
    """Open a plan built by `engines.trt_build`.

    options.extra: "device_index" (CUDA device, default 0), "dla_core" (default: the core
    recorded in the sidecar), "cuda_memory" ("cuda-python" | "pycuda"; default: either, see
    `engines.cuda_mem.open_device_memory`). Raises BackendUnavailable (no tensorrt/CUDA seam/GPU),
    ModelLoadError (missing, stale or foreign plan).
    """
    trt = trt_api.import_tensorrt()
    caps = trt_api.detect_capabilities(trt)
    if not caps.tensor_io_api:
        raise BackendUnavailable(f"TensorRT {caps.version} lacks the tensor-name API jetagent runs engines "
                                 f"with (needs 8.5 or later); missing: {', '.join(caps.missing)}")
    plan_path = Path(path)
    if not plan_path.is_file():
        raise ModelLoadError(f"{plan_path}: no such engine file")
    if plan_path.suffix.lower() == ".onnx":
        raise ModelLoadError(f"{plan_path} is an ONNX model, not a TensorRT plan: engines are built from it on "
                             "the device (the agent does this itself for backend = \"tensorrt\"; "
                             "engines.trt_build.build_engine by hand)")
    sidecar = read_sidecar(plan_path)
    built_with = str(sidecar["tensorrt_version"])
    if built_with != caps.version:
        raise ModelLoadError(f"{plan_path}: built by TensorRT {built_with}, this device has {caps.version}; "
                             "engines are not portable across TensorRT versions, rebuild it")
    dla_core = _option_int(options, "dla_core")
    if dla_core is None and isinstance(sidecar.get("dla_core"), int):
        dla_core = int(sidecar["dla_core"])
    cuda_memory = options.extra.get("cuda_memory")
    memory = open_device_memory(_option_int(options, "device_index") or 0,
                                str(cuda_memory) if cuda_memory else None)
    try:
        backend = TensorRTBackend(trt, plan_path, sidecar, memory, dla_core)
    except BaseException:
        memory.close()
        raise
    if options.precision != backend.precision:
        logger.info("%s: asked for %s, the plan holds %s", plan_path, options.precision, backend.precision)
    return backend
