"""`DeviceMemory` on cuda-python's CUDA runtime API (`cuda.bindings.runtime`, formerly `cuda.cudart`).

This is what NVIDIA's TensorRT samples use since 10.x (`samples/python/common_runtime.py`):
cudaMalloc/cudaMallocHost buffers, one cudaStream, cudaMemcpyAsync both ways. Every call
returns a tuple whose first item is a `cudaError_t`; each one is checked here and a
failure raises `CudaError` naming the call and CUDA's own error name and text (the
runtime API never raises by itself: an unchecked tuple would carry on with garbage).

Context: the runtime API works in the device's primary context, the one TensorRT uses
too. `activate()` calls cudaSetDevice on the calling thread (cheap once set), so a
camera thread other than the one that opened the engine can run it. The stream and
every buffer are released in `close()`, never in `__del__`; cudaDeviceReset is never
called (it would pull the context out from under TensorRT).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from engines.cuda_mem import (
    PYCUDA_HINT,
    DeviceBuffer,
    DeviceInfo,
    _check_fits,
    _cuda_python_version,
    cuda_version_text,
)
from engines.errors import BackendUnavailable, JetagentError

logger = logging.getLogger(__name__)

# cuda-python 12.6+ and 13.x: cuda.bindings.runtime; before that: cuda.cudart.
RUNTIME_MODULES = ("cuda.bindings.runtime", "cuda.cudart")


class CudaError(JetagentError):
    """A CUDA runtime call returned an error."""


def import_cudart() -> Any:
    """cuda-python's runtime module, or BackendUnavailable saying how to get it."""
    reason: Exception | None = None
    for name in RUNTIME_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            reason = reason or exc
    raise BackendUnavailable(f"cuda-python is not importable here ({reason}). {PYCUDA_HINT}") from reason


class CudaPythonMemory:
    """`engines.cuda_mem.DeviceMemory` on cuda-python's runtime API with one stream."""

    def __init__(self, device_index: int = 0) -> None:
        self._rt = import_cudart()
        self._index = device_index
        self._closed = False
        self._buffers: list[DeviceBuffer] = []
        self._pinned: list[int] = []
        self._version = _cuda_python_version()
        try:
            count = int(self._call("cudaGetDeviceCount"))
            if not 0 <= device_index < count:
                raise CudaError(f"device {device_index} requested, {count} CUDA device(s) present")
            self._call("cudaSetDevice", device_index)
            prop = self._call("cudaGetDeviceProperties", device_index)
            runtime, driver = int(self._call("cudaRuntimeGetVersion")), int(self._call("cudaDriverGetVersion"))
            self._stream = self._call("cudaStreamCreate")
        except CudaError as exc:
            raise BackendUnavailable(f"CUDA device {device_index} is not usable: {exc}") from exc
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        self._info = DeviceInfo(
            index=device_index, name=name.split("\0", 1)[0].strip(),
            compute_capability=(int(prop.major), int(prop.minor)), total_memory=int(prop.totalGlobalMem),
            multiprocessors=int(prop.multiProcessorCount), cuda_runtime=cuda_version_text(runtime),
            cuda_driver=cuda_version_text(driver))
        logger.info("CUDA device %d: %s (sm_%d%d), cuda-python %s", device_index, self._info.name,
                    *self._info.compute_capability, self._version)

    # -- the checked call ------------------------------------------------------------------------
    def _call(self, name: str, *args: Any) -> Any:
        """Call `cudart.<name>(*args)`; raise CudaError unless it returned cudaSuccess; return the value(s)."""
        result = getattr(self._rt, name)(*args)
        if not isinstance(result, tuple) or not result:
            raise CudaError(f"{name} returned {result!r}, not an (err, ...) tuple")
        err, values = result[0], result[1:]
        if err != self._rt.cudaError_t.cudaSuccess:
            raise CudaError(f"{name} failed: {self._describe(err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def _describe(self, err: Any) -> str:
        parts = []
        for getter in ("cudaGetErrorName", "cudaGetErrorString"):
            try:
                _, text = getattr(self._rt, getter)(err)
                parts.append(text.decode(errors="replace") if isinstance(text, bytes) else str(text))
            except Exception:  # describing an error must not hide it
                continue
        return " - ".join(parts) or repr(err)

    # -- DeviceMemory ------------------------------------------------------------------------------
    @property
    def info(self) -> DeviceInfo:
        return self._info

    @property
    def implementation(self) -> str:
        return f"cuda-python {self._version}"

    @property
    def stream_handle(self) -> int:
        if self._closed:
            raise BackendUnavailable("CUDA memory was already closed")
        return int(self._stream)

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        if self._closed:
            raise BackendUnavailable("CUDA memory was already closed")
        self._call("cudaSetDevice", self._index)  # this thread now works in the device's primary context
        yield

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = int(self._call("cudaMalloc", max(int(nbytes), 1)))
        buffer = DeviceBuffer(ptr=ptr, nbytes=int(nbytes), handle=ptr)
        self._buffers.append(buffer)
        return buffer

    def free(self, buffer: DeviceBuffer) -> None:
        if buffer.handle is not None:
            self._call("cudaFree", buffer.ptr)
            buffer.handle = None
        if buffer in self._buffers:
            self._buffers.remove(buffer)

    def pagelocked_empty(self, shape: Sequence[int], dtype: np.dtype[Any]) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(tuple(shape), dtype=np.int64))
        nbytes = max(count * dtype.itemsize, 1)
        ptr = int(self._call("cudaMallocHost", nbytes))
        self._pinned.append(ptr)
        raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
        array: np.ndarray = np.frombuffer(memoryview(raw), np.uint8, count=count * dtype.itemsize).view(dtype)
        return array.reshape(tuple(shape))

    def copy_to_device(self, dst: DeviceBuffer, src: np.ndarray) -> None:
        data = np.ascontiguousarray(src)
        _check_fits(dst, data)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call("cudaMemcpyAsync", dst.ptr, data.ctypes.data, data.nbytes, kind, self._stream)

    def copy_to_host(self, dst: np.ndarray, src: DeviceBuffer) -> None:
        if not (dst.flags.c_contiguous and dst.flags.writeable):
            raise ValueError("copy_to_host needs a writable C-contiguous host array")
        _check_fits(src, dst)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call("cudaMemcpyAsync", dst.ctypes.data, src.ptr, dst.nbytes, kind, self._stream)

    def synchronize(self) -> None:
        self._call("cudaStreamSynchronize", self._stream)

    def close(self) -> None:
        """Free every buffer, the pinned memory and the stream. Logs (never raises) what CUDA refuses."""
        if self._closed:
            return
        with self.activate():
            steps: list[tuple[str, tuple[Any, ...]]] = [("cudaStreamSynchronize", (self._stream,))]
            steps += [("cudaFree", (b.ptr,)) for b in self._buffers if b.handle is not None]
            steps += [("cudaFreeHost", (ptr,)) for ptr in self._pinned]
            steps.append(("cudaStreamDestroy", (self._stream,)))
            for name, args in steps:
                try:
                    self._call(name, *args)
                except CudaError as exc:
                    logger.warning("closing CUDA memory: %s", exc)
        for buffer in self._buffers:
            buffer.handle = None
        self._buffers.clear()
        self._pinned.clear()
        self._closed = True
