from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config

GOOD = """
device_id = "cam-01"
state_dir = "state"
[backend]
threads = 2
[[cameras]]
name = "front"
source = "clips/vtest.avi"
model = "models/person-ssdlite.onnx"
loop = true
[[cameras]]
name = "door"
source = "rtsp://10.1.2.3/stream"
model = "/opt/models/door.onnx"
"""


def test_good_config_resolves_relative_paths(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(GOOD)
    cfg = load_config(f)
    assert cfg.device_id == "cam-01" and cfg.backend.threads == 2
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.cameras[0].source == str(tmp_path / "clips/vtest.avi")
    assert cfg.cameras[0].model == tmp_path / "models/person-ssdlite.onnx"
    assert cfg.cameras[1].source == "rtsp://10.1.2.3/stream"
    assert cfg.cameras[1].model == Path("/opt/models/door.onnx")
    assert cfg.fleet is None and cfg.cameras[0].loop is True


def base() -> dict:
    return {"device_id": "d1", "state_dir": "/tmp/s",
            "cameras": [{"name": "a", "source": "x.avi", "model": "m.onnx"}]}


@pytest.mark.parametrize("mutate, where", [
    (lambda c: c.pop("device_id"), "device_id: missing"),
    (lambda c: c.update(device_id="bad id!"), "device_id"),
    (lambda c: c.update(cameras=[]), "cameras"),
    (lambda c: c["cameras"][0].update(loop="yes"), r"cameras\[0\]\.loop: must be true or false"),
    (lambda c: c["cameras"][0].update(sorce="x"), r"cameras\[0\]\.sorce: unknown key"),
    (lambda c: c["cameras"].append({"name": "a", "source": "y", "model": "m"}), r"cameras\[1\]\.name: duplicate"),
    (lambda c: c["cameras"][0].pop("model"), r"cameras\[0\]\.model: missing"),
    (lambda c: c.update(backend={"name": "openvino"}), "backend.name"),
    (lambda c: c.update(backend={"threads": -1}), "backend.threads"),
    (lambda c: c.update(backend={"precision": "int4"}), "backend.precision"),
    (lambda c: c.update(health={"interval_s": 0}), "health.interval_s"),
    (lambda c: c.update(fleet={"broker": "tcp://x"}), "fleet.broker"),
    (lambda c: c.update(fleet={"broker": "mqtt://h:1883", "tls": {"cert": "c.pem"}}), "fleet.tls.cert"),
    (lambda c: c.update(typo=1), "typo: unknown key"),
])
def test_bad_configs_name_the_key_path(mutate, where: str) -> None:
    raw = base()
    mutate(raw)
    with pytest.raises(ConfigError, match=where):
        parse_config(raw)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_fleet_section(tmp_path: Path) -> None:
    raw = base()
    raw["fleet"] = {"broker": "mqtts://broker.example:8883", "trusted_keys": ["keys/fleet.pub"]}
    cfg = parse_config(raw, base=tmp_path)
    assert cfg.fleet is not None and cfg.fleet.tls is not None and cfg.fleet.prefix == "jetagent"
