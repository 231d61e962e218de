"""Model delivery end to end: a real Mosquitto, real `jetfleet serve` / `jetfleet push`
processes and real agent processes on real (generated) ONNX models and video."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.wire.chunks import chunk_frame, parse_get_request
from broker import Broker
from delivery_helpers import Fleet, model_version
from onnx_models import slow_classifier


@pytest.fixture()
def fleet(tmp_path: Path):
    with Broker(tmp_path / "broker") as b:
        f = Fleet(tmp_path, b)
        try:
            yield f
        finally:
            f.close()


def results(fleet: Fleet, device: str) -> list[dict]:
    path = fleet.tmp / device / "results.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def wait_serving(fleet: Fleet, device: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(results(fleet, device)) < 5:
        if time.monotonic() > deadline:
            raise AssertionError(f"{device} serves no frames: {fleet.agents[device].log()[-2000:]}")
        time.sleep(0.1)


def test_push_to_two_devices_swaps_without_dropping_a_frame(fleet: Fleet) -> None:
    fleet.serve()
    for d in ("cam-a", "cam-b"):
        fleet.agent(d, results=True)
    for d in ("cam-a", "cam-b"):
        wait_serving(fleet, d)
    v2 = model_version(fleet.tmp / "models" / "v2" / "m.onnx", "v2")
    fleet.publish_model(v2, "cam-a", "cam-b", policy={"probation_s": 1})
    for d in ("cam-a", "cam-b"):
        done = fleet.wait_deploy(d, lambda m: m["state"] in ("active", "failed", "rolled_back"))
        assert done["state"] == "active", done
    time.sleep(1.0)
    for d in ("cam-a", "cam-b"):
        assert fleet.agents[d].stop() == 0
        served = results(fleet, d)
        seqs = [r["seq"] for r in served]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{d}: a frame was dropped or repeated"
        models = [r["model"] for r in served]
        cut = models.index("v2")
        assert set(models[:cut]) == {"v1"} and set(models[cut:]) == {"v2"} and cut > 0
        assert all(r["objects"][0]["label"] == "green" for r in served)  # every frame served, rightly
        log = fleet.agents[d].log()
        assert "frame failed" not in log and "Traceback" not in log


def requested(fleet: Fleet) -> Counter[int]:
    asked: Counter[int] = Counter()
    for topic, payload, _ in list(fleet.recorder.messages):
        if topic.endswith("/get"):
            asked.update(parse_get_request(payload, 10**6)[1])
    return asked


def durable_bitmap(fleet: Fleet) -> set[int]:
    partial = fleet.state_dir("cam-a") / "partial"
    bitmaps = list(partial.glob("*/bitmap"))
    if not bitmaps:
        return set()
    return {i for i, b in enumerate(bitmaps[0].read_bytes()) if b}


def interrupt_at_half_and_resume(fleet: Fleet, interrupt) -> tuple[dict, set[int]]:
    server = fleet.serve()
    fleet.agent("cam-a")
    time.sleep(2.0)
    big = model_version(fleet.tmp / "models" / "big" / "m.onnx", "big", pad_bytes=6_000_000)
    chunk = 16384
    n_chunks = -(-big.stat().st_size // chunk)
    fleet.publish_model(big, "cam-a", chunk_size=chunk, policy={"probation_s": 1})
    deadline = time.monotonic() + 30
    while len(requested(fleet)) < n_chunks // 2:  # half the file asked for: freeze the server
        assert time.monotonic() < deadline, "the download did not start"
        time.sleep(0.002)
    server.send_signal(signal.SIGSTOP)
    time.sleep(1.2)  # the device makes what it has durable (every 0.5 s) and waits
    durable = durable_bitmap(fleet)
    assert 0 < len(durable) < n_chunks, len(durable)
    interrupt()
    server.send_signal(signal.SIGCONT)
    done = fleet.wait_deploy("cam-a", lambda m: m["state"] in ("active", "failed", "rolled_back"), timeout=60)
    assert done["state"] == "active", done
    asked = requested(fleet)
    again = {i: n for i, n in asked.items() if i in durable and n != 1}
    assert again == {}, f"verified chunks requested again: {again}"
    assert set(asked) == set(range(n_chunks))
    assert not any((fleet.state_dir("cam-a") / "partial").iterdir())
    return done, durable


def test_sigkill_mid_download_resumes_without_refetching(fleet: Fleet) -> None:
    def interrupt() -> None:
        fleet.agents["cam-a"].kill()  # SIGKILL: no goodbye, no flush
        fleet.agent("cam-a")  # same config, same state_dir

    done, durable = interrupt_at_half_and_resume(fleet, interrupt)
    assert done["resumed_chunks"] == len(durable)  # the new process started from the durable bitmap


def test_broker_restart_mid_download_resumes(fleet: Fleet) -> None:
    def interrupt() -> None:
        fleet.broker.stop()
        time.sleep(1.0)
        fleet.broker.start()
        fleet.recorder.client.reconnect()

    interrupt_at_half_and_resume(fleet, interrupt)


class RogueServer:
    """Answers every block request with the right header and the wrong bytes."""

    def __init__(self, port: int) -> None:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rogue", protocol=mqtt.MQTTv5)
        ready = threading.Event()
        c.on_connect = lambda cl, u, f, r, p: cl.subscribe("jetagent/models/+/get", 1)
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        ready.wait(10)
        self.client = c
        self.answered = 0

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        sha = msg.topic.split("/")[2]
        _, chunks = parse_get_request(bytes(msg.payload), 10**6)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg.properties.CorrelationData  # a server: it sees the requests
        for i in chunks:
            client.publish(msg.properties.ResponseTopic, chunk_frame(sha, i, os.urandom(4096)), qos=1,
                           properties=props)
            self.answered += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_forged_chunks_fail_the_job_and_the_old_model_keeps_serving(fleet: Fleet) -> None:
    rogue = RogueServer(fleet.broker.port)
    try:
        fleet.agent("cam-a", results=True)
        wait_serving(fleet, "cam-a")
        v2 = model_version(fleet.tmp / "models" / "v2" / "m.onnx", "v2")
        fleet.publish_model(v2, "cam-a")
        row = fleet.wait_deploy("cam-a", lambda m: m["state"] in ("active", "failed", "rolled_back"))
        assert row["state"] == "failed" and "failed verification 3 times" in row["reason"], row
        n = len(results(fleet, "cam-a"))
        time.sleep(0.5)
        later = results(fleet, "cam-a")
        assert len(later) > n and {r["model"] for r in later} == {"v1"}  # still serving the old model
        state = fleet.state_dir("cam-a")
        assert not any((state / "partial").iterdir()) and not any((state / "models").iterdir())
    finally:
        rogue.close()


def test_unsigned_manifest_is_refused(fleet: Fleet) -> None:
    fleet.serve()
    fleet.agent("cam-a")
    v2 = model_version(fleet.tmp / "models" / "v2" / "m.onnx", "v2")
    fleet.publish_model(v2, "cam-a", policy={"probation_s": 0.5})
    fleet.wait_deploy("cam-a", lambda m: m["state"] == "active")
    # an attacker re-publishes that manifest without its signature, under a new desired state
    sha = next(p.stem for p in (fleet.repo / "manifests").glob("*.json"))
    env = json.loads((fleet.repo / "manifests" / f"{sha}.json").read_text())
    env.pop("signature")
    c = fleet.recorder.client
    c.publish(f"jetagent/models/{sha}/manifest", json.dumps(env), qos=1, retain=True).wait_for_publish(5)
    desired = {"v": 1, "job": "attack-1", "model": sha}
    # the device already serves sha: ask for another precision so it must fetch the manifest again
    desired["precision"] = "fp16"
    c.publish("jetagent/dev/cam-a/desired", json.dumps(desired), qos=1, retain=True).wait_for_publish(5)
    out = fleet.wait_deploy("cam-a", lambda m: m.get("job") == "attack-1" and m["state"] == "failed")
    assert "not signed" in out["reason"]


def test_slow_model_is_rolled_back_in_probation(fleet: Fleet) -> None:
    fleet.serve()
    fleet.agent("cam-a")
    slow = slow_classifier(fleet.tmp / "models" / "slow" / "m.onnx", matmuls=200, dim=512)  # ~2-5 fps
    fleet.publish_model(slow, "cam-a", policy={"probation_s": 3, "min_fps": 8})
    row = fleet.wait_deploy("cam-a", lambda m: m["state"] in ("active", "failed", "rolled_back"))
    assert row["state"] == "rolled_back" and "below the floor" in row["reason"], row
    assert fleet.agents["cam-a"].alive()


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_restart_comes_up_on_the_committed_model(fleet: Fleet, sig: int) -> None:
    fleet.serve()
    fleet.agent("cam-a", results=True)
    wait_serving(fleet, "cam-a")
    v2 = model_version(fleet.tmp / "models" / "v2" / "m.onnx", "v2")
    fleet.publish_model(v2, "cam-a", policy={"probation_s": 0.5})
    assert fleet.wait_deploy("cam-a", lambda m: m["state"] in ("active", "failed"))["state"] == "active"
    fleet.agents["cam-a"].signal(sig)
    fleet.agents["cam-a"].wait()
    (fleet.tmp / "cam-a" / "results.jsonl").unlink()
    fleet.agent("cam-a", results=True)
    wait_serving(fleet, "cam-a")
    assert {r["model"] for r in results(fleet, "cam-a")} == {"v2"}


def test_jetfleet_push_and_rollback_through_the_cli(fleet: Fleet) -> None:
    fleet.serve()
    for d in ("cam-a", "cam-b"):
        fleet.agent(d)
    v2 = model_version(fleet.tmp / "models" / "v2" / "m.onnx", "v2")
    proc = fleet.push(v2, "cam-a", "cam-b", extra=("--probation", "1", "--json", "--timeout", "60"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)
    assert sorted(r["device_id"] for r in rows) == ["cam-a", "cam-b"]
    assert all(r["state"] == "active" and r["precision"] == "fp32" for r in rows), rows
    from fleet_helpers import jetfleet

    back = jetfleet("--broker", fleet.broker.url, "rollback", "--device", "cam-a", "--json", timeout=60)
    assert back.returncode == 0, back.stdout + back.stderr
    fleet.wait_deploy("cam-a", lambda m: m["job"].startswith("rollback-") and m["state"] == "active")
    status = jetfleet("--broker", fleet.broker.url, "status", "--json", "--wait", "1")
    models = {r["device_id"]: r["model"] for r in json.loads(status.stdout)}
    assert models == {"cam-a": "v1", "cam-b": "v2"}, models


def test_canary_rollout_promotes_then_halts_on_a_bad_model(fleet: Fleet) -> None:
    from fleet_helpers import jetfleet

    fleet.serve()
    for d in ("lobby-1", "lobby-2", "lobby-3"):
        fleet.agent(d, groups=["lobby"])
    state_dir = fleet.tmp / "rollouts"

    def rollout(model: Path) -> subprocess.CompletedProcess[str]:
        return jetfleet("--broker", fleet.broker.url, "rollout", str(model), "--group", "lobby", "--canary", "33%",
                        "--promote-after", "2s", "--max-failures", "0", "--expect", "3", "--repo", str(fleet.repo),
                        "--key", str(fleet.keys / "fleet.key"), "--probation", "2", "--min-fps", "8",
                        "--state-dir", str(state_dir), "--timeout", "90", "--json", timeout=150)

    good = model_version(fleet.tmp / "models" / "v2" / "m.onnx", "v2")
    proc = rollout(good)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = jetfleet("--broker", fleet.broker.url, "status", "--json", "--wait", "1")
    assert {r["device_id"]: r["model"] for r in json.loads(status.stdout)} == {
        "lobby-1": "v2", "lobby-2": "v2", "lobby-3": "v2"}

    bad = slow_classifier(fleet.tmp / "models" / "slow" / "m.onnx", matmuls=200, dim=512)
    proc = rollout(bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    canary = next(m for m in fleet.deploys("lobby-1") if m.get("name") == "slow-classifier")
    assert canary is not None
    time.sleep(2)
    status = jetfleet("--broker", fleet.broker.url, "status", "--json", "--wait", "1")
    models = {r["device_id"]: r["model"] for r in json.loads(status.stdout)}
    assert models == {"lobby-1": "v2", "lobby-2": "v2", "lobby-3": "v2"}, models  # halted; the canary rolled back
    assert any(m["state"] == "rolled_back" for m in fleet.deploys("lobby-1"))
    assert not any(m.get("name") == "slow-classifier" for d in ("lobby-2", "lobby-3") for m in fleet.deploys(d))


def test_int8_push_calibrates_on_the_device_and_a_collapsing_model_serves_fp32(fleet: Fleet) -> None:
    """calibrate (frames from the live camera) -> build candidates -> gate -> swap, through a
    real agent; the model's INT8 versions collapse (calib_models.blob_detector), so the gate
    rejects them and FP32 serves, and the deploy state says why, with the numbers."""
    import onnx

    from calib_models import blob_detector, blob_frames
    from conftest import write_video
    from fleet_helpers import AgentProcess, agent_config

    video = write_video(fleet.tmp / "blobs.avi", blob_frames(60), fps=20)
    boot = blob_detector(fleet.tmp / "models" / "blob0" / "m.onnx")
    pushed = blob_detector(fleet.tmp / "models" / "blob1" / "m.onnx")
    m = onnx.load(str(pushed))
    m.metadata_props.add(key="version", value="1")
    onnx.save(m, str(pushed))
    cfg = agent_config(fleet.tmp / "cam-a", broker=fleet.broker.url, model=boot, video=video, device_id="cam-a",
                       interval_s=0.5, fleet={"trusted_keys": [str(fleet.keys / "fleet.pub")]})
    cfg.write_text(cfg.read_text() + "[calibration]\nframes = 16\nholdout = 8\nmin_interval_s = 0.05\n"
                   "min_frames = 8\n")
    fleet.agents["cam-a"] = AgentProcess(cfg).start()
    fleet.serve()
    time.sleep(2)
    fleet.publish_model(pushed, "cam-a", precision="int8", policy={"probation_s": 1})
    out = fleet.wait_deploy("cam-a", lambda m: m["state"] in ("active", "failed", "rolled_back"), timeout=180)
    assert out["state"] == "active" and out["precision"] == "fp32", out
    states = [m["state"] for m in fleet.deploys("cam-a") if m["job"] == out["job"]]
    seen = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert seen[seen.index("verifying"):] == ["verifying", "calibrating", "building", "validating", "activating",
                                              "probation", "active"]
    cal = out["calibration"]
    assert cal["requested"] == "int8" and cal["precision"] == "fp32" and cal["fallback"] is True
    assert cal["metric"] == "detection_f1" and cal["calibration_set"]["calibration"] >= 8
    int8 = [c for c in cal["candidates"] if c["precision"] == "int8"]
    assert int8 and all(c["status"] == "failed" and c["value"] < 0.95 for c in int8), int8
    assert "0.95" in cal["reason"]
