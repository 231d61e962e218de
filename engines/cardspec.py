"""Every key of the model card, once: its type, default, allowed values and meaning.

`engines.modelcard` validates cards against these tables (unknown keys refused in every
section, enumerations checked, errors naming the key path), the post-processors read their
defaults from them, `card_schema()` turns them into the JSON Schema published as
docs/schemas/card.schema.json, and the tests check docs/model-card.md against them. A key
added here is a key documented, validated and in the schema, or a test fails.

    python -m engines.cardspec > docs/schemas/card.schema.json
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

REQUIRED: Any = object()  # the default of a key that has none

TASKS = ("detection", "classification", "raw")
LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR", "GRAY")
RESIZES = ("stretch", "letterbox")
INPUT_DTYPES = ("float32", "float16", "uint8")
ACTIVATIONS = ("softmax", "sigmoid", "none")


@dataclass(frozen=True)
class Key:
    """One card key. `type` is one of: string, name (non-empty string), integer, number,
    boolean, enum, channels (a number or one per channel), numbers4, array (a .npy file
    name or an inline array), strings (list of strings)."""

    name: str
    type: str
    doc: str
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    nonzero: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def shown_default(self) -> str:
        """The default as docs/model-card.md writes it."""
        if self.required:
            return "required"
        return json.dumps(self.default)


def _threshold(name: str, default: float, doc: str) -> Key:
    return Key(name, "number", doc, default, minimum=0.0, maximum=1.0)


MAX_DETECTIONS = Key("max_detections", "integer", "most detections kept per frame, best first", 100, minimum=1)

TOP_KEYS: tuple[Key, ...] = (
    Key("v", "integer", "card format version; only 1 exists", 1, minimum=1, maximum=1),
    Key("name", "name", "the model's name: reports, the fleet repository and `jetfleet status` show it"),
    Key("task", "enum", "what the model does; follows from `postprocess.kind` when left out "
        "(classification -> classification, raw -> raw, every detector -> detection)", None, TASKS),
    Key("source", "string", "where the model came from (free text, for people)", ""),
    Key("input", "object", "how a camera frame becomes the input tensor (below)"),
    Key("postprocess", "object", "how the outputs become results (below); `{}` is raw", {}),
    Key("labels", "strings", "class names by class id; ids without a label are shown as numbers", []),
)

INPUT_KEYS: tuple[Key, ...] = (
    Key("name", "name", "the model input the frame is fed to"),
    Key("width", "integer", "input width in pixels; with dynamic H/W, a multiple of the model's stride", minimum=1),
    Key("height", "integer", "input height in pixels; with dynamic H/W, a multiple of the model's stride",
        minimum=1),
    Key("layout", "enum", "NCHW (channels first, PyTorch/Paddle) or NHWC (channels last, TensorFlow)", "NCHW",
        LAYOUTS),
    Key("color", "enum", "channel order the model was trained on (frames arrive BGR from OpenCV); GRAY is one "
        "channel", "RGB", COLORS),
    Key("resize", "enum", "stretch: scale to width x height, aspect ratio lost; letterbox: scale to fit keeping "
        "the aspect ratio, centred, the border filled with `pad_value` (as Ultralytics does)", "stretch", RESIZES),
    Key("scale", "number", "value = (pixel * scale - mean) / std", 1.0 / 255.0),
    Key("mean", "channels", "subtracted after scaling: one number for every channel or one per channel, in "
        "`color` order", 0.0),
    Key("std", "channels", "divided by after the mean: one number or one per channel; never 0", 1.0, nonzero=True),
    Key("dtype", "enum", "input element type; uint8 inputs get the resized pixels as they are (no scale, mean "
        "or std)", "float32", INPUT_DTYPES),
    Key("pad_value", "integer", "the letterbox border's pixel value", 114, minimum=0, maximum=255),
)

POSTPROCESS_KEYS: dict[str, tuple[Key, ...]] = {
    "classification": (
        Key("output", "string", "the output holding one score per class, (1, C) or (C,); \"\" = the model's "
            "first output", ""),
        Key("top_k", "integer", "results kept per frame, best first", 5, minimum=1),
        Key("score_activation", "enum", "applied to the output: softmax for logits, none when the model already "
            "outputs probabilities (a second softmax flattens them), sigmoid for multi-label heads", "softmax",
            ACTIVATIONS),
    ),
    "ssd": (
        Key("boxes", "name", "output of box encodings (1, A, [1,] 4) as ty, tx, th, tw (TF Object Detection API)"),
        Key("scores", "name", "output of class scores (1, A, C), column 0 the background when `background_class`"),
        Key("anchors", "array", "the A anchors (A, 4) as ycenter, xcenter, h, w, normalised: a .npy file beside "
            "the card, or inline {dtype, shape, b64} (how manifests carry it)"),
        Key("box_scales", "numbers4", "the box coder's scale factors y, x, h, w", [10.0, 10.0, 5.0, 5.0]),
        Key("score_activation", "enum", "applied to `scores`; none when the model already outputs probabilities",
            "sigmoid", ACTIVATIONS),
        Key("background_class", "boolean", "column 0 of `scores` is the background and is dropped", True),
        _threshold("score_threshold", 0.5, "least score a detection needs"),
        _threshold("iou_threshold", 0.6, "boxes of one class overlapping more than this are suppressed (NMS)"),
        MAX_DETECTIONS,
    ),
    "yolo": (
        Key("output", "name", "the head's output: v8 (1, 4+C, N) as cx, cy, w, h, class scores; v5 (1, N, 5+C) "
            "as cx, cy, w, h, objectness, class scores; boxes in input pixels"),
        Key("version", "enum", "head layout: v8 (Ultralytics YOLOv8/11 and later without NMS) or v5", "v8",
            ("v5", "v8")),
        _threshold("score_threshold", 0.25, "least score a detection needs (v5: objectness x class score)"),
        _threshold("iou_threshold", 0.45, "boxes of one class overlapping more than this are suppressed (NMS)"),
        MAX_DETECTIONS,
    ),
    "yolo_end2end": (
        Key("output", "name", "(1, K, 6+) rows of x1, y1, x2, y2, score, class id in input pixels, NMS already "
            "done (Ultralytics nms=True, YOLOv10, YOLO26); unused rows are zero; extra columns are ignored"),
        Key("box_format", "enum", "the first four columns: xyxy corners or xywh centre and size", "xyxy",
            ("xyxy", "xywh")),
        _threshold("score_threshold", 0.25, "least score a detection needs (also drops the zero padding rows)"),
        MAX_DETECTIONS,
    ),
    "efficient_nms": (
        Key("num_detections", "name", "output (1, 1) int: how many rows of the others are valid"),
        Key("boxes", "name", "output (1, K, 4) of boxes, corners (TensorRT's EfficientNMS always outputs corners)"),
        Key("scores", "name", "output (1, K) of scores"),
        Key("classes", "name", "output (1, K) of class ids"),
        Key("box_format", "enum", "corner order: xyxy, or yxyx as TensorFlow-trained models give them", "xyxy",
            ("xyxy", "yxyx")),
        Key("normalized", "boolean", "boxes are fractions of the input size, not input pixels", False),
        _threshold("score_threshold", 0.0, "least score a detection needs, on top of the plugin's own threshold"),
        MAX_DETECTIONS,
    ),
    "raw": (),
}

KINDS = tuple(POSTPROCESS_KEYS)
DETECTORS = ("ssd", "yolo", "yolo_end2end", "efficient_nms")
KIND_KEY = Key("kind", "enum", "which post-processor reads the outputs; default classification for a "
               "classification card, else raw", None, KINDS)


def task_of_kind(kind: str) -> str:
    return "classification" if kind == "classification" else "raw" if kind == "raw" else "detection"


def kinds_for_task(task: str) -> tuple[str, ...]:
    return tuple(k for k in KINDS if task_of_kind(k) == task)


def post_key(kind: str, name: str) -> Key:
    for key in POSTPROCESS_KEYS[kind]:
        if key.name == name:
            return key
    raise KeyError(f"{kind} has no key {name!r}")


def post_default(kind: str, name: str) -> Any:
    key = post_key(kind, name)
    if key.required:
        raise KeyError(f"{kind}.{name} has no default")
    return key.default


# -- JSON Schema (draft 2020-12) ---------------------------------------------------------------

SCHEMA_ID = "https://jetagent.dev/schemas/card.schema.json"


def _key_schema(key: Key) -> dict[str, Any]:
    s: dict[str, Any]
    if key.type in ("string", "name"):
        s = {"type": "string"}
        if key.type == "name":
            s["minLength"] = 1
    elif key.type in ("integer", "number"):
        s = {"type": key.type}
        if key.minimum is not None:
            s["minimum"] = int(key.minimum) if key.type == "integer" else key.minimum
        if key.maximum is not None:
            s["maximum"] = int(key.maximum) if key.type == "integer" else key.maximum
    elif key.type == "boolean":
        s = {"type": "boolean"}
    elif key.type == "enum":
        s = {"enum": list(key.choices)}
    elif key.type == "channels":
        number: dict[str, Any] = {"type": "number", "not": {"const": 0}} if key.nonzero else {"type": "number"}
        s = {"oneOf": [number, {"type": "array", "items": number, "minItems": 1, "maxItems": 3}]}
    elif key.type == "numbers4":
        s = {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 4, "maxItems": 4}
    elif key.type == "array":
        s = {"oneOf": [{"type": "string", "minLength": 1}, {"$ref": "#/$defs/inline_array"}]}
    elif key.type == "strings":
        s = {"type": "array", "items": {"type": "string"}}
    elif key.type == "object":
        s = {"type": "object"}
    else:  # pragma: no cover - a table entry with a type this function does not know
        raise ValueError(f"unknown key type {key.type!r}")
    s["description"] = key.doc
    if not key.required and key.default is not None:
        s["default"] = key.default
    return s


def _section(keys: tuple[Key, ...], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    props = {k.name: _key_schema(k) for k in keys}
    props.update(extra or {})
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    required = [k.name for k in keys if k.required]
    if required:
        out["required"] = required
    return out


def card_schema() -> dict[str, Any]:
    """The card as a JSON Schema; `engines.modelcard.parse_card` is the authority, this is its
    published shape (tests check both agree on the documented examples)."""
    variants = {}
    for kind, keys in POSTPROCESS_KEYS.items():
        kind_schema = {"const": kind, "description": KIND_KEY.doc}
        variants[kind] = _section(keys, {"kind": kind_schema})
        if kind in ("classification", "raw"):
            continue
        variants[kind]["required"] = ["kind", *variants[kind].get("required", [])]
    top = _section(tuple(k for k in TOP_KEYS if k.name not in ("input", "postprocess")), {
        "input": {"$ref": "#/$defs/input"},
        "postprocess": {"$ref": "#/$defs/postprocess"},
    })
    top["required"] = ["name", "input"]
    # task and kind agree; a detection card names its detector
    rules = []
    for task in TASKS:
        kinds = kinds_for_task(task)
        then: dict[str, Any] = {"properties": {"postprocess": {"properties": {"kind": {"enum": list(kinds)}}}}}
        if task == "detection":
            then["required"] = ["postprocess"]
            then["properties"]["postprocess"]["required"] = ["kind"]
        rules.append({"if": {"properties": {"task": {"const": task}}, "required": ["task"]}, "then": then})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "jetagent model card",
        "description": "What a model expects and how to read what it returns. See docs/model-card.md.",
        **top,
        "allOf": rules,
        "$defs": {
            "input": _section(INPUT_KEYS),
            "postprocess": {"anyOf": [{"$ref": f"#/$defs/post_{k}"} for k in variants]},
            **{f"post_{k}": v for k, v in variants.items()},
            "inline_array": {
                "type": "object", "additionalProperties": False, "required": ["dtype", "shape", "b64"],
                "description": "an array inlined as base64 of its little-endian bytes",
                "properties": {"dtype": {"type": "string"},
                               "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                               "b64": {"type": "string"}},
            },
        },
    }


def schema_text() -> str:
    return json.dumps(card_schema(), indent=2) + "\n"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


if __name__ == "__main__":
    print(schema_text(), end="")
