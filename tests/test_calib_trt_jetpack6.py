"""The TensorRT build route of deployment on JetPack 6: dynamic shapes through the build child, a
child that dies at exit after its plan is whole, and an engine fingerprint that tells Orin modules
and QDQ exports apart. Builds run in a real child process with the stand-in TensorRT (no GPU)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest

import trt_standins
from calib_models import colour_frames, conv_classifier
from calibration import trt_target
from calibration.build import build_in_child, probe_tensorrt
from calibration.candidates import Candidate, TimingPlan
from calibration.dataset import CalibrationSet, build_set
from calibration.deploy import DeployConfig, deploy_model
from calibration.engine_cache import EngineCache, Fingerprint, gpu_identity, jetson_model
from calibration.quantize import tensorrt_profile
from engines.errors import JetagentError
from engines.modelcard import ModelCard, load_card
from engines.trt_build import BuildRequest, EngineBuildError

CHILD = Path(__file__).resolve().parent / "calib_trt_child.py"
JP6 = "10.3.0.30"
QDQ_MINMAX = Candidate("int8-trt-s8s8-minmax", "int8", tensorrt_profile("minmax"), {"int8_route": "explicit-qdq"})
IMPLICIT = Candidate("int8-trt-implicit-entropy", "int8", None,
                     {"int8_route": "implicit-calibrator", "calibrator": "entropy"})


def launcher(mode: str = "ok", log: Path | None = None, version: str = JP6) -> tuple[str, ...]:
    return (sys.executable, str(CHILD), version, mode, str(log) if log else "-", "--")


@pytest.fixture()
def standin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in tensorrt + pycuda in this process too (it opens the plans the child builds)."""
    gpu = trt_standins.FakeGpu()
    monkeypatch.setitem(sys.modules, "tensorrt", trt_standins.make_tensorrt(JP6, gpu=gpu))
    trt_standins.install_pycuda(lambda name, module: monkeypatch.setitem(sys.modules, name, module), gpu)


def dynamic_batch(model: Path, out: Path) -> Path:
    """The same model with a dynamic batch dimension, as YOLO exports with dynamic=True have."""
    proto = onnx.load(str(model))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(proto, str(out))
    shutil.copy(model.with_suffix(".json"), out.with_suffix(".json"))
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard, CalibrationSet]:
    folder = tmp_path_factory.mktemp("dyn")
    model = dynamic_batch(conv_classifier(folder / "static.onnx"), folder / "dynamic.onnx")
    card = load_card(model.with_suffix(".json"))
    frames = colour_frames(12)
    return model, card, build_set(card.input, frames[:6], frames[6:])


def config(**changes: Any) -> DeployConfig:
    base: dict[str, Any] = {"backend": "tensorrt", "timing": TimingPlan(1, 2, 1), "build_timeout_s": 120.0,
                            "trt_launcher": launcher(), "workspace_bytes": 1 << 28}
    return DeployConfig(**{**base, **changes})


def test_a_dynamic_batch_model_deploys_through_the_build_child(
        classifier: tuple[Path, ModelCard, CalibrationSet], standin: None, tmp_path: Path) -> None:
    model, card, dataset = classifier
    d = deploy_model(model, card, dataset, config(candidates=(QDQ_MINMAX, IMPLICIT)), None, state_dir=tmp_path)
    d.runner.close()
    assert d.precision == "int8" and not d.summary["fallback"], d.summary["reason"]
    report = json.loads(d.engine_path.with_name("engine.plan.json").read_text())
    assert report["profile"] == {"image": [[1, 3, 32, 32]] * 3}  # pinned to the card's input shape
    statuses = {c["name"]: c["status"] for c in d.summary["candidates"]}
    assert statuses[QDQ_MINMAX.name] == statuses[IMPLICIT.name] == "passed"


def test_profile_ranges_travel_to_the_child(classifier: tuple[Path, ModelCard, CalibrationSet],
                                            tmp_path: Path) -> None:
    from engines.trt_profiles import ProfileShapes

    model, _, _ = classifier
    ranges = {"image": ProfileShapes(min=(1, 3, 32, 32), opt=(4, 3, 32, 32), max=(8, 3, 32, 32))}
    report = build_in_child(model, tmp_path / "r.plan", BuildRequest(profile_shapes=ranges, workspace_bytes=1 << 28),
                            launcher=launcher())
    assert report["profile"] == {"image": [[1, 3, 32, 32], [4, 3, 32, 32], [8, 3, 32, 32]]}
    assert trt_standins.plan_json(tmp_path / "r.plan")["profiles"] == [report["profile"]]


