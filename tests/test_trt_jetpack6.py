"""What would break a first TensorRT run on JetPack 6, each against a stand-in as strict as the real thing.

Every test here failed on the code before issue 12 (see the issue's report for the run against
the old tree): one logger per process, the plugin library, calibration shapes (static / OPT),
a workspace limit, TF32 cleared for FP32, DLA with the entropy calibrator only, dtypes numpy
cannot hold, host-located shape tensors, dynamic-shape profiles, the log ring. None of this
has run on a GPU; `tests/trt_standins.py` says which rules of the real library it enforces.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

import trt_models
import trt_standins
from engines import tensorrt, trt_build
from engines.base import BackendOptions
from engines.errors import InferenceError, ModelLoadError
from engines.trt_build import BuildRequest, BuildUnsupported, EngineBuildError, build_engine

JP6 = "10.3.0.30"


class Process:
    """One stand-in TensorRT 'process': its module (logger, plugin registry) and device memory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, version: str = JP6, **knobs: Any) -> None:
        self.gpu = trt_standins.FakeGpu()
        self.trt = trt_standins.make_tensorrt(version, gpu=self.gpu, **knobs)
        self.memories: list[trt_standins.StandinMemory] = []

        def memory(device_index: int = 0, implementation: str | None = None) -> trt_standins.StandinMemory:
            self.memories.append(trt_standins.StandinMemory(self.gpu))
            return self.memories[-1]

        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setattr(tensorrt, "open_device_memory", memory)
        monkeypatch.setattr(trt_build, "open_device_memory", memory)

    def calls(self, name: str) -> list[tuple[Any, ...]]:
        return [args for called, args, _ in self.trt._calls if called == name]


NewProcess = Callable[..., Process]


@pytest.fixture()
def process(monkeypatch: pytest.MonkeyPatch) -> NewProcess:
    return lambda version=JP6, **knobs: Process(monkeypatch, version, **knobs)


def req(**fields: Any) -> BuildRequest:
    """A request with a workspace limit, so each test fails (on old code) for its own reason."""
    return BuildRequest(**{"workspace_bytes": 1 << 28, **fields})


