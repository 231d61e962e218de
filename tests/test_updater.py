"""The updater end to end below MQTT: real store, real signed manifests, real models,
real camera pipelines on a generated video; the transport is a stand-in at our seam
(agent.updater.Transport) serving chunks from a real jetfleet repository."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import deploy_states as S
from agent.fetch import Chunk
from agent.fleetrepo import ModelRepo
from agent.pipeline import CameraPipeline
from agent.signing import TrustStore, generate_keys
from agent.slots import Slots
from agent.sources import Grabber, parse_source
from agent.store import ModelStore
from agent.updater import Desired, Updater
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

    def manifest(self, sha256: str, timeout: float) -> bytes | None:
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
            self.ref[0].on_chunk(Chunk(sha256, i, data[a:b]))


class Host:
    def __init__(self, pipes: dict[str, CameraPipeline]) -> None:
        self._pipes = pipes

    def pipelines(self) -> dict[str, CameraPipeline]:
        return self._pipes

    def open_runner(self, model_path: str, card: ModelCard, sha256: str, precision: str) -> ModelRunner:
        return open_model(model_path, card=card, sha256=sha256, options=BackendOptions(threads=1))

    def needs_optimize(self, precision: str) -> bool:
        return False

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
        self.updater = Updater(Host({"front": self.pipe}), self.store, self.slots, TrustStore.from_files([pub]),
                               self.transport, self.reports.append, manifest_timeout_s=1.0)
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
