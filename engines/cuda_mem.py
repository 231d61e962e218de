"""Device buffers and one CUDA stream, behind a small seam, on cuda-python or pycuda.

TensorRT needs device pointers, a stream handle, and copies between page-locked
host memory and the device. `DeviceMemory` is the whole surface the engine
modules use. Two implementations, chosen at run time (`open_device_memory`):

* `engines.cuda_python.CudaPythonMemory` on cuda-python's runtime API
  (`cuda.bindings.runtime`, or `cuda.cudart` in older releases): what NVIDIA's
  samples use since TensorRT 10 (`samples/python/common_runtime.py`), installable
  from wheels; every call returns an `(err, value...)` tuple and every one is checked.
* `PyCudaMemory` on pycuda, which is not part of JetPack and builds from source
  against JetPack's CUDA (PyPI has only an sdist).

"auto" (the default, or `$JETAGENT_CUDA_MEMORY`) takes the first that imports,
cuda-python first. `scripts/install_jetson.sh` installs whichever works.

Context handling (pycuda): `pycuda.autoinit` is never imported (it creates a context as
an import side effect). We retain the device's *primary* context, which is "the one
used by the CUDA runtime API" (pycuda docs, Device.retain_primary_context), and
TensorRT uses the runtime API, so pycuda and TensorRT share one context. The
context is pushed around every call (`activate()`; pycuda's context stack is per
thread), so a camera thread other than the one that opened the engine can run it.
Memory and the stream are released in `close()` while the context is still alive,
never in `__del__`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engines.errors import BackendUnavailable

logger = logging.getLogger(__name__)

PYCUDA_HINT = (
    "TensorRT device buffers need cuda-python or pycuda. On a Jetson: "
    "pip install 'cuda-python==<JetPack's CUDA major.minor>.*' (wheels), or pycuda from source against "
    "JetPack's CUDA: apt install python3-dev; PATH=/usr/local/cuda/bin:$PATH pip install pycuda "
    "(inside a venv created with --system-site-packages so JetPack's tensorrt stays visible). "
    "scripts/install_jetson.sh does this."
)
ENV_VAR = "JETAGENT_CUDA_MEMORY"
IMPLEMENTATIONS = ("cuda-python", "pycuda")


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU the buffers live on. Jetson modules share a name and compute capability
    (AGX Orin, Orin NX and Orin Nano are all "Orin", 8.7): the SM count and memory tell them apart."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    multiprocessors: int = 0
    cuda_runtime: str = ""  # e.g. "12.6" (the runtime the seam was built with)
    cuda_driver: str = ""  # e.g. "12.6" (what the driver supports)

    def as_dict(self) -> dict[str, object]:
        return {"index": self.index, "name": self.name,
                "compute_capability": "{}.{}".format(*self.compute_capability),
                "total_memory": self.total_memory, "multiprocessors": self.multiprocessors,
                "cuda_runtime": self.cuda_runtime, "cuda_driver": self.cuda_driver}


def cuda_version_text(value: int) -> str:
    """CUDA's integer version (12060) -> "12.6"."""
    return f"{value // 1000}.{(value % 1000) // 10}" if value > 0 else ""


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
    def implementation(self) -> str:
        """Which seam this is and its version, e.g. "cuda-python 12.6.2" or "pycuda 2024.1.2"."""

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
                multiprocessors=int(device.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)),
                cuda_runtime=".".join(str(v) for v in cuda.get_version()[:2]),
                cuda_driver=cuda_version_text(int(cuda.get_driver_version())),
            )
            self._cuda_context = device.retain_primary_context()
        except cuda.Error as exc:
            raise BackendUnavailable(f"CUDA device {device_index} is not usable: {exc}") from exc
        self._cuda = cuda
        self._version = _module_version("pycuda")
        self._buffers: list[DeviceBuffer] = []
        self._host: list[np.ndarray] = []
        self._closed = False
        with self.activate():
            self._stream: Any = cuda.Stream()
        logger.info("CUDA device %d: %s (sm_%d%d)", device_index, self._info.name,
                    *self._info.compute_capability)

    @property
    def info(self) -> DeviceInfo:
        return self._info

    @property
    def implementation(self) -> str:
        return f"pycuda {self._version}"

    @property
    def stream_handle(self) -> int:
        if self._stream is None:
            raise BackendUnavailable("CUDA memory was already closed")
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
            # pycuda destroys a stream when its last reference goes; that must happen now, while
            # the context is current and alive, not at some later garbage collection (a leak per
            # backend, and a clean-up on a dead context).
            self._stream = None
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


def _module_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed as a distribution (a stand-in, a source tree)
        module = importlib.import_module(name)
        return str(getattr(module, "VERSION_TEXT", getattr(module, "__version__", "unknown")))


def _probe_import(kind: str) -> str | None:
    """None when `kind`'s modules import, else why not."""
    try:
        if kind == "pycuda":
            _import_pycuda_driver()
        else:
            from engines.cuda_python import import_cudart

            import_cudart()
    except BackendUnavailable as exc:
        cause = exc.__cause__
        return str(cause) if cause is not None else str(exc).split(". ")[0]
    return None


def available_implementations() -> list[dict[str, object]]:
    """For reports (`jetagent doctor`): each seam, whether it imports, its version or why not."""
    out: list[dict[str, object]] = []
    for kind in IMPLEMENTATIONS:
        error = _probe_import(kind)
        version = None
        if error is None:
            version = _module_version("pycuda") if kind == "pycuda" else _cuda_python_version()
        out.append({"name": kind, "importable": error is None, "version": version, "error": error})
    return out


def _cuda_python_version() -> str:
    for distribution in ("cuda-python", "cuda-bindings"):
        try:
            from importlib.metadata import version

            return version(distribution)
        except Exception:
            continue
    from engines.cuda_python import import_cudart

    return str(getattr(import_cudart(), "__version__", "unknown"))


def choose_implementation(implementation: str | None = None) -> str:
    """The seam `open_device_memory` will use: the one asked for (argument, then $JETAGENT_CUDA_MEMORY),
    or with "auto" the first that imports. Raises BackendUnavailable saying why."""
    kind = implementation or os.environ.get(ENV_VAR) or "auto"
    if kind not in ("auto", *IMPLEMENTATIONS):
        raise BackendUnavailable(f"unknown CUDA memory implementation {kind!r}; choose one of: "
                                 f"auto, {', '.join(IMPLEMENTATIONS)}")
    if kind != "auto":
        return kind
    reasons = []
    for candidate in IMPLEMENTATIONS:
        error = _probe_import(candidate)
        if error is None:
            return candidate
        reasons.append(f"{candidate}: {error}")
    raise BackendUnavailable(f"neither cuda-python nor pycuda is importable here ({'; '.join(reasons)}). "
                             f"{PYCUDA_HINT}")


def open_device_memory(device_index: int = 0, implementation: str | None = None) -> DeviceMemory:
    """Open buffers and a stream on `device_index` with the chosen seam (`choose_implementation`).
    Raises BackendUnavailable with the reason."""
    kind = choose_implementation(implementation)
    if kind == "pycuda":
        return PyCudaMemory(device_index)
    from engines.cuda_python import CudaPythonMemory

    return CudaPythonMemory(device_index)
