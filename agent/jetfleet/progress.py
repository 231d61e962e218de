"""Following deployments from the operator's side: which devices, and how far each is.

`DeployWatch` folds the retained `{p}/dev/{id}/deploy` and `{p}/dev/{id}/state`
messages of a set of target devices into one `Target` per device, matched on the job
id the operator published (or, for a rollback, on whatever the device reports next).
`Display` prints them: redrawn in place on a terminal, one line per change otherwise.
`group_members` finds a group's devices from their retained states (`"groups": [...]`).

Callbacks (paho's thread) only parse and record under a lock.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent.jetfleet.client import FleetClient
from agent.jetfleet.view import FleetView
from agent.wire import deploy as S
from agent.wire.core import Inbound, ProtocolError, Topics, decode
from agent.wire.deploy import check_deploy
from engines.errors import JetagentError

log = logging.getLogger(__name__)

WILDCARD_OVER = 20  # more targets than this: one wildcard subscription instead of one per device


@dataclass
class Target:
    device_id: str
    job: str | None  # None: the next job the device reports (after `baseline`)
    state: str = "pending"  # a deploy state of our job, or "pending" before the device takes it up
    progress: float | None = None
    precision: str | None = None
    reason: str = ""
    device_state: str | None = None  # online / offline / lost from its retained state; None = never seen
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    last: dict[str, Any] = field(default_factory=dict)  # the newest deploy message of any job
    baseline: tuple[Any, ...] | None = None

    @property
    def terminal(self) -> bool:
        return self.state in S.TERMINAL

    @property
    def seconds(self) -> float:
        return round((self.finished or time.monotonic()) - self.started, 1)

    def row(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "job": self.job, "state": self.state, "precision": self.precision,
                "reason": self.reason, "seconds": self.seconds, "progress": self.progress,
                "device_state": self.device_state}


def _key(msg: dict[str, Any]) -> tuple[Any, ...]:
    return msg.get("job"), msg.get("state"), msg.get("ts")


class DeployWatch:
    """Deploy states of some devices for one job each. Thread-safe."""

    def __init__(self, topics: Topics, targets: dict[str, str | None]) -> None:
        self.topics = topics
        self._lock = threading.Lock()
        self.changed = threading.Event()
        self.targets = {d: Target(d, job) for d, job in targets.items()}

    def subscribe(self, client: FleetClient) -> None:
        if len(self.targets) > WILDCARD_OVER:
            client.subscribe(self.topics.all_deploy(), self.on_message)
            client.subscribe(self.topics.all_states(), self.on_message)
            return
        for d in self.targets:
            client.subscribe(self.topics.deploy(d), self.on_message)
            client.subscribe(self.topics.state(d), self.on_message)

    def unsubscribe(self, client: FleetClient) -> None:
        if len(self.targets) > WILDCARD_OVER:
            client.unsubscribe(self.topics.all_deploy())
            client.unsubscribe(self.topics.all_states())
            return
        for d in self.targets:
            client.unsubscribe(self.topics.deploy(d))
            client.unsubscribe(self.topics.state(d))

    def restart(self, device_id: str, job: str | None) -> None:
        """Follow another job on this device from now on (its clock starts again)."""
        with self._lock:
            old = self.targets[device_id]
            t = self.targets[device_id] = Target(device_id, job, device_state=old.device_state, last=old.last)
            if job is None:
                t.baseline = _key(old.last) if old.last else None
            elif old.last.get("job") == job:
                self._apply_deploy(t, old.last)

    def on_message(self, msg: Inbound) -> None:
        """FleetClient's handler (paho's thread)."""
        self.apply(msg.topic, msg.payload)

    def apply(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_dev(topic)
        if parsed is None or parsed[0] not in self.targets or not payload:
            return
        device_id, leaf = parsed
        if leaf not in ("state", "deploy"):
            return
        try:
            msg = check_deploy(payload) if leaf == "deploy" else decode(payload, leaf)
        except ProtocolError as exc:
            log.debug("ignoring %s: %s", topic, exc)
            return
        if msg.get("device_id", device_id) != device_id:
            return
        with self._lock:
            t = self.targets[device_id]
            if leaf == "state" and isinstance(msg.get("state"), str):
                t.device_state = msg["state"]
            elif leaf == "deploy":
                t.last = msg
                if t.job is None and t.baseline != _key(msg):
                    t.job = msg["job"]
                if msg["job"] == t.job:
                    self._apply_deploy(t, msg)
            else:
                return
        self.changed.set()

    @staticmethod
    def _apply_deploy(t: Target, msg: dict[str, Any]) -> None:
        t.state = msg["state"]
        progress = msg.get("progress")  # check_deploy: a number in 0..1 when present
        t.progress = float(progress) if progress is not None else None
        if isinstance(msg.get("precision"), str):
            t.precision = msg["precision"]
        t.reason = str(msg.get("reason") or "")[:300]
        if t.terminal and t.finished is None:
            t.finished = time.monotonic()

    def snapshot(self) -> list[Target]:
        with self._lock:
            return [Target(**t.__dict__) for _, t in sorted(self.targets.items())]

    def follow(self, display: Display | None, timeout: float, header: str = "") -> list[Target]:
        """Redraw until every target is terminal or `timeout` s pass; the final snapshot."""
        deadline = time.monotonic() + timeout
        while True:
            self.changed.clear()
            snap = self.snapshot()
            if display is not None:
                display.show(snap, header)
            if all(t.terminal for t in snap) or time.monotonic() >= deadline:
                return snap
            self.changed.wait(min(1.0, max(0.0, deadline - time.monotonic())))


def describe(t: Target) -> tuple[str, str, str, str, str]:
    """(state, progress, precision, time, note) as the display prints a target."""
    state = t.state
    if state == "pending":
        state = "waiting" + {None: " (device never seen)", "online": ""}.get(t.device_state,
                                                                               f" (device {t.device_state})")
    elif not t.terminal and t.device_state in ("offline", "lost"):
        state += f" (device {t.device_state})"
    progress = f"{100 * t.progress:.0f}%" if t.progress is not None and not t.terminal else "-"
    return state, progress, t.precision or "-", f"{t.seconds:.0f}s", t.reason or "-"


def format_targets(targets: list[Target]) -> list[str]:
    head = ("DEVICE", "STATE", "PROGRESS", "PRECISION", "TIME", "REASON")
    body = [(t.device_id, *describe(t)) for t in targets]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    widths[-1] = 0  # the reason is not padded
    return ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in (head, *body)]


class Display:
    """On a terminal the table is redrawn in place; otherwise one line per change."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._drawn = 0
        self._seen: dict[str, tuple[str, ...]] = {}
        self._header = ""

    def show(self, targets: list[Target], header: str = "") -> None:
        if self.tty:
            lines = ([header] if header else []) + format_targets(targets)
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.stream.write(up + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
            self._drawn = len(lines)
        else:
            if header and header != self._header:
                self.stream.write(header + "\n")
                self._header = header
            stamp = time.strftime("%H:%M:%S")
            for t in targets:
                state, progress, precision, _, reason = describe(t)
                bucket = "" if t.progress is None or t.terminal else str(int(10 * t.progress))  # 10% steps
                key = (state, bucket, precision, reason)
                if self._seen.get(t.device_id) != key:
                    self._seen[t.device_id] = key
                    extra = "".join(f"  {x}" for x in (progress, precision, reason) if x != "-")
                    self.stream.write(f"{stamp}  {t.device_id}  {state}{extra}\n")
        self.stream.flush()


def groups_of(state: dict[str, Any] | None) -> list[str]:
    groups = (state or {}).get("groups")
    return [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []


def group_members(client: FleetClient, group: str, *, expect: int = 0, wait_s: float = 10.0) -> list[str]:
    """Devices whose retained state lists `group`, sorted. With `expect`, wait up to `wait_s`
    for that many to show up (else JetagentError naming who did)."""
    view = FleetView(client.topics)
    client.subscribe(client.topics.all_states(), view.on_message)

    def members() -> list[str]:
        return sorted(rec.device_id for rec in view.records() if group in groups_of(rec.state))

    # the retained states come in a burst after the SUBACK; live devices keep refreshing
    # theirs, so wait until no new device has shown up for a while rather than for silence
    start = last_new = time.monotonic()
    seen = 0
    while time.monotonic() - last_new < 0.3 and time.monotonic() - start < 2.0:
        time.sleep(0.02)
        n = len(view.records())
        if n != seen:
            seen, last_new = n, time.monotonic()
    deadline = time.monotonic() + wait_s
    found = members()
    while expect and len(found) < expect:
        if time.monotonic() > deadline:
            raise JetagentError(f"group {group}: {len(found)} of the expected {expect} devices showed up within "
                                f"{wait_s:g} s ({', '.join(found) or 'none'})")
        time.sleep(0.1)
        found = members()
    client.unsubscribe(client.topics.all_states())
    return found


def own_desired(client: FleetClient, devices: list[str]) -> dict[str, str]:
    """Devices (of `devices`) that hold a retained device-level desired state -> its job.
    While present it wins over any group desired state on that device."""
    found: dict[str, str] = {}
    lock = threading.Lock()
    wanted = set(devices)
    last = [time.monotonic()]

    def on(msg: Inbound) -> None:
        topic, payload = msg.topic, msg.payload
        parsed = client.topics.parse_dev(topic)
        last[0] = time.monotonic()
        if parsed is None or parsed[0] not in wanted or parsed[1] != "desired" or not payload:
            return
        try:
            job = str(decode(payload, "desired").get("job", "?"))
        except ProtocolError:
            job = "(invalid)"
        with lock:
            found[parsed[0]] = job

    flt = f"{client.topics.prefix}/dev/+/desired"
    client.subscribe(flt, on)
    start = time.monotonic()
    while time.monotonic() - last[0] < 0.3 and time.monotonic() - start < 2.0:
        time.sleep(0.02)
    client.unsubscribe(flt)
    with lock:
        return dict(found)
