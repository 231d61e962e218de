"""The camera loop: grab -> preprocess -> infer -> postprocess -> results.

One `CameraPipeline` per camera, each on its own thread. `run_once()` does one
frame so tests can step it; `run(stop)` loops until the event is set. `swap()`
replaces the model between two frames: no frame is ever served by a
half-loaded model, and the old runner is idle when `swap` returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.camera.grabber import Frame, Grabber, Prepared
from agent.camera.snapshot import CameraSnapshot, ModelIdentity
from agent.camera.stats import Histogram, RateMeter
from engines.errors import JetagentError
from engines.postprocess import Result
from engines.runner import ModelRunner

log = logging.getLogger(__name__)

STAGES = ("preprocess", "infer", "postprocess", "total")

ResultSink = Callable[[dict[str, Any]], None]


@dataclass
class PipelineStats:
    stages: dict[str, Histogram] = field(default_factory=lambda: {s: Histogram() for s in STAGES})
    fps: RateMeter = field(default_factory=RateMeter)
    frames: int = 0
    errors: int = 0
    last_error: str = ""
    last_frame_at: float = 0.0  # time.monotonic() of the last completed frame
    crashes: int = 0  # loop crashes (counted by whoever restarts the loop)
    restarts: int = 0  # source reopened (replace_grabber)
    dropped_before: int = 0  # frames dropped by grabbers replaced since

    def window(self) -> dict[str, Any]:
        """Per-stage latency and FPS since the last call (a report window)."""
        n, dt = self.fps.take_window()
        return {
            "fps": round(n / dt, 2) if dt > 0 else 0.0,
            "frames": n,
            "latency_ms": {s: h.take().summary_ms() for s, h in self.stages.items()},
        }


class CameraPipeline:
    def __init__(
        self,
        name: str,
        grabber: Grabber,
        runner: ModelRunner,
        sink: ResultSink | None = None,
        *,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self.grabber = grabber
        self._runner = runner
        self._sink = sink
        self._on_error = on_error
        self._frame_lock = threading.Lock()  # held for the whole of one frame
        self.stats = PipelineStats()
        self.last_result: Result | None = None
        self.last_frame: Frame | None = None  # the newest frame served (activation checks run on it)
        self.observers: list[Callable[[Frame, Result], None]] = []
        self.swapped_at = (0, 0)  # (frames, errors) when the last swap took effect
        self._install_prepare(runner)

    def _install_prepare(self, runner: ModelRunner) -> None:
        """Let the grabber preprocess each frame for `runner` while the loop infers."""
        pre = runner.pre

        def prepare(image: np.ndarray) -> Prepared:
            t0 = time.perf_counter()
            value = pre(image)
            return Prepared(pre, value, time.perf_counter() - t0)

        self.grabber.prepare = prepare

    @property
    def runner(self) -> ModelRunner:
        return self._runner

    def swap(self, new_runner: ModelRunner) -> ModelRunner:
        """Make `new_runner` serve from the next frame on; return the old one, now idle.

        The caller warms the new runner up before and closes the old one after.
        """
        with self._frame_lock:
            old, self._runner = self._runner, new_runner
            self._install_prepare(new_runner)
            # what probation counts from: exactly the frames served by the new runner
            self.swapped_at = (self.stats.frames, self.stats.errors)
        log.info("camera %s: now serving %s (%s, %s)", self.name, new_runner.card.name,
                 new_runner.backend.name, new_runner.precision)
        return old

    def run_once(self, timeout: float = 1.0) -> bool:
        """Process the newest frame, if one comes within `timeout`. True if a frame was served."""
        frame = self.grabber.next_frame(timeout)
        if frame is None:
            return False
        with self._frame_lock:
            runner = self._runner
            st = self.stats.stages
            t0 = time.perf_counter()
            try:
                prep = frame.prepared
                if prep is not None and prep.owner is runner.pre:
                    tensor, transform = prep.value  # done ahead on the grabber thread
                    pre_s = prep.seconds
                else:  # prepared for a model swapped out since, or not at all
                    tensor, transform = runner.preprocess(frame.image)
                    pre_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                outputs = runner.infer(tensor)
                t2 = time.perf_counter()
                result = runner.postprocess(outputs, transform)
                t3 = time.perf_counter()
            except JetagentError as exc:
                self._count_error(exc)
                return False
            st["preprocess"].record(pre_s)
            st["infer"].record(t2 - t1)
            st["postprocess"].record(t3 - t2)
            st["total"].record(pre_s + (t3 - t1))
            self.stats.frames += 1  # under the lock: swap() reads a count that is exact
        self.stats.fps.tick()
        self.stats.last_frame_at = time.monotonic()
        self.last_result = result
        self.last_frame = frame
        for observe in list(self.observers):  # the updater may add or remove one meanwhile
            # Observers (calibration reservoir, drift) must be cheap and never block;
            # one that fails is reported and dropped, the camera goes on.
            try:
                observe(frame, result)
            except Exception:
                log.exception("camera %s: frame observer %r failed; removed", self.name, observe)
                self.remove_observer(observe)
        if self._sink is not None:
            self._sink({
                "camera": self.name,
                "seq": frame.seq,
                "ts": round(time.time(), 3),
                "model": runner.card.name,
                "precision": runner.precision,
                "objects": result.to_json(runner.card.labels),
                "latency_ms": round((pre_s + t3 - t1) * 1e3, 2),
            })
        return True

    def remove_observer(self, observe: Callable[[Frame, Result], None]) -> None:
        """Safe from any thread, and if it is already gone."""
        try:
            self.observers.remove(observe)
        except ValueError:
            pass

    def _count_error(self, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = str(exc)
        if self.stats.errors <= 3 or self.stats.errors % 100 == 0:
            log.error("camera %s: frame failed (%d so far): %s", self.name, self.stats.errors, exc)
        if self._on_error is not None:
            self._on_error(self.name, exc)

    def run(self, stop: threading.Event) -> None:
        """Serve frames until `stop` is set or the source ends."""
        while not stop.is_set():
            if not self.run_once(timeout=0.5) and self.grabber.finished:
                # the lossless handoff may still hold one last frame
                while self.run_once(timeout=0.0):
                    pass
                break

    def replace_grabber(self, new: Grabber) -> Grabber:
        """Serve from `new` (started by the caller) from the next frame on; returns the old one
        (still running: the caller stops it). The model's preprocessing hook moves over; a frame
        prepared by a stale hook (a swap racing this) is recognised and preprocessed again."""
        old = self.grabber
        new.prepare = old.prepare
        self.grabber = new
        self.stats.dropped_before += old.dropped
        self.stats.restarts += 1
        return old

    def identity(self) -> ModelIdentity:
        r = self._runner
        return ModelIdentity(self.name, r.card.name, r.sha256, r.backend.name, r.precision)

    def snapshot(self, window: bool = False) -> CameraSnapshot:
        """This camera now. With `window`, also latency and FPS since the previous window, which
        this call closes (one caller should own the windows: the daemon's health tick)."""
        g, st, last = self.grabber, self.stats, self.last_result
        return CameraSnapshot(
            identity=self.identity(), source=g.status(), pending=g.pending, frames_total=st.frames,
            errors=st.errors, last_error=st.last_error, fps_now=round(st.fps.rate, 2),
            objects=len(last) if last is not None else 0, dropped=st.dropped_before + g.dropped,
            restarts=st.restarts, crashes=st.crashes, window=st.window() if window else None)

    def status(self) -> dict[str, Any]:
        return self.snapshot().status()
