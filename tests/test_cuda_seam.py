"""The CUDA memory seam on cuda-python and on pycuda, chosen at run time (stand-ins; no GPU here).

The stand-ins (`tests/cuda_standins.py`) are strict where the seam could go wrong: cuda-python
returns `(err, value)` tuples that must be checked, pycuda keeps a context stack per thread and
dead contexts, device pointers are 256-byte aligned, and a stream must not outlive `close()`.
The whole build -> plan -> open -> infer path then runs on each seam with the TensorRT stand-in.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cuda_standins
import trt_models
import trt_standins
from engines import cuda_mem
from engines.base import BackendOptions
from engines.errors import BackendUnavailable, InferenceError, JetagentError

Setter = Callable[[str, Any], None]


@pytest.fixture()
def modules(monkeypatch: pytest.MonkeyPatch) -> Setter:
    """Install stand-in modules for this test only; start with no CUDA Python package importable."""
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv("JETAGENT_CUDA_MEMORY", raising=False)
    return lambda name, module: monkeypatch.setitem(sys.modules, name, module)


def run_in_thread(func: Callable[[], Any]) -> Any:
    out: list[Any] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            out.append(func())
        except BaseException as exc:  # re-raised on the test's thread
            errors.append(exc)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join(30)
    if errors:
        raise errors[0]
    return out[0]


# ---- choosing the seam -----------------------------------------------------------------------------

def test_the_seam_is_chosen_at_run_time(modules: Setter, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = cuda_standins.FakeGpu()
    with pytest.raises(BackendUnavailable, match="neither cuda-python nor pycuda is importable") as caught:
        cuda_mem.open_device_memory()
    assert "install_jetson.sh" in str(caught.value)
    cuda_standins.install_pycuda(modules, gpu)
    assert cuda_mem.choose_implementation() == "pycuda"
    cuda_standins.install_cudart(modules, gpu)
    assert cuda_mem.choose_implementation() == "cuda-python"  # NVIDIA's samples' choice first
    monkeypatch.setenv(cuda_mem.ENV_VAR, "pycuda")
    memory = cuda_mem.open_device_memory()
    assert memory.implementation.startswith("pycuda ")
    memory.close()
    assert cuda_mem.open_device_memory(0, "cuda-python").implementation.startswith("cuda-python ")
    with pytest.raises(BackendUnavailable, match="unknown CUDA memory implementation 'opencl'"):
        cuda_mem.open_device_memory(0, "opencl")
    listed = {row["name"]: row for row in cuda_mem.available_implementations()}
    assert listed["cuda-python"]["importable"] and listed["pycuda"]["importable"]


# ---- cuda-python ---------------------------------------------------------------------------------------

def test_cuda_python_memory_round_trip_on_pinned_buffers_from_another_thread(modules: Setter) -> None:
    gpu = cuda_standins.FakeGpu()
    rt = cuda_standins.install_cudart(modules, gpu)
    memory = cuda_mem.open_device_memory(0, "cuda-python")
    info = memory.info
    assert (info.name, info.compute_capability, info.multiprocessors) == ("Stand-in Orin", (8, 7), 8)
    assert info.cuda_runtime == "12.6" and info.total_memory == 8 << 30

    def work() -> np.ndarray:
        with memory.activate():
            buffer = memory.alloc(48)
            assert buffer.ptr % 256 == 0
            staging = memory.pagelocked_empty((12,), np.dtype(np.float32))
            staging[:] = np.arange(12, dtype=np.float32)
            memory.copy_to_device(buffer, staging)
            back = memory.pagelocked_empty((3, 4), np.dtype(np.float32))
            memory.copy_to_host(back, buffer)
            memory.synchronize()
            with pytest.raises(ValueError, match="do not fit"):
                memory.copy_to_device(buffer, np.zeros(13, np.float32))
            return back.copy()

    np.testing.assert_array_equal(run_in_thread(work), np.arange(12, dtype=np.float32).reshape(3, 4))
    memory_calls = [(name, device) for name, device in rt._calls if name.startswith(("cudaMalloc", "cudaMemcpy",
                                                                                      "cudaStream", "cudaFree"))]
    assert memory_calls and all(device == 0 for _, device in memory_calls), "a call ran with no device set"
    memory.close()
    memory.close()
    assert gpu.blocks == {} and rt._pinned == {} and not any(rt._streams.values()), "close() leaked"
    with pytest.raises(BackendUnavailable, match="already closed"):
        with memory.activate():
            pass


def test_every_cuda_python_error_tuple_is_checked(modules: Setter) -> None:
    gpu = cuda_standins.FakeGpu()
    rt = cuda_standins.install_cudart(modules, gpu)
    memory = cuda_mem.open_device_memory(0, "cuda-python")
    with memory.activate():
        rt._failures["cudaMalloc"] = cuda_standins.cudaError_t.cudaErrorMemoryAllocation
        with pytest.raises(JetagentError, match="cudaMalloc failed: cudaErrorMemoryAllocation - out of memory"):
            memory.alloc(1 << 20)
        buffer = memory.alloc(16)
        rt._failures["cudaMemcpyAsync"] = cuda_standins.cudaError_t.cudaErrorInvalidValue
        with pytest.raises(JetagentError, match="cudaMemcpyAsync failed: cudaErrorInvalidValue"):
            memory.copy_to_device(buffer, np.zeros(4, np.float32))
        rt._failures["cudaStreamSynchronize"] = cuda_standins.cudaError_t.cudaErrorInvalidResourceHandle
        with pytest.raises(JetagentError, match="cudaStreamSynchronize failed"):
            memory.synchronize()
        memory.free(buffer)
    rt._failures["cudaFree"] = cuda_standins.cudaError_t.cudaErrorInvalidDevicePointer
    memory.close()  # logs what CUDA refused, releases the rest, never raises
    assert not any(rt._streams.values())
    with pytest.raises(BackendUnavailable, match=r"CUDA device 1 is not usable: device 1 requested, 1 CUDA"):
        cuda_mem.open_device_memory(1, "cuda-python")
    cuda_standins.install_cudart(modules, gpu, devices=0)
    with pytest.raises(BackendUnavailable, match="cudaErrorNoDevice - no CUDA-capable device is detected"):
        cuda_mem.open_device_memory(0, "cuda-python")


# ---- pycuda ----------------------------------------------------------------------------------------

def test_pycuda_close_destroys_the_stream_while_the_context_lives(modules: Setter) -> None:
    gpu = cuda_standins.FakeGpu()
    driver = cuda_standins.install_pycuda(modules, gpu)
    memories = [cuda_mem.open_device_memory(0, "pycuda") for _ in range(3)]
    assert driver._live["streams"] == 3
    for memory in memories:
        with memory.activate():
            memory.pagelocked_empty((4,), np.dtype(np.float32))
            memory.alloc(64)
        memory.close()
    assert driver._live["streams"] == 0, "a CUDA stream leaked per close()"
    del memories
    gc.collect()
    assert driver._cleanup_errors == [], driver._cleanup_errors
    info = cuda_mem.open_device_memory(0, "pycuda").info
    assert info.multiprocessors == 8 and info.cuda_runtime == "12.6" and info.cuda_driver == "12.6"


def test_pycuda_contexts_are_per_thread(modules: Setter) -> None:
    gpu = cuda_standins.FakeGpu()
    driver = cuda_standins.install_pycuda(modules, gpu)
    memory = cuda_mem.open_device_memory(0, "pycuda")
    with pytest.raises(driver.LogicError, match="no current context on this thread"):
        run_in_thread(lambda: memory.alloc(16))  # outside activate(): nothing is current on that thread

    def inside() -> int:
        with memory.activate():
            return memory.alloc(16).nbytes

    assert run_in_thread(inside) == 16
    assert driver._stack() == []
    memory.close()


# ---- the whole path on each seam ---------------------------------------------------------------------

@pytest.mark.parametrize("seam", ["cuda-python", "pycuda"])
def test_build_open_infer_on_each_seam(seam: str, modules: Setter, tmp_path: Path) -> None:
    from engines import tensorrt
    from engines.trt_build import BuildRequest, build_engine

    gpu = cuda_standins.FakeGpu()
    trt = trt_standins.make_tensorrt("10.3.0.30", gpu=gpu)
    modules("tensorrt", trt)
    (cuda_standins.install_cudart if seam == "cuda-python" else cuda_standins.install_pycuda)(modules, gpu)
    calib = [np.full((1, 3, 4, 4), v, np.float32) for v in (0.1, 0.5, 0.9)]
    report = build_engine(trt_models.affine_relu(tmp_path / "m.onnx"), tmp_path / "m.plan",
                          BuildRequest(precision="int8", calibration=lambda: calib, cuda_memory=seam))
    assert report.cuda_memory.startswith(seam) and report.calibration_batches == 3
    backend = tensorrt.open_tensorrt(tmp_path / "m.plan", BackendOptions(extra={"cuda_memory": seam}))
    x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    y = run_in_thread(lambda: backend.infer({"x": x})["y"])
    np.testing.assert_allclose(y, np.maximum(2 * x + 1, 0), rtol=1e-6)
    assert backend.describe()["cuda_memory"].startswith(seam)
    assert all(active for _, _, active in trt._calls), "TensorRT was called with no CUDA context current"
    backend.close()
    with pytest.raises(InferenceError, match="closed"):
        backend.infer({"x": x})
    assert gpu.blocks == {}, "device memory left after close()"
