from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.base import BackendOptions, open_backend
from engines.errors import ModelMismatch
from engines.modelcard import ModelCardError, check_backend, load_card, parse_card
from engines.runner import open_model


def good() -> dict:
    return {
        "v": 1, "name": "m", "task": "classification",
        "input": {"name": "image", "width": 32, "height": 32, "layout": "NCHW"},
        "postprocess": {"kind": "classification", "output": "logits"},
        "labels": ["a", "b", "c"],
    }


@pytest.mark.parametrize("mutate, where", [
    (lambda c: c["input"].update(width=0), "input: width"),
    (lambda c: c["input"].update(layout="CHW"), "input: layout"),
    (lambda c: c["input"].update(mean=[1, 2]), "input: mean"),
    (lambda c: c["input"].update(std=[1, 0, 1]), "input: std"),
    (lambda c: c["input"].update(colour="RGB"), "input: colour"),
    (lambda c: c.update(task="segment"), "task"),
    (lambda c: c.update(labels="a,b"), "labels"),
    (lambda c: c.pop("input"), "input"),
])
def test_bad_cards_name_the_key(mutate, where: str) -> None:
    card = good()
    mutate(card)
    with pytest.raises(ModelCardError, match=where):
        parse_card(card, where="card.json")


def test_load_card_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="not found"):
        load_card(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        load_card(tmp_path / "bad.json")


def test_card_round_trips() -> None:
    card = parse_card(good())
    again = parse_card(card.to_dict())
    assert again.input == card.input and again.labels == card.labels


def test_input_spec_mismatch_is_caught(color_model: Path, tmp_path: Path) -> None:
    backend = open_backend("onnxruntime", color_model, BackendOptions())
    try:
        card = good()
        card["input"]["width"] = 64
        with pytest.raises(ModelMismatch, match=r"axis 3 differs"):
            check_backend(parse_card(card), backend)
        card = good()
        card["input"]["name"] = "pixels"
        with pytest.raises(ModelMismatch, match="no input named 'pixels'"):
            check_backend(parse_card(card), backend)
        card = good()
        card["input"]["layout"] = "NHWC"
        with pytest.raises(ModelMismatch, match="shape"):
            check_backend(parse_card(card), backend)
    finally:
        backend.close()


def test_card_naming_a_missing_output_is_caught(color_model: Path, tmp_path: Path) -> None:
    card = good()
    card["postprocess"]["output"] = "probs"
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    with pytest.raises(ModelMismatch, match="no output"):
        open_model(color_model, card=path)


def yolo_card() -> dict:
    return {"name": "y", "task": "detection", "input": {"name": "images", "width": 64, "height": 64},
            "postprocess": {"kind": "yolo", "output": "output0"}, "labels": ["a"]}


@pytest.mark.parametrize("section, mutate, words", [
    # the typo that once ran silently with the default
    ("postprocess", lambda c: c["postprocess"].update(score_treshold=0.6),
     "card.json: postprocess: score_treshold: unknown key (did you mean score_threshold?)"),
    ("postprocess", lambda c: c.update(task="classification", postprocess={"score_activation": "softmx"}),
     "postprocess: score_activation: must be one of softmax, sigmoid, none, not 'softmx' (did you mean softmax?)"),
    ("postprocess", lambda c: c["postprocess"].update(version="v7"), "postprocess: version: must be one of v5, v8"),
    ("postprocess", lambda c: c["postprocess"].update(score_threshold="0.5"),
     "postprocess: score_threshold: must be a finite number"),
    ("postprocess", lambda c: c["postprocess"].update(iou_threshold=1.5),
     "postprocess: iou_threshold: must be between 0 and 1"),
    ("postprocess", lambda c: c["postprocess"].update(max_detections=0), "postprocess: max_detections: must be"),
    ("postprocess", lambda c: c["postprocess"].pop("output"), "postprocess: output: missing"),
    ("postprocess", lambda c: c["postprocess"].update(kind="yolo8"), "postprocess: kind: must be one of"),
    ("postprocess", lambda c: c["postprocess"].pop("kind"), "postprocess: kind: missing: a detection card names"),
    ("postprocess", lambda c: c.update(task="classification"),
     "postprocess: kind: 'yolo' is not a classification post-processor"),
    ("top", lambda c: c.update(lables=["a"]), "card.json: lables: unknown key (did you mean labels?)"),
    ("top", lambda c: c.update(v=2), "card.json: v: the card format version is 1"),
    ("input", lambda c: c["input"].update(pad_value=300), "input: pad_value: must be at most 255"),
    ("input", lambda c: c["input"].update(resize="crop"), "input: resize: must be one of stretch, letterbox"),
    ("input", lambda c: c["input"].update(scale=True), "input: scale: must be a finite number"),
])
def test_a_card_typo_or_bad_value_is_an_error_naming_the_key(section: str, mutate, words: str) -> None:
    card = yolo_card()
    mutate(card)
    with pytest.raises(ModelCardError) as err:
        parse_card(card, where="card.json")
    assert words in str(err.value)


@pytest.mark.parametrize("post, words", [
    ({"kind": "ssd", "boxes": "b", "scores": "s", "anchors": "a.npy", "background": False},
     "postprocess: background: unknown key (did you mean background_class?) (known for kind 'ssd'"),
    ({"kind": "ssd", "boxes": "b", "scores": "s", "anchors": {"b64": "AA=="}}, "postprocess: anchors: must be"),
    ({"kind": "ssd", "boxes": "b", "scores": "s", "anchors": "a.npy", "box_scales": [10, 10, 5]},
     "postprocess: box_scales: must be a list of 4 positive numbers"),
    ({"kind": "ssd", "boxes": "b", "scores": "s", "anchors": "a.npy", "background_class": "yes"},
     "postprocess: background_class: must be true or false"),
    ({"kind": "yolo_end2end", "output": "o", "iou_threshold": 0.5}, "postprocess: iou_threshold: unknown key"),
    ({"kind": "yolo_end2end", "output": "o", "box_format": "cxcywh"}, "postprocess: box_format: must be one of"),
    ({"kind": "efficient_nms", "boxes": "b", "scores": "s", "classes": "c"}, "postprocess: num_detections: missing"),
])
def test_every_detector_kind_is_strict(post: dict, words: str) -> None:
    card = yolo_card()
    card["postprocess"] = post
    with pytest.raises(ModelCardError) as err:
        parse_card(card, where="card.json")
    assert words in str(err.value)


def test_classification_keys_and_defaults() -> None:
    card = parse_card(good())
    assert card.kind == "classification" and card.option("score_activation") == "softmax"
    assert card.option("top_k") == 5
    bad = good()
    bad["postprocess"]["softmax"] = False
    with pytest.raises(ModelCardError, match="postprocess: softmax: unknown key"):
        parse_card(bad)
    raw = parse_card({"name": "r", "input": {"name": "x", "width": 8, "height": 8}})
    assert raw.task == "raw" and raw.kind == "raw"
    with pytest.raises(ModelCardError, match="postprocess: output: unknown key"):
        parse_card({"name": "r", "input": {"name": "x", "width": 8, "height": 8}, "postprocess": {"output": "y"}})
    # task follows from the kind when left out
    assert parse_card({"name": "d", "input": {"name": "x", "width": 8, "height": 8},
                       "postprocess": {"kind": "yolo", "output": "o"}}).task == "detection"


def test_a_card_file_with_a_typo_does_not_open(tmp_path: Path, color_model: Path) -> None:
    card = json.loads(color_model.with_suffix(".json").read_text())
    card["postprocess"]["top_kk"] = 1
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=r"card\.json: postprocess: top_kk: unknown key \(did you mean top_k\?\)"):
        open_model(color_model, card=path)


def test_the_demo_card_is_valid(demo_model: Path) -> None:
    card = load_card(demo_model.with_suffix(".json"))
    assert card.kind == "ssd" and card.option("score_threshold") == 0.3 and card.option("box_scales") == [10, 10, 5, 5]
