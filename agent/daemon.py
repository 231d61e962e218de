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

from agent.camera.grabber import Grabber
from agent.camera.pipeline import CameraPipeline
from agent.camera.results import JsonLinesSink
from agent.camera.sources import parse_source, probe_source, set_opencv_threads
from agent.config import CameraConfig, Config
from agent.sdnotify import Notifier
from agent.serving import Serving, needs_engine, open_camera_model
from engines.errors import JetagentError

if TYPE_CHECKING:
    from agent.delivery.session import DeviceDelivery
    from agent.uplink.session import FleetSession

log = logging.getLogger(__name__)


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
            engine = (f"; its {config.backend.precision} TensorRT engine is built (or loaded from the cache) at "
                      "start, with ONNX Runtime serving meanwhile" if needs_engine(config, cam.model) else "")
            lines.append(f"camera {cam.name}: {runner.card.name} on {runner.backend.name} "
                         f"({runner.precision}), {where}{engine}")
        finally:
            runner.close()
    if config.fleet is not None:
        from agent.uplink.link import check_fleet

        lines.append(check_fleet(config.fleet, config.device_id))
    return lines


@dataclass
class _Camera:
    config: CameraConfig
    pipeline: CameraPipeline
    thread: threading.Thread | None = None


class Agent:
    """Runs every configured camera until stopped."""

    def __init__(self, config: Config, *, results_stream: IO[str] | None = None) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.sink = JsonLinesSink(config.results.output, config.results.every, stream=results_stream)
        self.cameras: list[_Camera] = []
        self.started_at = time.time()
        self.fleet: FleetSession | None = None
        self.delivery: DeviceDelivery | None = None
        self.serving = Serving(config, self.pipelines)
        self.notifier = Notifier()
        self._restart_lock = threading.Lock()
        self._snapshot_at = time.monotonic()
        self._identity: list[tuple[str, str, str, str]] = []

    def open(self) -> None:
        """Open every model and source. Raises JetagentError; leaves nothing open on failure."""
        set_opencv_threads(self.config.opencv_threads)
        try:
            if self.config.fleet is not None:
                self._open_store()
            for cam in self.config.cameras:
                spec = parse_source(cam.source)
                if not spec.is_live:
                    probe_source(cam.source)  # an unreadable video is a config error, said now
                runner = self.serving.initial_runner(cam)
                pipe = CameraPipeline(cam.name, make_grabber(cam), runner, self.sink)
                self.cameras.append(_Camera(cam, pipe))
            if self.config.fleet is not None:
                from agent.uplink.session import FleetSession

                self.fleet = FleetSession(self.config, self)
                self.delivery = self._make_delivery(self.fleet)
        except JetagentError:
            self.close()
            raise

    def _open_store(self) -> None:
        from agent.delivery.slots import Slots
        from agent.delivery.store import ModelStore

        fleet = self.config.fleet
        if fleet is None:
            return
        try:
            self.serving.store = ModelStore(self.config.state_dir, fleet.max_model_bytes)
            self.serving.slots = Slots(self.config.state_dir / "slots.json")
        except (OSError, ValueError) as exc:
            raise JetagentError(f"state_dir {self.config.state_dir}: cannot keep models there: {exc}") from exc

    def _make_delivery(self, session: FleetSession) -> DeviceDelivery:
        from agent.delivery.session import DeviceDelivery
        from agent.delivery.updater import Updater
        from agent.wire.signing import TrustStore

        fleet = session.fleet
        trust = TrustStore.from_files(list(fleet.trusted_keys))
        if not trust.keys:
            log.warning("fleet: no trusted_keys configured: every pushed model will be refused")
        store, slots = self.serving.store, self.serving.slots
        if store is None or slots is None:
            raise JetagentError("internal: the model store is not open")

        def make_updater(transport: Any, report: Any) -> Updater:
            return Updater(self.serving, store, slots, trust, transport, report,
                           default_precision=self.config.backend.precision)

        delivery = DeviceDelivery(session.link, session.topics, self.config.device_id, fleet.groups, make_updater)

        def rollback(args: Any) -> dict[str, Any]:
            reason = args.get("reason", "operator asked for a rollback") if isinstance(args, dict) else ""
            job = delivery.updater.request_rollback(str(reason)[:200])
            return {"queued": True, "job": job}

        session.commands.router.register("rollback", rollback, "serve each camera's previous model again")
        return delivery

    def pipelines(self) -> dict[str, CameraPipeline]:
        return {c.config.name: c.pipeline for c in self.cameras}

    def start(self) -> None:
        for cam in self.cameras:
            cam.pipeline.grabber.start()
            cam.thread = threading.Thread(target=self._serve, args=(cam,), name=f"cam-{cam.config.name}",
                                          daemon=True)
            cam.thread.start()
        self._snapshot_at = time.monotonic()
        if self.delivery is not None:
            self.delivery.start()
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
                cam.pipeline.stats.crashes += 1
                now = time.monotonic()
                crash_times = [t for t in crash_times if now - t < 60] + [now]
                log.error("camera %s loop crashed (%d):\n%s", cam.config.name, cam.pipeline.stats.crashes,
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
        watchdog = _Watchdog(self, self.notifier)
        while not self.stop_event.is_set() and self.running:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            watchdog.tick(now)
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
        return [c.pipeline.snapshot().change_key() for c in self.cameras]

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
        """Per-camera numbers for the window since the last snapshot (closes the window)."""
        now = time.monotonic()
        cams = [c.pipeline.snapshot(window=True).report() for c in self.cameras]
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
        return [c.pipeline.identity().to_dict() for c in self.cameras]

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
            new = make_grabber(cam.config)
            new.start()
            cam.pipeline.replace_grabber(new).stop()
        restarts = cam.pipeline.stats.restarts
        log.info("camera %s: source reopened on request (%d restart(s))", name, restarts)
        return {"camera": name, "restarts": restarts, "state": new.state}

    def status(self) -> dict[str, Any]:
        return {
            "device_id": self.config.device_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "cameras": [c.pipeline.status() for c in self.cameras],
            "engines": self.serving.engine_status(),
        }

    def stop(self) -> None:
        if not self.stop_event.is_set():
            self.notifier.stopping()
        self.stop_event.set()
        with self._restart_lock:  # no grabber is being replaced while they stop
            for cam in self.cameras:
                cam.pipeline.grabber.stop()
        for cam in self.cameras:
            if cam.thread is not None:
                cam.thread.join(10)

    def close(self) -> None:
        self.stop()
        probations = []
        if self.delivery is not None:
            self.delivery.stop()
            probations = self.delivery.updater.probations
            self.delivery = None
        for p in probations:  # stopped mid-probation: the pipeline holds the new runner
            p.old.close()
        if self.fleet is not None:
            self.fleet.close()  # says "offline" (retained) before disconnecting
            self.fleet = None
        self.serving.close()  # engines still being made at start-up: stop waiting, they close their own
        for cam in self.cameras:
            cam.pipeline.runner.close()
        self.sink.close()


class _Watchdog:
    """systemd: READY=1 after the first good frame (or a grace period with no camera),
    WATCHDOG=1 only while no camera is hung. A camera is hung when its grabber has a
    frame waiting and the loop completed none for a whole ping interval; a camera that
    is merely disconnected is not hung (the agent keeps running and reconnects)."""

    READY_GRACE_S = 60.0

    def __init__(self, agent: Agent, notifier: Notifier) -> None:
        self.agent, self.n = agent, notifier
        self.started = time.monotonic()
        self.ready = False
        self.interval = notifier.watchdog_interval_s
        self.last_ping = 0.0
        self.frames_at_ping: dict[str, int] = {}

    def tick(self, now: float) -> None:
        if not self.n.enabled:
            return
        cams = self.agent.cameras
        if not self.ready:
            served = sum(c.pipeline.stats.frames for c in cams)
            if served or now - self.started > self.READY_GRACE_S:
                self.ready = True
                self.n.ready(f"{len(cams)} camera(s), {served} frame(s) served" if served
                             else "no camera has delivered a frame yet")
        if self.interval and now - self.last_ping >= self.interval:
            snaps = [c.pipeline.snapshot() for c in cams]
            hung = [s.camera for s in snaps if s.pending and s.frames_total == self.frames_at_ping.get(s.camera, -1)]
            if hung:
                log.error("camera(s) %s hung: no frame completed in %.0f s; not pinging the watchdog",
                          ", ".join(hung), self.interval)
            else:
                self.n.watchdog()
            self.last_ping = now
            self.frames_at_ping = {s.camera: s.frames_total for s in snaps}
