"""Small real ONNX models and frames for the calibration tests.

* `conv_classifier`: a 2-conv colour classifier whose INT8 version keeps top-1 (quantizes well).
* `blob_detector`: a YOLOv8-layout detector of bright 8x8 blocks whose one convolution
  also produces a large constant channel (an "outlier" channel, like a head that mixes
  box coordinates and scores in one tensor). Per-tensor activation quantization gives
  that tensor a step of ~4, which wipes out the 0..1 brightness channel: its INT8
  version finds nothing. This is the model the gate must reject.
* `blob_frames`: dark noisy frames with bright blocks on the detector's grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_models import _save

OPSET = 13




def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def conv_classifier(path: Path, size: int = 32, opset: int = OPSET) -> Path:
    """logits = mean over the image of relu([I; -I] x) mapped back to 3 colours: top-1 is
    the dominant colour channel, by a wide margin for saturated colours."""
    rng = np.random.default_rng(7)
    w1 = np.concatenate([np.eye(3), -np.eye(3)]).astype(np.float32).reshape(6, 3, 1, 1)
    w2 = (rng.normal(0, 0.02, (6, 6, 3, 3)) + np.pad(np.eye(6)[:, :, None, None], ((0, 0), (0, 0), (1, 1), (1, 1)))
          ).astype(np.float32)
    fc = np.concatenate([np.eye(3), -np.eye(3)], axis=1).astype(np.float32).T  # (6, 3)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"]),
    ]
    inits = [_init("w1", w1), _init("b1", np.zeros(6, np.float32)), _init("w2", w2),
             _init("b2", np.zeros(6, np.float32)), _init("fc", fc * 10), _init("fcb", np.zeros(3, np.float32))]
    graph = helper.make_graph(nodes, "conv_classifier",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    card = {"v": 1, "name": "conv-classifier", "task": "classification",
            "input": {"name": "image", "width": size, "height": size, "layout": "NCHW", "color": "RGB",
                      "resize": "stretch", "scale": 1 / 255},
            "postprocess": {"kind": "classification", "output": "logits", "top_k": 3},
            "labels": ["red", "green", "blue"]}
    return _save(model, path, card)


def blob_detector(path: Path, size: int = 64, cell: int = 8, outlier: float = 1000.0) -> Path:
    """YOLOv8 layout (1, 4+1, N): one box per grid cell, score = sigmoid(20 * (brightness - 0.5))."""
    g = size // cell
    n = g * g
    w = np.zeros((2, 3, cell, cell), np.float32)
    w[0] = 1.0 / (3 * cell * cell)  # channel 0: mean brightness of the cell, 0..1
    bias = np.array([0.0, outlier], np.float32)  # channel 1: a large constant (the outlier)
    ys, xs = np.divmod(np.arange(n), g)
    boxes = np.stack([(xs + 0.5) * cell, (ys + 0.5) * cell, np.full(n, cell), np.full(n, cell)]).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["images", "w", "bias"], ["feat"], strides=[cell, cell]),
        helper.make_node("Slice", ["feat", "s0", "s1", "axis1"], ["bright"]),
        helper.make_node("Slice", ["feat", "s1", "s2", "axis1"], ["big"]),
        helper.make_node("Mul", ["big", "zero"], ["nothing"]),
        helper.make_node("Add", ["bright", "nothing"], ["b2"]),
        helper.make_node("Sub", ["b2", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score4d"]),
        helper.make_node("Reshape", ["score4d", "score_shape"], ["score"]),
        helper.make_node("Concat", ["boxes", "score"], ["output0"], axis=1),
    ]
    inits = [_init("w", w), _init("bias", bias), _init("s0", np.array([0], np.int64)),
             _init("s1", np.array([1], np.int64)), _init("s2", np.array([2], np.int64)),
             _init("axis1", np.array([1], np.int64)), _init("zero", np.array(0.0, np.float32)),
             _init("half", np.array(0.5, np.float32)), _init("gain", np.array(20.0, np.float32)),
             _init("score_shape", np.array([1, 1, n], np.int64)), _init("boxes", boxes[None])]
    graph = helper.make_graph(nodes, "blob_detector",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 5, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    card = {"v": 1, "name": "blob-detector", "task": "detection",
            "input": {"name": "images", "width": size, "height": size, "layout": "NCHW", "color": "RGB",
                      "resize": "stretch", "scale": 1 / 255},
            "postprocess": {"kind": "yolo", "version": "v8", "output": "output0", "score_threshold": 0.5,
                            "iou_threshold": 0.45},
            "labels": ["blob"]}
    return _save(model, path, card)


def blob_frames(n: int, size: int = 64, cell: int = 8, seed: int = 0, blobs: int = 3) -> list[np.ndarray]:
    """Dark noisy BGR frames, each with `blobs` bright cells on the detector's grid."""
    rng = np.random.default_rng(seed)
    g = size // cell
    frames = []
    for _ in range(n):
        frame = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        for index in rng.choice(g * g, blobs, replace=False):
            y, x = divmod(int(index), g)
            frame[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell] = rng.integers(200, 256, dtype=np.uint8)
        frames.append(frame)
    return frames


def colour_frames(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Saturated random colours with noise (BGR), for the classifier."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = np.zeros(3, np.int32)
        base[rng.integers(0, 3)] = 220
        noise = rng.integers(0, 50, (size, size, 3))
        out.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return out
