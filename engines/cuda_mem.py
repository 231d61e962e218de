"""Device buffers and one CUDA stream, behind a small seam.

TensorRT needs device pointers, a stream handle, and copies between page-locked
host memory and the device. `DeviceMemory` is the whole surface the engine
modules use; `PyCudaMemory` implements it with pycuda, and a cuda-python
(`cuda.bindings`) implementation can sit behind the same protocol later
(NVIDIA's samples moved to it; JetPack's pycuda builds from source).

Context handling: `pycuda.autoinit` is never imported (it creates a context as an
import side effect). We retain the device's *primary* context, which is "the one
used by the CUDA runtime API" (pycuda docs, Device.retain_primary_context), and
TensorRT uses the runtime API, so pycuda and TensorRT share one context. The
context is pushed around every call (`activate()`), so a camera thread other than
the one that opened the engine can run it. Memory is released in `close()`,
never in `__del__`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engines.errors import BackendUnavailable

logger = logging.getLogger(__name__)

PYCUDA_HINT = (
    "pycuda is needed for TensorRT device buffers. On a Jetson it builds from source against "
    "JetPack's CUDA: PATH=/usr/local/cuda/bin:$PATH pip install pycuda (inside a venv created "
    "with --system-site-packages so JetPack's tensorrt stays visible)."
)


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU the buffers live on."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int


@dataclass
class DeviceBuffer:
    """Linear device memory. `ptr` is what TensorRT's set_tensor_address / get_batch take."""

    ptr: int
    nbytes: int
    handle: Any = None  # the implementation's allocation object


class DeviceMemory(Protocol):
    """What the TensorRT runtime and builder need from CUDA. Not thread-safe."""

    @property
    def info(self) -> DeviceInfo: ...

    @property
    def stream_handle(self) -> int:
        """The stream's raw handle, for IExecutionContext.execute_async_v3."""

    def activate(self) -> contextlib.AbstractContextManager[None]:
        """Make this memory's CUDA context current on the calling thread for the block."""

    def alloc(self, nbytes: int) -> DeviceBuffer: ...

    def free(self, buffer: DeviceBuffer) -> None: ...

    def pagelocked_empty(self, shape: Sequence[int], dtype: np.dtype[Any]) -> np.ndarray:
        """A page-locked host array (fast, truly asynchronous copies)."""

    def copy_to_device(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        """Queue a host -> device copy on the stream."""

    def copy_to_host(self, dst: np.ndarray, src: DeviceBuffer) -> None:
        """Queue a device -> host copy on the stream."""

    def synchronize(self) -> None:
        """Wait until everything queued on the stream has finished."""

    def close(self) -> None:
        """Free every buffer and release the context. Safe to call twice."""


class PyCudaMemory:
    """`DeviceMemory` on pycuda with the device's primary context and one stream."""

    def __init__(self, device_index: int = 0) -> None:
        cuda = _import_pycuda_driver()
        try:
            cuda.init()
            device = cuda.Device(device_index)
            self._info = DeviceInfo(
                index=device_index,
                name=str(device.name()),
                compute_capability=_capability(device.compute_capability()),
                total_memory=int(device.total_memory()),
            )
            self._cuda_context = device.retain_primary_context()
        except cuda.Error as exc:
            raise BackendUnavailable(f"CUDA device {device_index} is not usable: {exc}") from exc
        self._cuda = cuda
        self._buffers: list[DeviceBuffer] = []
        self._host: list[np.ndarray] = []
        self._closed = False
        with self.activate():
            self._stream = cuda.Stream()
        logger.info("CUDA device %d: %s (sm_%d%d)", device_index, self._info.name,
                    *self._info.compute_capability)

    @property
    def info(self) -> DeviceInfo:
        return self._info

    @property
    def stream_handle(self) -> int:
        return int(self._stream.handle)

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        if self._closed:
            raise BackendUnavailable("CUDA memory was already closed")
        self._cuda_context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def alloc(self, nbytes: int) -> DeviceBuffer:
        allocation = self._cuda.mem_alloc(max(int(nbytes), 1))
        buffer = DeviceBuffer(ptr=int(allocation), nbytes=int(nbytes), handle=allocation)
        self._buffers.append(buffer)
        return buffer

    def free(self, buffer: DeviceBuffer) -> None:
        if buffer.handle is not None:
            buffer.handle.free()
            buffer.handle = None
        if buffer in self._buffers:
            self._buffers.remove(buffer)

    def pagelocked_empty(self, shape: Sequence[int], dtype: np.dtype[Any]) -> np.ndarray:
        array: np.ndarray = self._cuda.pagelocked_empty(tuple(shape), dtype)
        self._host.append(array)
        return array

    def copy_to_device(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        _check_fits(dst, src)
        self._cuda.memcpy_htod_async(dst.ptr, np.ascontiguousarray(src), self._stream)

    def copy_to_host(self, dst: np.ndarray, src: DeviceBuffer) -> None:
        _check_fits(src, dst)
        self._cuda.memcpy_dtoh_async(dst, src.ptr, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        if self._closed:
            return
        with self.activate():
            self._stream.synchronize()
            for buffer in list(self._buffers):
                self.free(buffer)
            for array in self._host:
                base = array.base
                if base is not None and hasattr(base, "free"):
                    base.free()  # PagelockedHostAllocation.free (pycuda docs)
            self._host.clear()
        self._closed = True
        # Drops our reference on the primary context; the driver keeps it while TensorRT or
        # anyone else in the process still retains it.
        self._cuda_context.detach()


def _capability(value: Any) -> tuple[int, int]:
    major, minor = value[:2]
    return int(major), int(minor)


def _check_fits(buffer: DeviceBuffer, array: np.ndarray) -> None:
    if array.nbytes > buffer.nbytes:
        raise ValueError(f"{array.nbytes} bytes do not fit a {buffer.nbytes}-byte device buffer")


def _import_pycuda_driver() -> Any:
    try:
        import pycuda.driver as cuda  # lazily: the module must import without pycuda
    except ImportError as exc:
        raise BackendUnavailable(f"pycuda is not importable here ({exc}). {PYCUDA_HINT}") from exc
    return cuda


IMPLEMENTATIONS = ("pycuda",)


def open_device_memory(device_index: int = 0, implementation: str | None = None) -> DeviceMemory:
    """Open buffers and a stream on `device_index`. Raises BackendUnavailable with the reason."""
    kind = implementation or "pycuda"
    if kind == "pycuda":
        return PyCudaMemory(device_index)
    raise BackendUnavailable(f"unknown CUDA memory implementation {kind!r}; choose one of: "
                             f"{', '.join(IMPLEMENTATIONS)}")
