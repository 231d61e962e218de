from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.base import Backend, BackendOptions, open_backend, resolve_factory
from engines.errors import BackendUnavailable, InferenceError, JetagentError, ModelLoadError
from engines.runner import open_model
from onnx_models import failing_model


def test_backend_runs_and_describes_itself(color_model: Path) -> None:
    be = open_backend("onnxruntime", color_model, BackendOptions(threads=1, graph_optimization="basic"))
    assert isinstance(be, Backend)
    assert be.inputs[0].name == "image" and be.inputs[0].shape == (1, 3, 32, 32)
    assert be.outputs[0].dtype == "float32"
    x = np.zeros((1, 3, 32, 32), np.float32)
    x[:, 2] = 1.0
    out = be.infer({"image": x})
    np.testing.assert_allclose(out["logits"], [[0.0, 0.0, 10.0]], atol=1e-6)
    d = be.describe()
    assert d["backend"] == "onnxruntime" and d["threads"] == 1 and be.precision == "fp32"
    be.close()
    be.close()  # twice is fine
    with pytest.raises(InferenceError):
        be.infer({"image": x})


def test_runner_classifies_real_frames(color_model: Path) -> None:
    runner = open_model(color_model)
    try:
        red = np.zeros((48, 64, 3), np.uint8)
        red[..., 2] = 255
        result = runner.run(red)
        assert result.class_ids.tolist()[0] == 0
        assert result.to_json(runner.card.labels)[0]["label"] == "red"
        assert result.scores[0] > 0.99
        assert len(runner.sha256) == 64
    finally:
        runner.close()


def test_unknown_backend_and_precision() -> None:
    with pytest.raises(BackendUnavailable, match="unknown backend 'openvino'"):
        resolve_factory("openvino")
    with pytest.raises(JetagentError, match="precision"):
        open_backend("onnxruntime", "x.onnx", BackendOptions(precision="int4"))


def test_missing_and_corrupt_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        open_backend("onnxruntime", tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match="cannot load"):
        open_backend("onnxruntime", junk)


def test_inference_failure_is_an_inference_error(tmp_path: Path) -> None:
    runner = open_model(failing_model(tmp_path / "fail.onnx"))
    try:
        with pytest.raises(InferenceError, match="onnxruntime inference failed"):
            runner.run(np.zeros((32, 32, 3), np.uint8))
    finally:
        runner.close()


def test_unavailable_providers_fall_back_to_cpu_with_a_warning(color_model: Path, caplog) -> None:
    be = open_backend("onnxruntime", color_model, BackendOptions(providers=("TensorrtExecutionProvider",)))
    try:
        assert be.describe()["providers"] == ["CPUExecutionProvider"]
        assert "TensorrtExecutionProvider" in caplog.text
    finally:
        be.close()
