"""`jetfleet serve` and `jetfleet keys init` against a real Mosquitto.

The requester is a plain MQTT client speaking the device's side of the wire
(agent.wire.chunks): block requests with a Response Topic and Correlation Data.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.jetfleet.client import FleetClient, FleetOptions
from agent.jetfleet.repo import ModelRepo
from agent.jetfleet.serve import ModelServer, throughput_line
from agent.wire.chunks import get_request, is_json, parse_chunk_frame, parse_server_error
from agent.wire.core import Inbound, Topics, encode
from agent.wire.manifest import Manifest
from agent.wire.signing import fingerprint_file, generate_keys
from broker import Broker
from conftest import ROOT
from fleet_helpers import jetfleet

T = Topics()
CARD = {"v": 1, "name": "blob", "task": "classification",
        "input": {"name": "image", "width": 32, "height": 32, "layout": "NCHW", "color": "RGB"},
        "postprocess": {"kind": "classification", "output": "logits"}, "labels": []}


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture()
def key(tmp_path: Path) -> Path:
    return generate_keys(tmp_path / "keys")[0]


def blob_model(path: Path, size: int, name: str = "blob") -> Path:
    """Random bytes with a card: the server never parses the model, it serves its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    path.with_suffix(".json").write_text(json.dumps({**CARD, "name": name}))
    return path


class Requester:
    """A device's side of the chunk protocol: requests out, replies (with correlation) in."""

    def __init__(self, broker: Broker, device: str = "dev-a") -> None:
        self.device = device
        self.client = FleetClient(FleetOptions(broker=broker.url)).connect()
        self.replies: list[tuple[str, bytes, bytes | None]] = []
        self.cond = threading.Condition()
        self.client.subscribe(T.dev(device, "reply/#"), self._on)

    def _on(self, m: Inbound) -> None:
        with self.cond:
            self.replies.append((m.topic, m.payload, m.correlation_data))
            self.cond.notify_all()

    def send(self, sha: str, payload: bytes, *, response_topic: str | None = "", correlation: bytes = b"c1") -> None:
        reply = None if response_topic is None else response_topic or T.reply(self.device, "chunks")
        self.client.publish(T.get(sha), payload, correlation_data=correlation, response_topic=reply)

    def ask(self, sha: str, chunks: list[int], correlation: bytes = b"c1") -> None:
        self.send(sha, encode(get_request(self.device, chunks)), correlation=correlation)

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[str, bytes, bytes | None]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.replies) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.replies)} of {n} replies within {timeout} s")
                self.cond.wait(left)
            return list(self.replies)

    def close(self) -> None:
        self.client.close()


def start_server(broker: Broker, repo: ModelRepo) -> ModelServer:
    client = FleetClient(FleetOptions(broker=broker.url)).connect()
    return ModelServer(client, repo).start()


def stop_server(server: ModelServer) -> None:
    server.stop()
    server.client.close()


def expect_chunks(replies: list[tuple[str, bytes, bytes | None]], m: Manifest, data: bytes) -> dict[int, bytes | None]:
    seen: dict[int, bytes | None] = {}
    for _topic, payload, corr in replies:
        sha, index, chunk = parse_chunk_frame(payload)
        a, b = m.chunk_range(index)
        assert sha == m.sha256 and chunk == data[a:b]
        assert index not in seen, f"chunk {index} answered twice"
        seen[index] = corr
    return seen


def test_block_requests_get_one_frame_per_index_with_the_correlation_data(broker: Broker, tmp_path: Path,
                                                                          key: Path) -> None:
    model = blob_model(tmp_path / "m.onnx", 64 * 1024 + 100)
    repo = ModelRepo(tmp_path / "repo")
    m = repo.add(model, key, chunk_size=4096).manifest
    server = start_server(broker, repo)
    dev = Requester(broker)
    try:
        dev.ask(m.sha256, [0, 5, 16], correlation=b"req-1")
        dev.ask(m.sha256, [3], correlation=b"req-2")
        replies = dev.wait(4)
        assert all(t == T.reply("dev-a", "chunks") for t, _, _ in replies)
        seen = expect_chunks(replies, m, model.read_bytes())
        assert seen == {0: b"req-1", 5: b"req-1", 16: b"req-1", 3: b"req-2"}
        assert len(parse_chunk_frame(replies[2][1])[2]) == 100  # the last, short chunk
        assert server.stats.chunks == 4 and server.stats.bytes == 3 * 4096 + 100 and server.stats.errors == 0
    finally:
        dev.close()
        stop_server(server)


