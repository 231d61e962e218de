"""`backend = "tensorrt"` with an ONNX model, and engines that must be (re)built at start-up.

Start-up never waits for a build: the camera serves ONNX Runtime FP32 at once, the engine is
built through the deployment path (a real build child with the stand-in TensorRT) and swapped in
when ready; an engine already in the cache serves from the first frame. No GPU here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

import trt_standins
from agent.config import Config, parse_config
from agent.daemon import Agent
from agent.delivery.slots import Slot, Slots
from agent.serving import Serving
from calibration import trt_target
from engines.runner import file_sha256

CHILD = Path(__file__).resolve().parent / "calib_trt_child.py"
JP6 = "10.3.0.30"


@pytest.fixture()
def standin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Stand-in TensorRT + pycuda here (the agent opens plans) and in the build children; returns the
    children's log (one line per child: probe / build)."""
    gpu = trt_standins.FakeGpu()
    monkeypatch.setitem(sys.modules, "tensorrt", trt_standins.make_tensorrt(JP6, gpu=gpu))
    trt_standins.install_pycuda(lambda name, module: monkeypatch.setitem(sys.modules, name, module), gpu)
    log = tmp_path / "children.log"
    monkeypatch.setattr(trt_target, "DEFAULT_LAUNCHER", (sys.executable, str(CHILD), JP6, "ok", str(log), "--"))
    return log


def make_config(tmp_path: Path, model: Path, video: Path, **backend: Any) -> Config:
    return parse_config({
        "device_id": "cam-trt", "state_dir": str(tmp_path / "state"), "results": {"output": "none"},
        "backend": {"name": "tensorrt", "workspace_mib": 256, **backend},
        "cameras": [{"name": "front", "source": str(video), "model": str(model), "pace": "fast", "loop": True}],
    })


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_an_onnx_model_on_tensorrt_serves_onnx_runtime_then_swaps_in_its_engine(
        standin: Path, color_model: Path, color_video: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, color_model, color_video, startup_wait_s=0.5)
    agent = Agent(config)
    started = time.monotonic()
    agent.open()
    try:
        assert time.monotonic() - started < 10, "start-up waited for the engine build"
        pipe = agent.cameras[0].pipeline
        assert (pipe.runner.backend.name, pipe.runner.precision) == ("onnxruntime", "fp32")
        agent.start()
        wait_for(lambda: pipe.runner.backend.name == "tensorrt", 90, "the TensorRT engine to be swapped in")
        frames_at_swap = pipe.stats.frames
        wait_for(lambda: pipe.stats.frames > frames_at_swap + 5, 30, "frames served by the engine")
        assert pipe.stats.errors == 0 and frames_at_swap > 0, "ONNX Runtime served while the engine was built"
        assert pipe.runner.precision == "fp32"
        (status,) = agent.status()["engines"]
        assert status["state"] == "serving" and status["camera"] == "front"
        assert standin.read_text().split() == ["probe", "build"]
    finally:
        agent.close()
    # The next start finds the engine in the cache: it serves from the first frame, nothing is built.
    again = Agent(make_config(tmp_path, color_model, color_video, startup_wait_s=60))
    again.open()
    try:
        assert again.cameras[0].pipeline.runner.backend.name == "tensorrt"
        assert standin.read_text().split() == ["probe", "build", "probe"]
    finally:
        again.close()


def test_a_committed_engine_that_must_be_rebuilt_does_not_hold_up_start_up(
        standin: Path, color_model: Path, color_video: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # After a JetPack upgrade every engine's fingerprint changes: the committed slot's engine is rebuilt.
    hang = (sys.executable, str(CHILD), JP6, "hang", str(standin), "--")
    monkeypatch.setattr(trt_target, "DEFAULT_LAUNCHER", hang)
    config = make_config(tmp_path, color_model, color_video, startup_wait_s=1.0, build_timeout_s=4.0)
    slots = Slots(tmp_path / "slots.json")
    sha = file_sha256(color_model)
    slots.commit("front", Slot(sha256=sha, name="colors", precision="fp32", path=str(color_model)), None)
    serving = Serving(config, lambda: {}, slots=Slots(tmp_path / "slots.json"))
    started = time.monotonic()
    runner = serving.initial_runner(config.cameras[0])
    try:
        assert time.monotonic() - started < 10
        assert runner.backend.name == "onnxruntime" and runner.sha256 == sha
        (status,) = serving.engine_status()
        assert status["state"] == "building"
        wait_for(lambda: serving.engine_status()[0]["state"] == "failed", 60, "the build timeout")
        assert "took longer than 4 s" in serving.engine_status()[0]["reason"]
    finally:
        serving.close()
        runner.close()


def test_a_fleet_deployment_supersedes_the_start_up_engine(
        standin: Path, color_model: Path, color_video: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, color_model, color_video, startup_wait_s=0.0)
    serving = Serving(config, lambda: {})
    runner = serving.initial_runner(config.cameras[0])
    try:
        assert runner.backend.name == "onnxruntime"
        # The updater starts a deployment for this camera (Host.optimize / open_runner): the start-up job is moot.
        serving.engines.supersede("front", "a fleet deployment replaced the start-up model")
        job = serving.engines.jobs["front"]
        assert job.done.wait(90), "the job did not finish"
        assert serving.engine_status()[0]["state"] == "superseded" and job.runner is None
    finally:
        serving.close()
        runner.close()
