"""`jetagent card init`: a card derived from the model itself, checked against hand-written
cards on real frames, and every guess said with why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from card_models import (
    COLOURS,
    colour_yolo,
    dynamic_text_detector,
    efficient_nms_model,
    end2end_yolo,
    hand_card_for_colour_yolo,
    probability_classifier,
    two_input_model,
    yolov5_model,
)
from conftest import ROOT, write_video
from engines.cardinit import CardInitError, card_for, derive_card
from engines.errors import ModelMismatch
from engines.modelcard import ModelCardError, load_card, parse_card
from engines.runner import open_model


def jetagent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def squares_video(path: Path, n: int = 12, size: tuple[int, int] = (320, 240)) -> Path:
    """Coloured squares moving over a dark frame (BGR, as OpenCV delivers), written as a real
    MJPG file: what a camera gives, not what the model was built around."""
    w, h = size
    frames = []
    for i in range(n):
        f = np.full((h, w, 3), 10, np.uint8)
        cv2.rectangle(f, (20 + 8 * i, 30), (90 + 8 * i, 100), (0, 0, 255), -1)  # red
        cv2.rectangle(f, (180, 60 + 5 * i), (260, 140 + 5 * i), (255, 0, 0), -1)  # blue
        cv2.circle(f, (120, 180), 30 + i, (0, 255, 0), -1)  # green
        frames.append(f)
    return write_video(path, frames)


def read_back(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    assert frames
    return frames


def detections(model: Path, card: Path, frames: list[np.ndarray]) -> list[list[dict]]:
    runner = open_model(model, card=card)
    try:
        return [runner.run(f).to_json(runner.card.labels) for f in frames]
    finally:
        runner.close()


def test_card_init_on_an_ultralytics_export_detects_what_the_hand_written_card_does(tmp_path: Path) -> None:
    model = colour_yolo(tmp_path / "yolo.onnx")  # dynamic H/W, metadata imgsz 160, names, stride 32, task detect
    proc = jetagent("card", "init", str(model))
    assert proc.returncode == 0, proc.stderr
    derived = model.with_suffix(".json")
    assert f"wrote {derived}" in proc.stdout and "every value read from the model" in proc.stdout
    for words in ("Ultralytics metadata imgsz", "a multiple of its stride 32", "letterbox", "3 names from",
                  "(1, 4+C, N)", "checked: one inference"):
        assert words in proc.stdout, proc.stdout
    card = json.loads(derived.read_text())
    assert card["labels"] == COLOURS and card["postprocess"] == {"kind": "yolo", "version": "v8", "output": "output0"}

    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps(hand_card_for_colour_yolo()))
    frames = read_back(squares_video(tmp_path / "squares.avi"))
    mine, theirs = detections(model, derived, frames), detections(model, hand, frames)
    assert sum(len(d) for d in theirs) >= 3 * len(frames)  # every square is found, every frame
    assert {d["label"] for frame in theirs for d in frame} == set(COLOURS)
    assert mine == theirs

    # ...and the comparison can fail: the same card with the colours swapped sees other objects
    swapped = hand_card_for_colour_yolo()
    swapped["input"]["color"] = "BGR"
    wrong = tmp_path / "bgr.json"
    wrong.write_text(json.dumps(swapped))
    assert detections(model, wrong, frames) != theirs


def test_the_demo_ssd_card_is_derived_from_the_model(demo_model: Path) -> None:
    d = derive_card(demo_model)
    assert d.unambiguous, d.lines()
    card = parse_card(d.card, base_dir=demo_model.parent)
    demo = load_card(demo_model.with_suffix(".json"))
    assert card.input == demo.input  # NHWC 300x300 RGB, [-1, 1], stretch
    assert card.kind == "ssd" and card.option("boxes") == "concat:0" and card.option("scores") == "concat_1:0"
    assert card.option("anchors") == "person-ssdlite.anchors.npy" and card.option("score_activation") == "sigmoid"
    assert any("TF Object Detection API" in g.why for g in d.guesses)


@pytest.mark.parametrize("make, kind, extra", [
    (end2end_yolo, "yolo_end2end", {"output": "output0"}),
    (efficient_nms_model, "efficient_nms", {"num_detections": "num_dets", "boxes": "det_boxes",
                                            "scores": "det_scores", "classes": "det_classes"}),
    (yolov5_model, "yolo", {"version": "v5", "output": "output0"}),
])
def test_detector_kinds_follow_from_the_outputs(tmp_path: Path, make, kind: str, extra: dict) -> None:
    model = make(tmp_path / f"{kind}.onnx")
    d = derive_card(model)
    post = d.card["postprocess"]
    assert post["kind"] == kind and {k: post[k] for k in extra} == extra
    assert d.card["task"] == "detection"
    why = next(g.why for g in d.guesses if g.key == "postprocess.kind")
    assert {"yolo_end2end": "NMS inside", "efficient_nms": "EfficientNMS", "yolo": "N = 252: v5"}[kind] in why
    # and the card runs: one inference through its preprocessing and post-processor
    path = tmp_path / "card.json"
    path.write_text(json.dumps(d.card))
    from engines.modelcheck import check_model

    runner = open_model(model, card=path)
    try:
        assert check_model(runner).detections >= 1
    finally:
        runner.close()


def test_efficient_nms_without_metadata_says_its_colour_guesses(tmp_path: Path) -> None:
    d = derive_card(efficient_nms_model(tmp_path / "nms.onnx"))
    assert not d.unambiguous
    doubts = {g.key for g in d.doubts}
    assert {"input.color", "input.scale", "input.resize"} <= doubts
    assert any(line.startswith("? input.color") for line in d.lines())


def test_a_classifier_that_outputs_probabilities_gets_no_second_softmax(tmp_path: Path) -> None:
    d = derive_card(probability_classifier(tmp_path / "cls.onnx"))
    post = d.card["postprocess"]
    assert post["kind"] == "classification" and post["score_activation"] == "none"
    assert d.card["input"]["width"] == 192 and d.card["input"]["height"] == 48
    assert "Softmax node" in next(g.why for g in d.guesses if g.key == "postprocess.score_activation")


def test_a_classifier_of_logits_gets_softmax(color_model: Path) -> None:
    d = derive_card(color_model)
    assert d.card["postprocess"]["score_activation"] == "softmax"
    assert not d.unambiguous  # (1, 3) could be an embedding; its exporter is unknown


def test_dynamic_hw_without_metadata_is_a_guess_until_size_is_given(tmp_path: Path) -> None:
    model = dynamic_text_detector(tmp_path / "det.onnx")
    d = derive_card(model)
    assert d.card["task"] == "raw" and d.card["input"]["width"] == 640
    assert {"input.width", "input.height"} <= {g.key for g in d.doubts}
    sized = derive_card(model, size=(320, 192))
    assert (sized.card["input"]["width"], sized.card["input"]["height"]) == (320, 192)
    assert "input.width" not in {g.key for g in sized.doubts}
    assert sized.card["input"]["color"] == "BGR"  # PaddleOCR's convention, said as a guess
    assert "input.color" in {g.key for g in sized.doubts}


def test_a_size_off_the_models_stride_is_refused(tmp_path: Path) -> None:
    model = colour_yolo(tmp_path / "yolo.onnx")
    with pytest.raises(CardInitError, match="width 300 and height 300 not a multiple of the model's stride 32"):
        derive_card(model, size=(300, 300))
    fixed = colour_yolo(tmp_path / "fixed.onnx", dynamic=False)
    with pytest.raises(CardInitError, match="is fixed at 160x160"):
        derive_card(fixed, size=(320, 320))


def test_models_the_camera_pipeline_cannot_feed(tmp_path: Path) -> None:
    d = derive_card(two_input_model(tmp_path / "two.onnx"))
    assert "scale_factor" in next(g.why for g in d.doubts if g.key == "input.name")
    proc = jetagent("card", "init", str(tmp_path / "two.onnx"))
    assert proc.returncode == 2 and "needs inputs the camera pipeline does not provide: scale_factor" in proc.stderr
    assert not (tmp_path / "two.json").exists()


def test_card_for_uses_the_card_beside_else_a_certain_derivation(tmp_path: Path, color_model: Path) -> None:
    card, note = card_for(color_model)
    assert note is None and card.name == "color-classifier"
    model = colour_yolo(tmp_path / "yolo.onnx")
    card, note = card_for(model)
    assert note is not None and "using the card derived from the model" in note and card.kind == "yolo"
    nms = efficient_nms_model(tmp_path / "nms.onnx")
    with pytest.raises(ModelCardError, match=r"not certain \(input.color: .*jetagent card init"):
        card_for(nms)
    with pytest.raises(ModelCardError, match="not found"):
        card_for(model, tmp_path / "missing.json")  # a card named explicitly must exist


def test_card_init_cli_writes_refuses_to_overwrite_and_prints(tmp_path: Path) -> None:
    model = end2end_yolo(tmp_path / "e2e.onnx")
    assert jetagent("card", "init", str(model)).returncode == 0
    again = jetagent("card", "init", str(model))
    assert again.returncode == 2 and "exists; --force" in again.stderr
    assert jetagent("card", "init", str(model), "--force", "--name", "e2e-model").returncode == 0
    assert load_card(model.with_suffix(".json")).name == "e2e-model"
    printed = jetagent("card", "init", str(model), "--out", "-")
    assert printed.returncode == 0 and json.loads(printed.stdout)["postprocess"]["kind"] == "yolo_end2end"
    assert "yolo_end2end" in printed.stderr and "checked:" in printed.stderr
    out = tmp_path / "elsewhere" / "card.json"
    out.parent.mkdir()
    assert jetagent("card", "init", str(model), "--out", str(out)).returncode == 0 and out.is_file()
    bad = jetagent("card", "init", str(tmp_path / "det.onnx"))
    assert bad.returncode == 2 and "model file not found" in bad.stderr


def test_card_init_with_a_size_the_model_cannot_run_writes_nothing(tmp_path: Path) -> None:
    model = colour_yolo(tmp_path / "yolo.onnx", metadata=False)  # no stride in the metadata: it must run to tell
    proc = jetagent("card", "init", str(model), "--size", "304x304")
    assert proc.returncode == 2, proc.stderr
    assert "does not run on the card's 304x304 input" in proc.stderr and "Concat" in proc.stderr
    assert not model.with_suffix(".json").exists()


def test_the_derived_card_is_refused_by_check_model_when_labels_do_not_match(tmp_path: Path) -> None:
    from engines.modelcheck import check_model

    model = colour_yolo(tmp_path / "yolo.onnx")
    card = hand_card_for_colour_yolo()
    card["labels"] = ["red", "green"]
    path = tmp_path / "two-labels.json"
    path.write_text(json.dumps(card))
    runner = open_model(model, card=path)
    try:
        with pytest.raises(ModelMismatch, match="the card has 2 labels, the outputs carry 3 classes"):
            check_model(runner)
    finally:
        runner.close()


def test_a_tf_object_detection_api_export_reads_as_efficient_nms_yxyx_normalized(tmp_path: Path) -> None:
    from card_models import _constant

    k = 10
    boxes = np.zeros((1, k, 4), np.float32)
    boxes[0, 0] = [0.1, 0.2, 0.5, 0.6]  # y1, x1, y2, x2 as fractions
    scores = np.zeros((1, k), np.float32)
    scores[0, 0] = 0.8
    heads = {"detection_boxes": boxes, "detection_scores": scores,
             "detection_classes": np.ones((1, k), np.float32), "num_detections": np.array([1.0], np.float32)}
    model = _constant(tmp_path / "tfod.onnx", heads, name="tfod", producer="tf2onnx")
    d = derive_card(model)
    post = d.card["postprocess"]
    assert post == {"kind": "efficient_nms", "num_detections": "num_detections", "boxes": "detection_boxes",
                    "scores": "detection_scores", "classes": "detection_classes", "box_format": "yxyx",
                    "normalized": True}
    path = tmp_path / "tfod.json"
    path.write_text(json.dumps(d.card))
    runner = open_model(model, card=path)
    try:
        r = runner.run(np.zeros((64, 64, 3), np.uint8))
    finally:
        runner.close()
    assert r.boxes is not None
    np.testing.assert_allclose(r.boxes, [[0.2 * 64, 0.1 * 64, 0.6 * 64, 0.5 * 64]], atol=1e-4)
