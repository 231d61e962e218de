"""`jetagent bench --precision fp32,int8 --calib-video` and `jetagent calibrate`, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from calib_models import blob_frames, colour_frames, conv_classifier
from calibration.dataset import CalibrationStore
from conftest import write_video
from engines.modelcard import load_card


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    return conv_classifier(folder / "cls.onnx"), write_video(folder / "colours.avi", colour_frames(40, size=64))


def test_bench_compares_each_candidate_with_fp32(classifier: tuple[Path, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model, video = classifier
    code = main(["bench", str(model), "--precision", "fp32,int8,fp16", "--calib-video", str(video), "--json",
                 "--calib-frames", "8", "--holdout-frames", "6", "--threads", "1", "--rounds", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)  # nothing but JSON on stdout, quantizer chatter included
    rows = {r["name"]: r for r in report["candidates"]}
    int8 = [r for r in rows.values() if r["precision"] == "int8"]
    assert int8 and "fp32-opt-all" in rows
    for row in [*int8, rows["fp32-opt-all"]]:
        assert set(row["latency_ms"]) == {"p50", "p90", "p99", "mean"}
        assert row["metric"] == "top1_agreement" and row["passed"] == (row["value"] >= 0.95)
        assert row["options"]["graph_optimization"] in ("all", "basic") and "speedup_vs_fp32" in row
    assert int8[0]["profile"]["activations"] == "u8"
    assert rows["fp16"]["status"] == "unavailable" and "no fp16 path" in rows["fp16"]["error"]
    assert report["served"] in rows and report["reason"]
    assert report["calibration"]["calibration_frames"] == 8 and report["calibration"]["holdout_frames"] == 6
    assert report["bound"] == {"metric": "top1_agreement", "minimum": 0.95}

    assert main(["bench", str(model), "--precision", "fp32,int8", "--calib-video", str(video), "--calib-frames", "8",
                 "--holdout-frames", "6", "--threads", "1", "--rounds", "3", "--warmup", "1"]) == 0
    table = capsys.readouterr().out
    assert "gate would serve" in table and "<- serves" in table and "top1_agreement" in table


def test_bench_int8_needs_frames_to_calibrate_on(classifier: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = classifier
    assert main(["bench", str(model), "--precision", "fp32,int8"]) == 2
    assert "needs --calib-video FILE" in capsys.readouterr().err
    assert main(["bench", str(model), "--precision", "int4"]) == 2


def test_calibrate_collects_a_set_from_the_configured_camera(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = conv_classifier(tmp_path / "cls.onnx")
    write_video(tmp_path / "street.avi", blob_frames(60, size=64, blobs=6, seed=2))
    config = tmp_path / "agent.toml"
    config.write_text(f"""
device_id = "cal-01"
state_dir = "state"
[results]
output = "none"
[[cameras]]
name = "street"
source = "street.avi"
model = "{model.name}"
pace = "fast"
[[cameras]]
name = "yard"
source = "street.avi"
model = "{model.name}"
pace = "fast"
""")
    code = main(["calibrate", "--config", str(config), "--frames", "8", "--camera", "street", "--interval", "0",
                 "--json"])
    assert code == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert (result["camera"], result["calibration"], result["holdout"]) == ("street", 6, 2)
    assert result["reservoir"]["accepted"] >= 8
    stored = CalibrationStore(tmp_path / "state" / "calibration").latest(load_card(model.with_suffix(".json")).input)
    assert stored is not None and stored.content_hash == result["sha256"]
    assert {s["camera"] for s in stored.sources} == {"street"}

    assert main(["calibrate", "--config", str(config), "--frames", "8", "--camera", "gate"]) == 2
    assert "no such camera" in capsys.readouterr().err
