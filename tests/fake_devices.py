"""Stand-in devices at our own protocol seam, for the operator-side tests (push, rollback, rollout).

A `FakeDevice` is an MQTT client that behaves like a jetagent on the wire: it publishes
a retained state (with `groups` and a health `summary`), follows its own and its groups'
desired states (its own wins while present; an empty retained payload clears one),
reports a scripted deployment on its retained deploy topic, and answers `rollback`.
No model is fetched or run: what is under test is the operator's side.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

from agent.jetfleet.client import FleetClient, FleetOptions
from agent.wire.core import Inbound, Topics, decode, encode
from agent.wire.device import command_ok, state_message
from broker import Broker

T = Topics()
OLD = "0" * 64


class FakeDevice:
    """outcome: "active", "failed", "rolled_back" or "hang" (stays downloading)."""

    def __init__(self, broker: Broker, device_id: str, *, groups: tuple[str, ...] = (), outcome: str = "active",
                 precision: str = "fp32", fps: float = 30.0, step_s: float = 0.05, reason: str = "",
                 online: bool = True, tick_s: float = 1.0) -> None:
        self.device_id, self.groups, self.outcome = device_id, groups, outcome
        self.precision, self.fps, self.errors, self.step_s, self.tick_s = precision, fps, 0, step_s, tick_s
        self.reason = reason or f"{outcome} on purpose (test)"
        self.model, self.previous = OLD, ""
        self.desired_seen: list[tuple[str, dict[str, Any] | None]] = []
        self.deploys: list[dict[str, Any]] = []
        self.rollbacks = 0
        self.done: set[str] = set()
        self._own: dict[str, Any] | None = None
        self._group: dict[str, dict[str, Any]] = {}
        self._applied = ""
        self._work: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self.client = FleetClient(FleetOptions(broker=broker.url, client_id=device_id)).connect()
        self.publish_state("online" if online else "offline")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()
        self.client.subscribe(T.desired(device_id), self._on_desired)
        for g in groups:
            self.client.subscribe(T.group_desired(g), self._on_desired)
        self.client.subscribe(T.cmd(device_id), self._on_cmd)

    # -- the wire ------------------------------------------------------------------------
    def publish_state(self, state: str = "online") -> None:
        msg = state_message(device_id=self.device_id, state=state, boot=1, connects=1, agent_version="0.1.0",
                            interval_s=0.2, cameras=[{"camera": "front", "model": "m", "sha256": self.model,
                                                      "backend": "onnxruntime", "precision": self.precision}],
                            summary={"fps": self.fps, "errors": self.errors})
        msg["groups"] = list(self.groups)
        self.client.publish(T.state(self.device_id), encode(msg), retain=True)

    def _deploy(self, job: str, model: str, state: str, **fields: Any) -> None:
        msg = {"v": 1, "device_id": self.device_id, "job": job, "state": state, "model": model,
               "ts": round(time.time(), 3), **fields}
        self.deploys.append(msg)
        self.client.publish(T.deploy(self.device_id), encode(msg), retain=True)
        time.sleep(self.step_s)

    def _on_desired(self, m: Inbound) -> None:
        topic, payload = m.topic, m.payload
        msg = decode(payload, "desired") if payload else None
        self.desired_seen.append((topic, msg))
        if topic == T.desired(self.device_id):
            self._own = msg
        elif msg is None:
            self._group.pop(topic, None)
        else:
            self._group[topic] = msg
        eff = self._own or (max(self._group.values(), key=lambda m: m.get("issued", 0)) if self._group else None)
        if eff is not None and eff["job"] != self._applied:
            self._applied = eff["job"]
            self._work.put(("deploy", eff))

    def _on_cmd(self, m: Inbound) -> None:
        self._work.put(("cmd", (json.loads(m.payload), m.response_topic, m.correlation_data)))

    # -- the worker: what a device's updater does, scripted ----------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind, item = self._work.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "deploy":
                self._run_job(item)
            else:
                self._run_cmd(*item)

    def _run_job(self, d: dict[str, Any]) -> None:
        job, model = d["job"], d["model"]
        if job in self.done:
            return
        self.done.add(job)
        self._deploy(job, model, "received", source="device")
        if model == self.model:
            self._deploy(job, model, "activating")
            self._deploy(job, model, "active", reason="already serving this model")
            return
        for p in (0.0, 0.5, 1.0):
            self._deploy(job, model, "downloading", name="m", progress=p)
            if self.outcome == "hang":
                return
        if self.outcome == "failed":
            self._deploy(job, model, "failed", name="m", reason=self.reason)
            return
        self._deploy(job, model, "verifying", name="m")
        self._deploy(job, model, "activating", name="m", precision=self.precision)
        self.previous, self.model = self.model, model
        self._deploy(job, model, "probation", name="m", precision=self.precision)
        if self.outcome == "rolled_back":
            self.model, self.previous = self.previous, self.model
            self._deploy(job, model, "rolled_back", name="m", precision=self.precision, reason=self.reason)
            return
        self._deploy(job, model, "active", name="m", precision=self.precision)

    def _run_cmd(self, cmd: dict[str, Any], response_topic: str | None, corr: bytes | None) -> None:
        if cmd.get("cmd") != "rollback":
            reply: dict[str, Any] = {"v": 1, "ok": False, "error": f"unknown command {cmd.get('cmd')!r}"}
        elif not self.previous:
            reply = {"v": 1, "ok": False, "error": "rollback: nothing to roll back to"}
        else:
            reply = command_ok({"queued": True})
        if response_topic:
            self.client.publish(response_topic, encode(reply), correlation_data=corr)
        if reply["ok"]:
            self.rollbacks += 1
            job = f"rollback-{int(time.time() * 1000)}"
            self.model, self.previous = self.previous, self.model
            self._deploy(job, self.model, "received", source="command", reason=cmd["args"].get("reason", ""))
            self._deploy(job, self.model, "activating")
            self._deploy(job, self.model, "active", reason="rolled back")

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.publish_state()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ticker.join(5)
        self.client.close()


def retained(broker: Broker, topic_filter: str, settle_s: float = 0.5) -> dict[str, bytes]:
    """The retained messages under a filter, topic -> payload."""
    got: dict[str, bytes] = {}
    c = FleetClient(FleetOptions(broker=broker.url)).connect()
    c.subscribe(topic_filter, lambda m: got.__setitem__(m.topic, m.payload))
    time.sleep(settle_s)
    c.close()
    return {t: p for t, p in got.items() if p}


def write_key_dir(tmp: Path) -> tuple[Path, Path]:
    from agent.wire.signing import generate_keys

    return generate_keys(tmp / "keys")
