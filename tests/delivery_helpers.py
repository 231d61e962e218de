"""A fleet on one machine for the model-delivery tests: a real Mosquitto, real
`jetfleet serve` and `jetfleet push` processes, real agent processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import Broker
from conftest import ROOT, color_frames, write_video
from fleet_helpers import AgentProcess, Recorder, agent_config, jetfleet
from onnx_models import color_classifier


def model_version(path: Path, name: str, *, size: int = 32, pad_bytes: int = 0) -> Path:
    """The colour classifier as a distinct file (metadata + optional padding initializer)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    p = color_classifier(path, size=size)
    m = onnx.load(str(p))
    m.metadata_props.add(key="version", value=name)
    if pad_bytes:  # an unused initializer: a bigger file with the same behaviour
        rng = np.random.default_rng(0)
        m.graph.initializer.append(numpy_helper.from_array(rng.integers(0, 255, pad_bytes, dtype=np.uint8), "pad"))
    onnx.save(m, str(p))
    card = json.loads(p.with_suffix(".json").read_text())
    card["name"] = name
    p.with_suffix(".json").write_text(json.dumps(card))
    return p


class Fleet:
    def __init__(self, tmp: Path, broker: Broker) -> None:
        self.tmp, self.broker = tmp, broker
        self.keys = tmp / "keys"
        self.repo = tmp / "repo"
        proc = jetfleet("keys", "init", "--dir", str(self.keys))
        if proc.returncode != 0:
            raise AssertionError(proc.stderr)
        self.video = write_video(tmp / "green.avi", color_frames(3)[1:2] * 20, fps=10)
        self.bootstrap = model_version(tmp / "models" / "v1" / "m.onnx", "v1")
        self.agents: dict[str, AgentProcess] = {}
        self.servers: list[subprocess.Popen[bytes]] = []
        self.recorder = Recorder(broker.port, ["jetagent/dev/+/deploy", "jetagent/models/+/get"],
                                 client_id=f"rec-{tmp.name}"[:60])

    def serve(self, *extra: str) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"serve{len(self.servers)}.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "agent.jetfleet.cli", "--broker", self.broker.url, "serve",
                              "--repo", str(self.repo), "--log-interval", "1", *extra],
                             cwd=ROOT, stdout=log, stderr=log)
        log.close()
        self.servers.append(p)
        time.sleep(0.5)  # subscribed before the first request
        return p

    def agent(self, device_id: str, *, results: bool = False, groups: list[str] | None = None,
              **fleet: Any) -> AgentProcess:
        d = self.tmp / device_id
        cfg = agent_config(d, broker=self.broker.url, model=self.bootstrap, video=self.video, device_id=device_id,
                           interval_s=0.5, fleet={"trusted_keys": [str(self.keys / "fleet.pub")],
                                                  "groups": groups or [], **fleet})
        if results:
            text = cfg.read_text().replace('output = "none"', f'output = "{d / "results.jsonl"}"')
            cfg.write_text(text)
        a = AgentProcess(cfg).start()
        self.agents[device_id] = a
        return a

    def publish_model(self, model: Path, *targets: str, chunk_size: int = 65536, job: str | None = None,
                      **desired: Any) -> str:
        """What `jetfleet push --no-wait` does, through the library: sign, add, publish retained."""
        from agent.jetfleet.repo import ModelRepo
        from agent.wire.core import Topics, encode

        entry = ModelRepo(self.repo).add(model, self.keys / "fleet.key", chunk_size=chunk_size)
        sha = entry.manifest.sha256
        topics = Topics("jetagent")
        c = self.recorder.client
        c.publish(topics.manifest(sha), entry.envelope, qos=1, retain=True).wait_for_publish(5)
        for t in targets:
            body = {"v": 1, "job": job or f"job-{time.time_ns()}", "model": sha, "issued": time.time(), **desired}
            c.publish(topics.desired(t), encode(body), qos=1, retain=True).wait_for_publish(5)
        return sha

    def push(self, model: Path, *targets: str, extra: tuple[str, ...] = (), timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
        args = ["--broker", self.broker.url, "push", str(model), "--repo", str(self.repo),
                "--key", str(self.keys / "fleet.key"), *extra]
        for t in targets:
            args += ["--device", t]
        return jetfleet(*args, timeout=timeout)

    def deploys(self, device_id: str) -> list[dict[str, Any]]:
        return [m for m in self.recorder.json("/deploy") if m.get("device_id") == device_id]

    def wait_deploy(self, device_id: str, check: Callable[[dict[str, Any]], bool], timeout: float = 30,
                    what: str = "deploy state") -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def ok() -> bool:
            hits = [m for m in self.deploys(device_id) if check(m)]
            found[:] = hits[-1:]
            return bool(hits)

        self.recorder.wait_for(ok, timeout=timeout, what=f"{device_id}: {what}")
        return found[0]

    def state_dir(self, device_id: str) -> Path:
        return self.tmp / device_id / "state"

    def close(self) -> None:
        for a in self.agents.values():
            if a.alive():
                a.kill()
        for p in self.servers:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        self.recorder.close()
