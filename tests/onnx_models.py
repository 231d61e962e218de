"""Tiny real ONNX models for the tests, each with a known, checkable behaviour.

Built with onnx.helper (no weights downloaded), run by real ONNX Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


def _save(model: onnx.ModelProto, path: Path, card: dict[str, Any]) -> Path:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return path


def color_classifier(path: Path, size: int = 32) -> Path:
    """Classifies a frame by its dominant colour channel.

    input "image" [1,3,S,S] RGB in 0..1; output "logits" [1,3] = 10 * per-channel mean.
    Labels red/green/blue: a pure red frame is class 0 with softmax ~1.
    """
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])
    ten = numpy_helper.from_array(np.array(10.0, np.float32), "ten")
    shape = numpy_helper.from_array(np.array([1, 3], np.int64), "shape")
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["m2"]),
        helper.make_node("Mul", ["m2", "ten"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "color_classifier", [inp], [out], [ten, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    card = {
        "v": 1, "name": "color-classifier", "task": "classification",
        "input": {"name": "image", "width": size, "height": size, "layout": "NCHW", "color": "RGB",
                  "resize": "stretch", "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "postprocess": {"kind": "classification", "output": "logits", "top_k": 2,
                        "score_activation": "softmax"},
        "labels": ["red", "green", "blue"],
    }
    return _save(model, path, card)


def constant_head(path: Path, head: np.ndarray, *, name: str, size: int = 64,
                  postprocess: dict[str, Any], labels: list[str], layout: str = "NCHW") -> Path:
    """A model whose output is a fixed tensor `head` (+ 0 * mean(input)), for decoder tests
    through a real runtime: the expected boxes are known exactly."""
    shape = [1, 3, size, size] if layout == "NCHW" else [1, size, size, 3]
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)
    out_name = postprocess["output"]
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(head.shape))
    const = numpy_helper.from_array(head.astype(np.float32), "head")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["head", "z"], [out_name]),
    ]
    graph = helper.make_graph(nodes, name, [inp], [out], [const, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    card = {
        "v": 1, "name": name, "task": "detection",
        "input": {"name": "images", "width": size, "height": size, "layout": layout, "color": "RGB",
                  "resize": "letterbox", "scale": 1 / 255},
        "postprocess": postprocess, "labels": labels,
    }
    return _save(model, path, card)


def failing_model(path: Path, size: int = 32) -> Path:
    """Loads fine, fails at inference: a Reshape to an impossible shape."""
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [7, 5])
    bad = numpy_helper.from_array(np.array([7, 5], np.int64), "bad_shape")
    nodes = [helper.make_node("Reshape", ["image", "bad_shape"], ["logits"])]
    graph = helper.make_graph(nodes, "failing", [inp], [out], [bad])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    card = json.loads(color_card_json(size))
    card["name"] = "failing-model"
    return _save(model, path, card)


def color_card_json(size: int = 32) -> str:
    return json.dumps({
        "v": 1, "name": "color-classifier", "task": "classification",
        "input": {"name": "image", "width": size, "height": size, "layout": "NCHW", "color": "RGB",
                  "resize": "stretch", "scale": 1 / 255},
        "postprocess": {"kind": "classification", "output": "logits", "top_k": 2},
        "labels": ["red", "green", "blue"],
    })


def slow_classifier(path: Path, size: int = 32, matmuls: int = 40, dim: int = 256) -> Path:
    """The colour classifier plus a chain of dim x dim MatMuls whose result is multiplied
    by zero: same answers, tens of milliseconds slower per frame (for FPS-floor tests)."""
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(10.0, np.float32), "ten"),
        numpy_helper.from_array(np.array([1, 3], np.int64), "shape"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array((rng.standard_normal((dim, dim)) / dim).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones((dim, dim), np.float32), "seed"),
    ]
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=1),
             helper.make_node("Reshape", ["m", "shape"], ["m2"]),
             helper.make_node("ReduceMean", ["image"], ["g"], keepdims=0),
             helper.make_node("Add", ["seed", "g"], ["x0"])]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"x{i}", "w"], [f"x{i + 1}"]))
    nodes += [helper.make_node("ReduceSum", [f"x{matmuls}"], ["s"], keepdims=0),
              helper.make_node("Mul", ["s", "zero"], ["z"]),
              helper.make_node("Add", ["m2", "z"], ["m3"]),
              helper.make_node("Mul", ["m3", "ten"], ["logits"])]
    graph = helper.make_graph(nodes, "slow_classifier", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    card = json.loads(color_card_json(size))
    card["name"] = "slow-classifier"
    return _save(model, path, card)


def red_failing_classifier(path: Path, size: int = 32) -> Path:
    """Serves green and blue frames; raises at inference on a red frame (an If branch
    that reshapes to an impossible shape): passes a check on other frames, fails live."""
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])
    inits = [
        numpy_helper.from_array(np.array(10.0, np.float32), "ten"),
        numpy_helper.from_array(np.array([1, 3], np.int64), "shape"),
        numpy_helper.from_array(np.array([0], np.int64), "red_idx"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array([7, 5], np.int64), "bad_shape"),
    ]
    ok_out = helper.make_tensor_value_info("ok", TensorProto.FLOAT, [1, 3])
    bad_out = helper.make_tensor_value_info("bad", TensorProto.FLOAT, [1, 3])
    then_g = helper.make_graph([helper.make_node("Reshape", ["m2", "bad_shape"], ["bad"])], "then", [], [bad_out])
    else_g = helper.make_graph([helper.make_node("Identity", ["m2"], ["ok"])], "else", [], [ok_out])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["m2"]),
        helper.make_node("Gather", ["m2", "red_idx"], ["red"], axis=1),
        helper.make_node("ReduceMax", ["red"], ["redmax"], keepdims=0),
        helper.make_node("Greater", ["redmax", "half"], ["is_red"]),
        helper.make_node("If", ["is_red"], ["picked"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Mul", ["picked", "ten"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "red_failing", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    card = json.loads(color_card_json(size))
    card["name"] = "red-failing-classifier"
    return _save(model, path, card)
