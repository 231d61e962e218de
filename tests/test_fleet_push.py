"""`jetfleet push` and `jetfleet rollback` through the real entry point, against a real
Mosquitto; the devices are stand-ins at the protocol seam (tests/fake_devices.py)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_devices import FakeDevice, retained, write_key_dir

from agent.jetfleet.progress import Display, Target
from agent.jetfleet.push import LARGE_MODEL, choose_chunk_size, chunk_limit
from agent.wire.core import Topics, decode
from agent.wire.desired import Desired, desired_message
from agent.wire.manifest import parse_manifest
from agent.wire.signing import TrustStore, verify
from broker import Broker, free_port
from engines.errors import JetagentError
from fleet_helpers import jetfleet

T = Topics()
KIB, MIB = 1024, 1024 * 1024


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_key_dir(tmp_path)


def push(broker: Broker, model: Path, repo: Path, key: Path, *args: str, timeout: float = 60):
    return jetfleet("--broker", broker.url, "push", str(model), "--repo", str(repo), "--key", str(key), *args,
                    timeout=timeout)


def test_push_publishes_a_signed_manifest_and_desired_states_and_follows_each_device(
        broker: Broker, tmp_path: Path, color_model: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    good = FakeDevice(broker, "cam-a", precision="int8")
    bad = FakeDevice(broker, "cam-b", outcome="failed", reason="manifest signed by unknown key 0123")
    try:
        proc = push(broker, color_model, tmp_path / "repo", priv, "--device", "cam-a", "--device", "cam-b",
                    "--device", "cam-gone", "--precision", "int8", "--probation", "5", "--min-fps", "2.5",
                    "--accuracy-min", "0.9", "--timeout", "2", "--json")
        assert proc.returncode == 1, proc.stderr
        rows = {r["device_id"]: r for r in json.loads(proc.stdout)}
        assert rows["cam-a"]["state"] == "active" and rows["cam-a"]["precision"] == "int8"
        assert rows["cam-b"]["state"] == "failed" and "unknown key" in rows["cam-b"]["reason"]
        assert rows["cam-gone"]["state"] == "pending" and rows["cam-gone"]["timed_out"] is True
        assert len({r["job"] for r in rows.values()}) == 1 and all(r["seconds"] >= 0 for r in rows.values())
        assert "chunks" in proc.stderr and "256 KiB" in proc.stderr and "timed out waiting for cam-gone" in proc.stderr

        manifests = retained(broker, f"{T.prefix}/models/+/manifest")
        (topic, envelope), = manifests.items()
        m = parse_manifest(verify(envelope, TrustStore.from_files([pub])))
        assert topic == T.manifest(m.sha256) and m.chunk_size == 256 * KIB and m.accuracy.minimum == 0.9
        assert m.size == color_model.stat().st_size and m.name == "color-classifier"
        desired = retained(broker, f"{T.prefix}/dev/+/desired")
        assert set(desired) == {T.desired(d) for d in ("cam-a", "cam-b", "cam-gone")}
        d = Desired.parse(decode(desired[T.desired("cam-a")]))
        assert d.sha256 == m.sha256 and d.job == rows["cam-a"]["job"] and d.precision == "int8"
        assert d.policy.probation_s == 5 and d.policy.min_fps == 2.5
        assert good.model == m.sha256
    finally:
        good.close()
        bad.close()


def test_push_to_healthy_devices_exits_0_and_prints_progress_lines(broker: Broker, tmp_path: Path,
                                                                  color_model: Path,
                                                                  keys: tuple[Path, Path]) -> None:
    devs = [FakeDevice(broker, "cam-a"), FakeDevice(broker, "cam-b")]
    try:
        proc = push(broker, color_model, tmp_path / "repo", keys[0], "--device", "cam-a", "--device", "cam-b")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert any("cam-a  downloading" in x and "50%" in x for x in lines), proc.stdout
        assert any(x.endswith("cam-b  active  fp32") for x in lines), proc.stdout
        assert "\x1b[" not in proc.stdout  # not a terminal: plain lines
    finally:
        for dev in devs:
            dev.close()


def test_push_to_a_group_follows_its_members_but_not_one_pinned_by_its_own_desired_state(
        broker: Broker, tmp_path: Path, color_model: Path, keys: tuple[Path, Path]) -> None:
    devs = [FakeDevice(broker, "lobby-1", groups=("lobby",)), FakeDevice(broker, "lobby-2", groups=("lobby", "x")),
            FakeDevice(broker, "pinned", groups=("lobby",)), FakeDevice(broker, "yard-1", groups=("yard",))]
    try:
        first = push(broker, color_model, tmp_path / "repo", keys[0], "--device", "pinned")
        assert first.returncode == 0, first.stdout + first.stderr
        proc = push(broker, color_model, tmp_path / "repo", keys[0], "--group", "lobby", "--expect", "3", "--json")
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)
        assert [r["device_id"] for r in rows] == ["lobby-1", "lobby-2"]
        assert all(r["state"] == "active" for r in rows)
        assert "pinned has its own desired state" in proc.stderr
        group = retained(broker, f"{T.prefix}/group/+/desired")
        assert list(group) == [T.group_desired("lobby")]
        assert Desired.parse(decode(group[T.group_desired("lobby")])).job == rows[0]["job"]
        assert devs[3].desired_seen == []  # yard is not lobby
        few = push(broker, color_model, tmp_path / "repo", keys[0], "--group", "yard", "--expect", "2",
                   "--expect-wait", "0.5", "--no-wait")
        assert few.returncode == 2 and "1 of the expected 2 devices" in few.stderr
    finally:
        for dev in devs:
            dev.close()


def test_push_refuses_what_a_device_would_refuse_before_publishing_anything(broker: Broker, tmp_path: Path,
                                                                           color_model: Path,
                                                                           keys: tuple[Path, Path]) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    junk.with_suffix(".json").write_text(color_model.with_suffix(".json").read_text())
    card = json.loads(color_model.with_suffix(".json").read_text())
    card["input"]["name"] = "pixels"
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(card))
    cases = [
        (push(broker, junk, tmp_path / "repo", keys[0], "--device", "cam-a"), "is not a valid ONNX model"),
        (push(broker, color_model, tmp_path / "repo", keys[0], "--device", "cam-a", "--card", str(wrong)),
         "no input named 'pixels'"),
        (push(broker, color_model, tmp_path / "repo", tmp_path / "nokey", "--device", "cam-a"), "no such file"),
        (push(broker, color_model, tmp_path / "repo", keys[0], "--device", "a/b"), "--device 'a/b'"),
        (push(broker, color_model, tmp_path / "repo", keys[0], "--device", "cam-a", "--chunk-size", "100M"),
         "--chunk-size 104857600: must be 4096.."),
    ]
    for proc, words in cases:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    assert retained(broker, f"{T.prefix}/#", settle_s=0.3) == {}
    down = jetfleet("--broker", f"mqtt://127.0.0.1:{free_port()}", "push", str(color_model), "--device", "cam-a",
                    "--repo", str(tmp_path / "repo"), "--key", str(keys[0]))
    assert down.returncode == 2 and "cannot connect" in down.stderr


def test_chunk_size_follows_the_model_size_and_the_packet_limits(tmp_path: Path, color_model: Path,
                                                                 keys: tuple[Path, Path]) -> None:
    unlimited = 268435460
    assert choose_chunk_size(10 * MIB, unlimited, "jetagent")[0] == 256 * KIB
    size, why = choose_chunk_size(LARGE_MODEL, unlimited, "jetagent")
    assert size == MIB and "16 MiB or more" in why
    assert choose_chunk_size(LARGE_MODEL, 600 * KIB, "jetagent")[0] == 512 * KIB  # 1 MiB does not fit
    assert choose_chunk_size(1 * MIB, 100 * KIB, "jetagent")[0] == 64 * KIB
    assert chunk_limit(unlimited, "jetagent") < 16 * MIB  # the device's own limit binds
    assert choose_chunk_size(1, unlimited, "jetagent", requested=5000) == (5000, "as asked (--chunk-size)")
    with pytest.raises(JetagentError, match="chunks cannot fit"):
        choose_chunk_size(1 * MIB, 4 * KIB, "jetagent")
    with Broker(tmp_path / "broker", max_packet_size=200_000) as small:
        proc = push(small, color_model, tmp_path / "repo", keys[0], "--device", "cam-a", "--no-wait")
        assert proc.returncode == 0, proc.stderr
        (_, envelope), = retained(small, f"{T.prefix}/models/+/manifest").items()
        assert parse_manifest(verify(envelope, TrustStore.from_files([keys[1]]))).chunk_size == 128 * KIB
        assert "128 KiB: the largest power of two under the packet limit" in proc.stdout


def test_desired_message_is_what_the_device_parses() -> None:
    msg = desired_message("job-1", "a" * 64, precision="fp16", policy={"probation_s": 3.0}, cameras=["front"])
    d = Desired.parse(msg)
    assert (d.job, d.sha256, d.precision, d.cameras, d.policy.probation_s) == ("job-1", "a" * 64, "fp16",
                                                                                ("front",), 3.0)
    assert msg["issued"] > time.time() - 5


def test_rollback_sends_the_command_and_follows_the_device(broker: Broker, tmp_path: Path, color_model: Path,
                                                           keys: tuple[Path, Path]) -> None:
    dev = FakeDevice(broker, "cam-a")
    fresh = FakeDevice(broker, "cam-new")
    try:
        nothing = jetfleet("--broker", broker.url, "rollback", "--device", "cam-new")
        assert nothing.returncode == 1 and "nothing to roll back to" in nothing.stderr
        assert push(broker, color_model, tmp_path / "repo", keys[0], "--device", "cam-a").returncode == 0
        pushed = dev.model
        proc = jetfleet("--broker", broker.url, "rollback", "--device", "cam-a", "--json", "--timeout", "10")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (row,) = json.loads(proc.stdout)
        assert row["state"] == "active" and row["job"].startswith("rollback-") and dev.rollbacks == 1
        assert dev.model != pushed
        gone = jetfleet("--broker", broker.url, "rollback", "--device", "cam-gone", "--timeout", "1")
        assert gone.returncode == 2 and "no reply from cam-gone" in gone.stderr
    finally:
        dev.close()
        fresh.close()


def test_the_terminal_display_redraws_in_place() -> None:
    out = io.StringIO()
    d = Display(out, tty=True)
    t = Target("cam-a", "j", state="downloading", progress=0.42, device_state="online")
    d.show([t], "job j")
    t.state, t.progress, t.precision, t.finished = "active", 1.0, "int8", t.started + 3
    d.show([t], "job j")
    text = out.getvalue()
    assert "42%" in text and "\x1b[3F" in text and "active" in text and "int8" in text
    assert text.count("DEVICE") == 2


def test_push_runs_the_model_once_with_its_card_before_publishing(broker: Broker, tmp_path: Path,
                                                                   keys: tuple[Path, Path]) -> None:
    """Not only a load: one inference on a generated frame through the card's preprocessing."""
    from card_models import colour_yolo, efficient_nms_model, hand_card_for_colour_yolo
    from onnx_models import failing_model

    fails = failing_model(tmp_path / "fails.onnx")  # loads, fits its card, raises at inference
    yolo = colour_yolo(tmp_path / "yolo.onnx", metadata=False)
    card = hand_card_for_colour_yolo()
    card["input"].update(width=300, height=300)  # a stride-32 model at 300x300
    (tmp_path / "yolo300.json").write_text(json.dumps(card))
    nms = efficient_nms_model(tmp_path / "nms.onnx")  # no card, and its colour order is only a guess
    cases = [
        (push(broker, fails, tmp_path / "repo", keys[0], "--device", "cam-a"),
         "does not run on the card's 32x32 input"),
        (push(broker, yolo, tmp_path / "repo", keys[0], "--device", "cam-a", "--card", str(tmp_path / "yolo300.json")),
         "it runs at 288x288"),
        (push(broker, nms, tmp_path / "repo", keys[0], "--device", "cam-a"),
         "the card derived from the model is not certain"),
    ]
    for proc, words in cases:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert words in proc.stderr, proc.stderr
    assert retained(broker, f"{T.prefix}/#", settle_s=0.3) == {}
    assert not (tmp_path / "repo" / "manifests").exists() or not list((tmp_path / "repo" / "manifests").iterdir())


def test_push_of_a_model_without_a_card_uses_the_derived_one_when_certain(broker: Broker, tmp_path: Path,
                                                                          keys: tuple[Path, Path]) -> None:
    from card_models import COLOURS, colour_yolo

    model = colour_yolo(tmp_path / "yolo.onnx")  # Ultralytics metadata: every value read from the model
    proc = push(broker, model, tmp_path / "repo", keys[0], "--device", "cam-a", "--no-wait")
    assert proc.returncode == 0, proc.stderr
    assert "no card beside yolo.onnx: using the card derived from the model (detection, yolo, images 160x160)" \
        in proc.stderr
    (_, envelope), = retained(broker, f"{T.prefix}/models/+/manifest").items()
    m = parse_manifest(verify(envelope, TrustStore.from_files([keys[1]])))
    assert m.card["postprocess"] == {"kind": "yolo", "version": "v8", "output": "output0"}
    assert m.card["labels"] == COLOURS and m.card["input"]["resize"] == "letterbox"
    assert not model.with_suffix(".json").exists()  # nothing written beside the user's model
