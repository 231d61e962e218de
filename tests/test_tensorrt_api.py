"""TensorRT backend and builder against stand-in TensorRT 8.5/8.6, 10.3 and 11.4 modules.

No GPU here: `trt_standins` generates each version's `tensorrt` module from the name
table in engines.trt_api (only the names that version has), and a fake device memory.
What runs for real: route selection, the full build_engine path (parser, profiles,
calibrator feeding device memory, timing cache, atomic plan + sidecar), and the
open_tensorrt + infer path (a stand-in context runs the ONNX with ONNX Runtime).
An AST walk checks every TensorRT name the code touches against the version table.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import trt_standins
from engines import cuda_mem, tensorrt, trt_api, trt_build, trt_logger
from engines.base import BackendOptions, open_backend
from engines.errors import BackendUnavailable, InferenceError, JetagentError, ModelLoadError
from engines.fileio import sha256_file
from engines.trt_build import (
    BuildRequest,
    BuildUnsupported,
    EngineBuildError,
    OnnxKinds,
    PrecisionUnavailable,
    build_engine,
    choose_route,
    inspect_onnx,
)

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("8.5.2.2", "8.6.1.6", "10.3.0.30", "11.4.0.1")
IMPLICIT = ("8.5.2.2", "8.6.1.6", "10.3.0.30")
EXPLICIT = ("10.3.0.30", "11.4.0.1")


# ---- tiny real ONNX models --------------------------------------------------------------------------

def _save(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any], path: Path) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def float_model(path: Path, shape: list[Any] | None = None) -> Path:
    """y = relu(2 * x + 1), float32."""
    shape = shape or [1, 3, 4, 4]
    return _save(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["u"]),
         helper.make_node("Relu", ["u"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.array(2, np.float32), "two"),
         numpy_helper.from_array(np.array(1, np.float32), "one")],
        path)


def qdq_model(path: Path) -> Path:
    """x -> QuantizeLinear/DequantizeLinear (symmetric int8, scale 1/64) -> relu: ORT quantizer style."""
    return _save(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
         helper.make_node("Relu", ["dq"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(np.array(1 / 64, np.float32), "scale"),
         numpy_helper.from_array(np.array(0, np.int8), "zero")],
        path)


def fp16_model(path: Path) -> Path:
    """The float model as ModelOpt AutoCast would leave it: float16 tensors throughout."""
    return _save(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 3, 4, 4])],
        [numpy_helper.from_array(np.array(2, np.float16), "two")],
        path)


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "onnx"
    folder.mkdir()
    return {"float": float_model(folder / "float.onnx"), "qdq": qdq_model(folder / "qdq.onnx"),
            "fp16": fp16_model(folder / "fp16.onnx"),
            "dynamic": float_model(folder / "dynamic.onnx", ["batch", 3])}


@pytest.fixture()
def calib_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(folder / f"{i:03d}.npy", rng.random((1, 3, 4, 4), np.float32))
    return folder


# ---- stand-in environment ---------------------------------------------------------------------------

@dataclass
class Env:
    trt: Any
    memories: list[trt_standins.StandinMemory]

    def calls(self, name: str) -> list[tuple[Any, ...]]:
        return [args for called, args, _ in self.trt._calls if called == name]


Install = Callable[..., Env]
Models = dict[str, Path]


@pytest.fixture()
def use_trt(monkeypatch: pytest.MonkeyPatch) -> Install:
    """Install a stand-in tensorrt module of a given version, and the fake device memory."""
    gpu = trt_standins.FakeGpu()

    def install(version: str, **platform: Any) -> Env:
        module = trt_standins.make_tensorrt(version, gpu=gpu, **platform)
        env = Env(module, [])

        def memory(device_index: int = 0, implementation: str | None = None) -> trt_standins.StandinMemory:
            env.memories.append(trt_standins.StandinMemory(gpu))
            return env.memories[-1]

        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(tensorrt, "open_device_memory", memory)
        monkeypatch.setattr(trt_build, "open_device_memory", memory)
        return env

    return install


def relu_2x_1(x: np.ndarray) -> np.ndarray:
    return np.maximum(2 * x + 1, 0)


# ---- the version table and capability detection ----------------------------------------------------

def test_table_is_well_formed() -> None:
    names = [row.name for row in trt_api.API]
    assert len(names) == len(set(names)), "duplicate rows"
    for row in trt_api.API:
        assert row.families and row.families <= set(trt_api.FAMILIES), row
    for _, families in trt_api.ROUTES.values():
        assert families <= set(trt_api.FAMILIES)
    probed = [n for needs in trt_api._ROUTE_NEEDS.values() for n in needs]
    for name in probed + list(trt_api._INFERENCE_NEEDS + trt_api._BUILD_NEEDS):
        assert name in trt_api.API_BY_NAME, f"detect_capabilities probes {name}, which the table lacks"


@pytest.mark.parametrize(("version", "family"), [
    ("8.5.2.2", "8.5"), ("8.6.1.6", "8.5"), ("10.3.0.30", "10"), ("10.16.1", "10"), ("11.4.0.1", "11"),
    ("8.2.1", "unknown"), ("7.1.3", "unknown"), ("garbage", "unknown")])
def test_family_of(version: str, family: str) -> None:
    assert trt_api.family_of(version) == family


@pytest.mark.parametrize("version", VERSIONS)
def test_standin_exposes_exactly_the_table(version: str) -> None:
    family = trt_api.family_of(version)
    expected = {row.name for row in trt_api.API if family in row.families}
    expected |= {name.partition(".")[0] for name in expected}
    assert trt_standins.public_names(trt_standins.make_tensorrt(version)) == expected


@pytest.mark.parametrize(("version", "routes", "platform", "explicit_batch"), [
    ("8.5.2.2", ("implicit-calibrator", "fp16-flag", "fp32"), True, True),
    ("8.6.1.6", ("implicit-calibrator", "fp16-flag", "fp32"), True, True),
    ("10.3.0.30", ("implicit-calibrator", "explicit-qdq", "fp16-flag", "fp16-onnx", "fp32"), True, False),
    ("11.4.0.1", ("explicit-qdq", "fp16-onnx", "fp32"), False, False)])
def test_detect_capabilities(version: str, routes: tuple[str, ...], platform: bool,
                             explicit_batch: bool) -> None:
    caps = trt_api.detect_capabilities(trt_standins.make_tensorrt(version))
    assert caps.routes == routes
    assert caps.tensor_io_api and not caps.missing
    assert caps.platform_queries is platform and caps.weak_typing is platform
    assert caps.explicit_batch_flag is explicit_batch
    assert caps.int8_routes == tuple(r for r in routes if r in ("implicit-calibrator", "explicit-qdq"))
    json.dumps(caps.as_dict())


def test_detect_capabilities_of_an_old_or_foreign_module() -> None:
    module = type(sys)("tensorrt")
    module.__dict__["__version__"] = "7.1.3"
    caps = trt_api.detect_capabilities(module)
    assert caps.family == "unknown" and caps.routes == ("fp32",) and not caps.tensor_io_api
    assert "ICudaEngine.num_io_tensors" in caps.missing


# ---- route rules --------------------------------------------------------------------------------------

FLOAT, QDQ, HALF = OnnxKinds(False, False), OnnxKinds(True, False), OnnxKinds(False, True)


@pytest.mark.parametrize(("version", "precision", "kinds", "asked", "expected"), [
    ("8.5.2.2", "int8", FLOAT, "auto", "implicit-calibrator"),
    ("8.5.2.2", "int8", QDQ, "auto", "strongly typed networks (TensorRT 10+)"),
    ("8.5.2.2", "int8", QDQ, "explicit-qdq", "strongly typed networks (TensorRT 10+)"),
    ("10.3.0.30", "int8", FLOAT, "auto", "implicit-calibrator"),
    ("10.3.0.30", "int8", QDQ, "auto", "explicit-qdq"),
    ("10.3.0.30", "int8", FLOAT, "explicit-qdq", "needs a QDQ ONNX"),
    ("10.3.0.30", "int8", QDQ, "implicit-calibrator", "holds Q/DQ nodes"),
    ("11.4.0.1", "int8", QDQ, "auto", "explicit-qdq"),
    ("11.4.0.1", "int8", FLOAT, "auto", "implicit INT8 calibration was removed in TensorRT 11"),
    ("11.4.0.1", "int8", FLOAT, "implicit-calibrator", "removed in TensorRT 11; use explicit-qdq"),
    ("8.5.2.2", "fp16", FLOAT, "auto", "fp16-flag"),
    ("8.5.2.2", "fp16", HALF, "fp16-onnx", "strongly typed networks (TensorRT 10+)"),
    ("10.3.0.30", "fp16", FLOAT, "auto", "fp16-flag"),
    ("10.3.0.30", "fp16", HALF, "auto", "fp16-onnx"),
    ("11.4.0.1", "fp16", HALF, "auto", "fp16-onnx"),
    ("11.4.0.1", "fp16", FLOAT, "auto", "ModelOpt AutoCast"),
    ("11.4.0.1", "fp16", FLOAT, "fp16-onnx", "needs an ONNX with float16 tensors"),
    ("11.4.0.1", "fp32", FLOAT, "auto", "fp32"),
    ("8.5.2.2", "fp32", QDQ, "auto", "always build INT8"),
    ("11.4.0.1", "fp32", HALF, "auto", "FP32 needs the FP32 model"),
    ("10.3.0.30", "fp16", QDQ, "auto", "always build INT8")])
def test_choose_route(version: str, precision: str, kinds: OnnxKinds, asked: str, expected: str) -> None:
    caps = trt_api.detect_capabilities(trt_standins.make_tensorrt(version))
    int8_route, fp16_route = (asked, "auto") if precision == "int8" else ("auto", asked)
    if expected in trt_api.ROUTES:
        assert choose_route(caps, precision, kinds, int8_route, fp16_route) == expected
    else:
        with pytest.raises(PrecisionUnavailable, match=re.escape(expected)):
            choose_route(caps, precision, kinds, int8_route, fp16_route)


def test_inspect_onnx(models: Models, tmp_path: Path) -> None:
    assert inspect_onnx(models["float"]) == OnnxKinds(False, False)
    assert inspect_onnx(models["qdq"]) == OnnxKinds(True, False)
    assert inspect_onnx(models["fp16"]) == OnnxKinds(False, True)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a readable ONNX"):
        inspect_onnx(tmp_path / "bad.onnx")


@pytest.mark.parametrize(("field", "value"), [
    ("precision", "int4"), ("int8_route", "magic"), ("fp16_route", "x"), ("calibrator", "percentile"),
    ("workspace_bytes", 0), ("dla_core", -1), ("profile_shapes", {"x": ((1, 3), (2, 3))}),
    ("profile_shapes", {"x": ((4, 3), (2, 3), (8, 3))})])
def test_bad_requests_are_refused(field: str, value: Any) -> None:
    with pytest.raises(JetagentError, match=field):
        BuildRequest(**{field: value}).validate()


# ---- build_engine through each version ---------------------------------------------------------------

@pytest.mark.parametrize("version", IMPLICIT)
def test_implicit_int8_build(version: str, use_trt: Install, models: Models,
                             calib_dir: Path, tmp_path: Path) -> None:
    env = use_trt(version)
    plan, cache = tmp_path / "m.plan", tmp_path / "m.calib"
    request = BuildRequest(precision="int8", calibration=calib_dir, calibration_cache=cache,
                           workspace_bytes=1 << 28)
    report = build_engine(models["float"], plan, request)
    assert (report.precision_requested, report.precision_built, report.route) == ("int8", "int8",
                                                                                   "implicit-calibrator")
    assert report.calibration_batches == 3 and env.trt._calibrated == [3] and report.mixed_with == ["fp16"]
    assert cache.read_bytes() == b"standin-calibration-table"
    sidecar = json.loads(tensorrt.sidecar_path(plan).read_text())
    assert sidecar == json.loads(json.dumps(report.to_dict()))
    assert sidecar["tensorrt_version"] == version and sidecar["plan_sha256"] == sha256_file(plan)
    flags = {flag.name for (flag,) in env.calls("IBuilderConfig.set_flag")}
    assert flags == {"INT8", "FP16"}
    explicit_batch = 1 << 0  # 8.x only
    assert env.calls("Builder.create_network") == [(explicit_batch if version.startswith("8") else 0,)]
    assert env.calls("IBuilderConfig.set_memory_pool_limit")[0][1] == 1 << 28
    assert len(env.calls("IBuilderConfig.int8_calibrator")) == 1
    assert all(active for _, _, active in env.trt._calls), "TensorRT was called outside the CUDA context"
    assert env.memories[-1].closed
    # A second build reuses the calibration cache and needs no batches.
    again = build_engine(models["float"], plan, BuildRequest(precision="int8", calibration_cache=cache,
                                                             calibrator="minmax"))
    assert again.calibration_cache_used and again.calibration_batches == 0 and env.trt._calibrated == [3]


@pytest.mark.parametrize("version", EXPLICIT)
def test_explicit_qdq_build_sets_no_precision_flags(version: str, use_trt: Install,
                                                    models: Models, tmp_path: Path) -> None:
    env = use_trt(version)
    report = build_engine(models["qdq"], tmp_path / "q.plan", BuildRequest(precision="int8"))
    assert (report.route, report.precision_built, report.mixed_with) == ("explicit-qdq", "int8", [])
    assert env.calls("IBuilderConfig.set_flag") == []
    strongly_typed = 1 << 1
    assert env.calls("Builder.create_network") == [(strongly_typed if version.startswith("10") else 0,)]
    assert trt_standins.plan_json(tmp_path / "q.plan")["strongly_typed"]
    if version.startswith("11"):
        assert any("platform queries were removed" in w for w in report.warnings)


def test_trt11_refuses_implicit_calibration_and_writes_nothing(use_trt: Install, models: Models,
                                                               calib_dir: Path, tmp_path: Path) -> None:
    use_trt("11.4.0.1")
    for route in ("auto", "implicit-calibrator"):
        with pytest.raises(PrecisionUnavailable, match="implicit INT8 calibration was removed in TensorRT"):
            build_engine(models["float"], tmp_path / "m.plan",
                         BuildRequest(precision="int8", int8_route=route, calibration=calib_dir))
    with pytest.raises(PrecisionUnavailable, match="ModelOpt AutoCast"):
        build_engine(models["float"], tmp_path / "m.plan", BuildRequest(precision="fp16"))
    assert list(tmp_path.glob("m.plan*")) == []


def test_trt85_refuses_explicit_qdq(use_trt: Install, models: Models, tmp_path: Path) -> None:
    use_trt("8.5.2.2")
    with pytest.raises(PrecisionUnavailable, match="explicit-qdq needs strongly typed networks"):
        build_engine(models["qdq"], tmp_path / "q.plan", BuildRequest(precision="int8"))


@pytest.mark.parametrize(("precision", "message"), [("int8", "no fast INT8"), ("fp16", "no fast FP16")])
def test_gpu_without_fast_precision_is_refused(precision: str, message: str, use_trt: Install,
                                               models: Models, calib_dir: Path, tmp_path: Path) -> None:
    use_trt("10.3.0.30", fast_int8=False, fast_fp16=False)
    with pytest.raises(PrecisionUnavailable, match=message):
        build_engine(models["float"], tmp_path / "m.plan",
                     BuildRequest(precision=precision, calibration=calib_dir))
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.parametrize(("version", "model", "route"), [
    ("8.6.1.6", "float", "fp16-flag"), ("10.3.0.30", "float", "fp16-flag"),
    ("10.3.0.30", "fp16", "fp16-onnx"), ("11.4.0.1", "fp16", "fp16-onnx")])
def test_fp16_builds(version: str, model: str, route: str, use_trt: Install,
                     models: Models, tmp_path: Path) -> None:
    env = use_trt(version)
    report = build_engine(models[model], tmp_path / "h.plan", BuildRequest(precision="fp16"))
    assert (report.route, report.precision_built) == (route, "fp16")
    flags = {flag.name for (flag,) in env.calls("IBuilderConfig.set_flag")}
    assert flags == ({"FP16"} if route == "fp16-flag" else set())


def test_timing_cache_is_loaded_saved_and_survives_garbage(use_trt: Install, models: Models,
                                                           tmp_path: Path) -> None:
    use_trt("10.3.0.30")
    cache = tmp_path / "timing.cache"
    request = BuildRequest(timing_cache=cache)
    assert build_engine(models["float"], tmp_path / "a.plan", request).timing_cache == "fresh"
    first = cache.read_bytes()
    assert build_engine(models["float"], tmp_path / "b.plan", request).timing_cache == "loaded"
    assert len(cache.read_bytes()) > len(first)
    cache.write_bytes(b"garbage from another TensorRT")
    assert build_engine(models["float"], tmp_path / "c.plan", request).timing_cache == "rejected-fresh"


def test_dla_build_and_load(use_trt: Install, models: Models, tmp_path: Path) -> None:
    env = use_trt("10.3.0.30", dla_cores=2)
    plan = tmp_path / "d.plan"
    report = build_engine(models["float"], plan, BuildRequest(precision="fp16", dla_core=1))
    assert report.dla_core == 1 and any("fall back to the GPU" in w for w in report.warnings)
    assert env.calls("IBuilderConfig.DLA_core") == [(1,)]
    assert [v.name for (v,) in env.calls("IBuilderConfig.default_device_type")] == ["DLA"]
    assert "GPU_FALLBACK" in {flag.name for (flag,) in env.calls("IBuilderConfig.set_flag")}
    backend = tensorrt.open_tensorrt(plan, BackendOptions())
    assert env.calls("Runtime.DLA_core") == [(1,)] and backend.describe()["dla_core"] == 1
    backend.close()
    too_many = re.escape("DLA core 2 requested but TensorRT 10.3.0.30 sees 2")
    with pytest.raises(BuildUnsupported, match=too_many):
        build_engine(models["float"], plan, BuildRequest(precision="fp16", dla_core=2))
    with pytest.raises(PrecisionUnavailable, match="DLA runs FP16 or INT8 only"):
        build_engine(models["float"], plan, BuildRequest(precision="fp32", dla_core=0))


def test_dynamic_input_needs_a_profile(use_trt: Install, models: Models, tmp_path: Path) -> None:
    env = use_trt("10.3.0.30")
    plan = tmp_path / "dyn.plan"
    with pytest.raises(BuildUnsupported, match=r"inputs \['x'\] have dynamic dimensions"):
        build_engine(models["dynamic"], plan, BuildRequest())
    ranges = ((1, 3), (2, 3), (4, 3))
    with pytest.raises(BuildUnsupported, match="unknown inputs"):
        build_engine(models["dynamic"], plan, BuildRequest(profile_shapes={"image": ranges}))
    build_engine(models["dynamic"], plan, BuildRequest(profile_shapes={"x": ((1, 3), (2, 3), (4, 3))}))
    assert trt_standins.plan_json(plan)["profiles"] == [{"x": [[1, 3], [2, 3], [4, 3]]}]
    backend = tensorrt.open_tensorrt(plan, BackendOptions())
    assert backend.inputs[0].shape == (None, 3)
    for batch in (1, 4, 2):
        x = np.linspace(-1, 1, batch * 3, dtype=np.float32).reshape(batch, 3)
        np.testing.assert_allclose(backend.infer({"x": x})["y"], relu_2x_1(x), rtol=1e-6)
    assert len(env.calls("IExecutionContext.set_tensor_address")) == 4  # grew once, then reused
    backend.close()


def test_dynamic_shapes_calibrate_with_the_build_profile(use_trt: Install, models: Models,
                                                        tmp_path: Path) -> None:
    env = use_trt("8.6.1.6")

    def batches() -> Iterator[np.ndarray]:
        yield from (np.full((2, 3), i, np.float32) for i in range(4))

    report = build_engine(models["dynamic"], tmp_path / "d.plan", BuildRequest(
        precision="int8", calibration=batches, max_calibration_batches=3,
        profile_shapes={"x": ((1, 3), (2, 3), (4, 3))}))
    assert report.calibration_batches == 3
    assert len(env.calls("IBuilderConfig.set_calibration_profile")) == 1


def test_calibration_problems_are_build_errors(use_trt: Install, models: Models,
                                               tmp_path: Path) -> None:
    use_trt("10.3.0.30")
    wrong_name = [{"image": np.zeros((1, 3, 4, 4), np.float32)}]
    request = BuildRequest(precision="int8", calibration=lambda: wrong_name)
    with pytest.raises(EngineBuildError, match=r"lacks inputs \['x'\]"):
        build_engine(models["float"], tmp_path / "m.plan", request)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineBuildError, match=r"no \.npy or \.npz calibration batches"):
        build_engine(models["float"], tmp_path / "m.plan", BuildRequest(precision="int8",
                                                                        calibration=tmp_path / "empty"))
    with pytest.raises(BuildUnsupported, match="needs calibration batches"):
        build_engine(models["float"], tmp_path / "m.plan", BuildRequest(precision="int8"))
    assert not (tmp_path / "m.plan").exists()


def test_npz_batches_feed_named_inputs(tmp_path: Path) -> None:
    np.savez(tmp_path / "b0.npz", x=np.ones((1, 3), np.float32))
    batches = list(trt_build.calibration_batches(tmp_path, {"x": None}))
    assert len(batches) == 1 and batches[0]["x"].shape == (1, 3)
    with pytest.raises(EngineBuildError, match="bare array"):
        list(trt_build.calibration_batches(lambda: [np.zeros(3)], {"a": None, "b": None}))


def test_unparseable_onnx_is_a_model_load_error(use_trt: Install, tmp_path: Path) -> None:
    use_trt("10.3.0.30")
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.plan", BuildRequest())
    with pytest.raises(ModelLoadError, match="no such ONNX"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "bad.plan", BuildRequest())


# ---- open_tensorrt + infer ------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_build_open_infer_roundtrip(version: str, use_trt: Install, models: Models,
                                    calib_dir: Path, tmp_path: Path) -> None:
    env = use_trt(version)
    plan = tmp_path / "m.plan"
    if version.startswith("11"):
        build_engine(models["qdq"], plan, BuildRequest(precision="int8"))
    else:
        build_engine(models["float"], plan, BuildRequest(precision="int8", calibration=calib_dir))
    backend = open_backend("tensorrt", plan, BackendOptions(precision="int8"))
    assert (backend.name, backend.precision) == ("tensorrt", "int8")
    assert [(s.name, s.shape, s.dtype) for s in backend.inputs] == [("x", (1, 3, 4, 4), "float32")]
    assert [(s.name, s.shape, s.dtype) for s in backend.outputs] == [("y", (1, 3, 4, 4), "float32")]
    x = np.linspace(-2, 2, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    quantized = np.round(x * 64).clip(-128, 127) / 64
    expected = np.maximum(quantized, 0) if version.startswith("11") else relu_2x_1(x)
    for _ in range(2):
        np.testing.assert_allclose(backend.infer({"x": x})["y"], expected, rtol=1e-6)
    described = backend.describe()
    assert described["tensorrt_version"] == version and described["device"] == "Stand-in Orin"
    assert described["dla_core"] is None and described["precision"] == "int8"
    assert env.calls("IExecutionContext.execute_async_v3") == [(0x5EED,), (0x5EED,)]
    assert all(active for _, _, active in env.trt._calls)
    backend.close()
    backend.close()
    assert env.memories[-1].closed
    with pytest.raises(InferenceError, match="closed"):
        backend.infer({"x": x})


def test_fp16_engine_takes_and_gives_float16(use_trt: Install, models: Models,
                                             tmp_path: Path) -> None:
    use_trt("11.4.0.1")
    build_engine(models["fp16"], tmp_path / "h.plan", BuildRequest(precision="fp16"))
    backend = tensorrt.open_tensorrt(tmp_path / "h.plan", BackendOptions())
    assert backend.inputs[0].dtype == "float16" and backend.precision == "fp16"
    y = backend.infer({"x": np.full((1, 3, 4, 4), 1.5, np.float16)})["y"]
    assert y.dtype == np.float16 and float(y.max()) == 3.0
    backend.close()


def test_bad_feeds_are_inference_errors(use_trt: Install, models: Models, tmp_path: Path) -> None:
    use_trt("10.3.0.30")
    build_engine(models["float"], tmp_path / "m.plan", BuildRequest())
    backend = tensorrt.open_tensorrt(tmp_path / "m.plan", BackendOptions())
    good = np.zeros((1, 3, 4, 4), np.float32)
    cases: list[tuple[dict[str, np.ndarray], str]] = [
        ({"image": good}, "missing"), ({"x": np.zeros((1, 3, 4, 5), np.float32)}, "shape"),
        ({"x": good.astype(np.complex64)}, "dtype"), ({"x": good, "z": good}, "unexpected")]
    for feeds, message in cases:
        with pytest.raises(InferenceError, match=message):
            backend.infer(feeds)
    np.testing.assert_allclose(backend.infer({"x": good.astype(np.float64)})["y"], np.ones_like(good))
    backend.close()


def test_foreign_stale_or_unmarked_plans_are_refused(use_trt: Install, models: Models,
                                                     tmp_path: Path) -> None:
    use_trt("8.5.2.2")
    plan = tmp_path / "m.plan"
    build_engine(models["float"], plan, BuildRequest())
    env = use_trt("10.3.0.30")
    foreign = re.escape("built by TensorRT 8.5.2.2, this device has 10.3.0.30")
    with pytest.raises(ModelLoadError, match=foreign):
        tensorrt.open_tensorrt(plan, BackendOptions())
    # A sidecar that lies about the version: deserialization itself fails, with TensorRT's words.
    sidecar = tensorrt.sidecar_path(plan)
    record = json.loads(sidecar.read_text())
    tensorrt.write_sidecar(plan, {**record, "tensorrt_version": "10.3.0.30"})
    with pytest.raises(ModelLoadError, match=r"could not deserialize.*plan built by 8.5.2.2"):
        tensorrt.open_tensorrt(plan, BackendOptions())
    assert env.memories[-1].closed, "the CUDA memory of a failed open must be released"
    plan.write_bytes(plan.read_bytes() + b"tail")
    with pytest.raises(ModelLoadError, match="does not match its sidecar"):
        tensorrt.open_tensorrt(plan, BackendOptions())
    sidecar.unlink()
    with pytest.raises(ModelLoadError, match="no sidecar"):
        tensorrt.open_tensorrt(plan, BackendOptions())
    with pytest.raises(ModelLoadError, match="no such engine file"):
        tensorrt.open_tensorrt(tmp_path / "none.plan", BackendOptions())


# ---- the CUDA seam ----------------------------------------------------------------------------------

def test_pycuda_memory_uses_the_primary_context(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = trt_standins.make_pycuda_driver()
    monkeypatch.setitem(sys.modules, "pycuda", type(sys)("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setattr(sys.modules["pycuda"], "driver", driver, raising=False)
    memory = cuda_mem.open_device_memory(0)
    assert memory.info.name == "Stand-in Orin" and memory.info.compute_capability == (8, 7)
    with memory.activate():
        buffer = memory.alloc(48)
        host = memory.pagelocked_empty((12,), np.dtype(np.float32))
        memory.copy_to_device(buffer, np.arange(12, dtype=np.float32))
        memory.copy_to_host(host, buffer)
        memory.synchronize()
        with pytest.raises(ValueError, match="do not fit"):
            memory.copy_to_device(buffer, np.zeros(13, np.float32))
    np.testing.assert_array_equal(host, np.arange(12, dtype=np.float32))
    assert memory.stream_handle == 0x5EED and driver._stack() == []
    memory.close()
    memory.close()
    calls = driver._calls
    assert calls[:2] == ["init", "retain_primary_context"] and calls[-1] == "detach"
    assert calls.count("push") == calls.count("pop") and "free" in calls
    assert "pycuda.autoinit" not in sys.modules
    with pytest.raises(BackendUnavailable, match="CUDA device 3 is not usable"):
        cuda_mem.open_device_memory(3)
    with pytest.raises(BackendUnavailable, match="unknown CUDA memory implementation"):
        cuda_mem.open_device_memory(0, "opencl")


# ---- imports with the GPU stack absent --------------------------------------------------------------

MODULES = ("engines.trt_api", "engines.cuda_mem", "engines.cuda_python", "engines.tensorrt", "engines.trt_build",
           "engines.trt_calib", "engines.trt_logger", "engines.trt_profiles")


def test_modules_import_and_fail_clearly_without_tensorrt_or_pycuda(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    for blocked in ("tensorrt", "pycuda", "pycuda.driver", "pycuda.autoinit", "cuda", "cuda.bindings"):
        monkeypatch.setitem(sys.modules, blocked, None)  # import raises ImportError
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    fresh = {name: importlib.import_module(name) for name in MODULES}
    with pytest.raises(BackendUnavailable, match="--system-site-packages"):
        fresh["engines.tensorrt"].open_tensorrt(tmp_path / "m.plan", BackendOptions())
    with pytest.raises(BackendUnavailable, match="--system-site-packages"):
        fresh["engines.trt_build"].build_engine(float_model(tmp_path / "f.onnx"), tmp_path / "f.plan",
                                                fresh["engines.trt_build"].BuildRequest())
    with pytest.raises(BackendUnavailable, match="pycuda"):
        fresh["engines.cuda_mem"].open_device_memory()
    with pytest.raises(BackendUnavailable, match="TensorRT is not importable"):
        open_backend("tensorrt", tmp_path / "m.plan")


# ---- every TensorRT name the code touches exists where that code runs -------------------------------

# Local names (or self._name attributes) that hold TensorRT objects, and their classes.
RECEIVERS = {
    "builder": "Builder", "config": "IBuilderConfig", "network": "INetworkDefinition",
    "parser": "OnnxParser", "tensor": "ITensor", "profile": "IOptimizationProfile",
    "timing_cache": "ITimingCache", "runtime": "Runtime", "engine": "ICudaEngine",
    "context": "IExecutionContext",
}
SOURCES = [ROOT / "engines" / f"{name}.py" for name in ("tensorrt", "trt_build", "trt_api", "trt_calib", "trt_logger",
                                                        "trt_profiles", "cuda_mem", "cuda_python")]


def _receiver(node: ast.expr) -> str | None:
    """'trt' for the module, a RECEIVERS key for TensorRT objects, else None."""
    if isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        name = node.attr.lstrip("_")
    else:
        return None
    return name if name == "trt" or name in RECEIVERS else None


def _families_of(func: ast.FunctionDef, inherited: frozenset[str]) -> frozenset[str]:
    for decorator in func.decorator_list:
        if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Name)
                and decorator.func.id == "code_path"):
            path = decorator.args[0]
            assert isinstance(path, ast.Constant)
            return trt_api.CODE_PATHS[str(path.value)]
    return inherited


def tensorrt_uses(source: str, filename: str = "<code>") -> list[tuple[str, frozenset[str], str]]:
    """(TensorRT name, families the code runs on, where) for every use in `source`."""
    uses: list[tuple[str, frozenset[str], str]] = []

    def visit(node: ast.AST, families: frozenset[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, _families_of(child, families))  # type: ignore[arg-type]
                continue
            if isinstance(child, ast.Attribute):
                chain, base = [child.attr], child.value
                while isinstance(base, ast.Attribute) and _receiver(base) is None:
                    chain.insert(0, base.attr)
                    base = base.value
                receiver = _receiver(base)
                where = f"{filename}:{child.lineno}"
                if receiver == "trt":
                    uses.append((".".join(chain[:2]), families, where))
                    continue  # the chain is consumed
                if receiver is not None:
                    uses.append((f"{RECEIVERS[receiver]}.{chain[0]}", families, where))
                    continue
                func = base.func if isinstance(base, ast.Call) else None
                if isinstance(func, ast.Attribute) and _receiver(func.value):
                    uses.append((f"<unnamed result of {func.attr}()>.{chain[0]}", families, where))
            visit(child, families)

    visit(ast.parse(source), trt_api.ALL)
    return uses


def _problems(uses: list[tuple[str, frozenset[str], str]]) -> list[str]:
    problems = []
    for name, families, where in uses:
        row = trt_api.API_BY_NAME.get(name)
        if row is None:
            problems.append(f"{where}: {name} is not in the version table (name the object, or add the row)")
        elif not families <= row.families:
            problems.append(f"{where}: {name} runs on {sorted(families)} "
                            f"but exists only in {sorted(row.families)}")
    return problems


def test_every_tensorrt_name_used_exists_in_the_versions_that_run_it() -> None:
    uses = [use for path in SOURCES for use in tensorrt_uses(path.read_text(), path.name)]
    assert _problems(uses) == []
    used = {name for name, _, _ in uses}
    for name in ("IExecutionContext.execute_async_v3", "IExecutionContext.set_tensor_address",
                 "ICudaEngine.num_io_tensors", "IBuilderConfig.int8_calibrator",
                 "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
                 "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
                 "Builder.platform_has_fast_int8", "IInt8EntropyCalibrator2", "ITimingCache.serialize"):
        assert name in used, f"the AST walk missed {name}: did the code stop naming its receivers?"
    assert len(used) >= 40


def test_the_name_check_catches_version_mistakes() -> None:
    bad = '''
def run(trt, engine, context, config):
    n = engine.num_bindings                   # removed in 10.0
    context.execute_async_v2([], 0)          # removed in 10.0
    config.set_flag(trt.BuilderFlag.INT8)    # removed in 11.0, and this function is untagged
    config.get_timing_cache().serialize()    # unnamed receiver: cannot be checked

@code_path("implicit-calibrator")
def calibrate(trt, config):
    config.set_flag(trt.BuilderFlag.INT8)    # fine here: the route only runs on 8.5 and 10
'''
    problems = _problems(tensorrt_uses(bad))
    assert len(problems) == 4, problems
    assert any("ICudaEngine.num_bindings" in p for p in problems)
    assert any("BuilderFlag.INT8 runs on ['10', '11', '8.5']" in p for p in problems)
    assert any("unnamed result of get_timing_cache()" in p for p in problems)


def test_overrides_match_what_tensorrt_calls() -> None:
    calibrator = {row.name.split(".")[1] for row in trt_api.API
                  if row.name.startswith("IInt8EntropyCalibrator2.")}
    assert calibrator <= set(vars(trt_build.CalibrationFeed))
    assert "log" in vars(trt_logger.LogRelay) and "ILogger.log" in trt_api.API_BY_NAME
