"""The model card: what a model expects and how to read what it returns.

A card travels with every model: as `<model>.json` beside a local ONNX file,
and inside the signed manifest when the fleet delivers one. It is the single
description the preprocessing, the post-processor, the calibration set and the
accuracy gate all read, so they cannot disagree about a model.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.base import Backend, TensorSpec
from engines.cardspec import (
    DETECTORS,
    INPUT_KEYS,
    KIND_KEY,
    KINDS,
    POSTPROCESS_KEYS,
    TASKS,
    TOP_KEYS,
    Key,
    is_number,
    kinds_for_task,
    post_key,
    task_of_kind,
)
from engines.errors import JetagentError, ModelMismatch


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

    @property
    def kind(self) -> str:
        """The post-processor's kind (parse_card always makes it explicit)."""
        return str(self.postprocess.get("kind", "classification" if self.task == "classification" else "raw"))

    def option(self, name: str) -> Any:
        """A postprocess key's value, or its default from `engines.cardspec`."""
        if name in self.postprocess:
            return self.postprocess[name]
        key = post_key(self.kind, name)
        if key.required:
            raise ModelCardError(f"model card {self.name!r}: postprocess: {name}: missing ({key.doc})")
        return key.default

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
        raise ModelCardError(f"model card not found: {p} (write one with `jetagent card init MODEL.onnx`; "
                             "docs/model-card.md describes every key)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelCardError(f"cannot read model card {p}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"{p}: not valid JSON: {exc}") from exc
    return parse_card(raw, base_dir=p.parent, where=str(p))


def parse_card(raw: Any, base_dir: Path = Path("."), where: str = "model card") -> ModelCard:
    """Validate a card (a parsed JSON object) against `engines.cardspec`. Unknown keys are
    refused in every section, enumerations and types checked; every error names the key path
    (`card.json: postprocess: score_treshold: unknown key (did you mean score_threshold?)`)."""
    if not isinstance(raw, dict):
        raise ModelCardError(f"{where}: must be a JSON object")
    r = _Reader(raw, where)
    r.no_extra(TOP_KEYS)
    if raw.get("v", 1) != 1 or isinstance(raw.get("v"), bool):
        raise r.fail("v", f"the card format version is 1 (the only one), not {raw.get('v')!r}")
    inp = _Reader(r.obj("input"), f"{where}: input")
    inp.no_extra(INPUT_KEYS)
    color = inp.choice(_input("color"))
    channels = 1 if color == "GRAY" else 3
    spec = InputSpec(
        name=inp.text(_input("name")),
        width=inp.integer(_input("width")),
        height=inp.integer(_input("height")),
        layout=inp.choice(_input("layout")),
        color=color,
        resize=inp.choice(_input("resize")),
        scale=inp.number(_input("scale")),
        mean=inp.vector(_input("mean"), channels),
        std=inp.vector(_input("std"), channels),
        dtype=inp.choice(_input("dtype")),
        pad_value=inp.integer(_input("pad_value")),
    )
    labels = r.strings(_top("labels"))
    post_raw = r.get("postprocess", {})
    if not isinstance(post_raw, dict):
        raise r.fail("postprocess", "must be an object")
    task_given = r.get("task")
    if task_given is not None:
        r.choice(_top("task"), TASKS)
    post = _parse_postprocess(post_raw, task_given, base_dir, f"{where}: postprocess")
    kind = post["kind"]
    task = task_given if task_given is not None else task_of_kind(kind)
    if task_of_kind(kind) != task:
        raise ModelCardError(
            f"{where}: postprocess: kind: {kind!r} is not a {task} post-processor "
            f"(for task {task!r} use one of: {', '.join(kinds_for_task(task))})")
    return ModelCard(
        name=r.text(_top("name")),
        task=task,
        input=spec,
        postprocess=post,
        labels=tuple(labels),
        source=r.string(_top("source")),
        base_dir=base_dir,
    )


def _parse_postprocess(raw: Mapping[str, Any], task: Any, base_dir: Path, where: str) -> dict[str, Any]:
    """The postprocess section with its kind made explicit; every other key as given."""
    p = _Reader(raw, where)
    if "kind" in raw:
        kind = p.choice(KIND_KEY, KINDS)
    elif task == "detection":
        raise p.fail("kind", f"missing: a detection card names its post-processor, one of "
                             f"{', '.join(DETECTORS)}")
    else:
        kind = "classification" if task == "classification" else "raw"
    keys = POSTPROCESS_KEYS[kind]
    p.no_extra((KIND_KEY, *keys), what=f"for kind {kind!r}")
    for key in keys:
        p.check(key)
    out = {"kind": kind}
    out.update({k: v for k, v in raw.items() if k != "kind"})
    return out


def _top(name: str) -> Key:
    return next(k for k in TOP_KEYS if k.name == name)


