#!/usr/bin/env python3
"""`make demo`: the whole story on one machine, on the CPU.

A Mosquitto broker, `jetfleet serve`, one agent running the person detector on the
sample street video, then `jetfleet push` of the same model with INT8 asked for: the
device downloads it (signed, chunk by chunk), collects a calibration set from its own
camera, quantizes, gates the INT8 candidates against FP32 on held-out frames, swaps
the winner in, and passes probation. Everything runs under .state/demo/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".state" / "demo"
PY = sys.executable
DEVICE = "street-cam"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto() -> str:
    for c in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if c and os.path.exists(c):
            return c
    sys.exit("demo: mosquitto is not installed (make setup installs it)")


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    f = open(log, "ab")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    finally:
        f.close()


def jetfleet(broker: str, *args: str, check: bool = True, live: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [PY, "-m", "agent.jetfleet.cli", "--broker", broker, *args]
    if live:
        return subprocess.run(cmd, cwd=ROOT, text=True, check=check)
    return subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, check=check)


def wait_online(broker: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = jetfleet(broker, "status", "--json", "--wait", "1", check=False)
        if p.returncode == 0:
            rows = json.loads(p.stdout)
            if any(r["device_id"] == DEVICE and r["state"] == "online" and r.get("fps") for r in rows):
                return
        time.sleep(1)
    sys.exit("demo: the agent did not come online; see .state/demo/agent.log")


def main() -> int:
    clip, model = ROOT / "clips" / "vtest.avi", ROOT / "models" / "person-ssdlite.onnx"
    for need in (clip, model):
        if not need.exists():
            sys.exit(f"demo: {need} is missing (make demo fetches the clip; the model is in git)")
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        say("1. broker: Mosquitto on a free loopback port")
        port = free_port()
        (DEMO / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                                             + ("user root\n" if os.geteuid() == 0 else ""))
        procs.append(start([mosquitto(), "-c", str(DEMO / "mosquitto.conf")], DEMO / "mosquitto.log"))
        broker = f"mqtt://127.0.0.1:{port}"
        time.sleep(0.5)
        print(f"   {broker}")

        say("2. the fleet's signing key, and the model server")
        keys = jetfleet(broker, "keys", "init", "--dir", str(DEMO / "keys")).stdout.strip()
        print("   " + keys.replace("\n", "\n   "))
        procs.append(start([PY, "-m", "agent.jetfleet.cli", "--broker", broker, "serve", "--repo", str(DEMO / "repo")],
                           DEMO / "serve.log"))

        say(f"3. the agent: device {DEVICE}, FP32 person detector on {clip.name}, as fast as it serves")
        cfg = DEMO / "agent.toml"
        cfg.write_text(f'''device_id = "{DEVICE}"
state_dir = "{DEMO / 'device'}"
[backend]
threads = 1
[results]
output = "{DEMO / 'results.jsonl'}"
every = 10
[health]
interval_s = 2
[calibration]
frames = 48
holdout = 24
min_interval_s = 0.1
[fleet]
broker = "{broker}"
trusted_keys = ["{DEMO / 'keys' / 'fleet.pub'}"]
[[cameras]]
name = "street"
source = "{clip}"
model = "{model}"
loop = true
pace = "fast"
''')
        procs.append(start([PY, "-m", "agent", "run", "--config", str(cfg)], DEMO / "agent.log"))
        wait_online(broker)
        time.sleep(3)
        print(jetfleet(broker, "status").stdout)

        say("4. jetfleet push: the same detector, INT8 calibrated on the device's own frames")
        t0 = time.monotonic()
        push = jetfleet(broker, "push", str(model), "--device", DEVICE, "--repo", str(DEMO / "repo"),
                        "--key", str(DEMO / "keys" / "fleet.key"), "--precision", "int8", "--probation", "5",
                        "--timeout", "300", check=False, live=True)
        took = time.monotonic() - t0
        print(f"   push -> active: {took:.1f} s (exit {push.returncode})")
        time.sleep(4)

        say("5. the fleet now")
        print(jetfleet(broker, "status").stdout)
        deploy = last_deploy(broker)
        if deploy:
            cal = deploy.get("calibration", {})
            print(f"   serving {cal.get('precision', deploy.get('precision'))} ({cal.get('candidate', '-')}); "
                  f"gate {cal.get('metric', '-')} = {cal.get('value', '-')} (min {cal.get('minimum', '-')}); "
                  f"{cal.get('speedup_vs_fp32', '-')}x FP32 latency")
            print(f"   reason: {cal.get('reason', deploy.get('reason', ''))}")
        show_detections()
        return 0 if push.returncode == 0 else 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        print("\n   logs: .state/demo/{agent,serve,mosquitto}.log; results: .state/demo/results.jsonl")


def last_deploy(broker: str) -> dict | None:
    """The device's retained deploy state (what it says it serves, and why)."""
    sys.path.insert(0, str(ROOT))
    from agent.jetfleet.client import FleetClient, FleetOptions

    box: list[bytes] = []
    with FleetClient(FleetOptions(broker=broker)).connect() as client:
        client.subscribe(client.topics.deploy(DEVICE), lambda m: box.append(m.payload))
        time.sleep(0.5)
    return json.loads(box[-1]) if box else None


def show_detections() -> None:
    rows = [json.loads(x) for x in (DEMO / "results.jsonl").read_text().splitlines()[-200:] if x.strip()]
    shown = 0
    for r in rows[::-1]:
        people = [o for o in r["objects"] if o["label"] == "person"]
        if len(people) >= 3:
            boxes = ", ".join(str(o["box"]) for o in people[:3])
            print(f"   frame {r['seq']} ({r['precision']}, {r['latency_ms']} ms): {len(people)} people, e.g. {boxes}")
            shown += 1
        if shown == 3:
            break


if __name__ == "__main__":
    sys.exit(main())