def test_two_servers_share_the_requests_and_every_chunk_is_answered_once(broker: Broker, tmp_path: Path,
                                                                         key: Path) -> None:
    model = blob_model(tmp_path / "m.onnx", 80 * 4096)
    repo = ModelRepo(tmp_path / "repo")
    m = repo.add(model, key, chunk_size=4096).manifest
    servers = [start_server(broker, repo), start_server(broker, repo)]
    dev = Requester(broker)
    try:
        for i in range(0, 80, 2):
            dev.ask(m.sha256, [i, i + 1], correlation=f"r{i}".encode())
        seen = expect_chunks(dev.wait(80), m, model.read_bytes())
        assert sorted(seen) == list(range(80))
        assert all(seen[i] == f"r{i - i % 2}".encode() for i in seen)
        shares = [s.stats.requests for s in servers]
        assert sum(shares) == 40 and min(shares) > 0, shares
        time.sleep(0.3)
        assert len(dev.replies) == 80
    finally:
        dev.close()
        for s in servers:
            stop_server(s)


def test_unknown_model_and_malformed_requests_get_an_error_reply(broker: Broker, tmp_path: Path, key: Path) -> None:
    model = blob_model(tmp_path / "m.onnx", 3 * 4096)
    repo = ModelRepo(tmp_path / "repo")
    m = repo.add(model, key, chunk_size=4096).manifest
    server = start_server(broker, repo)
    dev = Requester(broker)
    try:
        dev.ask("ab" * 32, [0], correlation=b"unknown")
        dev.ask(m.sha256, [3], correlation=b"range")  # chunks 0..2 exist
        dev.send(m.sha256, b'{"v": 1, "device_id": "dev-a", "chunks": "all"}', correlation=b"shape")
        dev.send(m.sha256, b'{"v": 2, "device_id": "dev-a", "chunks": [0]}', correlation=b"version")
        replies = dev.wait(4)
        assert all(is_json(p) for _, p, _ in replies)
        errors = {corr: parse_server_error(p) for _, p, corr in replies}
        assert "not on this server" in errors[b"unknown"] and "abababababab" in errors[b"unknown"]
        assert "chunks" in errors[b"range"] and "0..2" in errors[b"range"]
        assert "chunks" in errors[b"shape"]
        assert "version" in errors[b"version"]
        assert json.loads(replies[0][1])["model"] == "ab" * 32
        assert server.stats.errors == 4 and server.stats.chunks == 0
    finally:
        dev.close()
        stop_server(server)


def test_foreign_or_missing_response_topics_are_refused_without_a_reply(broker: Broker, tmp_path: Path,
                                                                      key: Path) -> None:
    model = blob_model(tmp_path / "m.onnx", 2 * 4096)
    repo = ModelRepo(tmp_path / "repo")
    m = repo.add(model, key, chunk_size=4096).manifest
    server = start_server(broker, repo)
    attacker, victim = Requester(broker, "dev-a"), Requester(broker, "dev-b")
    watch = FleetClient(FleetOptions(broker=broker.url)).connect()
    elsewhere: list[str] = []
    watch.subscribe("#", lambda m: elsewhere.append(m.topic) if "/models/" not in m.topic else None)
    try:
        bad = encode(get_request("dev-a", [0, 1]))
        attacker.send(m.sha256, bad, response_topic=T.reply("dev-b", "chunks"))  # someone else's reply topic
        attacker.send(m.sha256, bad, response_topic=T.state("dev-a"))  # its own tree, not a reply topic
        attacker.send(m.sha256, bad, response_topic="some/other/app")
        attacker.send(m.sha256, bad, response_topic=None)
        # a malformed request naming another device cannot point an error reply at it either
        attacker.send("cd" * 32, encode(get_request("dev-a", [0])), response_topic=T.reply("dev-b", "chunks"))
        attacker.ask(m.sha256, [1], correlation=b"ok")  # the worker is FIFO: once this is answered, all were seen
        replies = attacker.wait(1)
        time.sleep(0.3)
        assert [c for _, _, c in attacker.replies] == [b"ok"] and replies[0][0] == T.reply("dev-a", "chunks")
        assert victim.replies == []
        assert set(elsewhere) == {T.reply("dev-a", "chunks")}, elsewhere
        assert server.stats.refused == 5 and server.stats.chunks == 1
    finally:
        for c in (attacker, victim):
            c.close()
        watch.close()
        stop_server(server)


