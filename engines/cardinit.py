"""`jetagent card init`: a model card derived from the model itself.

Every value comes with the reason it was chosen (`Guess.why`) and whether it was *read* from
the model (fixed dims, Ultralytics metadata, output shapes that admit one reading, a
recognised exporter's convention) or only *guessed* (`Guess.certain` False). A derivation with
no guess is unambiguous: `card_for` then lets bench and push use it for a model that has no
card beside it, and says so; otherwise the user is shown the guesses to check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.cardspec import INPUT_DTYPES
from engines.errors import JetagentError
from engines.modelcard import ModelCard, ModelCardError, card_path_for, load_card, parse_card
from engines.onnxfacts import ModelFacts, TensorFacts, near_multiple, read_facts

DEFAULT_SIZE = 640
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
YOLO_STRIDES = ((8, 16, 32), (8, 16, 32, 64))


class CardInitError(JetagentError):
    """No camera card can be derived from this model (no image input, a size that cannot fit)."""


@dataclass(frozen=True)
class Guess:
    key: str  # the card key path: "input.width", "postprocess.kind"
    value: Any
    why: str
    certain: bool = True

    def line(self) -> str:
        mark = "  " if self.certain else "? "
        return f"{mark}{self.key:28} {json.dumps(self.value)[:60]:24} {self.why}"


@dataclass
class Derivation:
    card: dict[str, Any]
    guesses: list[Guess] = field(default_factory=list)
    facts: ModelFacts | None = None

    @property
    def doubts(self) -> list[Guess]:
        return [g for g in self.guesses if not g.certain]

    @property
    def unambiguous(self) -> bool:
        return not self.doubts

    def lines(self) -> list[str]:
        """One line per value, in the card's own order."""
        order = ["input.name", "input.layout", "input.width", "input.height", "input.dtype", "input.color",
                 "input.scale", "input.mean", "input.std", "input.resize", "postprocess.kind"]
        rank = {k: i for i, k in enumerate(order)}
        ranked = sorted(enumerate(self.guesses), key=lambda ig: (rank.get(ig[1].key, len(order)), ig[0]))
        return [g.line() for _, g in ranked]

    def add(self, key: str, value: Any, why: str, certain: bool = True) -> Any:
        self.guesses.append(Guess(key, value, why, certain))
        return value


def parse_size(text: str) -> tuple[int, int]:
    """"640" or "640x480" (width x height) -> (width, height)."""
    parts = text.lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise CardInitError(f"--size {text!r}: give WIDTHxHEIGHT or one number, e.g. 640x480") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise CardInitError(f"--size {text!r}: give WIDTHxHEIGHT or one number, e.g. 640x480")
    return nums[0], nums[1]


def derive_card(model_path: str | Path, *, size: tuple[int, int] | None = None, name: str | None = None,
                run: bool = True) -> Derivation:
    """A card for `model_path` and why each value is what it is. `size` (width, height) fixes
    dynamic H/W; `run` runs one ONNX Runtime inference to learn the outputs' concrete shapes."""
    path = Path(model_path)
    facts = read_facts(path)
    d = Derivation(card={"v": 1}, facts=facts)
    d.card["name"] = name or path.stem
    exporter = facts.exporter
    image = _image_input(facts, d)
    layout, channels, h_axis, w_axis = _layout(image, exporter, d)
    width, height = _size(facts, image, h_axis, w_axis, size, d)
    inp: dict[str, Any] = {"name": image.name, "width": width, "height": height, "layout": layout}
    outputs = _concrete_outputs(path, facts, image, layout, channels, width, height) if run else {}
    post, task = _postprocess(facts, outputs, width, height, d)
    _preprocessing(facts, image, channels, task, post, inp, d)
    d.card["task"] = task
    d.card["source"] = f"derived by jetagent card init from {path.name}" + (f" ({exporter} export)" if exporter
                                                                             else "")
    d.card["input"] = inp
    d.card["postprocess"] = post
    d.card["labels"] = _labels(facts, post, outputs, d)
    parse_card(d.card, base_dir=path.parent, where=f"derived card of {path.name}")  # a derived card is valid
    return d


# -- input -------------------------------------------------------------------------------------