def batches(shape: tuple[int, ...], n: int = 3) -> Callable[[], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    data = [rng.random(shape, np.float32) for _ in range(n)]
    return lambda: data


# ---- one logger per process ------------------------------------------------------------------------

def test_one_logger_per_process_survives_closing_the_first_backend(process: NewProcess, tmp_path: Path) -> None:
    proc = process()
    model = trt_models.affine_relu(tmp_path / "m.onnx")
    build_engine(model, tmp_path / "a.plan", req())
    build_engine(model, tmp_path / "b.plan", req())
    first = tensorrt.open_tensorrt(tmp_path / "a.plan", BackendOptions())
    second = tensorrt.open_tensorrt(tmp_path / "b.plan", BackendOptions())
    first.close()
    del first
    gc.collect()  # whatever the first backend held is gone now
    x = np.ones((1, 3, 4, 4), np.float32)
    np.testing.assert_allclose(second.infer({"x": x})["y"], 3 * x)
    # A later failure is reported with TensorRT's own words, through the one logger.
    stale = tmp_path / "a.plan"
    record = json.loads(tensorrt.sidecar_path(stale).read_text())
    stale.write_bytes(b"garbage")
    tensorrt.write_sidecar(stale, {**record, "plan_sha256": trt_build.sha256_file(stale)})
    with pytest.raises(ModelLoadError, match="invalid plan magic"):
        tensorrt.open_tensorrt(stale, BackendOptions())
    second.close()
    assert proc.trt._ignored_loggers == 0, "TensorRT was handed a second logger (it keeps only the first)"


def test_a_failed_build_quotes_tensorrt_s_last_error_not_its_first_chatter(process: NewProcess,
                                                                          tmp_path: Path) -> None:
    process(chatter=80, build_error="[defaultAllocator.cpp::allocate] Error Code 2: OutOfMemory")
    with pytest.raises(EngineBuildError, match="Error Code 2: OutOfMemory") as caught:
        build_engine(trt_models.affine_relu(tmp_path / "m.onnx"), tmp_path / "m.plan", req())
    assert "chatter 1 " not in str(caught.value) and not (tmp_path / "m.plan").exists()
    process(chatter=80)
    report = build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", req())
    assert report.warnings[-2:] == ["stand-in builder chatter 80", "stand-in builder: plan is a simulation"]


# ---- plugins ----------------------------------------------------------------------------------------

def test_plugin_ops_build_and_load_in_a_fresh_process(process: NewProcess, tmp_path: Path) -> None:
    builder = process()
    model = trt_models.with_plugin(tmp_path / "nms.onnx")
    build_engine(model, tmp_path / "nms.plan", req())
    assert builder.calls("init_libnvinfer_plugins") == [("",)]
    runner = process()  # another process: its plugin registry starts empty
    backend = tensorrt.open_tensorrt(tmp_path / "nms.plan", BackendOptions())
    assert backend.describe()["plugins"] is True and runner.trt._plugins
    backend.close()
    # Initialised once per process, not per engine.
    tensorrt.open_tensorrt(tmp_path / "nms.plan", BackendOptions()).close()
    assert runner.calls("init_libnvinfer_plugins") == [("",)]


# ---- calibration shapes --------------------------------------------------------------------------------

def test_calibration_batches_must_have_the_network_s_static_shape(process: NewProcess, tmp_path: Path) -> None:
    process()
    model = trt_models.affine_relu(tmp_path / "m.onnx")
    request = req(precision="int8", calibration=batches((2, 3, 4, 4)))
    with pytest.raises(EngineBuildError, match=r"shape \[2, 3, 4, 4\], but TensorRT reads calibration batches "
                                               r"with the network's input shape \[1, 3, 4, 4\]"):
        build_engine(model, tmp_path / "m.plan", request)
    assert not (tmp_path / "m.plan").exists()


def test_dynamic_inputs_calibrate_with_the_opt_shape(process: NewProcess, tmp_path: Path) -> None:
    proc = process()
    model = trt_models.affine_relu(tmp_path / "dyn.onnx", ["batch", 3, 4, 4])
    from engines.trt_profiles import ProfileShapes  # the profile API (a tuple triple works too)

    ranges = {"x": ProfileShapes(min=(1, 3, 4, 4), opt=(2, 3, 4, 4), max=(4, 3, 4, 4))}
    with pytest.raises(EngineBuildError, match=r"calibration profile's OPT shape \[2, 3, 4, 4\]"):
        build_engine(model, tmp_path / "d.plan", req(precision="int8", profile_shapes=ranges,
                                                              calibration=batches((1, 3, 4, 4))))
    report = build_engine(model, tmp_path / "d.plan", req(precision="int8", profile_shapes=ranges,
                                                                   calibration=batches((2, 3, 4, 4))))
    assert report.calibration_batches == 3 and proc.trt._calibrated == [3]
    assert report.profile == {"x": [[1, 3, 4, 4], [2, 3, 4, 4], [4, 3, 4, 4]]}
    assert len(proc.calls("IBuilderConfig.set_calibration_profile")) == 2  # one per build


def test_a_refused_calibration_profile_stops_the_build(process: NewProcess, tmp_path: Path) -> None:
    process(refuse_calibration_profile=True)
    model = trt_models.affine_relu(tmp_path / "dyn.onnx", ["batch", 3, 4, 4])
    request = req(precision="int8", profile_shapes={"x": ((2, 3, 4, 4),) * 3},
                           calibration=batches((2, 3, 4, 4)))
    with pytest.raises(EngineBuildError, match="refused the calibration profile"):
        build_engine(model, tmp_path / "d.plan", request)
    assert not (tmp_path / "d.plan").exists()


# ---- dynamic dimensions ----------------------------------------------------------------------------

def test_a_dynamic_batch_model_builds_and_runs_inside_its_profile(process: NewProcess, tmp_path: Path) -> None:
    process()
    model = trt_models.affine_relu(tmp_path / "dyn.onnx", ["batch", 3, 4, 4])
    with pytest.raises(BuildUnsupported, match=r"inputs \['x'\] have dynamic dimensions"):
        build_engine(model, tmp_path / "d.plan", req())
    ranges = {"x": ((1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4))}
    report = build_engine(model, tmp_path / "d.plan", req(profile_shapes=ranges))
    assert report.profile == {"x": [[1, 3, 4, 4], [2, 3, 4, 4], [4, 3, 4, 4]]}
    backend = tensorrt.open_tensorrt(tmp_path / "d.plan", BackendOptions())
    assert backend.inputs[0].shape == (None, 3, 4, 4)
    x = np.zeros((3, 3, 4, 4), np.float32)
    assert backend.infer({"x": x})["y"].shape == (3, 3, 4, 4)
    with pytest.raises(InferenceError, match="outside the engine's optimization profile"):
        backend.infer({"x": np.zeros((5, 3, 4, 4), np.float32)})
    backend.close()
    with pytest.raises(BuildUnsupported, match="does not fit the network's input shape"):
        build_engine(model, tmp_path / "e.plan", req(profile_shapes={"x": ((1, 3, 4, 4), (1, 3, 8, 8),
                                                                                     (1, 3, 8, 8))}))


# ---- workspace, TF32, DLA ----------------------------------------------------------------------------

def test_every_build_has_a_workspace_limit(process: NewProcess, tmp_path: Path) -> None:
    proc = process()
    report = build_engine(trt_models.affine_relu(tmp_path / "m.onnx"), tmp_path / "m.plan", BuildRequest())
    assert report.workspace_bytes == 1 << 30  # an eighth of the stand-in Orin's 8 GiB
    assert [args[1] for args in proc.calls("IBuilderConfig.set_memory_pool_limit")] == [1 << 30]
    assert trt_build.default_workspace_bytes(4 << 30) == 512 << 20
    assert trt_build.default_workspace_bytes(64 << 30) == 2 << 30
    assert trt_build.default_workspace_bytes(1 << 30) == 256 << 20


def test_fp32_engines_do_not_compute_in_tf32(process: NewProcess, tmp_path: Path) -> None:
    process()
    report = build_engine(trt_models.affine_relu(tmp_path / "m.onnx"), tmp_path / "m.plan", req())
    assert "TF32" not in trt_standins.plan_json(tmp_path / "m.plan")["flags"] and report.tf32 is False
    fp16 = build_engine(tmp_path / "m.onnx", tmp_path / "h.plan", req(precision="fp16"))
    assert fp16.tf32 is True  # reduced precision anyway; TensorRT's default stays


def test_dla_calibrates_only_with_the_entropy_calibrator(process: NewProcess, tmp_path: Path) -> None:
    process(dla_cores=2)
    model = trt_models.affine_relu(tmp_path / "m.onnx")
    with pytest.raises(BuildUnsupported, match="DLA requires the entropy calibrator"):
        build_engine(model, tmp_path / "m.plan", req(precision="int8", calibrator="minmax", dla_core=1,
                                                              calibration=batches((1, 3, 4, 4))))
    assert not (tmp_path / "m.plan").exists()
    report = build_engine(model, tmp_path / "m.plan", req(precision="int8", dla_core=1,
                                                                   calibration=batches((1, 3, 4, 4))))
    assert report.dla_core == 1 and report.precision_built == "int8"


# ---- tensors numpy cannot hold, and host-located tensors ------------------------------------------------

@pytest.mark.parametrize(("onnx_type", "trt_name"), [(TensorProto.BFLOAT16, "BF16"), (TensorProto.FLOAT8E4M3FN, "FP8")])
def test_tensors_numpy_cannot_hold_are_refused_by_name(onnx_type: int, trt_name: str, process: NewProcess,
                                                       tmp_path: Path) -> None:
    process()
    build_engine(trt_models.cast_output(tmp_path / "b.onnx", onnx_type), tmp_path / "b.plan", req())
    with pytest.raises(ModelLoadError, match=rf"output 'y' has TensorRT type {trt_name}, which numpy cannot hold"):
        tensorrt.open_tensorrt(tmp_path / "b.plan", BackendOptions())


def test_shape_outputs_live_on_the_host(process: NewProcess, tmp_path: Path) -> None:
    process()
    build_engine(trt_models.shape_output(tmp_path / "s.onnx"), tmp_path / "s.plan", req())
    backend = tensorrt.open_tensorrt(tmp_path / "s.plan", BackendOptions())
    assert backend.host_tensors == {"s"}
    x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    for _ in range(2):
        out = backend.infer({"x": x})
        np.testing.assert_array_equal(out["s"], [1, 3, 4, 4])
        np.testing.assert_allclose(out["y"], np.maximum(x, 0))
    backend.close()


def test_shape_inputs_are_read_from_host_memory(process: NewProcess, tmp_path: Path) -> None:
    proc = process()
    build_engine(trt_models.reshape_input(tmp_path / "r.onnx"), tmp_path / "r.plan", req())
    backend = tensorrt.open_tensorrt(tmp_path / "r.plan", BackendOptions())
    x = np.arange(12, dtype=np.float32).reshape(1, 12)
    for rows, cols in ((3, 4), (6, 2)):
        y = backend.infer({"x": x, "target": np.array([rows, cols], np.int64)})["y"]
        np.testing.assert_array_equal(y, x.reshape(rows, cols))
    addresses = [args[1] for args in proc.calls("IExecutionContext.set_tensor_address")]
    assert addresses and all(a % 256 == 0 for a in addresses)
    backend.close()


def test_an_engine_opened_on_one_thread_runs_on_another(process: NewProcess, tmp_path: Path) -> None:
    proc = process()
    build_engine(trt_models.affine_relu(tmp_path / "m.onnx"), tmp_path / "m.plan", req())
    backend = tensorrt.open_tensorrt(tmp_path / "m.plan", BackendOptions())
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(backend.infer({"x": np.ones((1, 3, 4, 4),
                                                                                       np.float32)})))
    worker.start()
    worker.join(30)
    np.testing.assert_allclose(results[0]["y"], 3.0)
    assert all(active for _, _, active in proc.trt._calls)
    backend.close()
