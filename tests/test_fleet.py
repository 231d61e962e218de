"""Acceptance: real agent processes, a real Mosquitto, `jetfleet` through its entry point."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.wire.core import Topics
from broker import Broker
from fleet_helpers import AgentProcess, Recorder, agent_config, first_seen, jetfleet, status_json

T = Topics()


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture()
def looping_video(tmp_path: Path) -> Path:
    from conftest import color_frames, write_video

    return write_video(tmp_path / "loop.avi", color_frames(30), fps=30.0)


def healths(rec: Recorder, device: str) -> list[dict]:
    return rec.json(f"/dev/{device}/health")


def test_online_health_status_offline_restart_and_lost(broker: Broker, tmp_path: Path, color_model: Path,
                                                       looping_video: Path) -> None:
    rec = Recorder(broker.port, [T.all_states(), T.all_health()])
    cfg = agent_config(tmp_path / "a", broker=broker.url, model=color_model, video=looping_video)
    agent = AgentProcess(cfg).start()
    try:
        rec.wait_for(lambda: len(healths(rec, "cam-1")) >= 3, what="three health reports")
        hs = healths(rec, "cam-1")
        assert [h["seq"] for h in hs[:3]] == [1, 2, 3]
        h = hs[-1]
        cam = h["cameras"][0]
        assert h["v"] == 1 and h["device_id"] == "cam-1" and h["boot"] == 1
        assert cam["camera"] == "front" and cam["model"] == "color-classifier" and cam["precision"] == "fp32"
        assert cam["backend"] == "onnxruntime" and len(cam["sha256"]) == 64 and cam["fps"] > 5
        assert set(cam["latency_ms"]) == {"preprocess", "infer", "postprocess", "total"}
        assert cam["latency_ms"]["infer"]["p99"] > 0 and cam["state"] == "streaming"
        for key in ("cpu_pct", "mem_used_mb", "disk_free_mb", "uptime_s", "temps_c", "gpu_load_pct", "throttled"):
            assert key in h["system"], key
        assert h["outbox"]["dropped"] == 0 and h["link"]["connected"]

        # retained state, refreshed with a summary at each report
        states = rec.json("/dev/cam-1/state")
        assert states[-1]["state"] == "online" and states[-1]["boot"] == 1 and states[-1]["summary"]["fps"] > 0
        rows = status_json(broker.url)
        assert len(rows) == 1
        row = rows[0]
        assert row["device_id"] == "cam-1" and row["state"] == "online"
        assert row["model"] == "color-classifier" and row["precision"] == "fp32" and row["fps"] > 5
        assert abs(row["last_seen"] - time.time()) < 5 and row["stale"] is False

        table = jetfleet("--broker", broker.url, "status")
        assert table.returncode == 0 and "cam-1" in table.stdout and "online" in table.stdout
        watch = jetfleet("--broker", broker.url, "watch", "--count", "2", "--interval", "0.2")
        assert watch.returncode == 0 and watch.stdout.count("cam-1") == 2 and "color-classifier" in watch.stdout

        assert agent.stop() == 0, agent.log()
    finally:
        agent.kill()
    row = status_json(broker.url)[0]
    assert row["state"] == "offline" and row["fps"] is None
    last_seq = healths(rec, "cam-1")[-1]["seq"]

    # Same state directory: boot 2, and the report sequence goes on where it stopped.
    agent = AgentProcess(cfg).start()
    try:
        rec.wait_for(lambda: any(s["state"] == "online" and s["boot"] == 2 for s in rec.json("/dev/cam-1/state")),
                     what="online, boot 2")
        rec.wait_for(lambda: healths(rec, "cam-1")[-1]["boot"] == 2, what="a boot-2 report")
        assert next(h["seq"] for h in healths(rec, "cam-1") if h["boot"] == 2) == last_seq + 1
        agent.signal(signal.SIGKILL)
        agent.wait()
        rec.wait_for(lambda: rec.json("/dev/cam-1/state")[-1]["state"] == "lost", what="the will (lost)")
    finally:
        agent.kill()
    lost = status_json(broker.url)[0]
    assert lost["state"] == "lost" and lost["boot"] == 2 and lost["model"] == "color-classifier"
    rec.close()
    assert "Traceback" not in agent.log()


def test_broker_outage_every_report_arrives_in_order_and_the_bound_drops_oldest(
        broker: Broker, tmp_path: Path, color_model: Path, looping_video: Path) -> None:
    rec = Recorder(broker.port, [T.all_health(), T.all_states()], persistent=True)
    big = AgentProcess(agent_config(tmp_path / "big", broker=broker.url, model=color_model, video=looping_video,
                                    device_id="big", interval_s=0.2)).start()
    small = AgentProcess(agent_config(tmp_path / "small", broker=broker.url, model=color_model,
                                      video=looping_video, device_id="small", interval_s=0.2,
                                      fleet={"outbox_max_messages": 3})).start()
    try:
        rec.wait_for(lambda: len(healths(rec, "big")) >= 2 and len(healths(rec, "small")) >= 2, what="reports")
        broker.stop()
        time.sleep(2.5)  # ~12 reports each, made while the broker is gone
        broker.start()
        before_big = max(h["seq"] for h in healths(rec, "big"))

        def caught_up() -> bool:
            hb, hs = healths(rec, "big"), healths(rec, "small")
            return (bool(hb) and hb[-1]["link"]["connects"] >= 2 and hb[-1]["seq"] >= before_big + 12
                    and bool(hs) and hs[-1]["link"]["connects"] >= 2 and hs[-1]["outbox"]["dropped"] > 0)

        rec.wait_for(caught_up, timeout=20, what="both agents to reconnect and drain")
    finally:
        big.kill()
        small.kill()
        rec.close()
    seqs = first_seen([h["seq"] for h in healths(rec, "big")])
    assert seqs == list(range(1, len(seqs) + 1)), "every report, in order, contiguous"
    assert healths(rec, "big")[-1]["outbox"]["dropped"] == 0

    small_seqs = first_seen([h["seq"] for h in healths(rec, "small")])
    assert small_seqs == sorted(small_seqs), "what survives the bound still arrives in order"
    missing = set(range(1, small_seqs[-1] + 1)) - set(small_seqs)
    dropped = healths(rec, "small")[-1]["outbox"]["dropped"]
    assert missing and len(missing) <= dropped, (sorted(missing), dropped)
    assert dropped >= 5  # ~12 made offline, 3 kept
    for name, a in (("big", big), ("small", small)):
        assert "Traceback" not in a.log(), name
        assert "reconnecting" in a.log() or "disconnected" in a.log()
    states = [s for s in rec.json("/dev/big/state") if s["state"] == "online"]
    assert states[-1]["connects"] >= 2


def test_agent_without_fleet_section_still_runs_standalone(tmp_path: Path, color_model: Path,
                                                           looping_video: Path) -> None:
    cfg = agent_config(tmp_path / "s", broker=None, model=color_model, video=looping_video, interval_s=0.2)
    agent = AgentProcess(cfg).start()
    try:
        deadline = time.monotonic() + 20
        while "fps" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.stop() == 0
    finally:
        agent.kill()
    log = agent.log()
    assert "front:" in log and "fleet" not in log and not (tmp_path / "s" / "state" / "outbox.sqlite").exists()


def test_jetfleet_errors_are_one_line(tmp_path: Path) -> None:
    from broker import free_port

    proc = jetfleet("--broker", f"mqtt://127.0.0.1:{free_port()}", "status")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("jetfleet: error: cannot connect to mqtt://127.0.0.1:")
    proc = jetfleet("--broker", "http://x", "status")
    assert proc.returncode == 2 and "broker URL must look like" in proc.stderr
    proc = jetfleet("cmd", "cam-1", "ping", "--args", "[1]")
    assert proc.returncode == 2 and "--args: must be a JSON object" in proc.stderr


def test_a_model_change_gets_its_own_report_from_the_same_single_snapshot(
        tmp_path: Path, color_model: Path, looping_video: Path) -> None:
    """In-process, with a recording stand-in for the fleet session (our own seam)."""
    import threading

    from agent.config import load_config
    from agent.daemon import Agent
    from engines.runner import open_model
    from onnx_models import color_classifier

    cfg = load_config(agent_config(tmp_path / "c", broker=None, model=color_model, video=looping_video,
                                   interval_s=30.0))
    agent = Agent(cfg)
    agent.open()

    class Reports:
        def __init__(self) -> None:
            self.got: list[tuple[str, dict]] = []

        def report(self, snapshot: dict, reason: str) -> None:
            self.got.append((reason, snapshot))

        def start(self) -> None:
            pass

        def close(self) -> None:
            pass

    fleet = Reports()
    agent.fleet = fleet  # type: ignore[assignment]
    agent.start()
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        time.sleep(1.0)
        assert fleet.got == []  # nothing changed, the interval is 30 s
        pipe = agent.cameras[0].pipeline
        new = open_model(color_classifier(tmp_path / "v2" / "color16.onnx", size=16))
        old = pipe.swap(new)
        deadline = time.monotonic() + 5
        while not fleet.got and time.monotonic() < deadline:
            time.sleep(0.05)
        old.close()
    finally:
        agent.stop_event.set()
        runner.join(10)
        agent.close()
    reason, snap = fleet.got[0]
    cam = snap["cameras"][0]
    assert reason == "change" and cam["sha256"] == new.sha256 != old.sha256
    assert cam["frames"] > 0 and cam["fps"] > 0  # the window since start, taken once