def _image_input(facts: ModelFacts, d: Derivation) -> TensorFacts:
    images = [t for t in facts.inputs if len(t.shape) == 4]
    if not images:
        shapes = ", ".join(f"{t.name} {list(t.shape)}" for t in facts.inputs) or "none"
        raise CardInitError(f"{facts.path.name}: no 4-D image input (inputs: {shapes}); the camera pipeline "
                            "feeds one image tensor")
    image = images[0]
    if len(images) > 1 or len(facts.inputs) > 1:
        others = ", ".join(t.name for t in facts.inputs if t.name != image.name)
        d.add("input.name", image.name, f"first 4-D input; the model also wants {others}, which the camera "
              "pipeline does not feed", certain=False)
    else:
        d.add("input.name", image.name, "the model's only input")
    if image.dtype not in INPUT_DTYPES:
        raise CardInitError(f"{facts.path.name}: input {image.name!r} is {image.dtype}; the camera pipeline "
                            f"feeds {', '.join(INPUT_DTYPES)}")
    return image


def _layout(image: TensorFacts, exporter: str, d: Derivation) -> tuple[str, int, int, int]:
    c1, c3 = image.dim(1), image.dim(3)
    if c1 in (1, 3) and c3 not in (1, 3):
        layout, channels = "NCHW", c1
        d.add("input.layout", layout, f"dims {_shape(image)}: {c1} channel(s) first")
    elif c3 in (1, 3) and c1 not in (1, 3):
        layout, channels = "NHWC", c3
        d.add("input.layout", layout, f"dims {_shape(image)}: {c3} channel(s) last")
    else:
        layout = "NHWC" if exporter == "tf2onnx" else "NCHW"
        channels = (c3 if layout == "NHWC" else c1) or 3
        d.add("input.layout", layout, f"dims {_shape(image)} do not say; {layout} as "
              f"{'TensorFlow' if layout == 'NHWC' else 'PyTorch/Paddle'} exports are", certain=False)
    h_axis, w_axis = (2, 3) if layout == "NCHW" else (1, 2)
    return layout, int(channels), h_axis, w_axis


def _size(facts: ModelFacts, image: TensorFacts, h_axis: int, w_axis: int, size: tuple[int, int] | None,
          d: Derivation) -> tuple[int, int]:
    fixed_h, fixed_w = image.dim(h_axis), image.dim(w_axis)
    stride = facts.stride
    if fixed_h and fixed_w:
        if size is not None and size != (fixed_w, fixed_h):
            raise CardInitError(f"--size {size[0]}x{size[1]}: input {image.name!r} is fixed at {fixed_w}x{fixed_h}")
        why = "fixed in the model"
        width, height = fixed_w, fixed_h
        d.add("input.width", width, why)
        d.add("input.height", height, why)
        return width, height
    if size is not None:
        width, height = size
        why = "--size (the model's H/W are dynamic)"
        certain = True
    elif facts.imgsz is not None:
        height, width = facts.imgsz
        why, certain = "Ultralytics metadata imgsz (the model's H/W are dynamic)", True
    else:
        width = fixed_w or DEFAULT_SIZE
        height = fixed_h or DEFAULT_SIZE
        why, certain = f"the model's H/W are dynamic and it names no size: {DEFAULT_SIZE} guessed (--size)", False
    if stride is not None:
        bad = [f"{n} {v}" for n, v in (("width", width), ("height", height)) if v % stride]
        if bad:
            raise CardInitError(f"{' and '.join(bad)} not a multiple of the model's stride {stride} (Ultralytics "
                                f"metadata); e.g. {near_multiple(width, stride)}x{near_multiple(height, stride)}")
        why += f", a multiple of its stride {stride}"
    d.add("input.width", width, why, certain)
    d.add("input.height", height, why, certain)
    return width, height


def _shape(t: TensorFacts) -> str:
    return "[" + ", ".join(str(x) if x is not None else "?" for x in t.shape) + "]"


# -- preprocessing by exporter ------------------------------------------------------------------

