"""Throughput of `jetfleet serve` on loopback: MB/s of chunk payload delivered.

Starts a Mosquitto (tests/broker.py), puts a random N MB "model" in a repository at
each chunk size, runs `python -m agent.jetfleet.cli serve` as its own process, and pulls the
whole file with one or more stand-in devices (plain paho clients that keep `--window`
chunks requested, `--batch` per block request, like the device's fetcher). Chunks are
counted and checked against the manifest's hashes; nothing is written to disk.

    .venv/bin/python scripts/bench_serve.py [--mb 64] [--chunk-kib 256,1024] [--window 16] [--devices 1]
        [--receiver python|c] [--broker-conf "set_tcp_nodelay true"]

`--receiver c` measures the server's own capacity: mosquitto_sub takes the chunks and
every request is sent at once, so neither a Python receiver nor request round trips set
the pace. The default measures the whole loop with Python devices that verify every chunk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent.jetfleet.repo import ModelRepo  # noqa: E402
from agent.mqtt import set_nodelay  # noqa: E402
from agent.wire.chunks import get_request, parse_chunk_frame  # noqa: E402
from agent.wire.core import Topics, encode  # noqa: E402
from agent.wire.signing import generate_keys  # noqa: E402
from broker import Broker  # noqa: E402

T = Topics()
VERIFY = os.environ.get("BENCH_VERIFY", "1") == "1"
CARD = {"v": 1, "name": "bench", "task": "classification",
        "input": {"name": "image", "width": 32, "height": 32, "layout": "NCHW", "color": "RGB"},
        "postprocess": {"kind": "classification", "output": "logits"}, "labels": []}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Puller:
    """A stand-in device: keeps `window` chunks requested until it has them all."""

    def __init__(self, port: int, device: str, sha: str, hashes: list[str], window: int, batch: int) -> None:
        self.device, self.sha, self.hashes = device, sha, hashes
        self.window, self.batch = window, batch
        self.verify = VERIFY
        self.todo = list(range(len(hashes)))[::-1]
        self.got: set[int] = set()
        self.bad = 0
        self.bytes = 0
        self.cond = threading.Condition()
        self.outstanding = 0
        self.reply = T.reply(device, "chunks")
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
        c.on_socket_open = lambda client, userdata, sock: set_nodelay(sock)
        c.on_message = self._on_message
        sub = threading.Event()
        c.on_subscribe = lambda *a: sub.set()
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe(self.reply, 1)
        if not sub.wait(10):
            raise RuntimeError("no SUBACK")
        self.client = c

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        sha, index, data = parse_chunk_frame(bytes(msg.payload))
        ok = sha == self.sha and (not self.verify or hashlib.sha256(data).hexdigest() == self.hashes[index])
        with self.cond:
            self.outstanding -= 1
            if ok and index not in self.got:
                self.got.add(index)
                self.bytes += len(data)
            elif not ok:
                self.bad += 1
            self.cond.notify_all()

    def run(self) -> float:
        t0 = time.perf_counter()
        while True:
            with self.cond:
                while self.outstanding > self.window - self.batch and len(self.got) < len(self.hashes):
                    self.cond.wait(1.0)
                if len(self.got) >= len(self.hashes):
                    return time.perf_counter() - t0
                batch = [self.todo.pop() for _ in range(min(self.batch, len(self.todo)))]
                self.outstanding += len(batch)
            if batch:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = self.reply
                props.CorrelationData = os.urandom(8)
                self.client.publish(T.get(self.sha), encode(get_request(self.device, batch)), qos=1,
                                    properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for_server(port: int, timeout: float = 30.0) -> None:
    """Ask for a model no server has until a server answers (with its error reply)."""
    answered = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-probe", protocol=mqtt.MQTTv5)
    c.on_message = lambda client, userdata, msg: answered.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe(T.reply("bench-probe", "chunks"), 1)
    deadline = time.monotonic() + timeout
    while not answered.is_set():
        if time.monotonic() > deadline:
            raise RuntimeError("jetfleet serve did not answer within {timeout} s")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = T.reply("bench-probe", "chunks")
        c.publish(T.get("0" * 64), encode(get_request("bench-probe", [0])), qos=1, properties=props)
        answered.wait(1.5)
    c.disconnect()
    c.loop_stop()


def pull_with_mosquitto_sub(port: int, device: str, sha: str, n_chunks: int, batch: int) -> float:
    """Server capacity: a C subscriber (mosquitto_sub) takes the chunks, every request is sent at
    once (the broker runs with an unlimited queue), so neither a Python receiver nor request
    round trips set the pace."""
    reply = T.reply(device, "chunks")
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1",
                            "-t", reply, "-C", str(n_chunks)], stdout=subprocess.DEVNULL)
    time.sleep(1.0)  # its SUBACK (its output is block-buffered, so not read from it)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device + "-req", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.perf_counter()
    for start in range(0, n_chunks, batch):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = os.urandom(8)
        c.publish(T.get(sha), encode(get_request(device, list(range(start, min(n_chunks, start + batch))))), qos=1,
                  properties=props)
    sub.wait()  # -C: it exits after the last chunk
    seconds = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--chunk-kib", default="256,1024")
    ap.add_argument("--window", type=int, default=16, help="chunks each device keeps requested")
    ap.add_argument("--batch", type=int, default=4, help="chunks per block request")
    ap.add_argument("--server-window", type=int, default=16, help="jetfleet serve --window")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--broker-conf", action="append", default=[], help="extra mosquitto.conf line")
    ap.add_argument("--receiver", choices=("python", "c"), default="python",
                    help="python: paho stand-in devices that verify every chunk; c: mosquitto_sub (server capacity)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = tmp / "bench.onnx"
    model.write_bytes(os.urandom(args.mb * 1024 * 1024))
    model.with_suffix(".json").write_text(json.dumps(CARD))
    key, _ = generate_keys(tmp / "keys")
    repo = ModelRepo(tmp / "repo")
    repo.manifests.mkdir(parents=True)
    results = []
    conf = list(args.broker_conf) + (["max_queued_messages 0", "max_queued_bytes 0"] if args.receiver == "c" else [])
    with Broker(tmp / "broker", extra=tuple(conf)) as broker:
        prefix = os.environ.get("BENCH_SERVER_PREFIX", "").split()  # e.g. "perf record -g --"
        server = subprocess.Popen([*prefix, sys.executable, "-m", "agent.jetfleet.cli", "--broker", broker.url, "serve",
                                   "--repo", str(repo.root), "--window", str(args.server_window),
                                   "--log-interval", "2"], cwd=ROOT)
        procs = {"server": server.pid, "broker": broker.proc.pid if broker.proc else 0}
        if args.receiver == "python":
            procs["pullers"] = os.getpid()
        try:
            wait_for_server(broker.port)
            for kib in (int(k) for k in args.chunk_kib.split(",")):
                # the same bytes again under another chunk size: the server notices the new manifest
                m = repo.add(model, key, chunk_size=kib * 1024).manifest
                for rnd in range(args.rounds):
                    cpu0 = {k: cpu_seconds(v) for k, v in procs.items()}
                    if args.receiver == "c":
                        wall = pull_with_mosquitto_sub(broker.port, f"bench-c-{kib}-{rnd}", m.sha256, m.n_chunks,
                                                       args.batch)
                        mb = m.size / 1e6
                        row: dict[str, object] = {"receiver": "mosquitto_sub"}
                    else:
                        wall, total, bad = pull_with_pullers(broker.port, f"bench-{kib}-{rnd}", m.sha256,
                                                             list(m.chunks), args)
                        mb = total / 1e6
                        row = {"receiver": f"{args.devices} paho device(s)", "bad": bad}
                    row.update({"chunk_kib": kib, "round": rnd, "mb": round(mb, 1), "seconds": round(wall, 3),
                                "mb_per_s": round(mb / wall, 1)})
                    row.update({f"{k}_cpu_pct": round(100 * (cpu_seconds(v) - cpu0[k]) / wall)
                                for k, v in procs.items()})
                    results.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(20)
    print(json.dumps({"summary": results}))
    return 0


def pull_with_pullers(port: int, name: str, sha: str, hashes: list[str],
                      args: argparse.Namespace) -> tuple[float, int, int]:
    pullers = [Puller(port, f"{name}-{i}", sha, hashes, args.window, args.batch) for i in range(args.devices)]
    threads = [threading.Thread(target=p.run) for p in pullers]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for p in pullers:
        p.close()
    return wall, sum(p.bytes for p in pullers), sum(p.bad for p in pullers)


if __name__ == "__main__":
    sys.exit(main())
