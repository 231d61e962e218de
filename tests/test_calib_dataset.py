"""Calibration sets and the frame reservoir: real frames, real preprocessing, real files."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from calib_models import blob_frames, conv_classifier
from calibration.dataset import CalibrationSet, CalibrationStore, build_set, read_video_frames, set_from_video
from calibration.errors import CalibrationError
from calibration.reservoir import FrameReservoir, thumbnail
from conftest import color_frames, write_video
from engines.modelcard import InputSpec, load_card
from engines.preprocess import preprocess

SPEC = InputSpec(name="image", width=32, height=24, layout="NCHW", color="RGB", resize="letterbox")


def frames(n: int, seed: int = 0, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(n)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_set_holds_what_preprocess_gives_and_its_hash_tracks_content(tmp_path: Path) -> None:
    calib, hold = frames(5), frames(3, seed=1)
    dataset = build_set(SPEC, calib, hold)
    assert dataset.size == (5, 3)
    tensor, transform = preprocess(hold[1], SPEC)
    np.testing.assert_array_equal(dataset.holdout[1], tensor)
    assert dataset.holdout_transforms[1] == transform
    same = build_set(SPEC, calib, hold)
    assert same.content_hash == dataset.content_hash
    calib[2][0, 0, 0] ^= 0xFF
    assert build_set(SPEC, calib, hold).content_hash != dataset.content_hash
    with pytest.raises(CalibrationError, match="both parts"):
        build_set(SPEC, calib, [])


def test_store_round_trip_survives_a_restart_and_refuses_damage(tmp_path: Path) -> None:
    dataset = build_set(SPEC, frames(4), frames(2, seed=3), sources=[{"camera": "a", "seq": i} for i in range(6)])
    store = CalibrationStore(tmp_path / "calibration")
    where = store.save(dataset)
    assert store.save(dataset) == where  # same content, same place: nothing rewritten
    again = CalibrationStore(tmp_path / "calibration").latest(SPEC)  # a fresh process would do this
    assert again is not None and again.content_hash == dataset.content_hash
    np.testing.assert_array_equal(again.calibration, dataset.calibration)
    assert again.holdout_transforms == dataset.holdout_transforms
    assert [s["seq"] for s in again.sources] == list(range(6))
    assert not list(where.parent.glob(".incoming-*"))
    other = InputSpec(name="image", width=16, height=16)
    assert store.latest(other) is None
    holdout = np.load(where / "holdout.npy")
    holdout[0, 0, 0, 0, 0] += 1.0
    np.save(where / "holdout.npy", holdout)
    with pytest.raises(CalibrationError, match="does not match its recorded sha256"):
        store.latest(SPEC)
    store.save(dataset)  # a damaged set of the same content is replaced on the next save
    assert store.latest(SPEC) is not None


def test_a_set_for_another_input_spec_is_refused() -> None:
    dataset = build_set(SPEC, frames(2), frames(1))
    with pytest.raises(CalibrationError, match="collect a new set"):
        dataset.check_spec(InputSpec(name="image", width=32, height=24, color="BGR", resize="letterbox"))
    dataset.check_spec(InputSpec(name="image", width=32, height=24, layout="NCHW", color="RGB", resize="letterbox"))


def test_set_from_video_calibrates_on_one_part_and_holds_out_the_other(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.avi", color_frames(40))
    dataset = set_from_video(SPEC, video, calibration=6, holdout=4, split=0.5)
    assert dataset.size == (6, 4)
    calib = [s["frame"] for s in dataset.sources if s["part"] == "calibration"]
    hold = [s["frame"] for s in dataset.sources if s["part"] == "holdout"]
    assert max(calib) < 20 <= min(hold)
    assert calib == sorted(set(calib)) and len(calib) == 6
    assert [i for i, _ in read_video_frames(video, 10, 14)] == [10, 11, 12, 13]
    with pytest.raises(CalibrationError, match="cannot open video"):
        read_video_frames(tmp_path / "none.avi")


def test_reservoir_spacing_duplicates_and_holdout_blocks() -> None:
    clock = Clock()
    res = FrameReservoir(SPEC, calibration_size=50, holdout_size=50, min_interval_s=0.5, block=2,
                         holdout_every=3, clock=clock)
    distinct = frames(40)
    for i in range(40):  # 10 fps: only every 5th frame is even looked at
        clock.now = i * 0.1
        res.offer(distinct[i], {"seq": i})
        res.process_pending()
    assert res.stats.accepted == 8 and res.stats.too_soon == 32
    still = distinct[0]
    for i in range(10):  # a scene that does not change: near-duplicates are skipped
        clock.now = 10.0 + i
        noisy = np.clip(still.astype(np.int16) + np.random.default_rng(i).integers(-3, 4, still.shape), 0, 255)
        res.offer(noisy.astype(np.uint8))
        res.process_pending()
    assert res.stats.duplicate >= 8
    dataset = res.snapshot()
    accepted_in_holdout = sorted(s["accepted"] for s in dataset.sources if s["part"] == "holdout")
    assert accepted_in_holdout and all((a // 2) % 3 == 2 for a in accepted_in_holdout)
    assert all((s["accepted"] // 2) % 3 != 2 for s in dataset.sources if s["part"] == "calibration")
    np.testing.assert_array_equal(dataset.holdout[0], preprocess(distinct[20], SPEC)[0])  # accepted #4 = frame 20


def test_reservoir_is_bounded_and_spread_over_the_whole_run() -> None:
    clock = Clock()
    res = FrameReservoir(SPEC, calibration_size=40, holdout_size=10, min_interval_s=0.0, clock=clock, seed=1)
    for i, frame in enumerate(frames(300, size=(32, 24))):
        clock.now = float(i)
        res.offer(frame, {"seq": i})
        res.process_pending()
    assert res.counts() == (40, 10) and res.full
    seqs = [s["seq"] for s in res.snapshot().sources if s["part"] == "calibration"]
    assert seqs == sorted(seqs)
    # A uniform sample of the whole run (Algorithm R): by chance alone, 40 draws from 225 frames
    # all landing after frame 100 (or before 200) has probability below 1e-8.
    assert min(seqs) < 100 and max(seqs) > 200


def test_the_camera_thread_never_waits_for_the_worker() -> None:
    res = FrameReservoir(SPEC, queue_size=1, min_interval_s=0.0, duplicate_threshold=0.0)
    big = frames(3, size=(1920, 1080))
    t0 = time.perf_counter()
    results = [res.offer(f) for f in big]  # nobody drains the queue
    elapsed = time.perf_counter() - t0
    assert results == [True, False, False] and res.stats.busy == 2
    assert elapsed < 0.5
    cost = []
    for f in big * 5:
        t = time.perf_counter()
        thumbnail(f)
        cost.append(time.perf_counter() - t)
    assert float(np.median(cost)) < 0.005  # the per-frame work on the camera thread: well under 5 ms at 1080p


def test_too_few_frames_is_a_clear_error() -> None:
    res = FrameReservoir(SPEC, min_interval_s=0.0)
    res.offer(frames(1)[0])
    res.process_pending()
    with pytest.raises(CalibrationError, match=r"kept 1 calibration and 0 holdout frames.*offered 1"):
        res.snapshot()


def test_reservoir_on_the_real_camera_pipeline(tmp_path: Path) -> None:
    """A real grabber on a real video file feeding a real model; the reservoir rides along."""
    from agent.camera.grabber import Grabber
    from agent.camera.pipeline import CameraPipeline
    from agent.camera.sources import parse_source
    from engines.runner import open_model

    model = conv_classifier(tmp_path / "cls.onnx")
    card = load_card(model.with_suffix(".json"))
    video = write_video(tmp_path / "blobs.avi", blob_frames(60, size=64, blobs=5, seed=4), fps=30)
    grabber = Grabber(parse_source(str(video)), mode="lossless", name="cam")
    pipeline = CameraPipeline("cam", grabber, open_model(model))
    reservoir = FrameReservoir(card.input, calibration_size=10, holdout_size=5, min_interval_s=0.0, block=1,
                               holdout_every=3, camera="cam")
    pipeline.observers.append(reservoir)
    reservoir.start()
    grabber.start()
    stop = threading.Event()
    try:
        pipeline.run(stop)
    finally:
        grabber.stop()
        reservoir.stop()
        pipeline.runner.close()
    assert pipeline.stats.frames == 60 and reservoir in pipeline.observers
    dataset = reservoir.snapshot()
    assert dataset.size == (10, 5)
    assert {s["camera"] for s in dataset.sources} == {"cam"}
    assert dataset.calibration.shape[1:] == (1, 3, 32, 32)
    path = CalibrationStore(tmp_path / "state").save(dataset)
    meta = json.loads((path / "set.json").read_text())
    assert meta["content_sha256"] == dataset.content_hash and meta["holdout"] == 5
    assert CalibrationSet.load(path).content_hash == dataset.content_hash