def _preprocessing(facts: ModelFacts, image: TensorFacts, channels: int, task: str, post: Mapping[str, Any],
                   inp: dict[str, Any], d: Derivation) -> None:
    exporter = facts.exporter
    if channels == 1:
        inp["color"] = d.add("input.color", "GRAY", "one input channel")
    if image.dtype != "float32":
        inp["dtype"] = d.add("input.dtype", image.dtype, f"the input is {image.dtype}")
    rgb: tuple[str, str, bool]
    norm: tuple[float, list[float], list[float], str, bool]
    resize: tuple[str, str, bool]
    if exporter in ("ultralytics", "yolov5"):
        who = "Ultralytics" if exporter == "ultralytics" else "YOLOv5 (stride/names metadata)"
        rgb = ("RGB", f"{who} models are trained on RGB", True)
        norm = (1 / 255, [0.0] * 3, [1.0] * 3, f"{who}: pixels / 255, no mean or std", True)
        if task == "classification":
            resize = ("stretch", f"{who} classifiers centre-crop a resized frame; stretch is the nearest", True)
        else:
            resize = ("letterbox", f"{who} letterboxes: aspect kept, centred, border 114", True)
    elif exporter == "tf2onnx":
        ssd = post.get("kind") == "ssd"
        rgb = ("RGB", "TensorFlow models take RGB", True)
        norm = (1 / 255, [0.5] * 3, [0.5] * 3, "TF Object Detection API SSD: pixels to [-1, 1]" if ssd else
                "tf2onnx export: [-1, 1] as TF Object Detection API / MobileNet (Keras models vary)", ssd)
        resize = ("stretch", "the TF Object Detection API's fixed-shape resizer stretches" if ssd else
                  "TensorFlow exports usually stretch", ssd)
    elif exporter == "paddle":
        rgb = ("BGR", "PaddleOCR reads frames with OpenCV and keeps BGR (PaddleDetection uses RGB)", False)
        if task == "classification":
            norm = (1 / 255, [0.5] * 3, [0.5] * 3, "PP-OCR's classifiers: pixels to [-1, 1]", False)
        else:
            norm = (1 / 255, IMAGENET_MEAN, IMAGENET_STD, "PaddleOCR's detectors: ImageNet mean/std", False)
        resize = ("stretch", "PaddlePaddle export: stretch (PP-OCR resizes to the input size)", False)
    elif exporter == "pytorch" and task == "classification":
        rgb = ("RGB", "PyTorch classifier: torchvision's convention", False)
        norm = (1 / 255, IMAGENET_MEAN, IMAGENET_STD, "PyTorch classifier: torchvision's ImageNet mean/std", False)
        resize = ("stretch", "torchvision resizes and centre-crops; stretch is the nearest", False)
    else:
        what = f"{exporter} export" if exporter else "exporter not recognised"
        rgb = ("RGB", f"{what}: RGB guessed", False)
        norm = (1 / 255, [0.0] * 3, [1.0] * 3, f"{what}: pixels / 255 guessed", False)
        resize = ("stretch", f"{what}: stretch guessed", False)
    if channels == 3:
        inp["color"] = d.add("input.color", rgb[0], rgb[1], rgb[2])
    if image.dtype == "uint8":
        d.add("input.scale", None, "uint8 input: the pixels go in as they are")
    else:
        scale, mean, std, why, certain = norm
        n = channels
        inp["scale"] = d.add("input.scale", scale, why, certain)
        inp["mean"] = d.add("input.mean", mean[:n] if n == 3 else mean[:1], why, certain)
        inp["std"] = d.add("input.std", std[:n] if n == 3 else std[:1], why, certain)
    inp["resize"] = d.add("input.resize", resize[0], resize[1], resize[2])
    if resize[0] == "letterbox":
        inp["pad_value"] = 114


# -- outputs -> post-processor -----------------------------------------------------------------

def _concrete_outputs(path: Path, facts: ModelFacts, image: TensorFacts, layout: str, channels: int, width: int,
                      height: int) -> dict[str, np.ndarray]:
    """One inference on a generated input: the outputs' concrete shapes and a look at their values.
    {} when the model does not run here (the card's check says why, with the card in hand)."""
    from engines.base import BackendOptions, open_backend
    from engines.errors import InferenceError, ModelLoadError

    if len(facts.inputs) != 1:
        return {}
    shape = (1, channels, height, width) if layout == "NCHW" else (1, height, width, channels)
    rng = np.random.default_rng(0)
    if image.dtype == "uint8":
        x = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        x = rng.uniform(0, 1, shape).astype(image.dtype)
    try:
        backend = open_backend("onnxruntime", path, BackendOptions(threads=1))
    except (ModelLoadError, JetagentError):
        return {}
    try:
        return backend.infer({image.name: x})
    except InferenceError:
        return {}
    finally:
        backend.close()


def _shapes(facts: ModelFacts, outputs: Mapping[str, np.ndarray]) -> dict[str, tuple[Any, ...]]:
    return {t.name: tuple(outputs[t.name].shape) if t.name in outputs else t.shape for t in facts.outputs}


