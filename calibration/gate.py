"""The accuracy gate: how much of the FP32 model's behaviour a candidate keeps.

Both models run on the same held-out frames (never used for calibration) and are
compared with a metric that fits the task:

* detection: boxes matched one-to-one to the FP32 detections at IoU >= 0.5 with the
  same class; precision = matched / candidate boxes, recall = matched / FP32 boxes,
  value = F1. Boxes are compared in frame pixels, after the same post-processing that
  serves (`engines.postprocess`), so thresholds and NMS are part of what is measured.
* classification: top-1 agreement with FP32.
* anything else (and detection on frames where FP32 found too few objects to say
  anything): cosine similarity of the raw outputs, averaged over frames.

The bound (`GateBound`, or the manifest's `AccuracyBound`: any object with `minimum`
and `metric`) says how much agreement a candidate must show to serve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from calibration.dataset import CalibrationSet
from calibration.errors import CalibrationError
from engines.postprocess import Result
from engines.runner import ModelRunner

METRICS = ("detection_f1", "top1_agreement", "cosine")
METRIC_ALIASES = {"auto": "auto", "detection": "detection_f1", "f1": "detection_f1", "detection_f1": "detection_f1",
                  "classification": "top1_agreement", "top1": "top1_agreement", "top1_agreement": "top1_agreement",
                  "cosine": "cosine"}
IOU_MATCH = 0.5
MIN_REFERENCE_OBJECTS = 5  # fewer FP32 detections than this on the holdout: F1 says nothing, use cosine


class BoundLike(Protocol):
    """`agent.wire.manifest.AccuracyBound` has this shape; calibration does not import agent."""

    @property
    def minimum(self) -> float: ...

    @property
    def metric(self) -> str: ...


@dataclass(frozen=True)
class GateBound:
    """The least agreement with FP32 a candidate must show to serve (default 0.95, metric by task)."""

    minimum: float = 0.95
    metric: str = "auto"


@dataclass
class Observations:
    """What one model did on the holdout: post-processed results, and raw outputs if kept."""

    results: list[Result] = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)


@dataclass(frozen=True)
class Agreement:
    """One metric's verdict on a candidate, with the numbers behind it."""

    metric: str
    value: float
    details: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    def passes(self, minimum: float) -> bool:
        """True when the value is a number at least `minimum` (NaN never passes)."""
        return math.isfinite(self.value) and self.value >= minimum

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "value": round(self.value, 4), **dict(self.details)}
        if self.note:
            out["note"] = self.note
        return out


def resolve_metric(task: str, metric: str) -> str:
    """The metric to use for a model `task` when the bound asks for `metric` ("auto" = by task)."""
    name = METRIC_ALIASES.get(metric)
    if name is None:
        raise CalibrationError(f"unknown accuracy metric {metric!r}; choose auto or one of {', '.join(METRICS)}")
    if name != "auto":
        return name
    return {"detection": "detection_f1", "classification": "top1_agreement"}.get(task, "cosine")


def observe(runner: ModelRunner, dataset: CalibrationSet, keep_outputs: bool) -> Observations:
    """Run `runner` over the holdout samples: results (and raw outputs when asked)."""
    obs = Observations()
    for tensor, transform in zip(dataset.holdout, dataset.holdout_transforms):
        outputs = runner.infer(tensor)
        obs.results.append(runner.postprocess(outputs, transform))
        if keep_outputs:
            obs.outputs.append({k: np.array(v, dtype=np.float32, copy=True) for k, v in outputs.items()})
    return obs


