from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines.errors import ModelMismatch
from engines.modelcard import ModelCardError, parse_card
from engines.postprocess import FrameTransform, SSDPost, batched_nms, make_postprocessor, nms
from engines.runner import open_model
from onnx_models import constant_head

IDENTITY = FrameTransform(64, 64, 1.0, 1.0)


def test_nms_keeps_best_of_overlapping_and_separate_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    assert nms(boxes, scores, 0.5, 100).tolist() == [3, 2]
    assert nms(boxes, scores, 0.5, 1).tolist() == [3]
    # a different class is never suppressed by another class's box
    keep = batched_nms(boxes, scores, np.array([0, 1, 0, 0]), 0.5, 100)
    assert sorted(keep.tolist()) == [1, 2, 3]


def test_nms_matches_brute_force_on_random_boxes() -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (200, 2))
    wh = rng.uniform(5, 30, (200, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 200).astype(np.float32)
    got = nms(boxes, scores, 0.45, 1000).tolist()

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    want: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(iou(boxes[i], boxes[j]) <= 0.45 for j in want):
            want.append(int(i))
    assert got == want


def ssd_card(tmp_path: Path, anchors: np.ndarray, **post: object) -> SSDPost:
    np.save(tmp_path / "anchors.npy", anchors)
    card = parse_card({
        "name": "ssd", "task": "detection",
        "input": {"name": "x", "width": 100, "height": 200},
        "postprocess": {"kind": "ssd", "boxes": "b", "scores": "s", "anchors": "anchors.npy",
                        "score_threshold": 0.5, **post},
        "labels": ["person"],
    }, base_dir=tmp_path)
    post_ = make_postprocessor(card)
    assert isinstance(post_, SSDPost)
    return post_


def test_ssd_decodes_tf_box_coder(tmp_path: Path) -> None:
    # anchors (yc, xc, h, w) normalised
    anchors = np.array([[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.1, 0.1]], np.float32)
    post = ssd_card(tmp_path, anchors)
    enc = np.zeros((1, 2, 1, 4), np.float32)
    enc[0, 0, 0] = [1.0, -2.0, 5 * np.log(2.0), 0.0]  # shift y by 0.1*h, x by -0.2*w, double h
    scores = np.array([[[-5, 3.0], [-5, -3.0]]], np.float32)  # logits; column 0 is background
    r = post({"b": enc, "s": scores}, FrameTransform(50, 100, 2.0, 2.0))  # frame is half the input size
    assert r.class_ids.tolist() == [0]
    assert r.scores[0] == pytest.approx(1 / (1 + np.exp(-3.0)), rel=1e-6)
    yc, xc, h, w = 0.5 + 0.1 * 0.2, 0.5 - 0.2 * 0.4, 0.4, 0.4
    want = np.array([(xc - w / 2) * 100, (yc - h / 2) * 200, (xc + w / 2) * 100, (yc + h / 2) * 200]) / 2
    assert r.boxes is not None
    np.testing.assert_allclose(r.boxes[0], want, rtol=1e-5)


def test_ssd_rejects_anchor_count_mismatch(tmp_path: Path) -> None:
    post = ssd_card(tmp_path, np.zeros((3, 4), np.float32))
    from engines.errors import ModelMismatch
    with pytest.raises(ModelMismatch, match="anchors"):
        post({"b": np.zeros((1, 2, 4), np.float32), "s": np.zeros((1, 2, 2), np.float32)}, IDENTITY)


def test_ssd_bad_anchor_file_is_a_card_error(tmp_path: Path) -> None:
    (tmp_path / "anchors.npy").write_text("nope")
    card = parse_card({"name": "ssd", "input": {"name": "x", "width": 8, "height": 8},
                       "postprocess": {"kind": "ssd", "boxes": "b", "scores": "s", "anchors": "anchors.npy"}},
                      base_dir=tmp_path)
    with pytest.raises(ModelCardError, match="anchors"):
        make_postprocessor(card)


def yolo_v8_head() -> np.ndarray:
    # (1, 4+2, 4): two overlapping class-0 boxes, one class-1 box, one below threshold
    cols = np.array([
        [20, 20, 10, 10, 0.9, 0.1],
        [21, 21, 10, 10, 0.8, 0.1],
        [40, 40, 8, 16, 0.05, 0.7],
        [10, 50, 4, 4, 0.1, 0.1],
    ], np.float32)
    return cols.T[None]


def test_yolo_v8_through_a_real_model(tmp_path: Path) -> None:
    path = constant_head(tmp_path / "y8.onnx", yolo_v8_head(), name="y8",
                         postprocess={"kind": "yolo", "version": "v8", "output": "output0",
                                      "score_threshold": 0.25, "iou_threshold": 0.45},
                         labels=["person", "car"])
    runner = open_model(path)
    try:
        # 128x64 frame letterboxed into 64x64: scale 0.5, 16 px padding top and bottom
        r = runner.run(np.zeros((64, 128, 3), np.uint8))
    finally:
        runner.close()
    assert r.class_ids.tolist() == [0, 1]
    assert r.scores.tolist() == pytest.approx([0.9, 0.7])
    assert r.boxes is not None
    np.testing.assert_allclose(r.boxes[0], [30, 0, 50, 18], atol=1e-4)  # (15..25, 15..25) -> frame
    np.testing.assert_allclose(r.boxes[1], [72, 32, 88, 64], atol=1e-4)


def test_yolo_v5_multiplies_objectness(tmp_path: Path) -> None:
    rows = np.array([[[32, 32, 10, 10, 0.5, 0.9, 0.2], [10, 10, 4, 4, 0.2, 0.9, 0.9]]], np.float32)
    path = constant_head(tmp_path / "y5.onnx", rows, name="y5",
                         postprocess={"kind": "yolo", "version": "v5", "output": "output",
                                      "score_threshold": 0.3},
                         labels=["a", "b"])
    runner = open_model(path)
    try:
        r = runner.run(np.zeros((64, 64, 3), np.uint8))
    finally:
        runner.close()
    assert r.class_ids.tolist() == [0] and r.scores[0] == pytest.approx(0.45)


def test_unknown_postprocessor_kind_is_refused_when_the_card_is_read() -> None:
    with pytest.raises(ModelCardError, match=r"postprocess: kind: must be one of .*not 'segmentation'"):
        parse_card({"name": "m", "input": {"name": "x", "width": 8, "height": 8},
                    "postprocess": {"kind": "segmentation"}})


def test_inline_anchors_equal_the_file(tmp_path: Path) -> None:
    from engines.postprocess import inline_array, load_array

    anchors = np.random.default_rng(0).uniform(0, 1, (7, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", anchors)
    inline = inline_array(anchors)
    np.testing.assert_array_equal(load_array(inline, tmp_path, "x"), load_array("a.npy", tmp_path, "x"))
    with pytest.raises(ModelCardError, match="bad inline array"):
        load_array({**inline, "shape": [3, 4]}, tmp_path, "x")


def _card_for(model: Path, post: dict, resize: str = "letterbox") -> Path:
    card = {"name": model.stem, "task": "detection",
            "input": {"name": "images", "width": 64, "height": 64, "resize": resize},
            "postprocess": post, "labels": ["a", "b", "c"]}
    path = model.with_suffix(".json")
    path.write_text(json.dumps(card))
    return path


def test_yolo_end2end_rows_through_a_real_model(tmp_path: Path) -> None:
    from card_models import end2end_yolo

    model = end2end_yolo(tmp_path / "e2e.onnx")
    runner = open_model(model, card=_card_for(model, {"kind": "yolo_end2end", "output": "output0"}))
    try:
        # 128x64 frame letterboxed into 64x64: scale 0.5, 16 px of padding above and below
        r = runner.run(np.zeros((64, 128, 3), np.uint8))
        groups = runner.post.groups(runner.infer(runner.preprocess(np.zeros((64, 64, 3), np.uint8))[0]))
    finally:
        runner.close()
    assert r.class_ids.tolist() == [2, 0] and r.scores.tolist() == pytest.approx([0.9, 0.6])  # 0.1 under 0.25
    assert r.boxes is not None
    np.testing.assert_allclose(r.boxes[0], [20, 0, 60, 48], atol=1e-4)  # (10,12,30,40) -> frame, y clipped
    np.testing.assert_allclose(r.boxes[1], [80, 48, 120, 64], atol=1e-4)
    assert groups["detection_scores"].shape == (300,) and groups["detected_boxes_xywh"].shape == (2, 4)


def test_yolo_end2end_xywh_and_limits() -> None:
    from card_models import end2end_rows

    card = parse_card({"name": "e", "input": {"name": "x", "width": 64, "height": 64},
                       "postprocess": {"kind": "yolo_end2end", "output": "o", "box_format": "xywh",
                                       "score_threshold": 0.05, "max_detections": 2}})
    rows = end2end_rows()
    rows[0, 0, :4] = [20, 26, 20, 28]  # the same box as 10,12,30,40 as centre and size
    r = make_postprocessor(card)({"o": rows}, IDENTITY)
    assert len(r) == 2 and r.scores.tolist() == pytest.approx([0.9, 0.6])  # best two of three
    assert r.boxes is not None
    np.testing.assert_allclose(r.boxes[0], [10, 12, 30, 40])
    with pytest.raises(ModelMismatch, match=r"has shape \[1, 300, 4\]; yolo_end2end reads"):
        make_postprocessor(card)({"o": rows[:, :, :4]}, IDENTITY)


def test_efficient_nms_reads_only_num_detections_rows(tmp_path: Path) -> None:
    from card_models import efficient_nms_model

    model = efficient_nms_model(tmp_path / "nms.onnx")
    post = {"kind": "efficient_nms", "num_detections": "num_dets", "boxes": "det_boxes", "scores": "det_scores",
            "classes": "det_classes"}
    runner = open_model(model, card=_card_for(model, post, resize="stretch"))
    try:
        r = runner.run(np.zeros((64, 64, 3), np.uint8))
    finally:
        runner.close()
    # row 3 (score 0.99, the whole frame) lies past num_dets = 3 and is never read
    assert r.class_ids.tolist() == [2, 0, 1] and r.scores.tolist() == pytest.approx([0.9, 0.6, 0.3])
    assert r.boxes is not None
    np.testing.assert_allclose(r.boxes, [[10, 12, 30, 40], [40, 40, 60, 60], [1, 1, 9, 9]])


def test_efficient_nms_yxyx_normalized_and_threshold() -> None:
    from card_models import efficient_nms_outputs

    out = efficient_nms_outputs()
    out["det_boxes"][0, :3] = out["det_boxes"][0, :3][:, [1, 0, 3, 2]] / 64.0  # TF style: y first, fractions
    card = parse_card({"name": "e", "input": {"name": "x", "width": 64, "height": 64},
                       "postprocess": {"kind": "efficient_nms", "num_detections": "num_dets", "boxes": "det_boxes",
                                       "scores": "det_scores", "classes": "det_classes", "box_format": "yxyx",
                                       "normalized": True, "score_threshold": 0.5}})
    post = make_postprocessor(card)
    r = post(out, IDENTITY)
    assert r.class_ids.tolist() == [2, 0] and r.boxes is not None
    np.testing.assert_allclose(r.boxes, [[10, 12, 30, 40], [40, 40, 60, 60]], atol=1e-4)
    g = post.groups(out)
    assert g["detection_scores"].tolist() == pytest.approx([0.9, 0.6, 0.3])
    out["num_dets"] = np.array([[0]], np.int32)
    assert len(post(out, IDENTITY)) == 0


def test_post_nms_scores_of_an_empty_scene_are_not_a_constant_model() -> None:
    from engines.sanity import OutputStats, group_findings

    stats = OutputStats()
    for _ in range(3):
        stats.add({"detection_scores": np.zeros(300, np.float32), "scores": np.zeros(10, np.float32)})
    found = {(f.check, f.where) for f in stats.findings()}
    assert ("constant", "scores") in found and ("constant", "detection_scores") not in found
    # still range-checked
    assert [f.check for f in group_findings({"detection_scores": np.array([0.5, 3.0])})] == ["score_range"]