def _postprocess(facts: ModelFacts, outputs: Mapping[str, np.ndarray], width: int, height: int,
                 d: Derivation) -> tuple[dict[str, Any], str]:
    shapes = _shapes(facts, outputs)
    shown = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    for rule in (_efficient_nms, _end2end, _yolo, _ssd, _classifier):
        got = rule(facts, shapes, outputs, width, height, d)
        if got is not None:
            return got
    task = f" (Ultralytics task {facts.task}: no post-processor for it)" if facts.task not in (None, "detect",
                                                                                           "classify") else ""
    d.add("postprocess.kind", "raw", f"outputs {shown}: no detector or classifier layout{task}; raw outputs")
    return {"kind": "raw"}, "raw"


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and v > 0 else None


def _efficient_nms(facts: ModelFacts, shapes: Mapping[str, tuple[Any, ...]], outputs: Mapping[str, np.ndarray],
                   width: int, height: int, d: Derivation) -> tuple[dict[str, Any], str] | None:
    if len(shapes) != 4:
        return None
    by = {t.name: t for t in facts.outputs}
    num = [n for n, s in shapes.items() if len(s) in (1, 2) and s[-1] == 1]  # (1, 1); TF's num_detections (1,)
    boxes = [n for n, s in shapes.items() if len(s) == 3 and s[2] == 4]
    pairs = [n for n, s in shapes.items() if len(s) == 2 and s[1] != 1 and n not in num]
    if len(num) != 1 or len(boxes) != 1 or len(pairs) != 2:
        return None
    ints = [n for n in pairs if by[n].dtype.startswith("int")]
    named = [n for n in pairs if "class" in n.lower() or "label" in n.lower()]
    if len(ints) == 1:
        classes, how = ints[0], f"{ints[0]} is the integer one"
    elif len(named) == 1:
        classes, how = named[0], f"{named[0]} is named for classes"
    else:
        classes, how = pairs[1], "scores and classes are alike: the second guessed to be the classes"
    scores = next(n for n in pairs if n != classes)
    plugin = facts.nms_plugin
    where = f"a {plugin['op']} node" if plugin else "four outputs (1,1), (1,K,4), (1,K), (1,K)"
    if facts.exporter == "tf2onnx":
        where += " (a TF Object Detection API export: its class ids start at 1)"
    post: dict[str, Any] = {"kind": "efficient_nms", "num_detections": num[0], "boxes": boxes[0], "scores": scores,
                            "classes": classes}
    d.add("postprocess.kind", "efficient_nms", f"{where}: NMS inside the model (TensorRT EfficientNMS style)")
    d.add("postprocess.classes", classes, how, certain=len(ints) == 1 or len(named) == 1)
    if facts.exporter == "tf2onnx":
        post["box_format"] = d.add("postprocess.box_format", "yxyx", "TensorFlow models give y first", False)
        post["normalized"] = d.add("postprocess.normalized", True, "TensorFlow models give boxes as fractions",
                                   False)
    else:
        d.add("postprocess.normalized", False, "YOLO-family NMS exports give input pixels, x first")
    return post, "detection"


