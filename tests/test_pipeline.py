from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent.camera.grabber import Grabber
from agent.camera.pipeline import CameraPipeline
from agent.camera.sources import parse_source
from engines.runner import open_model
from onnx_models import color_classifier, failing_model


def make(video: Path, model: Path, sink: Any = None, loop: bool = False) -> CameraPipeline:
    g = Grabber(parse_source(str(video)), mode="lossless", loop=loop, name="t")
    g.start()
    return CameraPipeline("t", g, open_model(model), sink)


def test_pipeline_serves_every_frame_with_the_right_answer(color_video: Path, color_model: Path) -> None:
    out: list[dict] = []
    p = make(color_video, color_model, out.append)
    p.run(threading.Event())
    p.runner.close()
    assert [r["seq"] for r in out] == list(range(1, 91))
    labels = [r["objects"][0]["label"] for r in out]
    assert labels == ["red", "green", "blue"] * 30
    assert p.stats.frames == 90 and p.stats.errors == 0
    w = p.stats.window()
    assert w["frames"] == 90 and w["latency_ms"]["infer"]["n"] == 90
    assert w["latency_ms"]["total"]["p99"] >= w["latency_ms"]["infer"]["p50"] > 0


def test_swap_mid_stream_drops_and_fails_no_frame(color_video: Path, color_model: Path, tmp_path: Path) -> None:
    second = color_classifier(tmp_path / "v2" / "color.onnx")
    card = second.with_suffix(".json")
    card.write_text(card.read_text().replace('"color-classifier"', '"color-classifier-v2"'))
    out: list[dict] = []
    p = make(color_video, color_model, out.append, loop=True)
    stop = threading.Event()
    t = threading.Thread(target=p.run, args=(stop,))
    t.start()
    while len(out) < 100:
        threading.Event().wait(0.005)
    new = open_model(second)
    new.warm_up(np.zeros((120, 160, 3), np.uint8))
    old = p.swap(new)
    old.close()  # idle once swap returns: the loop must never touch it again
    while len(out) < 250:
        threading.Event().wait(0.005)
    stop.set()
    t.join(5)
    p.grabber.stop()
    p.runner.close()
    seqs = [r["seq"] for r in out]
    assert seqs == list(range(1, len(seqs) + 1)), "a frame was dropped or repeated across the swap"
    models = [r["model"] for r in out]
    cut = models.index("color-classifier-v2")
    assert set(models[:cut]) == {"color-classifier"} and set(models[cut:]) == {"color-classifier-v2"}
    assert p.stats.errors == 0
    # the answer stays right on both sides of the swap
    assert all(r["objects"][0]["label"] == ["red", "green", "blue"][(r["seq"] - 1) % 3] for r in out)


def test_inference_errors_are_counted_and_the_loop_goes_on(color_video: Path, tmp_path: Path) -> None:
    errors: list[str] = []
    g = Grabber(parse_source(str(color_video)), mode="lossless", name="t")
    g.start()
    p = CameraPipeline("t", g, open_model(failing_model(tmp_path / "f.onnx")),
                       on_error=lambda cam, exc: errors.append(str(exc)))
    p.run(threading.Event())
    p.runner.close()
    assert p.stats.errors == 90 and p.stats.frames == 0 and len(errors) == 90
    assert "inference failed" in p.stats.last_error


def test_observers_see_every_frame_and_a_failing_one_is_dropped(color_video: Path, color_model: Path) -> None:
    seen: list[int] = []

    def broken(frame: Any, result: Any) -> None:
        raise RuntimeError("observer bug")

    p = make(color_video, color_model)
    p.observers += [lambda f, r: seen.append(f.seq), broken]
    p.run(threading.Event())
    p.runner.close()
    assert seen == list(range(1, 91)) and p.observers[1:] == [] and p.stats.frames == 90
