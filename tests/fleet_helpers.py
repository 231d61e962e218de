"""Real agent processes and a recording MQTT client, for the fleet-link tests.

Agents run through their real entry point (`python -m agent run --config ...`) on the
small generated ONNX model and a generated looping video, paced at its native rate so
they run until stopped. `Recorder` is a plain paho client that keeps every message.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import ROOT


def agent_config(directory: Path, *, broker: str | None, model: Path, video: Path, device_id: str = "cam-1",
                 interval_s: float = 0.3, fleet: dict[str, Any] | None = None,
                 tls: dict[str, Path] | None = None) -> Path:
    """A TOML config for one camera looping `video` at its native rate."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f'device_id = "{device_id}"', f'state_dir = "{directory / "state"}"', "[results]", 'output = "none"',
             "[health]", f"interval_s = {interval_s}"]
    if broker is not None:
        lines += ["[fleet]", f'broker = "{broker}"', "reconnect_min_s = 0.2", "reconnect_max_s = 0.5"]
        for k, v in (fleet or {}).items():
            lines.append(f"{k} = {json.dumps(v)}")
        if tls:
            lines.append("[fleet.tls]")
            lines += [f'{k} = "{v}"' for k, v in tls.items()]
    lines += ["[[cameras]]", 'name = "front"', f'source = "{video}"', f'model = "{model}"', 'pace = "native"',
              "loop = true"]
    path = directory / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """`python -m agent run --config CFG` with its stderr kept in a file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log_path = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self._log = open(self.log_path, "ab")  # closed in wait()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive() and self.proc is not None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._log.close()
        return rc

    def stop(self) -> int:
        self.signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.wait()

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.kill()


class Recorder:
    """A paho client that records every message on its subscriptions.

    With `persistent=True` it keeps an MQTT 5 session (expiry 300 s), so a broker that
    restarts with persistence queues what it missed while it reconnects.
    """

    def __init__(self, port: int, topics: list[str], *, client_id: str = "recorder", persistent: bool = False,
                 tls: dict[str, str] | None = None, username: str | None = None, password: str | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._topics = topics
        self._subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if tls:
            c.tls_set(ca_certs=tls["ca"], certfile=tls.get("cert"), keyfile=tls.get("key"))
        if username:
            c.username_pw_set(username, password)
        c.reconnect_delay_set(1, 1)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self._subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = 300
        c.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        c.loop_start()
        self.client = c
        if not self._subscribed.wait(10):
            raise RuntimeError("recorder: no SUBACK")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def json(self, topic_suffix: str) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(topic_suffix) and p]

    def wait_for(self, check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
                self._cond.wait(min(left, 0.2))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def jetfleet(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The `jetfleet` CLI through its real entry point."""
    return subprocess.run([sys.executable, "-m", "agent.jetfleet.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def status_json(broker_url: str, *extra: str) -> list[dict[str, Any]]:
    proc = jetfleet("--broker", broker_url, *extra, "status", "--json", "--wait", "1")
    if proc.returncode != 0:
        raise AssertionError(f"jetfleet status failed ({proc.returncode}): {proc.stderr}")
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    return rows


def first_seen(seqs: list[int]) -> list[int]:
    """Sequence numbers in arrival order with QoS 1 redeliveries removed."""
    seen: set[int] = set()
    out = []
    for s in seqs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
