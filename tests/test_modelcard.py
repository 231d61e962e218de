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
