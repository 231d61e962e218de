"""The gate's metrics on hand-made results whose right answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.errors import CalibrationError
from calibration.gate import (
    Agreement,
    Observations,
    compare,
    cosine_agreement,
    detection_agreement,
    match_detections,
    resolve_metric,
    top1_agreement,
)
from engines.postprocess import Result


def dets(*boxes: tuple[float, float, float, float], classes: list[int] | None = None,
         scores: list[float] | None = None) -> Result:
    n = len(boxes)
    return Result(np.asarray(classes or [0] * n, np.int32), np.asarray(scores or [0.9] * n, np.float32),
                  np.asarray(boxes, np.float32).reshape(n, 4))


def top(cls: int) -> Result:
    return Result(np.asarray([cls, (cls + 1) % 3], np.int32), np.asarray([0.8, 0.1], np.float32))


A, B, C = (0, 0, 10, 10), (20, 20, 40, 40), (50, 0, 60, 30)


def test_identical_detections_agree_fully() -> None:
    ref = [dets(A, B), dets(C)]
    got = detection_agreement(ref, [dets(B, A), dets(C)])
    assert got.value == 1.0 and got.details["matched"] == 3 and got.passes(0.95)


def test_missing_extra_moved_and_relabelled_boxes() -> None:
    ref = [dets(A, B, C)]
    assert detection_agreement(ref, [dets(A, B)]).details["recall"] == pytest.approx(2 / 3, abs=1e-4)
    extra = detection_agreement(ref, [dets(A, B, C, (70, 70, 80, 80))])
    assert (extra.details["precision"], extra.details["recall"]) == (0.75, 1.0)
    assert extra.value == pytest.approx(2 * 0.75 / 1.75)
    moved = detection_agreement([dets(A)], [dets((4, 4, 14, 14))])  # IoU 36/164 < 0.5
    assert moved.value == 0.0
    nudged = detection_agreement([dets(A)], [dets((1, 0, 11, 10))])  # IoU 90/110 >= 0.5
    assert nudged.value == 1.0
    relabelled = detection_agreement([dets(A, classes=[0])], [dets(A, classes=[1])])
    assert relabelled.value == 0.0


def test_one_candidate_box_matches_one_reference_box() -> None:
    twins = dets(A, (0, 0, 10, 11), scores=[0.9, 0.8])
    assert match_detections(twins, dets(A)) == 1
    assert match_detections(twins, dets(A, (0, 0, 10, 11))) == 2


def test_empty_frames() -> None:
    assert detection_agreement([dets()], [dets()]).value == 1.0
    assert detection_agreement([dets()], [dets(A)]).value == 0.0  # boxes FP32 never saw
    assert detection_agreement([dets(A)], [dets()]).value == 0.0  # a collapsed candidate


def test_top1_agreement() -> None:
    got = top1_agreement([top(0), top(1), top(2), top(0)], [top(0), top(1), top(0), top(0)])
    assert got.value == 0.75 and got.details == {"agreeing_frames": 3, "frames": 4}
    assert math.isnan(top1_agreement([], []).value) and not Agreement("x", float("nan")).passes(0.0)


def test_cosine_agreement() -> None:
    a = {"y": np.array([1.0, 2.0, 3.0]), "z": np.array([[0.5]])}
    assert cosine_agreement([a], [a]).value == pytest.approx(1.0)
    flipped = {k: -v for k, v in a.items()}
    assert cosine_agreement([a], [flipped]).value == pytest.approx(-1.0)
    zero = {k: np.zeros_like(v) for k, v in a.items()}
    both = cosine_agreement([a, zero], [a, zero])
    assert both.value == pytest.approx(1.0)
    assert cosine_agreement([a], [zero]).value == 0.0
    with pytest.raises(CalibrationError, match="raw outputs"):
        cosine_agreement([], [])


def test_metric_by_task_and_by_name() -> None:
    assert resolve_metric("detection", "auto") == "detection_f1"
    assert resolve_metric("classification", "auto") == "top1_agreement"
    assert resolve_metric("raw", "auto") == "cosine"
    assert resolve_metric("detection", "cosine") == "cosine"
    assert resolve_metric("raw", "f1") == "detection_f1"
    with pytest.raises(CalibrationError, match="unknown accuracy metric 'map'"):
        resolve_metric("detection", "map")


def test_detection_on_nearly_empty_holdout_compares_raw_outputs() -> None:
    out = {"y": np.array([1.0, 0.0])}
    ref = Observations([dets(A), dets()], [out, out])
    cand = Observations([dets(), dets()], [out, out])
    got = compare("detection_f1", ref, cand)
    assert got.metric == "cosine" and got.value == pytest.approx(1.0)
    assert "too few for detection F1" in got.note and got.details["detection"]["value"] == 0.0
    plenty = Observations([dets(A, B, C)] * 2, [out, out])
    assert compare("detection_f1", plenty, Observations([dets()] * 2, [out, out])).value == 0.0
    with pytest.raises(CalibrationError, match="different numbers of frames"):
        compare("top1_agreement", Observations([top(0)]), Observations([]))
