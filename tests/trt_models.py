"""Tiny real ONNX models for the TensorRT paths (built with onnx.helper; each says what it computes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any], path: Path,
         check: bool = True, opset: int = 13) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _scalar_inits() -> list[Any]:
    return [numpy_helper.from_array(np.array(2, np.float32), "two"),
            numpy_helper.from_array(np.array(1, np.float32), "one")]


def affine_relu(path: Path, shape: list[Any] | None = None) -> Path:
    """y = relu(2 * x + 1), float32; `shape` may name dynamic dimensions ("batch")."""
    shape = shape or [1, 3, 4, 4]
    return save([helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["u"]),
                 helper.make_node("Relu", ["u"], ["y"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], _scalar_inits(), path)


def with_plugin(path: Path) -> Path:
    """x -> EfficientNMS_TRT -> y: an op only TensorRT's plugin library provides (ORT cannot run it)."""
    return save([helper.make_node("EfficientNMS_TRT", ["x"], ["y"], score_threshold=0.25)],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], [], path, check=False)


def cast_output(path: Path, to: int = TensorProto.BFLOAT16) -> Path:
    """y = cast(x, to): with BFLOAT16 or FLOAT8E4M3FN, an output numpy has no type for."""
    return save([helper.make_node("Cast", ["x"], ["y"], to=to)],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                [helper.make_tensor_value_info("y", to, [1, 3, 4, 4])], [], path, opset=19)


def shape_output(path: Path) -> Path:
    """y = relu(x) and s = Shape(x): `s` is a shape tensor, which TensorRT keeps on the host."""
    return save([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Shape", ["x"], ["s"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4]),
                 helper.make_tensor_value_info("s", TensorProto.INT64, [4])], [], path)


def reshape_input(path: Path) -> Path:
    """y = reshape(x, target): `target` is a shape-tensor input (host-located); y's shape follows its values."""
    return save([helper.make_node("Reshape", ["x", "target"], ["y"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12]),
                 helper.make_tensor_value_info("target", TensorProto.INT64, [2])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "cols"])], [], path)
