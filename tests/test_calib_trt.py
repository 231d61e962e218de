"""TensorRT calibration paths against stand-in TensorRT 8.6, 10.3 and 11.4 (no GPU here).

The builds really run in a child process (`calibration.trt_child`, started through
tests/calib_trt_child.py, which installs the stand-in `tensorrt` and `pycuda` modules
first); the parent opens the plans with the same stand-ins. A stand-in plan runs its
ONNX with ONNX Runtime, so an explicit-QDQ "INT8 engine" computes what the QDQ model
computes and the gate's numbers are real. None of this has run on a GPU.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import trt_standins
from calib_models import blob_detector, blob_frames, colour_frames, conv_classifier
from calibration.build import build_in_child, probe_tensorrt
from calibration.candidates import Candidate, TimingPlan
from calibration.dataset import CalibrationSet, CalibrationStore, build_set
from calibration.deploy import DeployConfig, deploy_model
from calibration.quantize import tensorrt_profile
from calibration.trt_target import trt_candidates
from engines.errors import BackendUnavailable
from engines.modelcard import ModelCard, load_card
from engines.trt_build import BuildRequest, EngineBuildError, PrecisionUnavailable

CHILD = Path(__file__).resolve().parent / "calib_trt_child.py"
QDQ_MINMAX = Candidate("int8-trt-s8s8-minmax", "int8", tensorrt_profile("minmax"), {"int8_route": "explicit-qdq"})
IMPLICIT = Candidate("int8-trt-implicit-entropy", "int8", None,
                     {"int8_route": "implicit-calibrator", "calibrator": "entropy"})


def launcher(version: str, mode: str = "ok", log: Path | None = None) -> tuple[str, ...]:
    return (sys.executable, str(CHILD), version, mode, str(log) if log else "-", "--")


@pytest.fixture()
def standin(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install the stand-in tensorrt + pycuda in this process (the one that opens the plans)."""

    def install(version: str) -> None:
        gpu = trt_standins.FakeGpu()
        monkeypatch.setitem(sys.modules, "tensorrt", trt_standins.make_tensorrt(version, gpu=gpu))
        driver = trt_standins.make_pycuda_driver(gpu)
        package = types.ModuleType("pycuda")
        package.driver = driver  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "pycuda", package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)

    return install


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard, CalibrationSet]:
    model = conv_classifier(tmp_path_factory.mktemp("trt") / "cls.onnx")
    card = load_card(model.with_suffix(".json"))
    frames = colour_frames(12)
    return model, card, build_set(card.input, frames[:6], frames[6:])


def config(version: str, log: Path | None = None, **changes: Any) -> DeployConfig:
    base: dict[str, Any] = {"backend": "tensorrt", "timing": TimingPlan(1, 2, 1), "build_timeout_s": 120.0,
                            "trt_launcher": launcher(version, log=log), "workspace_bytes": 1 << 28}
    return DeployConfig(**{**base, **changes})


@pytest.mark.parametrize("version, routes", [
    ("8.6.1.6", ["implicit-calibrator", "fp16-flag", "fp32"]),
    ("10.3.0.30", ["implicit-calibrator", "explicit-qdq", "fp16-flag", "fp16-onnx", "fp32"]),
    ("11.4.0.1", ["explicit-qdq", "fp16-onnx", "fp32"]),
])
def test_probe_and_default_candidates_follow_what_the_module_has(version: str, routes: list[str]) -> None:
    probe = probe_tensorrt(launcher=launcher(version))
    assert probe["tensorrt_version"] == version and probe["routes"] == routes
    assert probe["device"]["name"] == "Stand-in Orin" and probe["device"]["compute_capability"] == "8.7"
    names = [c.name for c in trt_candidates("detection", routes)]
    assert ("int8-trt-implicit-entropy" in names) == ("implicit-calibrator" in routes)
    assert ("int8-trt-s8s8-percentile-conv-p99.999" in names) == ("explicit-qdq" in routes)


def test_int8_on_tensorrt_10_serves_and_a_restart_builds_nothing(
        classifier: tuple[Path, ModelCard, CalibrationSet], standin: Any, tmp_path: Path) -> None:
    model, card, dataset = classifier
    standin("10.3.0.30")
    builds = tmp_path / "children.log"
    events: list[Any] = []
    d = deploy_model(model, card, dataset, config("10.3.0.30", builds, candidates=(QDQ_MINMAX, IMPLICIT)), None,
                     state_dir=tmp_path, progress=events.append)
    d.runner.close()
    s = d.summary
    assert d.precision == "int8" and d.runner.backend.name == "tensorrt" and not s["fallback"]
    assert {c["name"]: c["status"] for c in s["candidates"]} == {
        QDQ_MINMAX.name: "passed", IMPLICIT.name: "passed", "fp16-trt": "skipped", "fp32-trt": "skipped"}
    assert d.engine_path.name == "engine.plan" and (d.engine_path.parent / "engine.plan.json").is_file()
    sidecar = json.loads((d.engine_path.parent / "engine.plan.cache.json").read_text())
    device = sidecar["fingerprint"]["device"]
    assert device == {"kind": "gpu", "name": "Stand-in Orin", "compute_capability": "8.7", "l4t": device["l4t"],
                      "board": device["board"], "multiprocessors": 8, "memory_gib": 8, "cuda": "12.6"}
    assert sidecar["fingerprint"]["backend_version"] == "10.3.0.30"
    assert sidecar["metadata"]["precision_built"] == "int8"
    routes = {c["name"]: json.loads((Path(c["artifact"]).parent / "engine.plan.cache.json").read_text())
              ["metadata"]["route"] for c in json.loads(Path(s["report"]).read_text())["candidates"]
              if c["precision"] == "int8"}
    assert routes == {QDQ_MINMAX.name: "explicit-qdq", IMPLICIT.name: "implicit-calibrator"}
    assert list((tmp_path / "engines" / "timing").glob("tensorrt-*.cache"))
    messages = [e.message for e in events if e.stage == "build"]
    assert any("calibration: batch 6 of 6" in m for m in messages), messages
    assert builds.read_text().split() == ["probe", "build", "build"]

    again = deploy_model(model, card, dataset, config("10.3.0.30", builds, candidates=(QDQ_MINMAX, IMPLICIT)),
                         None, state_dir=tmp_path)
    again.runner.close()
    assert again.reused and again.engine_path == d.engine_path
    assert builds.read_text().split() == ["probe", "build", "build", "probe"], "the restart built nothing"