def compare(metric: str, reference: Observations, candidate: Observations) -> Agreement:
    """Score `candidate` against `reference` with `metric` (a resolved name)."""
    if len(reference.results) != len(candidate.results):
        raise CalibrationError("reference and candidate ran on different numbers of frames")
    if metric == "detection_f1":
        agreement = detection_agreement(reference.results, candidate.results)
        refs = int(agreement.details["reference_objects"])
        if refs < MIN_REFERENCE_OBJECTS and reference.outputs and candidate.outputs:
            cos = cosine_agreement(reference.outputs, candidate.outputs)
            return Agreement(cos.metric, cos.value, {**cos.details, "detection": agreement.to_dict()},
                             note=f"FP32 found {refs} object(s) on the holdout, too few for detection F1; "
                                  "compared raw outputs instead")
        return agreement
    if metric == "top1_agreement":
        return top1_agreement(reference.results, candidate.results)
    if metric == "cosine":
        return cosine_agreement(reference.outputs, candidate.outputs)
    raise CalibrationError(f"unknown accuracy metric {metric!r}")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes (N,4) and (M,4), x1,y1,x2,y2."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    result: np.ndarray = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    return result


def match_detections(reference: Result, candidate: Result, iou: float = IOU_MATCH) -> int:
    """How many reference boxes find their own candidate box (same class, IoU >= `iou`).

    Greedy, best-scoring reference first, each candidate box used once."""
    if len(reference) == 0 or len(candidate) == 0 or reference.boxes is None or candidate.boxes is None:
        return 0
    overlap = box_iou(reference.boxes, candidate.boxes)
    overlap[reference.class_ids[:, None] != candidate.class_ids[None, :]] = 0.0
    used = np.zeros(len(candidate), dtype=bool)
    matched = 0
    for i in np.argsort(-reference.scores, kind="stable"):
        row = np.where(used, -1.0, overlap[i])
        j = int(np.argmax(row))
        if row[j] >= iou:
            used[j] = True
            matched += 1
    return matched


def detection_agreement(reference: Sequence[Result], candidate: Sequence[Result],
                        iou: float = IOU_MATCH) -> Agreement:
    """Precision, recall and F1 of the candidate's boxes against FP32's, over all frames."""
    matched = sum(match_detections(r, c, iou) for r, c in zip(reference, candidate))
    n_ref = sum(len(r) for r in reference)
    n_cand = sum(len(c) for c in candidate)
    precision = matched / n_cand if n_cand else (1.0 if n_ref == 0 else 0.0)
    recall = matched / n_ref if n_ref else (1.0 if n_cand == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return Agreement("detection_f1", f1, {
        "precision": round(precision, 4), "recall": round(recall, 4), "matched": matched,
        "reference_objects": n_ref, "candidate_objects": n_cand, "iou": iou, "frames": len(reference)})


def top1_agreement(reference: Sequence[Result], candidate: Sequence[Result]) -> Agreement:
    """Fraction of frames where the candidate's best class is FP32's best class."""
    frames = len(reference)
    same = sum(1 for r, c in zip(reference, candidate)
               if len(r) and len(c) and int(r.class_ids[0]) == int(c.class_ids[0]))
    value = same / frames if frames else float("nan")
    return Agreement("top1_agreement", value, {"agreeing_frames": same, "frames": frames})


def cosine_agreement(reference: Sequence[Mapping[str, np.ndarray]],
                     candidate: Sequence[Mapping[str, np.ndarray]]) -> Agreement:
    """Mean over frames of the cosine similarity of all outputs, flattened together."""
    if not reference or len(reference) != len(candidate):
        raise CalibrationError("cosine agreement needs the raw outputs of both models on the same frames")
    values = []
    for ref, cand in zip(reference, candidate):
        names = sorted(ref)
        a = np.concatenate([np.asarray(ref[n], np.float64).ravel() for n in names])
        b = np.concatenate([np.asarray(cand[n], np.float64).ravel() for n in names])
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0.0 and nb == 0.0:
            values.append(1.0)
        elif na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
            values.append(0.0)
        else:
            values.append(float(np.dot(a, b) / (na * nb)))
    return Agreement("cosine", float(np.mean(values)), {"min": round(min(values), 4), "frames": len(values)})