def test_a_child_that_dies_at_exit_after_a_whole_plan_built_it(
        classifier: tuple[Path, ModelCard, CalibrationSet], tmp_path: Path) -> None:
    model, _, _ = classifier
    request = BuildRequest(profile_shapes={"image": ((1, 3, 32, 32),) * 3}, workspace_bytes=1 << 28)
    report = build_in_child(model, tmp_path / "a.plan", request, launcher=launcher("exit-crash"))
    assert report["precision_built"] == "fp32" and (tmp_path / "a.plan.json").is_file()
    with pytest.raises(EngineBuildError, match="died from signal SIGSEGV"):
        build_in_child(model, tmp_path / "b.plan", request, launcher=launcher("exit-crash-torn"))


def test_the_probe_names_the_device_exactly() -> None:
    probe = probe_tensorrt(launcher=launcher())
    assert probe["device"]["multiprocessors"] == 8 and probe["device"]["total_memory"] == 8 << 30
    assert probe["device"]["cuda_runtime"] == "12.6" and probe["dla_cores"] == 0
    assert probe["plugins"] is True and probe["cuda_memory"].startswith("pycuda")


def test_orin_modules_get_different_engines(tmp_path: Path) -> None:
    boards = {"NVIDIA Jetson AGX Orin Developer Kit": (16, 64 << 30),
              "NVIDIA Jetson Orin NX Engine Board": (8, 16 << 30),
              "NVIDIA Jetson Orin Nano Developer Kit": (8, 8 << 30)}
    keys = set()
    for board, (sms, memory) in boards.items():
        device = gpu_identity("Orin", "8.7", "R36.4.3", board=board, multiprocessors=sms, memory_bytes=memory,
                              cuda="12.6")
        keys.add(Fingerprint("a" * 64, "tensorrt", JP6, device, "int8").key)
    assert len(keys) == 3, "AGX Orin, Orin NX and Orin Nano would share engines"
    same_board = [gpu_identity("Orin", "8.7", "R36.4.3", board="x", multiprocessors=8, memory_bytes=m)
                  for m in (int(7.4 * 2**30), int(7.6 * 2**30))]
    assert same_board[0] == same_board[1], "memory is compared in whole GiB"
    (tmp_path / "model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    assert jetson_model(tmp_path / "model") == "NVIDIA Jetson Orin Nano Developer Kit"
    assert jetson_model(tmp_path / "absent") is None


def test_the_target_fingerprint_holds_the_board_and_the_qdq_file(
        classifier: tuple[Path, ModelCard, CalibrationSet], standin: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, card, dataset = classifier
    monkeypatch.setattr(trt_target, "jetson_model", lambda: "NVIDIA Jetson Orin Nano Developer Kit")
    log = tmp_path / "children.log"
    target = trt_target.TensorRTTarget(model, card, "f" * 64, dataset, EngineCache(tmp_path / "engines"),
                                       workspace_bytes=1 << 28, launcher=launcher(log=log))
    _, device = target.identity()
    assert device["board"] == "NVIDIA Jetson Orin Nano Developer Kit" and device["multiprocessors"] == 8
    first = target.prepare(QDQ_MINMAX, lambda event: None)
    again = target.prepare(QDQ_MINMAX, lambda event: None)
    assert again.cache_hit and again.artifact == first.artifact
    # A new ONNX Runtime re-exports the QDQ model (new quantizer, new bytes): the plan must follow it.
    real_export = trt_target.export_qdq

    def different_export(*args: Any) -> Any:
        result = real_export(*args)
        path = Path(args[1])
        proto = onnx.load(str(path))
        proto.doc_string = "exported by another quantizer"
        onnx.save(proto, str(path))
        return result

    monkeypatch.setattr(trt_target, "ort_version", lambda: "1.99.0")
    monkeypatch.setattr(trt_target, "export_qdq", different_export)
    rebuilt = trt_target.TensorRTTarget(model, card, "f" * 64, dataset, EngineCache(tmp_path / "engines"),
                                        workspace_bytes=1 << 28, launcher=launcher(log=log)).prepare(
        QDQ_MINMAX, lambda event: None)
    assert not rebuilt.cache_hit and rebuilt.artifact != first.artifact
    assert log.read_text().split().count("build") == 2


def test_a_model_whose_dynamic_input_the_card_cannot_pin_is_refused(tmp_path: Path, standin: None) -> None:
    model = conv_classifier(tmp_path / "two.onnx")
    proto = onnx.load(str(model))
    extra = onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, ["n"])
    proto.graph.input.append(extra)
    onnx.save(proto, str(model))
    card = load_card(model.with_suffix(".json"))
    target = trt_target.TensorRTTarget(model, card, "e" * 64, None, EngineCache(tmp_path / "engines"),
                                       launcher=launcher())
    with pytest.raises(JetagentError, match=r"inputs \['scale'\] have dynamic dimensions and no shape"):
        target.prepare(Candidate("fp32-trt", "fp32", None, {}), lambda event: None)
