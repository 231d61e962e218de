"""`jetagent bench MODEL.onnx` with no card, through the real entry point: the backend alone on
generated inputs of the model's own shapes, --shapes for dynamic dims (trtexec's spelling)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, jetagent

from agent.bench_raw import ShapeError, parse_shapes, resolve_shapes
from card_models import (
    colour_yolo,
    dynamic_text_detector,
    efficient_nms_model,
    end2end_yolo,
    hand_card_for_colour_yolo,
    probability_classifier,
    yolov5_model,
)
from engines.base import TensorSpec

FAST = ("--duration", "0.4", "--warmup", "2", "--rounds", "2")


def bench_json(*args: str) -> dict:
    proc = jetagent("bench", *args, *FAST, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("make", [end2end_yolo, efficient_nms_model, yolov5_model, probability_classifier])
def test_bench_without_a_card_runs_and_reports(tmp_path: Path, make) -> None:
    model = make(tmp_path / "m.onnx")
    assert not model.with_suffix(".json").exists()
    r = bench_json(str(model))
    assert r["mode"] == "raw" and r["card"] is None and r["model_name"] == "m" and len(r["sha256"]) == 64
    lat = r["raw"]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and lat["n"] > 0 and r["raw"]["fps"] > 0
    assert len(r["raw"]["fps_rounds"]) == 2 and r["load_s"] > 0 and r["peak_rss_mb"] > 10
    assert r["throughput"]["inferences_per_s"] == r["raw"]["fps"] and r["throughput"]["batch"] == 1
    assert r["backend"]["backend"] == "onnxruntime" and r["outputs"]


def test_the_table_says_what_ran(tmp_path: Path) -> None:
    model = probability_classifier(tmp_path / "cls.onnx")  # dynamic N only: batch 1, said
    proc = jetagent("bench", str(model), *FAST)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "no card: the backend alone on generated inputs x 1x3x48x192 float32" in out
    assert "dynamic batch dim N set to 1" in out and "raw backend loop" in out and "peak RSS" in out


def test_dynamic_dims_without_shapes_are_named(tmp_path: Path) -> None:
    model = dynamic_text_detector(tmp_path / "det.onnx")
    assert_one_line_error(jetagent("bench", str(model), *FAST),
                          "input 'x' [N, 3, H, W] has dynamic dims N (axis 0), H (axis 2), W (axis 3)",
                          "--shapes x:1x3x640x640")
    yolo = colour_yolo(tmp_path / "yolo.onnx")  # its metadata knows the size it was exported at
    assert_one_line_error(jetagent("bench", str(yolo), *FAST), "height (axis 2), width (axis 3)",
                          "--shapes images:1x3x160x160")


def test_shapes_set_the_dynamic_dims(tmp_path: Path) -> None:
    model = dynamic_text_detector(tmp_path / "det.onnx")
    r = bench_json(str(model), "--shapes", "x:2x3x320x480")
    assert r["inputs"] == {"x": {"shape": [2, 3, 320, 480], "dtype": "float32"}}
    assert r["outputs"] == {"maps": [2, 1, 320, 480]}
    assert r["throughput"]["batch"] == 2 and r["throughput"]["samples_per_s"] == pytest.approx(
        2 * r["raw"]["fps"], rel=1e-3)


def test_bad_shapes_are_one_line_errors(tmp_path: Path) -> None:
    model = dynamic_text_detector(tmp_path / "det.onnx")
    cases = [("x:1x3x320", "3 dims given, the input has 4"),
             ("images:1x3x320x320", "names 'images', which the model does not have (inputs: x)"),
             ("x:1x4x320x320", "axis 1 is fixed at 3 in the model, not 4"),
             ("x:1x3xbigx320", "dims must be integers"),
             ("x:1x3x0x320", "every dim must be positive")]
    for shapes, words in cases:
        assert_one_line_error(jetagent("bench", str(model), "--shapes", shapes, *FAST), words)
    stride = colour_yolo(tmp_path / "yolo.onnx")
    assert_one_line_error(jetagent("bench", str(stride), "--shapes", "images:1x3x300x300", *FAST),
                          "does not run on generated inputs (images 1x3x300x300)", "Concat")


def test_shape_spelling() -> None:
    assert parse_shapes("images:1x3x640x640, mask:1x1x8x8") == {"images": (1, 3, 640, 640), "mask": (1, 1, 8, 8)}
    assert parse_shapes("Preprocessor/sub:0:1x300x300x3") == {"Preprocessor/sub:0": (1, 300, 300, 3)}
    assert parse_shapes("'input:0':1x3") == {"input:0": (1, 3)}
    with pytest.raises(ShapeError, match="twice"):
        parse_shapes("a:1,a:2")
    spec = [TensorSpec("a", (None, 3), "float32"), TensorSpec("b", (4,), "int64")]
    shapes, notes = resolve_shapes(spec, None)
    assert shapes == {"a": (1, 3), "b": (4,)} and "batch" in notes[0]


def test_a_card_beside_the_model_runs_the_card_and_checks_its_stride(tmp_path: Path, color_video: Path) -> None:
    model = colour_yolo(tmp_path / "yolo.onnx")
    card = hand_card_for_colour_yolo()
    card["input"].update(width=300, height=300)
    model.with_suffix(".json").write_text(json.dumps(card))
    assert_one_line_error(jetagent("bench", str(model), *FAST), "not a multiple of the model's stride 32")
    # --raw (or --shapes) runs the backend alone, whatever the card says
    r = bench_json(str(model), "--raw", "--shapes", "images:1x3x320x320")
    assert r["mode"] == "raw" and "the model's card is not used (--raw/--shapes)" in r["notes"]
    card["input"].update(width=160, height=160)
    model.with_suffix(".json").write_text(json.dumps(card))
    r = bench_json(str(model), "--video", str(color_video))
    assert r["mode"] == "card" and r["card"]["derived"] is False and "pipeline" in r


def test_no_card_with_video_uses_the_derived_card_when_it_is_certain(tmp_path: Path, color_video: Path) -> None:
    model = colour_yolo(tmp_path / "yolo.onnx")
    proc = jetagent("bench", str(model), "--video", str(color_video), *FAST, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "jetagent: note: no card beside yolo.onnx: using the card derived from the model" in proc.stderr
    r = json.loads(proc.stdout)
    assert r["mode"] == "card" and r["card"]["derived"] is True and r["card"]["input"] == "images 160x160"
    assert r["pipeline"]["fps"] > 0
    nms = efficient_nms_model(tmp_path / "nms.onnx")  # colour and scaling only guessed
    assert_one_line_error(jetagent("bench", str(nms), "--video", str(color_video), *FAST),
                          "the card derived from the model is not certain", "jetagent card init")


def test_tensorrt_without_tensorrt_is_one_clear_line(tmp_path: Path) -> None:
    model = end2end_yolo(tmp_path / "e2e.onnx")
    assert_one_line_error(jetagent("bench", str(model), "--backend", "tensorrt", *FAST, timeout=120),
                          "TensorRT is not importable here")


def test_raw_mode_refuses_what_needs_a_card(tmp_path: Path, color_video: Path) -> None:
    model = end2end_yolo(tmp_path / "e2e.onnx")
    assert_one_line_error(jetagent("bench", str(model), "--raw", "--video", str(color_video), *FAST),
                          "--raw/--shapes run the backend alone")
    assert_one_line_error(jetagent("bench", str(tmp_path / "none.onnx"), *FAST), "model file not found")


def test_tensorrt_builds_at_the_given_shapes_then_runs_the_loop(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the stand-in TensorRT 10.3 (tests/trt_standins.py: its plans run their ONNX with
    ONNX Runtime); the build really runs in the child process. Not run on a GPU."""
    import sys
    import types

    import trt_standins
    from agent.bench_raw import RawBenchOptions, run_raw_bench

    gpu = trt_standins.FakeGpu()
    monkeypatch.setitem(sys.modules, "tensorrt", trt_standins.make_tensorrt("10.3.0.30", gpu=gpu))
    driver = trt_standins.make_pycuda_driver(gpu)
    package = types.ModuleType("pycuda")
    package.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    model = dynamic_text_detector(tmp_path / "det.onnx")
    child = (sys.executable, str(Path(__file__).parent / "calib_trt_child.py"), "10.3.0.30", "ok", "-", "--")
    r = run_raw_bench(RawBenchOptions(model=model, backend="tensorrt", shapes="x:1x3x64x96", duration_s=0.3,
                                      warmup=1, build_launcher=child))
    assert r["backend"]["backend"] == "tensorrt" and r["build_s"] > 0 and r["load_s"] >= 0
    assert r["inputs"]["x"]["shape"] == [1, 3, 64, 96] and r["outputs"] == {"maps": [1, 1, 64, 96]}
    assert r["raw"]["fps"] > 0
