"""The device's side of the fleet: state, health reports and commands over the link.

`FleetSession` wires the pieces: the MQTT link, the on-disk outbox and its publisher,
the command worker, the telemetry sampler. The daemon hands it one snapshot per
health interval (and one when a camera or model changes); it turns that into a
health report (through the outbox, so nothing is lost while offline) and a fresh
retained state, so `jetfleet status` answers from retained messages alone.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

from agent import __version__
from agent.camera.snapshot import ModelIdentity
from agent.config import Config, FleetConfig
from agent.uplink.commands import AgentControl, CommandRouter, CommandService, register_agent_commands
from agent.uplink.link import ConnectInfo, FleetLink, LinkError
from agent.uplink.outbox import Outbox, OutboxError, OutboxPublisher
from agent.uplink.telemetry import Telemetry
from agent.wire.core import Topics, encode
from agent.wire.device import state_message
from engines.errors import JetagentError
from engines.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

# What the retained state says of each camera: its ModelIdentity.
CAMERA_IDENTITY = tuple(f.name for f in fields(ModelIdentity))


class AgentView(AgentControl, Protocol):
    """What the session needs from the daemon besides the command hooks."""

    def describe_cameras(self) -> list[dict[str, Any]]: ...


def next_boot(state_dir: Path) -> int:
    """Increment and return the persisted boot counter (1 on a fresh state directory)."""
    path = state_dir / "boot"
    try:
        text = path.read_text().strip()
        last = int(text) if text.isdigit() else 0
        if not text.isdigit():
            log.warning("boot counter %s is unreadable (%r); starting again from 1", path, text)
    except FileNotFoundError:
        last = 0
    boot = last + 1
    atomic_write_bytes(path, f"{boot}\n".encode())
    return boot


def summarize(cameras: list[Mapping[str, Any]], system: Mapping[str, Any], outbox: Mapping[str, int]) -> dict[str, Any]:
    """The few numbers `jetfleet status` shows, carried in the retained state."""
    p99 = [c["latency_ms"]["total"]["p99"] for c in cameras if c.get("latency_ms", {}).get("total", {}).get("n")]
    return {
        "fps": round(sum(float(c.get("fps", 0.0)) for c in cameras), 2),
        "p99_ms": max(p99) if p99 else None,
        "temp_c": system.get("temp_max_c"),
        "gpu_load_pct": system.get("gpu_load_pct"),
        "cpu_pct": system.get("cpu_pct"),
        "errors": sum(int(c.get("errors", 0)) for c in cameras),
        "cameras_streaming": sum(1 for c in cameras if c.get("state") == "streaming"),
        "throttled": system.get("throttled"),
        "outbox_queued": outbox.get("queued", 0),
        "outbox_dropped": outbox.get("dropped", 0),
    }


class FleetSession:
    """Everything the daemon does for the fleet. `start()`, then `report()` per window, `close()`."""

    def __init__(self, config: Config, agent: AgentView, *, telemetry: Telemetry | None = None) -> None:
        if config.fleet is None:
            raise ValueError("FleetSession needs a [fleet] section")
        self.config = config
        self.fleet: FleetConfig = config.fleet
        self.device_id = config.device_id
        self.agent = agent
        self.topics = Topics(self.fleet.prefix)
        self.started_at = time.time()
        self._cameras = [{k: c.get(k) for k in CAMERA_IDENTITY} for c in agent.describe_cameras()]
        self._summary: dict[str, Any] = {}
        try:
            self.boot = next_boot(config.state_dir)
            self.outbox = Outbox(config.state_dir / "outbox.sqlite", self.fleet.outbox_max_messages,
                                 self.fleet.outbox_max_bytes)
        except (OSError, sqlite3.Error) as exc:
            raise JetagentError(f"state_dir {config.state_dir}: cannot keep fleet state there: {exc}") from exc
        try:
            # The will is fixed when paho connects: it says "lost" with what this process started with.
            self.link = FleetLink(self.fleet, self.device_id, will_topic=self.topics.state(self.device_id),
                                  will_payload=encode(self._state("lost", ts=self.started_at, connects=0)),
                                  reconnect=(self.fleet.reconnect_min_s, self.fleet.reconnect_max_s))
        except LinkError:
            self.outbox.close()
            raise
        self.publisher = OutboxPublisher(self.outbox, self.link)
        router = CommandRouter()
        register_agent_commands(router, agent, self.boot)
        self.commands = CommandService(router, self._reply)
        self.telemetry = telemetry or Telemetry(config.state_dir)
        self.reports = 0

    def start(self) -> None:
        self.telemetry.start()
        self.link.add_listener(self._on_connected)
        self.link.subscribe(self.topics.cmd(self.device_id), self.commands.sink, qos=1)
        self.commands.start()
        self.publisher.start()
        self.link.start()
        log.info("fleet: device %s boot %d, reporting every %g s to %s", self.device_id, self.boot,
                 self.config.health.interval_s, self.fleet.broker)

    def _state(self, state: str, ts: float | None = None, connects: int | None = None) -> dict[str, Any]:
        return state_message(device_id=self.device_id, state=state, boot=self.boot,
                             connects=self.link.connection_id if connects is None else connects,
                             agent_version=__version__, interval_s=self.config.health.interval_s,
                             cameras=self._cameras, summary=self._summary, ts=ts, groups=self.fleet.groups)

    def _on_connected(self, info: ConnectInfo) -> None:
        self.publish_state()
        self.publisher.wake()

    def _reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        own = self.topics.dev(self.device_id, "")
        if topic.startswith(own) and not topic.startswith(self.topics.cmd_reply(self.device_id, "")):
            # A response topic naming our own state/health/cmd topic would let a sender make the
            # device write junk there (the ACL allows the device its own topics).
            raise JetagentError(f"response topic {topic!r} is one of this device's own topics; "
                                f"replies go under {self.topics.cmd_reply(self.device_id, '')}")
        self.link.publish(topic, payload, qos=1, correlation_data=correlation)

    def publish_state(self, state: str = "online") -> None:
        """(Re)publish the retained state; only while connected (paho's queue is not a backlog)."""
        if not self.link.connected:
            return
        try:
            self.link.publish(self.topics.state(self.device_id), encode(self._state(state)), qos=1, retain=True)
        except LinkError as exc:
            log.warning("fleet: state not published: %s", exc)

    def report(self, snapshot: Mapping[str, Any], reason: str = "interval") -> int | None:
        """Queue one health report built from `snapshot` and refresh the retained state.
        Returns the report's seq, or None if the outbox could not store it."""
        cameras = list(snapshot.get("cameras", []))
        self._cameras = [{k: c.get(k) for k in CAMERA_IDENTITY} for c in cameras]
        system = self.telemetry.sample()
        box = self.outbox.stats()
        body = {
            "v": 1, "device_id": self.device_id, "boot": self.boot, "ts": snapshot.get("ts", round(time.time(), 3)),
            "reason": reason, "window_s": snapshot.get("window_s"), "uptime_s": snapshot.get("uptime_s"),
            "cameras": cameras, "system": system,
            "outbox": {k: box[k] for k in ("queued", "bytes", "dropped", "rejected")},
            "link": {"connected": self.link.connected, "connects": self.link.connection_id,
                     "max_packet_size": self.link.max_packet_size, "last_error": self.link.last_error},
        }
        seq: int | None
        try:
            seq = self.outbox.put(self.topics.health(self.device_id), lambda n: encode({**body, "seq": n}))
        except OutboxError as exc:
            log.error("fleet: health report lost: %s", exc)
            seq = None
        self.reports += 1
        self.publisher.wake()
        self._summary = summarize(cameras, system, box)
        self.publish_state()
        return seq

    def close(self) -> None:
        """Stop the workers, publish "offline" (retained) if connected, disconnect cleanly."""
        self.publisher.stop()
        self.commands.stop()
        self.link.stop(final=(self.topics.state(self.device_id), encode(self._state("offline"))))
        self.telemetry.stop()
        self.outbox.close()