def _yolo_candidates(width: int, height: int) -> dict[int, str]:
    """Candidate counts of YOLO heads at this input size -> what they are."""
    out: dict[int, str] = {}
    for strides in YOLO_STRIDES:
        cells = sum(-(-width // s) * -(-height // s) for s in strides)
        out.setdefault(cells, f"v8: one candidate per cell at strides {'/'.join(map(str, strides))}")
        out.setdefault(3 * cells, f"v5: three anchors per cell at strides {'/'.join(map(str, strides))}")
    return out


def _end2end(facts: ModelFacts, shapes: Mapping[str, tuple[Any, ...]], outputs: Mapping[str, np.ndarray],
             width: int, height: int, d: Derivation) -> tuple[dict[str, Any], str] | None:
    dets = [(n, s) for n, s in shapes.items() if len(s) == 3 and _int(s[2]) and 6 <= s[2] <= 64]
    if not dets or facts.task not in (None, "detect") or facts.end2end is False:
        return None
    name, shape = dets[0]
    k = _int(shape[1])
    if facts.end2end:
        why = "Ultralytics metadata: NMS inside the model (end2end / nms=True)"
    elif k is not None and k <= 1000 and k not in _yolo_candidates(width, height) and shape[2] == 6:
        why = f"{k} rows of 6 (box, score, class): an end-to-end head with NMS inside"
    else:
        return None
    d.add("postprocess.kind", "yolo_end2end", f"output {name} {list(shape)}: {why}")
    return {"kind": "yolo_end2end", "output": name}, "detection"


def _yolo(facts: ModelFacts, shapes: Mapping[str, tuple[Any, ...]], outputs: Mapping[str, np.ndarray],
          width: int, height: int, d: Derivation) -> tuple[dict[str, Any], str] | None:
    if facts.task not in (None, "detect"):
        return None
    heads = [(n, s) for n, s in shapes.items() if len(s) == 3 and _int(s[1]) and _int(s[2])]
    if not heads:
        return None
    name, (_, a, b) = heads[0]
    known = _yolo_candidates(width, height)
    names = facts.names
    metadata = facts.exporter in ("ultralytics", "yolov5") and facts.task in (None, "detect")
    if a < b and a >= 5:  # (1, 4+C, N)
        version, classes, n = "v8", a - 4, b
    elif b < a and b >= 6:  # (1, N, 5+C), or a transposed v8 head (1, N, 4+C)
        version, classes, n = "v5", b - 5, a
        if names is not None and len(names) == b - 4:
            version, classes = "v8", b - 4
    else:
        return None
    reasons = []
    if n in known:
        reasons.append(f"N = {n}: {known[n]} for {width}x{height}")
    if names is not None:
        reasons.append(f"{classes} classes as the metadata names {len(names)}" if len(names) == classes else
                       f"the metadata names {len(names)} classes, the head has {classes}")
    if metadata:
        reasons.append(f"{facts.exporter} metadata task {facts.task or 'detect (YOLOv5)'}")
    if not (metadata or n in known):
        return None  # a 3-D tensor that is not recognisably a YOLO head
    certain = names is None or len(names) == classes
    layout = "(1, 4+C, N)" if version == "v8" and a < b else "(1, N, 4+C)" if version == "v8" else "(1, N, 5+C)"
    d.add("postprocess.kind", "yolo", f"output {name} {[1, a, b]} is {layout}: " + "; ".join(reasons), certain)
    d.add("postprocess.version", version, f"layout {layout}", certain)
    return {"kind": "yolo", "version": version, "output": name}, "detection"


def _ssd(facts: ModelFacts, shapes: Mapping[str, tuple[Any, ...]], outputs: Mapping[str, np.ndarray],
         width: int, height: int, d: Derivation) -> tuple[dict[str, Any], str] | None:
    if len(shapes) != 2:
        return None
    (n1, s1), (n2, s2) = shapes.items()
    pair = None
    for b, sb, c, ss in ((n1, s1, n2, s2), (n2, s2, n1, s1)):
        box_ok = (len(sb) == 3 and sb[2] == 4) or (len(sb) == 4 and sb[2] == 1 and sb[3] == 4)
        if box_ok and len(ss) == 3 and _int(sb[1]) and sb[1] == ss[1] and _int(ss[2]):
            pair = (b, sb, c, ss)
            break
    if pair is None:
        return None
    boxes, sb, scores, ss = pair
    anchors_n = int(sb[1])
    post: dict[str, Any] = {"kind": "ssd", "boxes": boxes, "scores": scores}
    d.add("postprocess.kind", "ssd", f"two outputs over the same {anchors_n} anchors: box encodings {boxes} "
          f"{list(sb)} and class scores {scores} {list(ss)}")
    anchor_file = facts.path.with_name(f"{facts.path.stem}.anchors.npy")
    have = None
    if anchor_file.is_file():
        try:
            have = np.load(anchor_file).shape
        except (OSError, ValueError):
            have = None
    post["anchors"] = anchor_file.name
    if have == (anchors_n, 4):
        d.add("postprocess.anchors", anchor_file.name, f"beside the model, ({anchors_n}, 4) as the outputs need")
    else:
        found = f"{anchor_file.name} has shape {have}" if have else f"no {anchor_file.name} beside the model"
        d.add("postprocess.anchors", anchor_file.name, f"the model does not carry its {anchors_n} anchors and "
              f"{found}: give the (A, 4) ycenter, xcenter, h, w anchors", certain=False)
    producer = next((t.producer for t in facts.outputs if t.name == scores), "")
    tf = facts.exporter == "tf2onnx"
    if producer in ("Sigmoid", "Softmax"):
        post["score_activation"] = d.add("postprocess.score_activation", "none",
                                         f"{scores} is made by a {producer} node: already probabilities")
    else:
        d.add("postprocess.score_activation", "sigmoid", f"{scores} has no activation at its end: logits, "
              "sigmoid as the TF Object Detection API", certain=tf)
    d.add("postprocess.background_class", True, "column 0 is the background, as the TF Object Detection API "
          "exports", certain=tf)
    return post, "detection"


def _classifier(facts: ModelFacts, shapes: Mapping[str, tuple[Any, ...]], outputs: Mapping[str, np.ndarray],
                width: int, height: int, d: Derivation) -> tuple[dict[str, Any], str] | None:
    if not facts.outputs or facts.task not in (None, "classify"):
        return None
    first = facts.outputs[0]
    s = shapes[first.name]
    flat = [x for x in s[1:] if x != 1]
    c = _int(flat[0]) if len(flat) == 1 else None
    if c is None or c < 2 or len(s) not in (2, 4):
        return None
    values = np.asarray(outputs[first.name], dtype=np.float64).reshape(-1) if first.name in outputs else None
    sums_to_one = values is not None and values.min() >= 0 and values.max() <= 1 and abs(values.sum() - 1) < 1e-3
    names = facts.names
    why = f"output {first.name} {list(s)}: one score for each of {c} classes"
    if facts.task == "classify":
        why, certain = why + " (Ultralytics metadata task classify)", True
    elif first.producer in ("Softmax", "Sigmoid") or sums_to_one:
        why, certain = why + " (they are probabilities)", True
    elif names is not None and len(names) == c:
        why, certain = why + f" (the metadata names {c})", True
    else:
        why, certain = why + "; or an embedding: nothing in the model says which", False
    d.add("postprocess.kind", "classification", why, certain)
    post: dict[str, Any] = {"kind": "classification", "output": first.name}
    if first.producer in ("Softmax", "Sigmoid"):
        act, why = "none", f"made by a {first.producer} node: the model already outputs probabilities"
    elif sums_to_one:
        act, why = "none", f"on a generated input the {c} outputs are in [0, 1] and sum to 1: probabilities"
    else:
        act, why = "softmax", "no Softmax at the end: logits"
    post["score_activation"] = d.add("postprocess.score_activation", act, why,
                                     certain=values is not None or first.producer in ("Softmax", "Sigmoid"))
    post["top_k"] = min(5, c)
    return post, "classification"


def _labels(facts: ModelFacts, post: Mapping[str, Any], outputs: Mapping[str, np.ndarray],
            d: Derivation) -> list[str]:
    names = facts.names
    if names:
        return list(d.add("labels", names, f"{len(names)} names from the model's metadata"))
    if post.get("kind") != "raw":
        d.add("labels", [], "the model names no classes: class ids are shown as numbers (add labels)")
    return []


# -- using a derived card ----------------------------------------------------------------------

def card_for(model_path: str | Path, card_path: str | Path | None = None) -> tuple[ModelCard, str | None]:
    """The model's card: the one at `card_path` (default `<model>.json`), or, when there is none,
    the derived card if the derivation is unambiguous. Returns (card, note): the note says a
    derived card is in use. Raises ModelCardError naming the doubts otherwise."""
    path = Path(card_path) if card_path is not None else card_path_for(model_path)
    if path.exists() or card_path is not None:
        return load_card(path), None
    derivation = derive_card(model_path)
    if not derivation.unambiguous:
        doubts = "; ".join(f"{g.key}: {g.why}" for g in derivation.doubts[:3])
        raise ModelCardError(f"no model card beside {Path(model_path).name} ({path.name}), and the card derived "
                             f"from the model is not certain ({doubts}); write one with `jetagent card init "
                             f"{model_path}` and check it")
    card = parse_card(derivation.card, base_dir=Path(model_path).parent, where=f"derived card of {path.stem}")
    kind = card.kind if card.kind == "raw" else f"{card.task}, {card.kind}"
    note = (f"no card beside {Path(model_path).name}: using the card derived from the model ({kind}, "
            f"{card.input.name} {card.input.width}x{card.input.height}); `jetagent card init` writes it out")
    return card, note


def summarize(guesses: Sequence[Guess]) -> str:
    n = sum(1 for g in guesses if not g.certain)
    return "every value read from the model" if n == 0 else f"{n} value(s) guessed: check the lines marked ?"
