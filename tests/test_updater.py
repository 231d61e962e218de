"""The updater end to end below MQTT: real store, real signed manifests, real models,
real camera pipelines on a generated video; the transport is a stand-in at our seam
(agent.delivery.updater.Transport) serving chunks from a real jetfleet repository."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.camera.grabber import Grabber
from agent.camera.pipeline import CameraPipeline
from agent.camera.sources import parse_source
from agent.delivery.fetch import Chunk
from agent.delivery.slots import Slot, Slots
from agent.delivery.store import ModelStore
from agent.delivery.updater import Updater
from agent.jetfleet.repo import ModelRepo
from agent.wire import deploy as S
from agent.wire.desired import Desired
from agent.wire.signing import TrustStore, generate_keys
from engines.base import BackendOptions
from engines.modelcard import ModelCard
from engines.runner import ModelRunner, open_model
from onnx_models import color_classifier, red_failing_classifier, slow_classifier


class RepoTransport:
    def __init__(self, repo: ModelRepo, updater_ref: list[Updater]) -> None:
        self.repo, self.ref = repo, updater_ref
        self.connected = True
        self.requests: list[int] = []
        self.envelopes: dict[str, bytes] = {}

    def manifest(self, sha256: str, timeout: float, cancel: threading.Event) -> bytes | None:
        if sha256 in self.envelopes:
            return self.envelopes[sha256]
        try:
            return self.repo.get(sha256).envelope
        except Exception:
            return None

    def request(self, sha256: str, indices: list[int], request_id: str) -> None:
        e = self.repo.get(sha256)
        data = e.model_path.read_bytes()
        for i in indices:
            self.requests.append(i)
            a, b = e.manifest.chunk_range(i)
            self.ref[0].on_chunk(Chunk(sha256, i, data[a:b], request_id))


class Host:
    def __init__(self, pipes: dict[str, CameraPipeline], store: ModelStore) -> None:
        self._pipes = pipes
        self.store = store

    def pipelines(self) -> dict[str, CameraPipeline]:
        return self._pipes

    def open_runner(self, model_path: str, card: ModelCard, sha256: str, precision: str) -> ModelRunner:
        return open_model(model_path, card=card, sha256=sha256, options=BackendOptions(threads=1))

    def needs_optimize(self, precision: str) -> bool:
        return False

    def open_slot(self, slot: Slot, camera: str) -> ModelRunner:
        from engines.modelcard import card_path_for, load_card

        path = self.store.model_path(slot.sha256) if self.store.has(slot.sha256) else Path(slot.path)
        card = self.store.card_path(slot.sha256) if self.store.has(slot.sha256) else card_path_for(slot.path)
        return self.open_runner(str(path), load_card(card), slot.sha256, slot.precision)

    def optimize(self, *args: Any) -> tuple[ModelRunner, dict[str, Any]]:
        raise AssertionError("fp32 only in these tests")


class Camera:
    """A live camera at our FrameReader seam: 30 fps of one solid colour the test can change."""

    fps = 0.0

    def __init__(self) -> None:
        self.bgr = (0, 255, 0)

    def read(self) -> np.ndarray:
        time.sleep(1 / 30)
        return np.full((48, 64, 3), self.bgr, np.uint8)

    def rewind(self) -> bool:
        return False

    def close(self) -> None:
        pass


class Rig:
    def __init__(self, tmp: Path, first_model: Path) -> None:
        self.priv, pub = generate_keys(tmp / "keys")
        self.repo = ModelRepo(tmp / "repo")
        self.store = ModelStore(tmp / "state", max_model_bytes=10 * 1024 * 1024)
        self.slots = Slots(tmp / "state" / "slots.json")
        self.camera = Camera()
        g = Grabber(parse_source("/dev/video99"), opener=lambda spec: self.camera, name="front")
        self.pipe = CameraPipeline("front", g, open_model(first_model, options=BackendOptions(threads=1)))
        self.served: list[dict[str, Any]] = []
        self.pipe._sink = self.served.append
        self.reports: list[dict[str, Any]] = []
        ref: list[Updater] = []
        self.transport = RepoTransport(self.repo, ref)
        self.updater = Updater(Host({"front": self.pipe}, self.store), self.store, self.slots,
                               TrustStore.from_files([pub]), self.transport, self.reports.append,
                               manifest_timeout_s=1.0)
        ref.append(self.updater)
        self.stop = threading.Event()
        g.start()
        self.threads = [threading.Thread(target=self.pipe.run, args=(self.stop,)),
                        threading.Thread(target=self.updater.run, args=(self.stop,))]
        for t in self.threads:
            t.start()

    def push(self, model: Path, **kw: Any) -> str:
        return self.repo.add(model, self.priv, chunk_size=4096, **kw).manifest.sha256

    def deploy(self, sha: str, job: str, timeout: float = 30, **policy: Any) -> dict[str, Any]:
        pol = {"probation_s": 1.0, **policy}
        self.updater.submit(Desired.parse({"v": 1, "job": job, "model": sha, "policy": pol}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [r for r in self.reports if r["job"] == job and r["state"] in S.TERMINAL]
            if done:
                return done[-1]
            time.sleep(0.05)
        raise AssertionError(f"job {job} did not finish: {self.reports[-3:]}")

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.pipe.grabber.stop()
        self.pipe.runner.close()


@pytest.fixture()
def rig(tmp_path: Path):
    r = Rig(tmp_path, color_classifier(tmp_path / "v1" / "color.onnx"))
    yield r
    r.close()


def second_model(tmp_path: Path, name: str = "color-v2") -> Path:
    """The colour classifier as another file (a metadata prop makes its bytes and sha differ)."""
    import onnx

    p = color_classifier(tmp_path / name / "color.onnx")
    m = onnx.load(str(p))
    m.metadata_props.add(key="version", value=name)
    onnx.save(m, str(p))
    card = json.loads(p.with_suffix(".json").read_text())
    card["name"] = name
    card["labels"] = ["R", "G", "B"]
    p.with_suffix(".json").write_text(json.dumps(card))
    return p


def test_happy_path_download_swap_probation_commit(rig: Rig, tmp_path: Path) -> None:
    v1 = rig.pipe.runner.sha256
    sha = rig.push(second_model(tmp_path))
    out = rig.deploy(sha, "job-1")
    assert out["state"] == S.ACTIVE, out
    states = [r["state"] for r in rig.reports if r["job"] == "job-1"]
    assert [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]] == [
        S.RECEIVED, S.DOWNLOADING, S.VERIFYING, S.ACTIVATING, S.PROBATION, S.ACTIVE]
    assert rig.pipe.runner.sha256 == sha and rig.pipe.stats.errors == 0
    assert rig.slots.active("front").sha256 == sha and rig.slots.previous("front").sha256 == v1
    assert out["download"]["requested"] == len(set(rig.transport.requests))
    assert out["probation"]["front"]["frames"] > 0
    assert rig.store.partials() == []
    time.sleep(0.3)
    assert rig.served[-1]["model"] == "color-v2" and rig.served[-1]["objects"][0]["label"] == "G"
    # the same job again (a retained desired state after a restart) does nothing
    n = len(rig.reports)
    rig.updater.submit(Desired.parse({"v": 1, "job": "job-1", "model": sha}))
    time.sleep(0.5)
    assert len(rig.reports) == n
    # operator rollback: the previous model serves again
    rig.updater.request_rollback()
    deadline = time.monotonic() + 10
    while rig.pipe.runner.sha256 != v1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig.pipe.runner.sha256 == v1 and rig.slots.active("front").sha256 == v1


def rejected(rig: Rig, job: str, sha: str, match: str) -> None:
    before = rig.pipe.runner.sha256
    frames = rig.pipe.stats.frames
    out = rig.deploy(sha, job)
    assert out["state"] == S.FAILED and match in out["reason"], out
    time.sleep(0.2)
    assert rig.pipe.runner.sha256 == before and rig.pipe.stats.frames > frames  # still serving
    assert rig.store.partials() == [] and sha not in rig.store.stored()


def test_signature_rejections(rig: Rig, tmp_path: Path) -> None:
    sha = rig.push(second_model(tmp_path))
    env = json.loads(rig.repo.get(sha).envelope)
    rig.transport.envelopes[sha] = json.dumps({k: v for k, v in env.items() if k != "signature"}).encode()
    rejected(rig, "unsigned", sha, "not signed")
    rig.transport.envelopes[sha] = json.dumps(dict(env, manifest=env["manifest"].replace('"G"', '"X"'))).encode()
    rejected(rig, "tampered", sha, "does not verify")
    other, _ = generate_keys(tmp_path / "rogue")
    rogue_repo = ModelRepo(tmp_path / "rogue-repo")
    rig.transport.envelopes[sha] = rogue_repo.add(second_model(tmp_path, "rogue"), other, chunk_size=4096).envelope
    rejected(rig, "unknown-key", sha, "unknown key")


def test_content_rejections(rig: Rig, tmp_path: Path) -> None:
    junk = tmp_path / "junk" / "junk.onnx"
    junk.parent.mkdir()
    junk.write_bytes(b"definitely not a protobuf" * 500)
    junk.with_suffix(".json").write_text(second_model(tmp_path).with_suffix(".json").read_text())
    rejected(rig, "not-onnx", rig.push(junk), "cannot load")

    wrong = color_classifier(tmp_path / "big" / "color.onnx", size=48)
    card = json.loads(wrong.with_suffix(".json").read_text())
    card["input"]["width"] = card["input"]["height"] = 32  # card says 32, model takes 48
    wrong.with_suffix(".json").write_text(json.dumps(card))
    rejected(rig, "mismatch", rig.push(wrong), "shape")

    huge = tmp_path / "huge" / "m.onnx"
    huge.parent.mkdir()
    huge.write_bytes(np.zeros(11 * 1024 * 1024, np.uint8).tobytes())
    huge.with_suffix(".json").write_text(second_model(tmp_path).with_suffix(".json").read_text())
    rejected(rig, "too-big", rig.push(huge), "at most")

    rejected(rig, "no-manifest", "e" * 64, "no manifest")


def test_model_failing_live_is_rolled_back(rig: Rig, tmp_path: Path) -> None:
    # the camera shows green; switch it to red after the swap: the new model raises on red
    sha = rig.push(red_failing_classifier(tmp_path / "red" / "m.onnx"))
    v1 = rig.pipe.runner.sha256
    orig_swap = rig.pipe.swap

    def swap_then_turn_red(new: ModelRunner) -> ModelRunner:
        old = orig_swap(new)
        if new.sha256 == sha:
            rig.camera.bgr = (0, 0, 255)  # the scene changes right after the swap
        return old

    rig.pipe.swap = swap_then_turn_red  # type: ignore[method-assign]
    out = rig.deploy(sha, "red", probation_s=5.0)
    assert out["state"] == S.ROLLED_BACK and "inference error" in out["reason"], out
    assert rig.pipe.runner.sha256 == v1 and rig.slots.active("front") is None


def test_slow_model_is_rolled_back_below_the_fps_floor(rig: Rig, tmp_path: Path) -> None:
    sha = rig.push(slow_classifier(tmp_path / "slow" / "m.onnx", matmuls=60, dim=512))
    out = rig.deploy(sha, "slow", probation_s=2.0, min_fps_ratio=0.6)
    assert out["state"] == S.ROLLED_BACK and "below the floor" in out["reason"], out
    assert rig.pipe.runner.sha256 != sha


def test_shutdown_mid_download_leaves_no_verdict_and_the_job_runs_again(rig: Rig, tmp_path: Path) -> None:
    sha = rig.push(second_model(tmp_path))
    rig.transport.connected = False  # the download waits (paused, not failing)
    rig.updater.submit(Desired.parse({"v": 1, "job": "j", "model": sha}))
    deadline = time.monotonic() + 10
    while not any(r["state"] == S.DOWNLOADING for r in rig.reports) and time.monotonic() < deadline:
        time.sleep(0.02)
    rig.updater.cancel()  # the agent stops
    time.sleep(0.5)
    assert rig.reports[-1]["state"] == S.DOWNLOADING  # no "cancelled", no "failed"
    assert rig.slots.job_outcome("j") is None and rig.store.partials() == [sha]
    # the next process (same state) runs the same retained desired state to the end
    rig.stop.set()
    for t in rig.threads:
        t.join(5)
    rig.pipe.grabber.stop()
    again = Updater(rig.updater.host, rig.store, Slots(tmp_path / "state" / "slots.json"), rig.updater.trust,
                    rig.transport, rig.reports.append)
    rig.transport.ref[0] = again
    rig.transport.connected = True
    again.submit(Desired.parse({"v": 1, "job": "j", "model": sha, "policy": {"probation_s": 0.5}}))
    stop = threading.Event()
    worker = threading.Thread(target=again.run, args=(stop,))
    worker.start()
    g = Grabber(parse_source("/dev/video99"), opener=lambda spec: rig.camera, name="front")
    rig.pipe.grabber = g
    g.start()
    cam = threading.Thread(target=rig.pipe.run, args=(stop,))
    cam.start()
    try:
        deadline = time.monotonic() + 20
        while not (rig.reports[-1]["job"] == "j" and rig.reports[-1]["state"] in S.TERMINAL):
            assert time.monotonic() < deadline, rig.reports[-3:]
            time.sleep(0.05)
        assert rig.reports[-1]["state"] == S.ACTIVE
    finally:
        stop.set()
        worker.join(5)
        cam.join(5)
        g.stop()


def test_an_os_error_fails_the_job_and_the_worker_goes_on(rig: Rig, tmp_path: Path, monkeypatch) -> None:
    from agent.delivery import store as store_mod

    def broken(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    sha = rig.push(second_model(tmp_path))
    monkeypatch.setattr(store_mod, "atomic_write_json", broken)  # finish() cannot write the card
    out = rig.deploy(sha, "enospc")
    assert out["state"] == S.FAILED and "disk full" in out["reason"], out
    assert rig.store.partials() == [] and not list(rig.store.models.glob(".*"))
    monkeypatch.undo()

    def bug(*a: Any, **k: Any) -> ModelRunner:
        raise RuntimeError("a bug in opening models")

    monkeypatch.setattr(rig.updater.host, "open_runner", bug)
    out = rig.deploy(sha, "bug")
    assert out["state"] == S.FAILED and "internal error: RuntimeError: a bug" in out["reason"], out
    monkeypatch.undo()
    assert rig.deploy(sha, "after")["state"] == S.ACTIVE  # the worker is alive


def test_a_newer_desired_state_during_probation_is_the_one_that_runs(rig: Rig, tmp_path: Path) -> None:
    a, b, c = (rig.push(second_model(tmp_path, n)) for n in ("va", "vb", "vc"))
    rig.updater.submit(Desired.parse({"v": 1, "job": "A", "model": a, "policy": {"probation_s": 1.5}}))
    deadline = time.monotonic() + 10
    while not any(r["job"] == "A" and r["state"] == S.PROBATION for r in rig.reports):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    rig.updater.submit(Desired.parse({"v": 1, "job": "B", "model": b}))
    rig.updater.submit(Desired.parse({"v": 1, "job": "C", "model": c, "policy": {"probation_s": 0.5}}))
    out = rig.deploy(c, "C")  # waits for C's verdict (the rig resubmits the same job: a no-op)
    assert out["state"] == S.ACTIVE and rig.pipe.runner.sha256 == c
    assert not any(r["job"] == "B" for r in rig.reports)  # superseded before it started


def test_back_to_the_group_model_when_the_own_desired_state_is_cleared(rig: Rig, tmp_path: Path) -> None:
    g, d = rig.push(second_model(tmp_path, "vg")), rig.push(second_model(tmp_path, "vd"))
    assert rig.deploy(g, "group-job")["state"] == S.ACTIVE
    assert rig.deploy(d, "device-job")["state"] == S.ACTIVE
    n = len(rig.reports)
    rig.updater.submit(Desired.parse({"v": 1, "job": "group-job", "model": g, "policy": {"probation_s": 0.5}}))
    deadline = time.monotonic() + 15
    while not any(r["job"] == "group-job" and r["state"] == S.ACTIVE for r in rig.reports[n:]):
        assert time.monotonic() < deadline, rig.reports[n:]
        time.sleep(0.05)
    assert rig.pipe.runner.sha256 == g


def test_a_rollback_asked_during_a_download_cancels_it_then_rolls_back(rig: Rig, tmp_path: Path) -> None:
    v1 = rig.pipe.runner.sha256
    v2, v3 = rig.push(second_model(tmp_path, "v2")), rig.push(second_model(tmp_path, "v3"))
    assert rig.deploy(v2, "to-v2")["state"] == S.ACTIVE
    rig.transport.connected = False
    rig.updater.submit(Desired.parse({"v": 1, "job": "to-v3", "model": v3}))
    deadline = time.monotonic() + 10
    while not any(r["job"] == "to-v3" and r["state"] == S.DOWNLOADING for r in rig.reports):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    rig.updater.request_rollback("bad day")
    deadline = time.monotonic() + 10
    while rig.pipe.runner.sha256 != v1:
        assert time.monotonic() < deadline, rig.reports[-3:]
        time.sleep(0.05)
    states = {(r["job"], r["state"]) for r in rig.reports}
    assert ("to-v3", S.CANCELLED) in states
    assert any(r["state"] == S.ACTIVE and "bad day" in r.get("reason", "") for r in rig.reports)


def test_unsolicited_chunks_are_dropped_on_arrival(rig: Rig) -> None:
    rig.updater.on_chunk(Chunk("a" * 64, 0, b"x" * 100, "r"))
    assert rig.updater.inbox.queue.empty() and rig.updater.inbox.unsolicited == 1


@pytest.mark.parametrize("policy, where", [
    ({"probation_s": 1e300}, "probation_s"), ({"probation_s": 10**400}, "probation_s"),
    ({"check_frames": 0}, "check_frames"), ({"min_fps_ratio": 2}, "min_fps_ratio"),
])
def test_unreasonable_policies_are_refused(policy: dict, where: str) -> None:
    from agent.wire.core import ProtocolError

    with pytest.raises(ProtocolError, match=where):
        Desired.parse({"v": 1, "job": "j", "model": "a" * 64, "policy": policy})


def test_a_damaged_slots_file_is_set_aside(tmp_path: Path) -> None:
    p = tmp_path / "slots.json"
    p.write_text("{half a json")
    slots = Slots(p)
    assert slots.active("front") is None
    assert list(tmp_path.glob("slots.json.damaged-*"))
