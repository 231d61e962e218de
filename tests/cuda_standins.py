"""Stand-in CUDA for tests without a GPU: fake device memory, `pycuda.driver`, cuda-python's runtime.

As strict as the real thing where jetagent could get it wrong:

* `FakeGpu` hands out 256-byte-aligned device pointers (cudaMalloc's alignment, which
  TensorRT's setTensorAddress requires) and refuses reads/writes outside an allocation.
* pycuda: a context stack *per thread* (pushing on one thread makes nothing current on
  another); a detached context is dead: pushing it raises, and a stream or allocation
  cleaned up after its context died is recorded in `_cleanup_errors` (pycuda prints
  "a clean-up operation failed (dead context maybe?)"); live streams are counted, so one
  that leaks past `close()` shows.
* cuda-python: every call returns an `(err, value...)` tuple with `cudaError_t` codes;
  unknown pointers, double frees, destroyed streams and over-large allocations return
  errors (they never raise), exactly as the runtime API does. Host pointers are real
  host memory, so the code's numpy views over pinned memory are exercised for real.

Which thread had a device current is tracked in `FakeGpu.active` (per thread), so the
TensorRT stand-in can record whether each call ran inside `activate()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.cuda_mem import DeviceBuffer, DeviceInfo

ALIGN = 256
ORIN = {"name": "Stand-in Orin", "cc": (8, 7), "memory": 8 << 30, "sms": 8}


class _Depth(threading.local):
    value = 0


@dataclass
class FakeGpu:
    """Device memory as a dict of bytearrays, shared by the stand-in TensorRT and memory seams."""

    blocks: dict[int, bytearray] = field(default_factory=dict)
    next_ptr: int = 0x10000
    capacity: int = 1 << 30  # allocations beyond this fail (cudaErrorMemoryAllocation)
    _depth: _Depth = field(default_factory=_Depth)

    @property
    def active(self) -> int:
        """How deep the calling thread is inside activate() (0: no CUDA context current here)."""
        return self._depth.value

    @active.setter
    def active(self, value: int) -> None:
        self._depth.value = value

    def alloc(self, nbytes: int) -> int:
        if sum(len(b) for b in self.blocks.values()) + nbytes > self.capacity:
            raise MemoryError(f"out of device memory allocating {nbytes} bytes")
        ptr = self.next_ptr
        self.next_ptr += -(-(max(nbytes, 1) + ALIGN) // ALIGN) * ALIGN  # the next one stays aligned
        self.blocks[ptr] = bytearray(nbytes)
        return ptr

    def owns(self, ptr: int) -> bool:
        return ptr in self.blocks

    def read(self, ptr: int, nbytes: int) -> bytes:
        if ptr not in self.blocks or len(self.blocks[ptr]) < nbytes:
            raise RuntimeError(f"illegal device read of {nbytes} bytes at {ptr:#x}")
        return bytes(self.blocks[ptr][:nbytes])

    def write(self, ptr: int, data: bytes) -> None:
        if ptr not in self.blocks or len(self.blocks[ptr]) < len(data):
            raise RuntimeError(f"illegal device write of {len(data)} bytes at {ptr:#x}")
        self.blocks[ptr][: len(data)] = data


def device_info(name: str = str(ORIN["name"])) -> DeviceInfo:
    """The stand-in Orin as engines.cuda_mem.DeviceInfo (fields it does not have are left out)."""
    known = {f.name for f in dataclasses.fields(DeviceInfo)}
    values = {"index": 0, "name": name, "compute_capability": ORIN["cc"], "total_memory": ORIN["memory"],
              "multiprocessors": ORIN["sms"], "cuda_runtime": "12.6", "cuda_driver": "12.6"}
    return DeviceInfo(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]


class StandinMemory:
    """`engines.cuda_mem.DeviceMemory` over a FakeGpu (in-process tests); records what happened."""

    implementation = "stand-in"

    def __init__(self, gpu: FakeGpu, name: str = ORIN["name"]) -> None:  # type: ignore[assignment]
        self.gpu = gpu
        self.info = device_info(name)
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


# ---- pycuda.driver ------------------------------------------------------------------------------

def make_pycuda_driver(gpu: FakeGpu | None = None, devices: int = 1) -> types.ModuleType:
    """The pycuda.driver names PyCudaMemory uses (read from pycuda's cuda.hpp, wrap_cudadrv.cpp, docs)."""
    memory = gpu or FakeGpu()
    driver = types.ModuleType("pycuda.driver")
    calls: list[str] = []
    cleanup_errors: list[str] = []
    live = {"streams": 0}
    local = threading.local()

    def stack() -> list[Any]:
        if not hasattr(local, "stack"):
            local.stack = []
        return local.stack  # type: ignore[no-any-return]

    class Error(Exception):
        pass

    class LogicError(Error):
        pass

    class Context:
        def __init__(self) -> None:
            self.alive = True
            self.retained = 1

        def push(self) -> None:
            calls.append("push")
            if not self.alive:
                raise LogicError("cannot push a dead context")
            stack().append(self)
            memory.active += 1

        @staticmethod
        def pop() -> None:
            calls.append("pop")
            if not stack():
                raise LogicError("context stack of this thread is empty: pop without push")
            stack().pop()
            memory.active -= 1

        def detach(self) -> None:
            calls.append("detach")
            if stack() and stack()[-1] is self:
                raise LogicError("detaching a context that is current on this thread")
            self.retained -= 1
            if self.retained <= 0:
                self.alive = False

    def current(what: str) -> Context:
        calls.append(what)
        if not stack():
            raise LogicError(f"{what}: no current context on this thread")
        context: Context = stack()[-1]
        return context

    class Device:
        def __init__(self, index: int) -> None:
            if not 0 <= index < devices:
                raise LogicError("cuDeviceGet failed: invalid device ordinal")

        def name(self) -> str:
            return str(ORIN["name"])

        def compute_capability(self) -> tuple[int, int]:
            return ORIN["cc"]  # type: ignore[return-value]

        def total_memory(self) -> int:
            return int(ORIN["memory"])  # type: ignore[call-overload]

        def get_attribute(self, attribute: Any) -> int:
            if attribute is not device_attribute.MULTIPROCESSOR_COUNT:
                raise LogicError(f"unknown attribute {attribute}")
            return int(ORIN["sms"])  # type: ignore[call-overload]

        def retain_primary_context(self) -> Context:
            calls.append("retain_primary_context")
            return Context()

    device_attribute = enum.Enum("device_attribute", ["MULTIPROCESSOR_COUNT"])

    class Stream:
        handle = 0x5EED

        def __init__(self) -> None:
            self.context = current("Stream")
            live["streams"] += 1

        def synchronize(self) -> None:
            current("synchronize")

        def __del__(self) -> None:  # pycuda's ~stream: cuStreamDestroy in its own context
            live["streams"] -= 1
            if not self.context.alive:
                cleanup_errors.append("stream destroyed after its context died")

    class Allocation:
        def __init__(self, nbytes: int) -> None:
            self.context = current("mem_alloc")
            self.ptr = memory.alloc(nbytes)

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            calls.append("free")
            if not self.context.alive:
                cleanup_errors.append("allocation freed after its context died")
            memory.blocks.pop(self.ptr, None)

    class HostAllocation:
        def __init__(self, context: Context) -> None:
            self.context, self.freed = context, False

        def free(self) -> None:
            calls.append("free_host")
            if not self.context.alive:
                cleanup_errors.append("host allocation freed after its context died")
            self.freed = True

    def mem_alloc(nbytes: int) -> Allocation:
        return Allocation(nbytes)

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        owner = HostAllocation(current("pagelocked_empty"))
        raw = np.empty(shape, dtype)
        view = raw.view(type=_Pinned)
        view.base_allocation = owner
        return view

    def memcpy_htod_async(dest: int, src: np.ndarray, stream: Any = None) -> None:
        current("memcpy_htod_async")
        memory.write(int(dest), np.ascontiguousarray(src).tobytes())

    def memcpy_dtoh_async(dest: np.ndarray, src: int, stream: Any = None) -> None:
        current("memcpy_dtoh_async")
        dest[...] = np.frombuffer(memory.read(int(src), dest.nbytes), dest.dtype).reshape(dest.shape)

    driver.__dict__.update(
        init=lambda: calls.append("init"), Device=Device, Context=Context, Stream=Stream, Error=Error,
        LogicError=LogicError, device_attribute=device_attribute, mem_alloc=mem_alloc,
        pagelocked_empty=pagelocked_empty, memcpy_htod_async=memcpy_htod_async,
        memcpy_dtoh_async=memcpy_dtoh_async, get_version=lambda: (12, 6, 0),
        get_driver_version=lambda: 12060, _calls=calls, _stack=stack, _gpu=memory,
        _cleanup_errors=cleanup_errors, _live=live)
    return driver


class _Pinned(np.ndarray):
    """A page-locked array: `.base` is the pycuda HostAllocation that frees it."""

    base_allocation: Any = None

    @property  # type: ignore[misc]
    def base(self) -> Any:  # pycuda: pagelocked arrays' base is their HostAllocation
        return self.base_allocation


def install_pycuda(sys_modules: Any, gpu: FakeGpu, devices: int = 1) -> types.ModuleType:
    """Put a stand-in `pycuda` + `pycuda.driver` into `sys_modules` (a dict or monkeypatch.setitem)."""
    driver = make_pycuda_driver(gpu, devices)
    package = types.ModuleType("pycuda")
    package.driver = driver  # type: ignore[attr-defined]
    package.VERSION_TEXT = "2024.1.2-standin"  # type: ignore[attr-defined]
    setter = sys_modules if callable(sys_modules) else sys_modules.__setitem__
    setter("pycuda", package)
    setter("pycuda.driver", driver)
    return driver


# ---- cuda-python's runtime API (cuda.bindings.runtime) --------------------------------------------

class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


_ERROR_TEXT = {cudaError_t.cudaErrorInvalidValue: "invalid argument",
               cudaError_t.cudaErrorMemoryAllocation: "out of memory",
               cudaError_t.cudaErrorInvalidDevicePointer: "invalid device pointer",
               cudaError_t.cudaErrorNoDevice: "no CUDA-capable device is detected",
               cudaError_t.cudaErrorInvalidDevice: "invalid device ordinal",
               cudaError_t.cudaErrorInvalidResourceHandle: "invalid resource handle"}


class cudaStream_t:
    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __int__(self) -> int:
        return self._handle


@dataclass
class cudaDeviceProp:
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int
    multiProcessorCount: int


def make_cudart(gpu: FakeGpu | None = None, devices: int = 1) -> types.ModuleType:
    """cuda-python's runtime module with the calls CudaPythonMemory makes; errors come back as codes."""
    memory = gpu or FakeGpu()
    rt = types.ModuleType("cuda.bindings.runtime")
    calls: list[tuple[str, int | None]] = []  # (call, the calling thread's current device or None)
    current = threading.local()
    streams: dict[int, bool] = {}  # handle -> alive
    pinned: dict[int, Any] = {}  # host pointer -> ctypes buffer keeping it alive
    failures: dict[str, cudaError_t] = {}  # call name -> error to return next (tests inject)
    ok = cudaError_t.cudaSuccess

    def record(name: str) -> cudaError_t | None:
        calls.append((name, getattr(current, "device", None)))
        return failures.pop(name, None)

    def wrap(name: str, body: Any) -> Any:
        def call(*args: Any) -> tuple[Any, ...]:
            injected = record(name)
            if injected is not None:
                return (injected,) if name in _NO_VALUE else (injected, None)
            return body(*args)  # type: ignore[no-any-return]

        call.__name__ = name
        return call

    def get_device_count() -> tuple[Any, ...]:
        return (ok, devices) if devices else (cudaError_t.cudaErrorNoDevice, 0)

    def set_device(index: int) -> tuple[Any, ...]:
        if not 0 <= index < devices:
            return (cudaError_t.cudaErrorInvalidDevice,)
        if getattr(current, "device", None) is None:
            memory.active += 1  # this thread now has a context current, for the rest of its life
        current.device = index
        return (ok,)

    def properties(index: int) -> tuple[Any, ...]:
        if not 0 <= index < devices:
            return (cudaError_t.cudaErrorInvalidDevice, None)
        return (ok, cudaDeviceProp(str(ORIN["name"]).encode() + b"\0\0", *ORIN["cc"],  # type: ignore[misc]
                                   ORIN["memory"], ORIN["sms"]))  # type: ignore[arg-type]

    def malloc(nbytes: int) -> tuple[Any, ...]:
        try:
            return (ok, memory.alloc(int(nbytes)))
        except MemoryError:
            return (cudaError_t.cudaErrorMemoryAllocation, 0)

    def free(ptr: int) -> tuple[Any, ...]:
        if memory.blocks.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidDevicePointer,)
        return (ok,)

    def malloc_host(nbytes: int) -> tuple[Any, ...]:
        raw = ctypes.create_string_buffer(int(nbytes) + 4096)
        ptr = -(-ctypes.addressof(raw) // 4096) * 4096  # page-aligned, like cudaMallocHost
        pinned[ptr] = raw
        return (ok, ptr)

    def free_host(ptr: int) -> tuple[Any, ...]:
        if pinned.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (ok,)

    def stream_create() -> tuple[Any, ...]:
        handle = 0x5EED + len(streams)
        streams[handle] = True
        return (ok, cudaStream_t(handle))

    def live_stream(stream: Any) -> bool:
        return streams.get(int(stream), False)

    def stream_sync(stream: Any) -> tuple[Any, ...]:
        return (ok,) if live_stream(stream) else (cudaError_t.cudaErrorInvalidResourceHandle,)

    def stream_destroy(stream: Any) -> tuple[Any, ...]:
        if not live_stream(stream):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        streams[int(stream)] = False
        return (ok,)

    def memcpy_async(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple[Any, ...]:
        if not live_stream(stream):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if not isinstance(kind, cudaMemcpyKind):
            return (cudaError_t.cudaErrorInvalidValue,)
        try:
            if kind is cudaMemcpyKind.cudaMemcpyHostToDevice:
                if memory.owns(int(src)):
                    return (cudaError_t.cudaErrorInvalidValue,)  # a device pointer given as the host source
                memory.write(int(dst), ctypes.string_at(int(src), int(count)))
            elif kind is cudaMemcpyKind.cudaMemcpyDeviceToHost:
                if memory.owns(int(dst)):
                    return (cudaError_t.cudaErrorInvalidValue,)
                ctypes.memmove(int(dst), memory.read(int(src), int(count)), int(count))
            else:
                return (cudaError_t.cudaErrorInvalidValue,)
        except RuntimeError:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (ok,)

    def error_name(err: cudaError_t) -> tuple[Any, ...]:
        return (ok, cudaError_t(err).name.encode())

    def error_string(err: cudaError_t) -> tuple[Any, ...]:
        return (ok, _ERROR_TEXT.get(cudaError_t(err), "unknown error").encode())

    bodies = {
        "cudaGetDeviceCount": get_device_count, "cudaSetDevice": set_device,
        "cudaGetDeviceProperties": properties, "cudaRuntimeGetVersion": lambda: (ok, 12060),
        "cudaDriverGetVersion": lambda: (ok, 12060), "cudaMalloc": malloc, "cudaFree": free,
        "cudaMallocHost": malloc_host, "cudaFreeHost": free_host, "cudaStreamCreate": stream_create,
        "cudaStreamSynchronize": stream_sync, "cudaStreamDestroy": stream_destroy,
        "cudaMemcpyAsync": memcpy_async,
    }
    rt.__dict__.update({name: wrap(name, body) for name, body in bodies.items()})
    rt.__dict__.update(cudaGetErrorName=error_name, cudaGetErrorString=error_string, cudaError_t=cudaError_t,
                       cudaMemcpyKind=cudaMemcpyKind, cudaStream_t=cudaStream_t, __version__="12.6.2-standin",
                       _calls=calls, _streams=streams, _pinned=pinned, _failures=failures, _gpu=memory)
    return rt


_NO_VALUE = {"cudaSetDevice", "cudaFree", "cudaFreeHost", "cudaStreamSynchronize", "cudaStreamDestroy",
             "cudaMemcpyAsync"}


def install_cudart(sys_modules: Any, gpu: FakeGpu, devices: int = 1) -> types.ModuleType:
    """Put stand-in `cuda`, `cuda.bindings` and `cuda.bindings.runtime` into `sys_modules`."""
    rt = make_cudart(gpu, devices)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = rt  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    setter = sys_modules if callable(sys_modules) else sys_modules.__setitem__
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt)):
        setter(name, module)
    return rt


_PROCESS_GPU: FakeGpu | None = None


def process_gpu() -> FakeGpu:
    """One FakeGpu per process, shared by stand-ins installed through tests/standin_site."""
    global _PROCESS_GPU
    if _PROCESS_GPU is None:
        _PROCESS_GPU = FakeGpu()
    return _PROCESS_GPU
