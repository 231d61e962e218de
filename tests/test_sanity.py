"""engines.sanity: output sanity checks on their own and against FP32, through real models
run by real ONNX Runtime (generated heads with known outputs) and on crafted tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.base import BackendOptions, TensorSpec
from engines.postprocess import FrameTransform, Result
from engines.runner import ModelRunner, open_model
from engines.sanity import (
    Finding,
    OutputStats,
    SanityError,
    compare,
    frame_findings,
    raw_findings,
    result_findings,
)
from onnx_models import color_classifier, constant_head

IDENT = FrameTransform(64, 64, 1.0, 1.0)


def yolo_head(n: int = 50, classes: int = 3, seed: int = 0) -> np.ndarray:
    """A YOLOv8-style (1, 4+C, N) head: boxes in input pixels, class scores in [0, 1]."""
    rng = np.random.default_rng(seed)
    head = np.zeros((1, 4 + classes, n), np.float32)
    head[0, 0:2] = rng.uniform(5, 59, (2, n))
    head[0, 2:4] = rng.uniform(4, 20, (2, n))
    head[0, 4:] = rng.uniform(0, 0.6, (classes, n))
    return head


def open_yolo(tmp: Path, head: np.ndarray, name: str = "yolo") -> ModelRunner:
    path = constant_head(tmp / f"{name}.onnx", head, name=name, labels=["a", "b", "c"],
                         postprocess={"kind": "yolo", "version": "v8", "output": "output0", "score_threshold": 0.3})
    return open_model(path, options=BackendOptions(threads=1))


def checks(found: list[Finding]) -> set[str]:
    return {f.check for f in found}


def test_a_sane_detector_has_no_findings(tmp_path: Path) -> None:
    runner = open_yolo(tmp_path, yolo_head())
    frame = np.full((64, 64, 3), 90, np.uint8)
    tensor, t = runner.preprocess(frame)
    outputs = runner.infer(tensor)
    assert runner.sanity(outputs, runner.postprocess(outputs, t)) == []


@pytest.mark.parametrize("poison, check", [(np.nan, "non_finite"), (np.inf, "non_finite")])
def test_nan_or_inf_anywhere_is_found(tmp_path: Path, poison: float, check: str) -> None:
    head = yolo_head()
    head[0, 1, 7] = poison  # one box coordinate
    runner = open_yolo(tmp_path, head)
    tensor, _ = runner.preprocess(np.zeros((64, 64, 3), np.uint8))
    found = runner.sanity(runner.infer(tensor))
    assert check in checks(found)
    assert any("1 of" in f.detail and "output0" == f.where for f in found), found


def test_scores_outside_0_1_after_activation_are_found(tmp_path: Path) -> None:
    head = yolo_head()
    head[0, 4:] *= 40.0  # logits where probabilities were expected
    runner = open_yolo(tmp_path, head)
    tensor, _ = runner.preprocess(np.zeros((64, 64, 3), np.uint8))
    found = runner.sanity(runner.infer(tensor))
    assert [f for f in found if f.check == "score_range" and f.where == "scores"], found


def test_constant_scores_in_a_frame_are_found(tmp_path: Path) -> None:
    head = yolo_head()
    head[0, 4:] = 0.0  # dead class scores, boxes still fine
    runner = open_yolo(tmp_path, head)
    tensor, _ = runner.preprocess(np.zeros((64, 64, 3), np.uint8))
    found = runner.sanity(runner.infer(tensor))
    assert [f for f in found if f.check == "constant" and f.where == "scores"], found
    assert not [f for f in found if f.where == "boxes"]


def test_boxes_far_outside_the_input_are_found(tmp_path: Path) -> None:
    head = yolo_head()
    head[0, 4, :5] = 0.9  # five confident detections ...
    head[0, 0, :5] = 10_000.0  # ... whose centres are nowhere near the 64x64 input
    runner = open_yolo(tmp_path, head)
    tensor, _ = runner.preprocess(np.zeros((64, 64, 3), np.uint8))
    found = runner.sanity(runner.infer(tensor))
    assert [f for f in found if f.check == "box_range" and "5 of" in f.detail], found


def test_shape_and_dtype_against_the_declared_outputs() -> None:
    specs = [TensorSpec("scores", (1, 1917, 2), "float32")]
    found = raw_findings({"scores": np.zeros((1, 7), np.float32)}, specs)
    assert checks(found) == {"shape"} and "[1, 7]" in found[0].detail
    found = raw_findings({"scores": np.zeros((1, 1917, 2), np.float64)}, specs)
    assert checks(found) == {"dtype"}
    dynamic = [TensorSpec("scores", (None, 1917, 2), "float32")]
    assert raw_findings({"scores": np.zeros((4, 1917, 2), np.float32)}, dynamic) == []


def test_a_broken_tensor_is_reported_without_decoding_it(tmp_path: Path) -> None:
    runner = open_yolo(tmp_path, yolo_head())
    found = frame_findings({"output0": np.zeros((1, 7), np.float32)}, runner.post,
                           specs=runner.backend.outputs)
    assert "shape" in checks(found)


def test_classifier_probabilities_and_results(tmp_path: Path) -> None:
    runner = open_model(color_classifier(tmp_path / "c.onnx"), options=BackendOptions(threads=1))
    tensor, t = runner.preprocess(np.full((32, 32, 3), (0, 0, 255), np.uint8))
    outputs = runner.infer(tensor)
    assert runner.sanity(outputs, runner.postprocess(outputs, t)) == []
    bad = Result(np.array([0], np.int32), np.array([1.7], np.float32))
    assert checks(result_findings(bad)) == {"score_range"}
    nan_box = Result(np.array([0], np.int32), np.array([0.5], np.float32), np.array([[0, 0, np.nan, 3]], np.float32))
    assert checks(result_findings(nan_box)) == {"non_finite"}


def test_collapsed_score_channels_are_caught_although_boxes_dominate() -> None:
    """The failure this module exists for: box channels (0-64 px) would dominate a whole-tensor
    cosine; compared per channel group, dead scores stand out."""
    ref, cand = OutputStats(), OutputStats()
    for i in range(6):
        head = yolo_head(seed=i)[0].T  # (N, 4+C)
        ref.add({"boxes": head[:, :4], "scores": head[:, 4:]})
        dead = head.copy()
        dead[:, 4:] = 0.0
        cand.add({"boxes": dead[:, :4], "scores": dead[:, 4:]})
        whole_a, whole_b = head.ravel().astype(np.float64), dead.ravel().astype(np.float64)
        assert whole_a @ whole_b / np.linalg.norm(whole_a) / np.linalg.norm(whole_b) > 0.98  # cosine is fooled
    found = compare(ref, cand)
    assert [(f.check, f.where) for f in found] == [("collapsed", "scores")]
    assert "all zero" in found[0].detail and "FP32 spans" in found[0].detail


def test_a_shrunk_range_and_a_model_that_ignores_its_input() -> None:
    ref, shrunk, frozen = OutputStats(), OutputStats(), OutputStats()
    rng = np.random.default_rng(1)
    fixed = rng.uniform(0, 1, 100)
    for _ in range(5):
        s = rng.uniform(0, 1, 100)
        ref.add({"scores": s})
        shrunk.add({"scores": 0.5 + (s - 0.5) * 0.02})
        frozen.add({"scores": fixed})
    assert [f.check for f in compare(ref, shrunk)] == ["range_shrunk"]
    assert compare(ref, ref) == []
    assert [f.check for f in frozen.findings()] == ["constant"]
    assert ref.findings() == []


def test_sanity_error_names_the_findings() -> None:
    err = SanityError("refused", [Finding("non_finite", "scores", "3 of 10 values are not finite")] * 6)
    assert "scores: 3 of 10 values are not finite" in str(err) and "(+2 more)" in str(err)
    assert len(err.findings) == 6
