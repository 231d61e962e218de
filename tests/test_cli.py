"""The `jetagent` command through its real entry point, in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT


def jetagent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def write_config(tmp_path: Path, model: Path, source: str, **extra: str) -> Path:
    lines = [
        'device_id = "cam-test"',
        f'state_dir = "{tmp_path / "state"}"',
        "[results]",
        f'output = "{extra.get("output", "none")}"',
        "[health]",
        "interval_s = 0.5",
        "[[cameras]]",
        'name = "front"',
        f'source = "{source}"',
        f'model = "{model}"',
        f'pace = "{extra.get("pace", "fast")}"',
        f'loop = {extra.get("loop", "false")}',
    ]
    cfg = tmp_path / "agent.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("jetagent: error:")]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0]


def test_bad_config_key_is_one_line(tmp_path: Path, color_model: Path, color_video: Path) -> None:
    cfg = write_config(tmp_path, color_model, str(color_video))
    cfg.write_text(cfg.read_text().replace("loop = false", 'loop = "sometimes"'))
    assert_one_line_error(jetagent("run", "--config", str(cfg)), "cameras[0].loop")


def test_missing_config(tmp_path: Path) -> None:
    assert_one_line_error(jetagent("run", "--config", str(tmp_path / "nope.toml")), "config file not found")


def test_missing_model_is_one_line(tmp_path: Path, color_video: Path) -> None:
    cfg = write_config(tmp_path, tmp_path / "missing.onnx", str(color_video))
    assert_one_line_error(jetagent("run", "--config", str(cfg)), "model file not found")


def test_model_that_does_not_fit_is_one_line(tmp_path: Path, color_model: Path, color_video: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(color_model.read_bytes())
    card = json.loads(color_model.with_suffix(".json").read_text())
    card["input"]["width"] = 224
    model.with_suffix(".json").write_text(json.dumps(card))
    cfg = write_config(tmp_path, model, str(color_video))
    assert_one_line_error(jetagent("run", "--config", str(cfg)), "shape", "224")


def test_unreadable_video_is_one_line(tmp_path: Path, color_model: Path) -> None:
    bad = tmp_path / "broken.avi"
    bad.write_bytes(os.urandom(20000))
    cfg = write_config(tmp_path, color_model, str(bad))
    assert_one_line_error(jetagent("run", "--config", str(cfg)), "broken.avi")
    assert_one_line_error(jetagent("run", "--config", str(cfg), "--check-config"), "broken.avi")


def test_check_config_ok(tmp_path: Path, color_model: Path, color_video: Path) -> None:
    cfg = write_config(tmp_path, color_model, str(color_video))
    proc = jetagent("run", "--config", str(cfg), "--check-config")
    assert proc.returncode == 0, proc.stderr
    assert "camera front: color-classifier on onnxruntime (fp32)" in proc.stdout
    assert "config OK" in proc.stdout


def test_run_writes_results_until_the_video_ends(tmp_path: Path, color_model: Path, color_video: Path) -> None:
    out = tmp_path / "results.jsonl"
    cfg = write_config(tmp_path, color_model, str(color_video), output=str(out))
    proc = jetagent("run", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["seq"] for r in rows] == list(range(1, 91))
    assert rows[0]["objects"][0]["label"] == "red" and rows[0]["camera"] == "front"


def test_sigterm_stops_cleanly_with_health_lines(tmp_path: Path, color_model: Path, color_video: Path) -> None:
    out = tmp_path / "results.jsonl"
    cfg = write_config(tmp_path, color_model, str(color_video), output=str(out), loop="true", pace="native")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not out.exists() or out.stat().st_size < 2000):
            time.sleep(0.1)
        time.sleep(1.2)  # at least one health line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err
    assert "front:" in err and "fps" in err and "camera streaming" in err


def test_bench_json(color_model: Path, color_video: Path) -> None:
    proc = jetagent("bench", str(color_model), "--video", str(color_video), "--duration", "1",
                    "--threads", "1", "--warmup", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["raw"]["fps"] > 0 and rep["pipeline"]["fps"] > 0
    assert rep["pipeline_over_raw"] == pytest.approx(rep["pipeline"]["fps"] / rep["raw"]["fps"], abs=2e-3)
    assert set(rep["pipeline"]["stages_ms"]) == {"preprocess", "infer", "postprocess", "total"}
    assert rep["peak_rss_mb"] > 0 and rep["backend"]["threads"] == 1


def test_bench_table_and_errors(color_model: Path) -> None:
    proc = jetagent("bench", str(color_model), "--duration", "0.5", "--warmup", "1")
    assert proc.returncode == 0, proc.stderr
    assert "raw backend loop" in proc.stdout and "no --video" in proc.stdout
    assert_one_line_error(jetagent("bench", "missing.onnx"), "model file not found")
    assert_one_line_error(jetagent("bench", str(color_model), "--precision", "int3"), "int3")
