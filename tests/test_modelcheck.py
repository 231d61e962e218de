"""engines.modelcheck: one real inference with the card before a model is trusted, at
--check-config, start-up, bench and push; each failure one specific error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_cli import assert_one_line_error, jetagent, write_config

from card_models import _constant, colour_yolo, hand_card_for_colour_yolo, probability_classifier
from engines.errors import ModelMismatch
from engines.modelcheck import check_model
from engines.runner import open_model


def card_file(tmp_path: Path, card: dict, name: str = "card.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(card))
    return path


def check(model: Path, card: Path) -> str:
    runner = open_model(model, card=card)
    try:
        check_model(runner)
    except ModelMismatch as exc:
        return str(exc)
    finally:
        runner.close()
    return ""


def yolo_at(size: int) -> dict:
    card = hand_card_for_colour_yolo()
    card["input"].update(width=size, height=size)
    return card


def test_a_card_off_the_stride_is_refused_by_the_metadata(tmp_path: Path) -> None:
    model = colour_yolo(tmp_path / "yolo.onnx")
    err = check(model, card_file(tmp_path, yolo_at(300)))
    assert "the card's input 300x300 is not a multiple of the model's stride 32" in err and "288x288" in err
    assert check(model, card_file(tmp_path, yolo_at(320), "ok.json")) == ""


def test_without_metadata_the_inference_itself_tells_and_the_error_says_what_runs(tmp_path: Path) -> None:
    model = colour_yolo(tmp_path / "yolo.onnx", metadata=False)
    err = check(model, card_file(tmp_path, yolo_at(300)))
    assert "does not run on the card's 300x300 input ([1, 3, 300, 300])" in err and "Concat" in err
    assert "it runs at 288x288" in err and "multiples of 32" in err


def test_check_config_and_start_up_refuse_it(tmp_path: Path, color_video: Path) -> None:
    model = colour_yolo(tmp_path / "yolo.onnx", metadata=False)
    card_file(tmp_path, yolo_at(300), "yolo.json")
    cfg = write_config(tmp_path, model, str(color_video))
    assert_one_line_error(jetagent("run", "--config", str(cfg), "--check-config"),
                          "camera front:", "does not run on the card's 300x300 input", "288x288")
    # and the daemon itself: no camera loop logging an ONNX Runtime error every frame, then exit 0
    assert_one_line_error(jetagent("run", "--config", str(cfg), "--duration", "5"), "300x300")
    card_file(tmp_path, yolo_at(320), "yolo.json")
    ok = jetagent("run", "--config", str(cfg), "--check-config")
    assert ok.returncode == 0 and "config OK" in ok.stdout, ok.stderr


def test_a_second_softmax_over_probabilities_is_refused(tmp_path: Path) -> None:
    model = probability_classifier(tmp_path / "cls.onnx")
    card = {"name": "cls", "input": {"name": "x", "width": 192, "height": 48, "color": "BGR", "scale": 1 / 255,
                                     "mean": 0.5, "std": 0.5},
            "postprocess": {"kind": "classification", "output": "probs"}, "labels": ["0", "180"]}
    err = check(model, card_file(tmp_path, card))
    assert "already holds probabilities" in err and 'score_activation to "none"' in err
    card["postprocess"]["score_activation"] = "none"
    assert check(model, card_file(tmp_path, card, "ok.json")) == ""


def test_a_second_sigmoid_over_ssd_probabilities_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    heads = {"boxes": rng.normal(0, 1, (1, 64, 1, 4)).astype(np.float32),
             "scores": rng.uniform(0, 1, (1, 64, 2)).astype(np.float32)}
    model = _constant(tmp_path / "ssd.onnx", heads, name="ssd", size=32)
    np.save(tmp_path / "anchors.npy", rng.uniform(0.2, 0.8, (64, 4)).astype(np.float32))
    card = {"name": "ssd", "input": {"name": "images", "width": 32, "height": 32},
            "postprocess": {"kind": "ssd", "boxes": "boxes", "scores": "scores", "anchors": "anchors.npy"},
            "labels": ["thing"]}
    assert "applies sigmoid again" in check(model, card_file(tmp_path, card))
    card["postprocess"]["score_activation"] = "none"
    assert check(model, card_file(tmp_path, card, "ok.json")) == ""
    card["labels"] = ["a", "b"]
    assert "the card has 2 labels, the outputs carry 1 classes" in check(model, card_file(tmp_path, card, "l.json"))


def test_nan_outputs_and_scores_outside_0_1_are_refused(tmp_path: Path) -> None:
    head = np.zeros((1, 7, 16), np.float32)
    head[0, 4, 3] = np.nan
    model = _constant(tmp_path / "nan.onnx", {"output0": head}, name="nan")
    card = hand_card_for_colour_yolo(64)
    assert "not finite" in check(model, card_file(tmp_path, card))
    head[0, 4, 3] = 7.5  # logits where the v8 head gives probabilities
    model = _constant(tmp_path / "logits.onnx", {"output0": head}, name="logits")
    assert "outside [0, 1] after activation" in check(model, card_file(tmp_path, card, "l.json"))


def test_a_post_processor_that_cannot_read_the_outputs(tmp_path: Path) -> None:
    model = _constant(tmp_path / "flat.onnx", {"output0": np.zeros((1, 10), np.float32)}, name="flat")
    card = hand_card_for_colour_yolo(64)
    assert "a YOLOv8 head is (1, 4+C, N)" in check(model, card_file(tmp_path, card))
