"""The model card: what a model expects and how to read what it returns.

A card travels with every model: as `<model>.json` beside a local ONNX file,
and inside the signed manifest when the fleet delivers one. It is the single
description the preprocessing, the post-processor, the calibration set and the
accuracy gate all read, so they cannot disagree about a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.base import Backend, TensorSpec
from engines.errors import JetagentError, ModelMismatch

TASKS = ("detection", "classification", "raw")
LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR", "GRAY")
RESIZES = ("stretch", "letterbox")
INPUT_DTYPES = ("float32", "float16", "uint8")


class ModelCardError(JetagentError):
    """A model card is missing, malformed, or names a key with a bad value."""


@dataclass(frozen=True)
class InputSpec:
    """How a camera frame becomes the model's input tensor.

    value = (pixel * scale - mean[c]) / std[c], channels in `color` order.
    For uint8 inputs no normalisation is applied.
    """

    name: str
    width: int
    height: int
    layout: str = "NCHW"
    color: str = "RGB"
    resize: str = "stretch"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    dtype: str = "float32"
    pad_value: int = 114

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    def tensor_shape(self) -> tuple[int, int, int, int]:
        if self.layout == "NCHW":
            return (1, self.channels, self.height, self.width)
        return (1, self.height, self.width, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "width": self.width, "height": self.height, "layout": self.layout,
            "color": self.color, "resize": self.resize, "scale": self.scale, "mean": list(self.mean),
            "std": list(self.std), "dtype": self.dtype, "pad_value": self.pad_value,
        }


@dataclass(frozen=True)
class ModelCard:
    name: str
    task: str
    input: InputSpec
    postprocess: Mapping[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    source: str = ""
    base_dir: Path = Path(".")  # where relative files named by the card (anchors) live

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1, "name": self.name, "task": self.task, "source": self.source,
            "input": self.input.to_dict(), "postprocess": dict(self.postprocess),
            "labels": list(self.labels),
        }

    def label(self, class_id: int) -> str:
        if 0 <= class_id < len(self.labels):
            return self.labels[class_id]
        return str(class_id)


def card_path_for(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_suffix(".json")


def load_card(path: str | Path) -> ModelCard:
    """Read a card from its JSON file. Errors name the file and the key path."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelCardError(f"model card not found: {p} (every model needs a card beside it)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelCardError(f"cannot read model card {p}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"{p}: not valid JSON: {exc}") from exc
    return parse_card(raw, base_dir=p.parent, where=str(p))


def parse_card(raw: Any, base_dir: Path = Path("."), where: str = "model card") -> ModelCard:
    if not isinstance(raw, dict):
        raise ModelCardError(f"{where}: must be a JSON object")
    r = _Reader(raw, where)
    inp = _Reader(r.obj("input"), f"{where}: input")
    layout = inp.choice("layout", LAYOUTS, "NCHW")
    color = inp.choice("color", COLORS, "RGB")
    channels = 1 if color == "GRAY" else 3
    spec = InputSpec(
        name=inp.text("name"),
        width=inp.positive_int("width"),
        height=inp.positive_int("height"),
        layout=layout,
        color=color,
        resize=inp.choice("resize", RESIZES, "stretch"),
        scale=inp.number("scale", 1.0 / 255.0),
        mean=inp.vector("mean", channels, 0.0),
        std=inp.vector("std", channels, 1.0, nonzero=True),
        dtype=inp.choice("dtype", INPUT_DTYPES, "float32"),
        pad_value=int(inp.number("pad_value", 114)),
    )
    inp.no_extra({"name", "width", "height", "layout", "color", "resize", "scale", "mean", "std",
                  "dtype", "pad_value"})
    labels_raw = r.get("labels", [])
    if not isinstance(labels_raw, list) or not all(isinstance(x, str) for x in labels_raw):
        raise ModelCardError(f"{where}: labels: must be a list of strings")
    post = r.get("postprocess", {})
    if not isinstance(post, dict):
        raise ModelCardError(f"{where}: postprocess: must be an object")
    card = ModelCard(
        name=r.text("name"),
        task=r.choice("task", TASKS, "raw"),
        input=spec,
        postprocess=post,
        labels=tuple(labels_raw),
        source=str(r.get("source", "")),
        base_dir=base_dir,
    )
    r.no_extra({"v", "name", "task", "input", "postprocess", "labels", "source"})
    return card


def check_backend(card: ModelCard, backend: Backend) -> None:
    """Raise ModelMismatch unless the backend's input fits the card's input spec.

    This is what stops a model whose inputs don't fit the camera pipeline from
    ever serving a frame.
    """
    spec = card.input
    by_name = {t.name: t for t in backend.inputs}
    if spec.name not in by_name:
        have = ", ".join(t.name for t in backend.inputs) or "none"
        raise ModelMismatch(f"model {card.name!r} has no input named {spec.name!r} (it has: {have})")
    extra = [t.name for t in backend.inputs if t.name != spec.name]
    if extra:
        raise ModelMismatch(
            f"model {card.name!r} needs inputs the camera pipeline does not provide: {', '.join(extra)}"
        )
    _check_shape(card, by_name[spec.name])
    if by_name[spec.name].dtype != spec.dtype:
        raise ModelMismatch(
            f"model {card.name!r} input {spec.name!r} is {by_name[spec.name].dtype}, "
            f"card says {spec.dtype}"
        )


def _check_shape(card: ModelCard, tensor: TensorSpec) -> None:
    want = card.input.tensor_shape()
    if len(tensor.shape) != 4:
        raise ModelMismatch(
            f"model {card.name!r} input {tensor.name!r} has rank {len(tensor.shape)}; "
            f"the camera pipeline feeds a 4-D {card.input.layout} image tensor {list(want)}"
        )
    for axis, (have, need) in enumerate(zip(tensor.shape, want)):
        if isinstance(have, int) and have > 0 and have != need:
            raise ModelMismatch(
                f"model {card.name!r} input {tensor.name!r} has shape {list(tensor.shape)}; "
                f"the card's input spec ({card.input.layout} {card.input.width}x{card.input.height}, "
                f"{card.input.channels} channel(s)) gives {list(want)} (axis {axis} differs)"
            )


class _Reader:
    """Typed access to one JSON object, with errors that name the key path."""

    def __init__(self, raw: Mapping[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

    def fail(self, key: str, msg: str) -> ModelCardError:
        return ModelCardError(f"{self.where}: {key}: {msg}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def obj(self, key: str) -> Mapping[str, Any]:
        v = self.raw.get(key)
        if not isinstance(v, dict):
            raise self.fail(key, "missing or not an object")
        return v

    def text(self, key: str) -> str:
        v = self.raw.get(key)
        if not isinstance(v, str) or not v:
            raise self.fail(key, "missing or not a non-empty string")
        return v

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        v = self.raw.get(key, default)
        if v not in options:
            raise self.fail(key, f"must be one of {', '.join(options)}, not {v!r}")
        return str(v)

    def number(self, key: str, default: float) -> float:
        v = self.raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(key, f"must be a finite number, not {v!r}")
        return float(v)

    def positive_int(self, key: str) -> int:
        v = self.raw.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self.fail(key, f"must be a positive integer, not {v!r}")
        return v

    def vector(self, key: str, n: int, default: float, nonzero: bool = False) -> tuple[float, ...]:
        v = self.raw.get(key, [default] * n)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v] * n
        if (not isinstance(v, list) or len(v) != n
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise self.fail(key, f"must be a number or a list of {n} numbers, not {v!r}")
        if nonzero and any(x == 0 for x in v):
            raise self.fail(key, "must not contain zero")
        return tuple(float(x) for x in v)

    def no_extra(self, allowed: set[str]) -> None:
        extra = sorted(set(self.raw) - allowed)
        if extra:
            raise self.fail(extra[0], f"unknown key (known: {', '.join(sorted(allowed))})")