def _input(name: str) -> Key:
    return next(k for k in INPUT_KEYS if k.name == name)


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
    """Typed access to one JSON object by `Key`, with errors that name the key path."""

    def __init__(self, raw: Mapping[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

    def fail(self, key: str, msg: str) -> ModelCardError:
        return ModelCardError(f"{self.where}: {key}: {msg}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def _value(self, key: Key) -> Any:
        if key.name in self.raw:
            return self.raw[key.name]
        if key.required:
            raise self.fail(key.name, f"missing ({key.doc})")
        return key.default

    def obj(self, key: str) -> Mapping[str, Any]:
        v = self.raw.get(key)
        if not isinstance(v, dict):
            raise self.fail(key, "missing or not an object")
        return v

    def text(self, key: Key) -> str:
        v = self._value(key)
        if not isinstance(v, str) or not v:
            raise self.fail(key.name, f"must be a non-empty string, not {v!r}")
        return v

    def string(self, key: Key) -> str:
        v = self._value(key)
        if not isinstance(v, str):
            raise self.fail(key.name, f"must be a string, not {v!r}")
        return v

    def choice(self, key: Key, options: tuple[str, ...] | None = None) -> str:
        v = self._value(key)
        options = options or key.choices
        if v not in options:
            hint = _did_you_mean(v, options) if isinstance(v, str) else ""
            raise self.fail(key.name, f"must be one of {', '.join(options)}, not {v!r}{hint}")
        return str(v)

    def number(self, key: Key) -> float:
        v = self._value(key)
        if not is_number(v):
            raise self.fail(key.name, f"must be a finite number, not {v!r}")
        if (key.minimum is not None and v < key.minimum) or (key.maximum is not None and v > key.maximum):
            raise self.fail(key.name, f"must be between {key.minimum:g} and {key.maximum:g}, not {v!r}")
        return float(v)

    def integer(self, key: Key) -> int:
        v = self._value(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key.name, f"must be an integer, not {v!r}")
        if key.minimum is not None and v < key.minimum:
            what = "a positive integer" if key.minimum == 1 and key.maximum is None else f"at least {key.minimum:g}"
            raise self.fail(key.name, f"must be {what}, not {v!r}")
        if key.maximum is not None and v > key.maximum:
            raise self.fail(key.name, f"must be at most {key.maximum:g}, not {v!r}")
        return v

    def boolean(self, key: Key) -> bool:
        v = self._value(key)
        if not isinstance(v, bool):
            raise self.fail(key.name, f"must be true or false, not {v!r}")
        return v

    def strings(self, key: Key) -> list[str]:
        v = self._value(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.fail(key.name, "must be a list of strings")
        return list(v)

    def vector(self, key: Key, n: int) -> tuple[float, ...]:
        v = self._value(key)
        if is_number(v):
            v = [v] * n
        if not isinstance(v, list) or len(v) != n or not all(is_number(x) for x in v):
            raise self.fail(key.name, f"must be a number or a list of {n} numbers, not {v!r}")
        if key.nonzero and any(x == 0 for x in v):
            raise self.fail(key.name, "must not contain zero")
        return tuple(float(x) for x in v)

    def numbers4(self, key: Key) -> tuple[float, ...]:
        v = self._value(key)
        if not isinstance(v, list) or len(v) != 4 or not all(is_number(x) and x > 0 for x in v):
            raise self.fail(key.name, f"must be a list of 4 positive numbers, not {v!r}")
        return tuple(float(x) for x in v)

    def array(self, key: Key) -> None:
        v = self._value(key)
        if isinstance(v, str) and v:
            return
        if isinstance(v, dict) and set(v) == {"dtype", "shape", "b64"} and isinstance(v["b64"], str) \
                and isinstance(v["dtype"], str) and isinstance(v["shape"], list) \
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v["shape"]):
            return
        raise self.fail(key.name, "must be a .npy file name beside the card or an inline array "
                                  "{\"dtype\", \"shape\", \"b64\"}")

    def check(self, key: Key) -> None:
        """Validate one key by its type (value discarded: the post-processor reads it)."""
        checkers = {"string": self.string, "name": self.text, "integer": self.integer, "number": self.number,
                    "boolean": self.boolean, "enum": self.choice, "numbers4": self.numbers4, "array": self.array,
                    "strings": self.strings}
        checkers[key.type](key)

    def no_extra(self, keys: tuple[Key, ...], what: str = "") -> None:
        allowed = [k.name for k in keys]
        extra = sorted(set(self.raw) - set(allowed))
        if extra:
            bad = extra[0]
            hint = _did_you_mean(bad, allowed)
            known = f"known{' ' + what if what else ''}: {', '.join(allowed)}"
            raise self.fail(bad, f"unknown key{hint} ({known})")


def _did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
