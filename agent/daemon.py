"""The daemon: one pipeline thread per camera, health lines and reports, clean shutdown.

With a `[fleet]` section the agent also keeps a `FleetSession` (agent/reporting.py):
the MQTT link, health reports through the on-disk outbox, commands. Without one
it runs standalone, exactly as before.

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
from typing import IO, TYPE_CHECKING, Any

from agent.config import CameraConfig, Config
from agent.pipeline import CameraPipeline
from agent.results import JsonLinesSink
from agent.sources import Grabber, parse_source, probe_source
from engines.base import BackendOptions
from engines.errors import JetagentError
from engines.runner import ModelRunner, open_model

if TYPE_CHECKING:
    from agent.reporting import FleetSession

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
    if config.fleet is not None:
        from agent.link import check_fleet

        lines.append(check_fleet(config.fleet, config.device_id))
    return lines


@dataclass
class _Camera:
    config: CameraConfig
    pipeline: CameraPipeline
    thread: threading.Thread | None = None
    crashes: int = 0
    restarts: int = 0  # source reopened on command
    dropped_before: int = 0  # frames dropped by grabbers replaced since


class Agent:
    """Runs every configured camera until stopped."""

    def __init__(self, config: Config, *, results_stream: IO[str] | None = None) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.sink = JsonLinesSink(config.results.output, config.results.every, stream=results_stream)
        self.cameras: list[_Camera] = []
        self.started_at = time.time()
        self.fleet: FleetSession | None = None
        self._restart_lock = threading.Lock()
        self._snapshot_at = time.monotonic()
        self._identity: list[tuple[str, str, str, str]] = []

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
            if self.config.fleet is not None:
                from agent.reporting import FleetSession

                self.fleet = FleetSession(self.config, self)
        except JetagentError:
            self.close()
            raise

    def start(self) -> None:
        for cam in self.cameras:
            cam.pipeline.grabber.start()
            cam.thread = threading.Thread(target=self._serve, args=(cam,), name=f"cam-{cam.config.name}",
                                          daemon=True)
            cam.thread.start()
        self._snapshot_at = time.monotonic()
        if self.fleet is not None:
            self.fleet.start()

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
        """Block until stopped, the duration passes, or every source has ended.

        Every health interval takes ONE snapshot (the only call of `PipelineStats.window()`,
        which resets the window); the log lines and the fleet report both come from it.
        With a fleet, a camera or model change gets its own report at once (at most 1/s).
        """
        deadline = None if duration is None else time.monotonic() + duration
        interval = self.config.health.interval_s
        next_health = time.monotonic() + interval
        last_change = 0.0
        self._identity = self.identity()
        while not self.stop_event.is_set() and self.running:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            wake = min(next_health, deadline) if deadline is not None else next_health
            self.stop_event.wait(max(0.0, min(wake - now, 0.25)))
            now = time.monotonic()
            if now >= next_health:
                next_health = max(next_health + interval, now + interval / 2)  # never a burst to catch up
                self.health_tick("interval")
            elif self.fleet is not None and now - last_change >= 1.0 and self.identity() != self._identity:
                last_change = now
                self.health_tick("change")
        self.stop()

    def identity(self) -> list[tuple[str, str, str, str]]:
        """What a change report is for: each camera's source state and model."""
        return [(c.config.name, str(c.pipeline.grabber.state), c.pipeline.runner.sha256, c.pipeline.runner.precision)
                for c in self.cameras]

    def health_tick(self, reason: str) -> None:
        snapshot = self.take_snapshot()
        self._identity = self.identity()
        if self.config.health.log:
            for line in self.health_lines(snapshot):
                log.info("%s", line)
        if self.fleet is not None:
            try:
                self.fleet.report(snapshot, reason)
            except Exception:  # reporting must never stop the cameras
                log.exception("fleet report failed")

    def take_snapshot(self) -> dict[str, Any]:
        """Per-camera numbers for the window since the last snapshot (resets the window)."""
        now = time.monotonic()
        cams = []
        for cam in self.cameras:
            p = cam.pipeline
            w = p.stats.window()
            src = p.grabber.status()
            r = p.runner
            last = p.last_result
            cams.append({
                "camera": cam.config.name, "model": r.card.name, "sha256": r.sha256, "backend": r.backend.name,
                "precision": r.precision, "fps": w["fps"], "frames": w["frames"], "frames_total": p.stats.frames,
                "latency_ms": w["latency_ms"], "objects": len(last) if last is not None else 0,
                "errors": p.stats.errors, "last_error": p.stats.last_error, "state": src["state"],
                "source_error": src["error"], "dropped": cam.dropped_before + p.grabber.dropped,
                "reconnects": p.grabber.reconnects, "restarts": cam.restarts, "crashes": cam.crashes,
            })
        snap = {"ts": round(time.time(), 3), "window_s": round(now - self._snapshot_at, 3),
                "uptime_s": round(time.time() - self.started_at, 1), "cameras": cams}
        self._snapshot_at = now
        return snap

    @staticmethod
    def health_lines(snapshot: dict[str, Any]) -> list[str]:
        lines = []
        for c in snapshot["cameras"]:
            lat = c["latency_ms"]
            lines.append(
                f"{c['camera']}: {c['fps']:.1f} fps, infer p50 {lat['infer']['p50']:.1f} ms "
                f"p99 {lat['infer']['p99']:.1f} ms, total p99 {lat['total']['p99']:.1f} ms, "
                f"objects {c['objects']}, dropped {c['dropped']}, errors {c['errors']}, camera {c['state']}"
            )
        return lines

    # -- what the fleet session and its commands use --------------------------------------
    def describe_cameras(self) -> list[dict[str, Any]]:
        return [{"camera": c.config.name, "model": c.pipeline.runner.card.name, "sha256": c.pipeline.runner.sha256,
                 "backend": c.pipeline.runner.backend.name, "precision": c.pipeline.runner.precision}
                for c in self.cameras]

    def camera_names(self) -> list[str]:
        return [c.config.name for c in self.cameras]

    def restart_camera(self, name: str) -> dict[str, Any]:
        """Reopen one camera's source with a fresh grabber; the model stays loaded.

        The camera thread picks the new grabber up at its next frame.
        """
        cam = next(c for c in self.cameras if c.config.name == name)
        with self._restart_lock:
            if self.stop_event.is_set():
                raise JetagentError("the agent is stopping")
            old = cam.pipeline.grabber
            new = make_grabber(cam.config)
            # The model's preprocessing runs on the grabber thread; a frame prepared by a stale
            # hook (a swap racing this) is recognised by the pipeline and preprocessed again.
            new.prepare = old.prepare
            new.start()
            cam.pipeline.grabber = new
            cam.dropped_before += old.dropped
            old.stop()
            cam.restarts += 1
        log.info("camera %s: source reopened on request (%d restart(s))", name, cam.restarts)
        return {"camera": name, "restarts": cam.restarts, "state": new.state}

    def status(self) -> dict[str, Any]:
        return {
            "device_id": self.config.device_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "cameras": [c.pipeline.status() for c in self.cameras],
        }

    def stop(self) -> None:
        self.stop_event.set()
        with self._restart_lock:  # no grabber is being replaced while they stop
            for cam in self.cameras:
                cam.pipeline.grabber.stop()
        for cam in self.cameras:
            if cam.thread is not None:
                cam.thread.join(10)

    def close(self) -> None:
        self.stop()
        if self.fleet is not None:
            self.fleet.close()  # says "offline" (retained) before disconnecting
            self.fleet = None
        for cam in self.cameras:
            cam.pipeline.runner.close()
        self.sink.close()