def test_a_model_pushed_after_start_is_served_and_a_repush_with_another_chunk_size_too(
        broker: Broker, tmp_path: Path, key: Path) -> None:
    repo = ModelRepo(tmp_path / "repo")
    server = start_server(broker, repo)
    server.unknown_retry_s = 0.0
    dev = Requester(broker)
    try:
        model = blob_model(tmp_path / "late.onnx", 10 * 4096)
        sha = ModelRepo(tmp_path / "repo").add(model, key, chunk_size=4096).manifest.sha256
        dev.ask(sha, [0], correlation=b"first")
        dev.wait(1)
        assert not is_json(dev.replies[0][1])
        time.sleep(0.05)  # a distinct mtime for the re-written manifest
        m2 = repo.add(model, key, chunk_size=8192).manifest
        assert m2.sha256 == sha
        dev.ask(sha, [0], correlation=b"second")
        replies = dev.wait(2)
        _, index, data = parse_chunk_frame(replies[1][1])
        assert index == 0 and len(data) == 8192 and data == model.read_bytes()[:8192]
    finally:
        dev.close()
        stop_server(server)


def test_a_chunk_over_the_brokers_packet_limit_gets_an_error_not_a_disconnect(tmp_path: Path, key: Path) -> None:
    with Broker(tmp_path / "broker", max_packet_size=16 * 1024) as broker:
        model = blob_model(tmp_path / "m.onnx", 3 * 32 * 1024)
        repo = ModelRepo(tmp_path / "repo")
        m = repo.add(model, key, chunk_size=32 * 1024).manifest
        server = start_server(broker, repo)
        dev = Requester(broker)
        try:
            dev.ask(m.sha256, [1])
            (_, payload, _), = dev.wait(1)
            assert "does not fit the broker" in parse_server_error(payload)
            assert server.client.connected and server.client.max_packet_size == 16 * 1024
        finally:
            dev.close()
            stop_server(server)


def test_throughput_line_reads_well() -> None:
    prev = {"requests": 0, "chunks": 0, "bytes": 0, "errors": 0, "refused": 0, "dropped": 0, "devices": 0}
    cur = {**prev, "requests": 10, "chunks": 40, "bytes": 40_000_000, "devices": 2}
    line = throughput_line(prev, cur, 2.0, 7)
    assert line.startswith("served 40 chunks, 40.0 MB in 2.0 s = 20.0 MB/s; requests 10") and "in flight 7" in line


def test_serve_cli_answers_and_stops_cleanly_on_sigterm_and_sigint(broker: Broker, tmp_path: Path, key: Path) -> None:
    model = blob_model(tmp_path / "m.onnx", 4 * 4096)
    repo = ModelRepo(tmp_path / "repo")
    m = repo.add(model, key, chunk_size=4096).manifest
    procs = [subprocess.Popen([sys.executable, "-m", "agent.jetfleet.cli", "--broker", broker.url, "serve", "--repo",
                               str(repo.root), "--log-interval", "0.2"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    dev = Requester(broker)
    try:
        deadline = time.monotonic() + 20
        i = 0
        while len(dev.replies) < 4:  # until both are subscribed and answering
            assert time.monotonic() < deadline, "jetfleet serve did not answer"
            dev.ask(m.sha256, [i % 4], correlation=str(i).encode())
            i += 1
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGTERM)
        procs[1].send_signal(signal.SIGINT)
        logs = []
        for p in procs:
            _, err = p.communicate(timeout=20)
            assert p.returncode == 0, err
            assert "stopped:" in err and "Traceback" not in err
            logs.append(err)
        assert any("MB/s" in err for err in logs), logs  # the periodic throughput line
    finally:
        dev.close()
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_keys_init_writes_a_private_key_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    proc = jetfleet("keys", "init", "--dir", str(d))
    assert proc.returncode == 0, proc.stderr
    pub = d / "fleet.pub"
    assert stat.S_IMODE((d / "fleet.key").stat().st_mode) == 0o600
    assert fingerprint_file(pub) in proc.stdout
    assert f'trusted_keys = ["{pub.resolve()}"]' in proc.stdout
    before = (d / "fleet.key").read_bytes()
    again = jetfleet("keys", "init", "--dir", str(d))
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "refusing to overwrite" in again.stderr
    assert (d / "fleet.key").read_bytes() == before