def test_collapsing_int8_falls_back_to_fp16_on_tensorrt_10(standin: Any, tmp_path: Path) -> None:
    model = blob_detector(tmp_path / "blobs.onnx")
    card = load_card(model.with_suffix(".json"))
    frames = blob_frames(16)
    dataset = build_set(card.input, frames[:8], frames[8:])
    standin("10.3.0.30")
    d = deploy_model(model, card, dataset, config("10.3.0.30", candidates=(QDQ_MINMAX,)), None, state_dir=tmp_path)
    d.runner.close()
    s = d.summary
    assert (d.precision, s["candidate"], s["fallback"]) == ("fp16", "fp16-trt", True)
    assert s["reason"].startswith(f"no INT8 candidate reached detection_f1 >= 0.95 ({QDQ_MINMAX.name} "
                                  "detection_f1 0.000)")
    assert [c["name"] for c in s["candidates"]] == [QDQ_MINMAX.name, "fp16-trt", "fp32-trt"]
    assert s["candidates"][2]["status"] == "skipped"


def test_tensorrt_11_has_no_implicit_int8_and_no_fp16_flag(standin: Any, tmp_path: Path) -> None:
    model = blob_detector(tmp_path / "blobs.onnx")
    card = load_card(model.with_suffix(".json"))
    frames = blob_frames(16)
    dataset = build_set(card.input, frames[:8], frames[8:])
    standin("11.4.0.1")
    d = deploy_model(model, card, dataset, config("11.4.0.1", candidates=(QDQ_MINMAX, IMPLICIT)), None,
                     state_dir=tmp_path)
    d.runner.close()
    by_name = {c["name"]: c for c in d.summary["candidates"]}
    assert by_name[IMPLICIT.name]["status"] == "error"
    assert "INT8 via implicit-calibrator is not available in TensorRT 11.4.0.1" in by_name[IMPLICIT.name]["error"]
    assert by_name["fp16-trt"]["status"] == "error" and "FP16 ONNX" in by_name["fp16-trt"]["error"]
    assert d.precision == "fp32" and d.summary["candidate"] == "fp32-trt" and d.summary["fallback"]


def test_the_build_child_can_crash_hang_or_refuse_and_the_caller_lives(
        classifier: tuple[Path, ModelCard, CalibrationSet], tmp_path: Path) -> None:
    model, _, dataset = classifier
    request = BuildRequest(precision="fp32")
    with pytest.raises(EngineBuildError, match=r"died from signal SIGKILL \(killed: out of memory\?\)"):
        build_in_child(model, tmp_path / "a.plan", request, launcher=launcher("10.3.0.30", "crash"))
    with pytest.raises(EngineBuildError, match=r"took longer than 1\.5 s and was stopped"):
        build_in_child(model, tmp_path / "b.plan", request, timeout_s=1.5, launcher=launcher("10.3.0.30", "hang"))
    with pytest.raises(EngineBuildError, match=r"failed \(exit status 0\): no output"):
        build_in_child(model, tmp_path / "c.plan", request, launcher=launcher("10.3.0.30", "silent"))
    where = CalibrationStore(tmp_path / "sets").save(dataset)
    with pytest.raises(PrecisionUnavailable, match="implicit INT8 calibration was removed in TensorRT 11"):
        build_in_child(model, tmp_path / "d.plan", BuildRequest(precision="int8", int8_route="implicit-calibrator"),
                       calibration_set=where, launcher=launcher("11.4.0.1"))
    assert not list(tmp_path.glob("*.plan"))
    report = build_in_child(model, tmp_path / "e.plan", BuildRequest(precision="int8",
                            int8_route="implicit-calibrator"), calibration_set=where, launcher=launcher("8.6.1.6"))
    assert report["precision_built"] == "int8" and report["calibration_batches"] == 6
    assert (tmp_path / "e.plan").is_file() and (tmp_path / "e.plan.json").is_file()
    with pytest.raises(BackendUnavailable, match="TensorRT is not usable here"):
        probe_tensorrt(launcher=(sys.executable, "-c", "import sys; sys.exit(1)"))
