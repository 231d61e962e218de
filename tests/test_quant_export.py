"""QDQ export with ONNX Runtime's quantizer: per-target profiles, methods, op selection, opsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calib_models import colour_frames, conv_classifier
from calibration.dataset import CalibrationSet, build_set
from calibration.errors import QuantizationError
from calibration.quantize import QuantProfile, check_tensorrt_qdq, cpu_profile, export_qdq, tensorrt_profile
from engines.base import BackendOptions
from engines.modelcard import load_card
from engines.runner import open_model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CalibrationSet]:
    model = conv_classifier(tmp_path_factory.mktemp("quant") / "cls.onnx")
    frames = colour_frames(16)
    return model, build_set(load_card(model.with_suffix(".json")).input, frames[:10], frames[10:])


def qdq_nodes(path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(str(path))
    return model, {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def zero_points(path: Path) -> list[np.ndarray]:
    model, inits = qdq_nodes(path)
    return [inits[n.input[2]] for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]


def test_tensorrt_profile_gives_what_tensorrt_accepts(classifier: tuple[Path, CalibrationSet],
                                                      tmp_path: Path) -> None:
    model, dataset = classifier
    export = export_qdq(model, tmp_path / "trt.onnx", dataset, tensorrt_profile("minmax"))
    assert check_tensorrt_qdq(export.path) == []
    zps = zero_points(export.path)
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    onnx_model, inits = qdq_nodes(export.path)
    assert not any(v.dtype == np.int32 for v in inits.values()), "biases must stay float for TensorRT"
    axes = [a.i for n in onnx_model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
            if a.name == "axis"]
    assert axes, "weights are quantized per channel"
    assert export.samples == 10 and export.opset >= 13 and len(export.sha256) == 64


def test_cpu_profile_is_u8s8_and_tensorrt_would_refuse_it(classifier: tuple[Path, CalibrationSet],
                                                          tmp_path: Path) -> None:
    model, dataset = classifier
    export = export_qdq(model, tmp_path / "cpu.onnx", dataset, cpu_profile("minmax"))
    # uint8 activations, int8 weights, int32 biases
    assert {z.dtype for z in zero_points(export.path)} == {np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int32)}
    problems = check_tensorrt_qdq(export.path)
    assert any("uint8" in p for p in problems) and any("int32" in p for p in problems)
    card = load_card(model.with_suffix(".json"))
    fp32 = open_model(model, card=card)
    int8 = open_model(export.path, card=card, options=BackendOptions(precision="int8"))
    try:
        assert int8.precision == "int8"
        for tensor in dataset.holdout:
            assert int(fp32.postprocess(fp32.infer(tensor), dataset.holdout_transforms[0]).class_ids[0]) == int(
                int8.postprocess(int8.infer(tensor), dataset.holdout_transforms[0]).class_ids[0])
    finally:
        fp32.close()
        int8.close()


def test_op_type_selection_leaves_other_ops_in_float(classifier: tuple[Path, CalibrationSet],
                                                     tmp_path: Path) -> None:
    model, dataset = classifier

    def quantized_consumers(path: Path) -> set[str]:
        graph = onnx.load(str(path)).graph
        dq_out = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        return {n.op_type for n in graph.node if any(i in dq_out for i in n.input)}

    everything = export_qdq(model, tmp_path / "all.onnx", dataset, cpu_profile("minmax"))
    conv_only = export_qdq(model, tmp_path / "conv.onnx", dataset, cpu_profile("minmax", op_types=("Conv",)))
    assert "Gemm" in quantized_consumers(everything.path)
    assert "Conv" in quantized_consumers(conv_only.path) and "Gemm" not in quantized_consumers(conv_only.path)
    assert conv_only.profile.name == "cpu-u8s8-pc-minmax-conv"


def test_calibration_methods_choose_different_ranges(classifier: tuple[Path, CalibrationSet], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    model, dataset = classifier

    def activation_scales(path: Path) -> dict[str, float]:
        graph, inits = qdq_nodes(path)
        return {n.input[0]: float(inits[n.input[1]]) for n in graph.graph.node if n.op_type == "QuantizeLinear"}

    scales = {m: activation_scales(export_qdq(model, tmp_path / f"{m}.onnx", dataset,
                                              cpu_profile(m, percentile=90.0)).path)
              for m in ("minmax", "percentile", "entropy")}
    assert all(scales["percentile"][t] <= scales["minmax"][t] for t in scales["minmax"])  # the 90th percentile clips
    assert sum(scales["percentile"].values()) < sum(scales["minmax"].values())
    # ORT's quantize_static runs entropy with 128 histogram bins and 128 quantized bins, so it has
    # one threshold to choose from (the full range): it equals min-max. docs/int8.md has the numbers.
    assert set(scales["entropy"]) == set(scales["minmax"])
    assert "Collecting tensor data" not in capsys.readouterr().out  # ORT's prints stay off stdout


def test_old_opsets_are_converted_before_per_channel_quantization(tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "old.onnx", opset=11)
    frames = colour_frames(6)
    dataset = build_set(load_card(model.with_suffix(".json")).input, frames[:4], frames[4:])
    export = export_qdq(model, tmp_path / "old-qdq.onnx", dataset, tensorrt_profile("minmax"))
    assert (export.source_opset, export.opset >= 13) == (11, True)
    assert check_tensorrt_qdq(export.path) == []


def test_bad_profiles_and_bad_models_are_refused(classifier: tuple[Path, CalibrationSet], tmp_path: Path) -> None:
    model, dataset = classifier
    wrong_for_trt = QuantProfile(name="u8-for-trt", target="tensorrt", activations="u8")
    with pytest.raises(QuantizationError, match="TensorRT needs symmetric int8"):
        export_qdq(model, tmp_path / "x.onnx", dataset, wrong_for_trt)
    with pytest.raises(QuantizationError, match="method must be one of"):
        cpu_profile("median").validate()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(QuantizationError, match="not a readable ONNX"):
        export_qdq(broken, tmp_path / "y.onnx", dataset, cpu_profile())
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()
    assert not list(tmp_path.glob("jetagent-quant-*")), "the quantizer's scratch folder is removed"
    limited = export_qdq(model, tmp_path / "few.onnx", dataset, cpu_profile().variant(name="few", max_samples=3))
    assert limited.samples == 3
