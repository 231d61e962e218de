"""`jetfleet rollout` through the real entry point against a real Mosquitto, with stand-in
devices (tests/fake_devices.py); and its decisions on their own."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_devices import FakeDevice, retained, write_key_dir

from agent.jetfleet.rollout_state import Plan, RolloutStore, decide, judge, new_state, parse_duration, pick_canaries
from agent.wire.core import Topics, decode
from broker import Broker
from conftest import ROOT
from engines.errors import JetagentError
from fleet_helpers import jetfleet

T = Topics()


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


def rollout_args(broker: Broker, tmp_path: Path, model: Path, *extra: str) -> list[str]:
    key = tmp_path / "keys" / "fleet.key"
    if not key.exists():
        write_key_dir(tmp_path)
    return ["--broker", broker.url, "rollout", str(model), "--group", "lobby", "--repo", str(tmp_path / "repo"),
            "--key", str(key), "--state-dir", str(tmp_path / "rollouts"), *extra]


def lobby(broker: Broker, n: int, **per_device: dict[str, Any]) -> list[FakeDevice]:
    return [FakeDevice(broker, f"cam-{i}", groups=("lobby",), tick_s=0.2, **per_device.get(f"cam-{i}", {}))
            for i in range(1, n + 1)]


def state_file(tmp_path: Path) -> dict[str, Any]:
    (path,) = (tmp_path / "rollouts").glob("ro-*.json")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_canaries_active_and_healthy_promote_to_the_group(broker: Broker, tmp_path: Path, color_model: Path) -> None:
    devs = lobby(broker, 3)
    try:
        proc = jetfleet(*rollout_args(broker, tmp_path, color_model, "--canary", "30%", "--promote-after", "1s",
                                      "--max-failures", "0", "--json"), timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = json.loads(proc.stdout)
        assert out["outcome"] == "promoted" and out["group"] == "lobby"
        assert [(c["device_id"], c["verdict"]) for c in out["canaries"]] == [("cam-1", "ok")]
        assert sorted((d["device_id"], d["state"]) for d in out["devices"]) == [
            ("cam-1", "active"), ("cam-2", "active"), ("cam-3", "active")]
        st = state_file(tmp_path)
        assert st["phase"] == "promoted" and st["canaries"] == ["cam-1"]
        assert st["group_job"] == out["devices"][0]["job"]
        assert decode(retained(broker, T.group_desired("lobby"))[T.group_desired("lobby")])["job"] == st["group_job"]
        assert retained(broker, f"{T.prefix}/dev/+/desired") == {}  # the canary's own one is cleared
        seen = [(topic, msg["job"] if msg else None) for topic, msg in devs[0].desired_seen]
        assert seen == [(T.desired("cam-1"), st["canary_job"]), (T.group_desired("lobby"), st["group_job"]),
                        (T.desired("cam-1"), None)]
        assert [m["job"] for _, m in devs[1].desired_seen if m] == [st["group_job"]]
        assert all(d.model == out["model"] for d in devs)
    finally:
        for d in devs:
            d.close()


def test_a_canary_that_rolls_back_halts_the_rollout_and_the_committed_canary_is_rolled_back(
        broker: Broker, tmp_path: Path, color_model: Path) -> None:
    devs = lobby(broker, 4, **{"cam-1": {"outcome": "rolled_back", "step_s": 0.3,
                                         "reason": "cam front: 3 inference errors during probation"}})
    try:
        proc = jetfleet(*rollout_args(broker, tmp_path, color_model, "--canary", "50%", "--promote-after", "30s",
                                      "--max-failures", "0", "--json"), timeout=60)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        out = json.loads(proc.stdout)
        assert out["outcome"] == "halted" and "cam-1: rolled_back: cam front: 3 inference errors" in \
            out["reason"]
        rows = {c["device_id"]: c for c in out["canaries"]}
        assert rows["cam-1"]["rollback"].startswith("not needed") and rows["cam-2"]["rollback"] == "sent"
        assert devs[0].rollbacks == 0 and devs[1].rollbacks == 1
        assert devs[1].model != out["model"]  # serving its previous model again
        assert retained(broker, f"{T.prefix}/dev/+/desired") == {}
        assert retained(broker, f"{T.prefix}/group/+/desired") == {}
        assert devs[2].desired_seen == [] and devs[3].desired_seen == []
        assert state_file(tmp_path)["phase"] == "halted"
    finally:
        for d in devs:
            d.close()


def test_a_killed_rollout_resumes_where_it_was(broker: Broker, tmp_path: Path, color_model: Path) -> None:
    devs = lobby(broker, 3)
    args = rollout_args(broker, tmp_path, color_model, "--canary", "30%", "--promote-after", "4s")
    try:
        first = subprocess.Popen([sys.executable, "-m", "agent.jetfleet.cli", *args], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # until the canary is active and being watched
            assert time.monotonic() < deadline, "the canary never went active"
            files = list((tmp_path / "rollouts").glob("ro-*.json"))
            if files and json.loads(files[0].read_text())["canary"]["cam-1"]["active_since"]:
                break
            time.sleep(0.1)
        first.kill()
        first.wait(10)
        before = state_file(tmp_path)
        assert before["phase"] == "canary" and before["resumed"] == 0

        again = jetfleet(*args, "--json", timeout=60)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"resuming   rollout {before['id']} in phase canary" in again.stderr
        after = state_file(tmp_path)
        assert after["phase"] == "promoted" and after["resumed"] == 1
        assert (after["canary_job"], after["created"]) == (before["canary_job"], before["created"])
        assert after["canary"]["cam-1"]["active_since"] == before["canary"]["cam-1"]["active_since"]
        own = [m for topic, m in devs[0].desired_seen if topic == T.desired("cam-1") and m]
        assert len(own) == 1  # not published a second time
        assert all(d.model == json.loads(again.stdout)["model"] for d in devs)

        done = jetfleet("--broker", broker.url, "rollout", "--resume", before["id"], "--state-dir",
                        str(tmp_path / "rollouts"), "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["outcome"] == "promoted"
        assert state_file(tmp_path)["resumed"] == 2 and len(devs[1].desired_seen) == 1
        missing = jetfleet("--broker", broker.url, "rollout", "--resume", "ro-nope", "--state-dir",
                           str(tmp_path / "rollouts"))
        assert missing.returncode == 2 and "no rollout ro-nope" in missing.stderr
    finally:
        for d in devs:
            d.close()


def test_an_empty_group_is_a_one_line_error(broker: Broker, tmp_path: Path, color_model: Path) -> None:
    proc = jetfleet(*rollout_args(broker, tmp_path, color_model, "--canary", "10%"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "group lobby has no device" in proc.stderr


# -- the decisions, without a broker ---------------------------------------------------------

PLAN = Plan(sha256="a" * 64, group="g", canary_pct=10, promote_after_s=60, max_failures=1, broker="mqtt://x",
            prefix="jetagent", repo="/r", min_fps=10.0, max_errors=2)


def canary_state(n: int, plan: Plan = PLAN) -> dict[str, Any]:
    devices = [f"d{i}" for i in range(n)]
    return new_state(plan, "m", devices, devices, {})


def healthy(**kw: Any) -> dict[str, Any]:
    return {"device_state": "online", "fps": 30.0, "errors": 5, "boot": 1, **kw}


def test_canaries_are_the_first_sorted_ids_at_least_one() -> None:
    assert pick_canaries(["c", "a", "b"], 10) == ["a"]
    assert pick_canaries([f"d{i:02d}" for i in range(20)], 25) == ["d00", "d01", "d02", "d03", "d04"]
    assert pick_canaries(["b", "a", "c"], 34) == ["a", "b"]
    assert pick_canaries(["b", "a"], 100) == ["a", "b"]
    assert parse_duration("1h30m") == 5400 and parse_duration("90") == 90 and parse_duration("2.5m") == 150
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_a_canary_is_watched_for_promote_after_and_judged_on_its_health() -> None:
    st = canary_state(1)
    rec, t0 = st["canary"]["d0"], 1000.0
    assert judge(rec, "downloading", "", healthy(), PLAN, t0, t0)
    assert rec["verdict"] is None
    judge(rec, "active", "", healthy(), PLAN, t0 + 1, t0)
    assert rec["active_since"] == t0 + 1 and rec["errors0"] == 5
    judge(rec, "active", "", healthy(errors=7), PLAN, t0 + 30, t0)  # +2 is tolerated (--max-errors 2)
    assert rec["verdict"] is None and decide(st, PLAN) == (None, "")
    judge(rec, "active", "", healthy(errors=7), PLAN, t0 + 61, t0)
    assert rec["verdict"] == "ok" and decide(st, PLAN)[0] == "promote"

    for health, words in ((healthy(errors=8), "3 inference errors"), (healthy(fps=4.0), "under the 10 floor"),
                          (healthy(device_state="lost"), "device lost")):
        st = canary_state(1)
        rec = st["canary"]["d0"]
        judge(rec, "active", "", healthy(), PLAN, t0, t0)
        judge(rec, "active", "", health, PLAN, t0 + 61, t0)
        assert rec["verdict"] == "unhealthy" and words in rec["reason"], (rec, words)
    st = canary_state(1)
    rec = st["canary"]["d0"]
    judge(rec, "active", "", healthy(errors=9, boot=1), PLAN, t0, t0)
    judge(rec, "active", "", healthy(errors=1, boot=2), PLAN, t0 + 5, t0)  # restarted: counts from its new start
    judge(rec, "active", "", healthy(errors=2, boot=2), PLAN, t0 + 10, t0)
    assert rec["verdict"] is None


def test_more_failures_than_allowed_halt_and_so_does_no_healthy_canary() -> None:
    st = canary_state(3)
    t0 = 0.0
    judge(st["canary"]["d0"], "failed", "bad signature", healthy(), PLAN, t0, t0)
    assert decide(st, PLAN) == (None, "")  # 1 failure is allowed, the others are not decided
    judge(st["canary"]["d1"], "probation", "", healthy(), PLAN, PLAN.timeout_s + 1, t0)
    verdict, why = decide(st, PLAN)
    assert verdict == "halt" and "d0: failed: bad signature" in why and "d1: still probation after" in why
    lenient = Plan(**{**PLAN.to_dict(), "max_failures": 5})
    one = canary_state(1, lenient)
    judge(one["canary"]["d0"], "rolled_back", "fps 2 < 10", healthy(), lenient, t0, t0)
    assert decide(one, lenient)[0] == "halt" and "no canary came through healthy" in decide(one, lenient)[1]


def test_a_rollout_runs_in_one_jetfleet_at_a_time(tmp_path: Path) -> None:
    store = RolloutStore(tmp_path, PLAN.rollout_id)
    with store.locked():
        with pytest.raises(JetagentError, match="being run by another jetfleet"):
            with RolloutStore(tmp_path, PLAN.rollout_id).locked():
                pass
    with store.locked():
        pass
    assert PLAN.rollout_id == Plan.from_dict(PLAN.to_dict()).rollout_id
    assert PLAN.rollout_id != Plan(**{**PLAN.to_dict(), "group": "h"}).rollout_id
