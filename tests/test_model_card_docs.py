"""docs/model-card.md and docs/schemas/card.schema.json against the loader: every key documented
with its default, every example valid for both the schema and parse_card, the schema file
what engines.cardspec generates, and the schema as strict as the loader on typos."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from conftest import ROOT
from engines.cardspec import INPUT_KEYS, KINDS, POSTPROCESS_KEYS, TOP_KEYS, Key, schema_text
from engines.modelcard import ModelCardError, parse_card

DOC = ROOT / "docs" / "model-card.md"
SCHEMA = ROOT / "docs" / "schemas" / "card.schema.json"


def sections() -> dict[str, str]:
    """Markdown text by heading (## or ###), backticks dropped from the heading."""
    out: dict[str, str] = {}
    current = ""
    for line in DOC.read_text().splitlines():
        m = re.match(r"^#{2,3} (.+)$", line)
        if m:
            current = m.group(1).replace("`", "").strip()
            out[current] = ""
        else:
            out[current] = out.get(current, "") + line + "\n"
    return out


def examples() -> list[dict]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", DOC.read_text(), re.S)]


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_schema_file_is_what_the_key_table_generates() -> None:
    assert SCHEMA.read_text() == schema_text(), \
        "regenerate it: python -m engines.cardspec > docs/schemas/card.schema.json"


@pytest.mark.parametrize("section, keys", [("Top-level keys", TOP_KEYS), ("input", INPUT_KEYS),
                                           *[(kind, keys) for kind, keys in POSTPROCESS_KEYS.items()]])
def test_every_key_is_documented_with_its_default(section: str, keys: tuple[Key, ...]) -> None:
    text = sections()[section]
    for key in keys:
        row = next((ln for ln in text.splitlines() if ln.startswith(f"| `{key.name}` |")), None)
        assert row is not None, f"docs/model-card.md, section {section}: no row for {key.name}"
        default = re.split(r"(?<!\\)\|", row)[3].strip()
        if key.required:
            assert default == "required", row
        elif key.default is not None:
            assert default.startswith(f"`{json.dumps(key.default)}`"), row
        for choice in key.choices:
            assert f"`{choice}`" in row, row


def test_every_kind_has_an_example_and_every_example_is_valid_for_schema_and_loader() -> None:
    v = validator()
    seen = set()
    for card in examples():
        errors = [e.message for e in v.iter_errors(card)]
        assert not errors, (card["name"], errors)
        parsed = parse_card(card, where=card["name"])
        seen.add(parsed.kind)
        if parsed.kind == "yolo":
            seen.add(f"yolo-{parsed.option('version')}")
    assert seen >= {*KINDS, "yolo-v5", "yolo-v8"}


def test_the_demo_card_is_the_ssd_example_and_valid() -> None:
    demo = json.loads((ROOT / "models" / "person-ssdlite.json").read_text())
    assert not list(validator().iter_errors(demo))
    assert demo in examples()


@pytest.mark.parametrize("mutate", [
    lambda c: c["postprocess"].update(score_treshold=0.5),
    lambda c: c["input"].update(colour="RGB"),
    lambda c: c.update(lables=[]),
    lambda c: c["postprocess"].update(kind="yolo8"),
    lambda c: c["input"].update(resize="crop"),
    lambda c: c.update(task="classification"),
    lambda c: c["postprocess"].pop("output"),
    lambda c: c["postprocess"].update(iou_threshold=2),
])
def test_schema_and_loader_both_refuse_the_same_mistakes(mutate) -> None:
    card = next(c for c in examples() if c["name"] == "yolov8n")
    mutate(card)
    assert list(validator().iter_errors(card)), card
    with pytest.raises(ModelCardError):
        parse_card(card)


def test_a_detection_card_without_its_detector_is_refused_by_both() -> None:
    card = {"name": "d", "task": "detection", "input": {"name": "x", "width": 8, "height": 8}}
    assert list(validator().iter_errors(card))
    with pytest.raises(ModelCardError, match="postprocess: kind: missing"):
        parse_card(card)


def test_every_card_the_tests_and_scripts_write_is_valid_for_the_schema(tmp_path: Path) -> None:
    from card_models import hand_card_for_colour_yolo
    from onnx_models import color_card_json

    v = validator()
    for card in (hand_card_for_colour_yolo(), json.loads(color_card_json())):
        assert not list(v.iter_errors(card)), card
