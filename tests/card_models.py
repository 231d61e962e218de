"""Generated ONNX models of each kind jetagent reads, shaped as third-party exports are, with no
card beside them: what `jetagent card init` and `jetagent bench` meet in the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
COLOURS = ["red", "green", "blue"]


def _save(model: onnx.ModelProto, path: Path, *, producer: str = "pytorch",
          metadata: dict[str, str] | None = None) -> Path:
    model.producer_name = producer
    for k, v in (metadata or {}).items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _model(nodes: list[Any], name: str, inputs: list[Any], outputs: list[Any], inits: list[Any]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def ultralytics_metadata(*, size: int, names: list[str] = COLOURS, task: str = "detect", stride: int = 32,
                         nms: bool = False) -> dict[str, str]:
    """As Ultralytics' exporter writes them: str() of Python values."""
    return {
        "description": "Ultralytics YOLOv8n model", "author": "Ultralytics", "version": "8.3.0",
        "license": "AGPL-3.0 License (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
        "stride": str(stride), "task": task, "batch": "1", "imgsz": str([size, size]),
        "names": str(dict(enumerate(names))),
        "args": str({"batch": 1, "half": False, "dynamic": True, "nms": nms}),
    }


def colour_yolo(path: Path, *, size: int = 160, dynamic: bool = True, metadata: bool = True) -> Path:
    """A YOLOv8-layout detector of coloured cells, built like a YOLO: a backbone of stride-2
    stages (ceil(n/2) each) and an FPN that concatenates the stride-16 map with the upsampled
    stride-32 one, so with dynamic H/W it runs only where ceil(n/16) == 2 * ceil(n/32) (a
    multiple of 32 does; 300 fails inside, in the Concat, as a real YOLOv8 does).

    Head "output0" (1, 4+3, N), one candidate per stride-16 cell: box = the 16x16 cell, class
    scores = the cell's mean R, G, B in 0..1 (so colour order, scaling and geometry all show)."""
    hw: list[Any] = ["height", "width"] if dynamic else [size, size]
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *hw])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 7, "anchors" if dynamic else
                                                                       (size // 16) ** 2])
    mix = np.zeros((3, 6, 1, 1), np.float32)
    for c in range(3):
        mix[c, c] = mix[c, c + 3] = 0.5
    inits = [numpy_helper.from_array(mix, "mix"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up"),
             numpy_helper.from_array(np.array(16.0, np.float32), "cell"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(2, np.int64), "ax2"),
             numpy_helper.from_array(np.array(3, np.int64), "ax3"),
             numpy_helper.from_array(np.array([1, 7, -1], np.int64), "flat")]
    nodes = []
    prev = "images"
    for i in range(5):
        nodes.append(helper.make_node("AveragePool", [prev], [f"s{i}"], kernel_shape=[3, 3], strides=[2, 2],
                                      pads=[1, 1, 1, 1], count_include_pad=0))
        prev = f"s{i}"
    nodes += [
        helper.make_node("Resize", ["s4", "", "up"], ["p5up"], mode="nearest"),
        helper.make_node("Concat", ["s3", "p5up"], ["fpn"], axis=1),  # fails unless ceil(n/16) == 2*ceil(n/32)
        helper.make_node("Conv", ["fpn", "mix"], ["scores"]),
        helper.make_node("ReduceMean", ["scores"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["z", "one"], ["ones"]),
        helper.make_node("CumSum", ["ones", "ax3"], ["col"]),
        helper.make_node("CumSum", ["ones", "ax2"], ["row"]),
        helper.make_node("Sub", ["col", "half"], ["colc"]),
        helper.make_node("Sub", ["row", "half"], ["rowc"]),
        helper.make_node("Mul", ["colc", "cell"], ["cx"]),
        helper.make_node("Mul", ["rowc", "cell"], ["cy"]),
        helper.make_node("Mul", ["ones", "cell"], ["wh"]),
        helper.make_node("Concat", ["cx", "cy", "wh", "wh", "scores"], ["head"], axis=1),
        helper.make_node("Reshape", ["head", "flat"], ["output0"]),
    ]
    model = _model(nodes, "colour_yolo", [inp], [out], inits)
    meta = ultralytics_metadata(size=size) if metadata else None
    return _save(model, path, metadata=meta)


def hand_card_for_colour_yolo(size: int = 160) -> dict[str, Any]:
    """The card an engineer writes for `colour_yolo` after reading docs/model-card.md."""
    return {
        "v": 1, "name": "colour-yolo", "task": "detection",
        "input": {"name": "images", "width": size, "height": size, "layout": "NCHW", "color": "RGB",
                  "resize": "letterbox", "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1], "pad_value": 114},
        "postprocess": {"kind": "yolo", "version": "v8", "output": "output0", "score_threshold": 0.25,
                        "iou_threshold": 0.45, "max_detections": 100},
        "labels": COLOURS,
    }


def _constant(path: Path, heads: dict[str, np.ndarray], *, name: str, size: int = 64,
              producer: str = "pytorch", metadata: dict[str, str] | None = None) -> Path:
    """Outputs fixed tensors (+ 0 * mean(input)): decoders meet exactly known values."""
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"])]
    outs = []
    for i, (out_name, value) in enumerate(heads.items()):
        inits.append(numpy_helper.from_array(value, f"c{i}"))
        if value.dtype == np.float32:
            nodes.append(helper.make_node("Add", [f"c{i}", "z"], [out_name]))
        else:
            nodes.append(helper.make_node("Cast", ["z"], [f"zi{i}"], to=helper.np_dtype_to_tensor_dtype(value.dtype)))
            nodes.append(helper.make_node("Add", [f"c{i}", f"zi{i}"], [out_name]))
        outs.append(helper.make_tensor_value_info(out_name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                  list(value.shape)))
    return _save(_model(nodes, name, [inp], outs, inits), path, producer=producer, metadata=metadata)


def end2end_rows() -> np.ndarray:
    """(1, 300, 6): two detections in input pixels (64x64 input), the rest zero padding."""
    rows = np.zeros((1, 300, 6), np.float32)
    rows[0, 0] = [10, 12, 30, 40, 0.9, 2]
    rows[0, 1] = [40, 40, 60, 60, 0.6, 0]
    rows[0, 2] = [0, 0, 5, 5, 0.1, 1]  # under the default threshold
    return rows


def end2end_yolo(path: Path, *, metadata: bool = True) -> Path:
    """An Ultralytics nms=True / YOLOv10-style export: (1, 300, 6) x1, y1, x2, y2, score, class."""
    meta = ultralytics_metadata(size=64, nms=True) if metadata else None
    return _constant(path, {"output0": end2end_rows()}, name="yolo_e2e", metadata=meta)


def efficient_nms_outputs(k: int = 100) -> dict[str, np.ndarray]:
    boxes = np.zeros((1, k, 4), np.float32)
    scores = np.zeros((1, k), np.float32)
    classes = np.zeros((1, k), np.int32)
    boxes[0, :3] = [[10, 12, 30, 40], [40, 40, 60, 60], [1, 1, 9, 9]]
    scores[0, :3] = [0.9, 0.6, 0.3]
    classes[0, :3] = [2, 0, 1]
    boxes[0, 3] = [0, 0, 64, 64]  # past num_dets: garbage the decoder must not read
    scores[0, 3] = 0.99
    return {"num_dets": np.array([[3]], np.int32), "det_boxes": boxes, "det_scores": scores,
            "det_classes": classes}


def efficient_nms_model(path: Path) -> Path:
    """TensorRT EfficientNMS-style outputs, as YOLO exports with the plugin name them (the plugin
    itself runs only in TensorRT; these are the same tensors from plain ops)."""
    return _constant(path, efficient_nms_outputs(), name="effnms")


def yolov5_rows(size: int = 64, classes: int = 2) -> np.ndarray:
    """(1, 3*(8x8+4x4+2x2), 5+C) for a 64x64 input: YOLOv5's layout, one real candidate."""
    n = 3 * sum((size // s) ** 2 for s in (8, 16, 32))
    rows = np.zeros((1, n, 5 + classes), np.float32)
    rows[0, 5] = [32, 32, 10, 10, 0.9, 0.1, 0.8]
    return rows


def yolov5_model(path: Path) -> Path:
    meta = {"stride": "32", "names": str({0: "cat", 1: "dog"})}  # what the yolov5 repository writes
    return _constant(path, {"output0": yolov5_rows()}, name="yolov5", metadata=meta)


def dynamic_text_detector(path: Path) -> Path:
    """PP-OCR-detector-like: dynamic N/H/W input, (N, 1, H, W) probability map (raw)."""
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    out = helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", 1, "H", "W"])
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Sigmoid", ["m"], ["maps"])]
    return _save(_model(nodes, "text_det", [inp], [out], []), path, producer="PaddlePaddle")


def probability_classifier(path: Path, *, width: int = 192, height: int = 48) -> Path:
    """PP-OCR-orientation-classifier-like: dynamic N, (N, 2) already through a Softmax."""
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, height, width])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])
    w = numpy_helper.from_array(np.array([[4.0, -4.0], [-2.0, 2.0], [0.5, -0.5]], np.float32), "w")
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    return _save(_model(nodes, "cls", [inp], [out], [w]), path, producer="PaddlePaddle")


def two_input_model(path: Path) -> Path:
    """An image and a second input the camera pipeline cannot feed (PaddleDetection's scale_factor)."""
    a = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])
    b = helper.make_tensor_value_info("scale_factor", TensorProto.FLOAT, [1, 2])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Slice", ["m", "s0", "s2", "ax1"], ["m2"]),
             helper.make_node("Add", ["m2", "scale_factor"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([2], np.int64), "s2"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    return _save(_model(nodes, "two_inputs", [a, b], [out], inits), path)
