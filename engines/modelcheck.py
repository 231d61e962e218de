"""Does a model run with its card? One real inference on a generated frame through the card's
own preprocessing, before the model is trusted with a camera.

`check_backend` (engines.modelcard) compares declared shapes; this runs the model, because
a model with dynamic H/W accepts any size on paper and then fails inside (a 300x300 card on a
stride-32 YOLO: ONNX Runtime's Concat error, every frame). `check_model` runs at
`jetagent run --check-config` and start-up, `jetagent bench`, `jetagent card init` and
`jetfleet push`, and refuses with one specific error:

* the card's size is not a multiple of the model's stride (Ultralytics metadata), or the
  model fails on it (with the sizes it does run at, when its H/W are dynamic);
* outputs with the wrong shape or dtype, NaN or Inf (engines.sanity);
* a post-processor that cannot read the outputs, or scores outside [0, 1] after activation;
* a second softmax/sigmoid over outputs that already are probabilities;
* labels that do not match the classes the outputs carry.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.errors import InferenceError, JetagentError, ModelMismatch
from engines.onnxfacts import near_multiple, read_facts_quietly
from engines.preprocess import Preprocessor
from engines.sanity import group_findings, raw_findings, summary

if TYPE_CHECKING:
    from engines.onnxfacts import ModelFacts
    from engines.runner import ModelRunner

HINT_STRIDES = (32, 64, 16, 8)  # sizes tried when a dynamic-H/W model fails on the card's


@dataclass(frozen=True)
class CheckReport:
    input_shape: tuple[int, ...]
    outputs: dict[str, list[int]]
    detections: int
    seconds: float

    def line(self) -> str:
        shapes = ", ".join(f"{n} {s}" for n, s in self.outputs.items())
        return (f"one inference on a generated frame ({'x'.join(map(str, self.input_shape))}) in "
                f"{self.seconds * 1000:.0f} ms: {shapes}; {self.detections} result(s)")


def probe_frame(width: int = 640, height: int = 480) -> np.ndarray:
    """A deterministic BGR frame: gradients and noise, mean near 100 (neither black nor white)."""
    rng = np.random.default_rng(1234)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 160 // max(width, 1)), (y * 160 // max(height, 1)), ((x + y) * 80 // max(width + height, 1))],
                    axis=-1)
    noise = rng.integers(0, 48, (height, width, 3))
    return np.clip(base + noise + 20, 0, 255).astype(np.uint8)


def check_model(runner: ModelRunner, facts: ModelFacts | None = None) -> CheckReport:
    """Raise ModelMismatch unless the model runs on a generated frame with its card, and its
    outputs are what the card says. `facts` default: read from the runner's ONNX file."""
    card = runner.card
    spec = card.input
    facts = facts if facts is not None else read_facts_quietly(runner.path)
    who = f"model {card.name!r}"
    declared = next((t.shape for t in runner.backend.inputs if t.name == spec.name), ())
    h_axis, w_axis = (2, 3) if spec.layout == "NCHW" else (1, 2)
    dynamic_hw = len(declared) == 4 and not all(_fixed(declared[a]) for a in (h_axis, w_axis))
    stride = facts.stride if facts is not None else None
    if stride and dynamic_hw and (spec.width % stride or spec.height % stride):
        raise ModelMismatch(
            f"{who}: the card's input {spec.width}x{spec.height} is not a multiple of the model's stride {stride} "
            f"(its metadata); use e.g. {near_multiple(spec.width, stride)}x{near_multiple(spec.height, stride)}")
    frame = probe_frame()
    tensor, transform = runner.preprocess(frame)
    t0 = time.perf_counter()
    try:
        outputs = runner.infer(tensor)
    except InferenceError as exc:
        hint = _sizes_that_run(runner, frame) if dynamic_hw else ""
        raise ModelMismatch(f"{who} does not run on the card's {spec.width}x{spec.height} input "
                            f"({list(tensor.shape)}): {exc}{hint}") from None
    seconds = time.perf_counter() - t0
    found = [f for f in raw_findings(outputs, runner.backend.outputs) if f.check in ("shape", "dtype", "non_finite")]
    if found:
        raise ModelMismatch(f"{who}: on a generated frame its outputs are not what it declares: {summary(found)}")
    post = runner.post
    try:
        result = runner.postprocess(outputs, transform)
        groups = post.groups(outputs)
        classes = post.classes(outputs)
    except (ValueError, IndexError, KeyError) as exc:
        raise ModelMismatch(f"{who}: the {card.kind} post-processor cannot read its outputs "
                            f"({_shapes(outputs)}): {exc}") from None
    bad = [f for f in group_findings(groups, (spec.width, spec.height)) if f.check in ("score_range", "non_finite")]
    if bad:
        raise ModelMismatch(f"{who}: with the card's {card.kind} post-processor: {summary(bad)}")
    _activated_twice(card, outputs, who)
    if classes is not None and card.labels and classes != len(card.labels):
        raise ModelMismatch(f"{who}: the card has {len(card.labels)} labels, the outputs carry {classes} classes "
                            f"({_shapes(outputs)})")
    return CheckReport(tuple(int(d) for d in tensor.shape), {n: list(np.shape(v)) for n, v in outputs.items()},
                       len(result), seconds)


def _activated_twice(card: Any, outputs: dict[str, np.ndarray], who: str) -> None:
    """A softmax (sigmoid) over outputs that already are probabilities flattens every score."""
    kind, act = card.kind, card.postprocess.get("score_activation")
    if kind == "classification":
        act = card.option("score_activation")
        name = card.option("output") or next(iter(outputs))
    elif kind == "ssd":
        act = card.option("score_activation")
        name = card.option("scores")
    else:
        return
    values = np.asarray(outputs.get(name, np.zeros(0)), dtype=np.float64)
    if values.size < 2 or act == "none":
        return
    in_unit = values.min() >= 0 and values.max() <= 1
    rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, -1)
    if act == "softmax" and in_unit and np.allclose(rows.sum(axis=-1), 1.0, atol=1e-3):
        raise ModelMismatch(f"{who}: output {name!r} already holds probabilities (in [0, 1], summing to 1) and "
                            "the card applies softmax again, which flattens every score: set "
                            "postprocess.score_activation to \"none\"")
    if act == "sigmoid" and in_unit and values.size >= 16:
        raise ModelMismatch(f"{who}: output {name!r} is already in [0, 1] ({values.min():.3g}..{values.max():.3g}) "
                            "and the card applies sigmoid again (every score then lands in 0.5..0.73): set "
                            "postprocess.score_activation to \"none\"")


def _sizes_that_run(runner: ModelRunner, frame: np.ndarray) -> str:
    """With dynamic H/W: the nearest sizes at which the model does run, as a hint."""
    spec = runner.card.input
    for stride in HINT_STRIDES:
        w, h = near_multiple(spec.width, stride), near_multiple(spec.height, stride)
        if (w, h) == (spec.width, spec.height):
            continue
        try:
            tensor, _ = Preprocessor(dataclasses.replace(spec, width=w, height=h))(frame)
            runner.backend.infer({spec.name: tensor})
        except (InferenceError, JetagentError):
            continue
        return (f"; it runs at {w}x{h}: its H/W must probably be multiples of {stride} (set input.width/height "
                "to such a size)")
    return ""


def _fixed(d: object) -> bool:
    return isinstance(d, int) and d > 0


def _shapes(outputs: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{n} {list(np.shape(v))}" for n, v in outputs.items())
