"""The daemon: one pipeline thread per camera, health lines, clean shutdown.

Everything that can fail because of the user's config (a missing model, a
model that does not fit, an unreadable video) fails in `Agent.open()`, before
any thread starts, with one specific error.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import IO, Any

from agent.config import CameraConfig, Config
from agent.pipeline import CameraPipeline
from agent.results import JsonLinesSink
from agent.sources import Grabber, parse_source, probe_source
from engines.base import BackendOptions
from engines.errors import JetagentError
from engines.runner import ModelRunner, open_model

log = logging.getLogger(__name__)


def backend_options(config: Config) -> BackendOptions:
    b = config.backend
    return BackendOptions(threads=b.threads, providers=b.providers,
                          graph_optimization=b.graph_optimization, precision=b.precision)


def open_camera_model(config: Config, cam: CameraConfig) -> ModelRunner:
    return open_model(cam.model, card=cam.card, backend=config.backend.name, options=backend_options(config))


def make_grabber(cam: CameraConfig) -> Grabber:
    spec = parse_source(cam.source)
    if spec.kind in ("file", "directory"):
        paced = cam.pace == "native"
        return Grabber(spec, mode="latest" if paced else "lossless", loop=cam.loop, paced=paced, name=cam.name)
    return Grabber(spec, mode="latest", name=cam.name)


def check_config(config: Config) -> list[str]:
    """Open every model and every file source once. Returns a line per camera; raises on the first error."""
    lines = []
    for cam in config.cameras:
        runner = open_camera_model(config, cam)
        try:
            spec = parse_source(cam.source)
            if spec.is_live:
                where = f"{spec.kind} source {cam.source} (live; not opened by the check)"
            else:
                _, w, h = probe_source(cam.source)
                where = f"{spec.kind} {cam.source} ({w}x{h})"
            lines.append(f"camera {cam.name}: {runner.card.name} on {runner.backend.name} "
                         f"({runner.precision}), {where}")
        finally:
            runner.close()
    return lines


@dataclass
class _Camera:
    config: CameraConfig
    pipeline: CameraPipeline
    thread: threading.Thread | None = None
    crashes: int = 0


class Agent:
    """Runs every configured camera until stopped."""

    def __init__(self, config: Config, *, results_stream: IO[str] | None = None) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.sink = JsonLinesSink(config.results.output, config.results.every, stream=results_stream)
        self.cameras: list[_Camera] = []
        self.started_at = time.time()

    def open(self) -> None:
        """Open every model and source. Raises JetagentError; leaves nothing open on failure."""
        try:
            for cam in self.config.cameras:
                spec = parse_source(cam.source)
                if not spec.is_live:
                    probe_source(cam.source)  # an unreadable video is a config error, said now
                runner = open_camera_model(self.config, cam)
                pipe = CameraPipeline(cam.name, make_grabber(cam), runner, self.sink)
                self.cameras.append(_Camera(cam, pipe))
        except JetagentError:
            self.close()
            raise

    def start(self) -> None:
        for cam in self.cameras:
            cam.pipeline.grabber.start()
            cam.thread = threading.Thread(target=self._serve, args=(cam,), name=f"cam-{cam.config.name}",
                                          daemon=True)
            cam.thread.start()

    def _serve(self, cam: _Camera) -> None:
        """Run one camera loop; an unexpected crash restarts it with backoff (budget: 5 per minute)."""
        crash_times: list[float] = []
        while not self.stop_event.is_set():
            try:
                cam.pipeline.run(self.stop_event)
                return
            except Exception:  # a bug, not a user error: keep the traceback, keep serving
                cam.crashes += 1
                now = time.monotonic()
                crash_times = [t for t in crash_times if now - t < 60] + [now]
                log.error("camera %s loop crashed (%d):\n%s", cam.config.name, cam.crashes,
                          traceback.format_exc())
                delay = 30.0 if len(crash_times) > 5 else 1.0
                self.stop_event.wait(delay)

    @property
    def running(self) -> bool:
        return any(c.thread is not None and c.thread.is_alive() for c in self.cameras)

    def run(self, duration: float | None = None) -> None:
        """Block until stopped, the duration passes, or every source has ended."""
        deadline = None if duration is None else time.monotonic() + duration
        interval = self.config.health.interval_s
        next_health = time.monotonic() + interval
        while not self.stop_event.is_set() and self.running:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            wake = min(next_health, deadline) if deadline is not None else next_health
            self.stop_event.wait(max(0.0, min(wake - now, 0.5)))
            if time.monotonic() >= next_health:
                next_health += interval
                if self.config.health.log:
                    for line in self.health_lines():
                        log.info("%s", line)
        self.stop()

    def health_lines(self) -> list[str]:
        lines = []
        for cam in self.cameras:
            p = cam.pipeline
            w = p.stats.window()
            lat = w["latency_ms"]
            last = p.last_result
            src = p.grabber.status()
            lines.append(
                f"{cam.config.name}: {w['fps']:.1f} fps, infer p50 {lat['infer']['p50']:.1f} ms "
                f"p99 {lat['infer']['p99']:.1f} ms, total p99 {lat['total']['p99']:.1f} ms, "
                f"objects {len(last) if last is not None else 0}, dropped {src['dropped']}, "
                f"errors {p.stats.errors}, camera {src['state']}"
            )
        return lines

    def status(self) -> dict[str, Any]:
        return {
            "device_id": self.config.device_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "cameras": [c.pipeline.status() for c in self.cameras],
        }

    def stop(self) -> None:
        self.stop_event.set()
        for cam in self.cameras:
            cam.pipeline.grabber.stop()
        for cam in self.cameras:
            if cam.thread is not None:
                cam.thread.join(10)

    def close(self) -> None:
        self.stop()
        for cam in self.cameras:
            cam.pipeline.runner.close()
        self.sink.close()
