#!/usr/bin/env python3
"""Model delivery throughput, against the single-message baseline in the same run.

Ours: a real agent pulls a 50 MB model (a valid ONNX: the tiny colour classifier
padded with an unused 50 MB initializer) from a real `jetfleet serve` through a real
Mosquitto on loopback: windowed block requests, every chunk's sha256 checked, progress
made durable, the whole file hashed again, fsynced and renamed into the store. Timed
from the device's first `downloading` report to its `verifying` report (both device
timestamps), i.e. request of the first chunk to a verified, durable file.

Baseline: `mosquitto_pub -f FILE -q 1` to a `mosquitto_sub -C 1` of the same broker:
the same bytes as one message, nothing verified, nothing written.

Also: `jetfleet push` to `active` for the demo model (person-ssdlite, 12 MB, FP32) and
where that time goes. Rounds alternate; medians are reported. Prints a table and JSON.

    .venv/bin/python scripts/bench_delivery.py [--mb 50] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from broker import Broker  # noqa: E402
from conftest import color_frames, write_video  # noqa: E402
from delivery_helpers import model_version  # noqa: E402
from fleet_helpers import AgentProcess, Recorder, agent_config  # noqa: E402


def jetfleet(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.jetfleet.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def baseline(broker: Broker, blob: Path) -> float:
    """Seconds for mosquitto_pub -f -> mosquitto_sub -C 1 of one message."""
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(broker.port), "-h", "127.0.0.1", "-t", "bench/blob",
                            "-C", "1", "-q", "1", "-N"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # subscribed
    t0 = time.perf_counter()
    subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-h", "127.0.0.1", "-t", "bench/blob", "-q", "1",
                    "-f", str(blob)], check=True, timeout=120)
    sub.wait(120)
    return time.perf_counter() - t0


def job_of(push: subprocess.CompletedProcess[str]) -> str:
    m = re.search(r"\bjob (\S+)", push.stdout)
    if m is None:
        raise SystemExit(f"no job id in jetfleet push's output: {push.stdout}")
    return m.group(1)


def deploy_times(rec: Recorder, job: str, device: str, timeout: float = 300) -> dict[str, float]:
    """First timestamp of each state of `job` on `device`, once it is finished."""
    def mine() -> list[dict]:
        return [m for m in rec.json("/deploy") if m.get("device_id") == device and m.get("job") == job]

    rec.wait_for(lambda: any(m["state"] in ("active", "failed", "rolled_back") for m in mine()),
                 timeout=timeout, what=f"job {job} to finish")
    msgs = mine()
    first: dict[str, float] = {}
    for m in msgs:
        first.setdefault(m["state"], m["ts"])
    first["_state"] = msgs[-1]["state"]  # type: ignore[assignment]
    first["_download"] = msgs[-1].get("download", {})  # type: ignore[assignment]
    return first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=0, help="0 = jetfleet push's default")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="jetagent-bench-"))
    base_s: list[float] = []
    ours_s: list[float] = []
    ours_detail: list[dict] = []
    push_rows: list[dict] = []
    try:
        with Broker(tmp / "broker") as broker:  # set_tcp_nodelay true, as docs/broker/mosquitto.conf
            subprocess.run([sys.executable, "-m", "agent.jetfleet.cli", "keys", "init", "--dir", str(tmp / "keys")],
                           check=True, capture_output=True, cwd=ROOT)
            serve_log = open(tmp / "serve.log", "ab")
            serve = subprocess.Popen([sys.executable, "-m", "agent.jetfleet.cli", "--broker", broker.url, "serve",
                                      "--repo", str(tmp / "repo")], cwd=ROOT, stdout=serve_log, stderr=serve_log)
            video = write_video(tmp / "v.avi", color_frames(3)[1:2] * 20, fps=10)
            boot = model_version(tmp / "m" / "v0" / "m.onnx", "v0")
            cfg = agent_config(tmp / "dev", broker=broker.url, model=boot, video=video, device_id="bench-dev",
                               interval_s=5, fleet={"trusted_keys": [str(tmp / "keys" / "fleet.pub")]})
            agent = AgentProcess(cfg).start()
            rec = Recorder(broker.port, ["jetagent/dev/+/deploy"], client_id="bench-rec")
            time.sleep(3)
            for r in range(args.rounds):
                blob_model = model_version(tmp / "m" / f"big{r}" / "m.onnx", f"big{r}", pad_bytes=args.mb * 10**6)
                size = blob_model.stat().st_size
                base_s.append(baseline(broker, blob_model))
                extra = ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
                p = jetfleet("--broker", broker.url, "push", str(blob_model), "--device", "bench-dev",
                             "--repo", str(tmp / "repo"), "--key", str(tmp / "keys" / "fleet.key"),
                             "--probation", "0.5", "--no-wait", *extra)
                if p.returncode != 0:
                    raise SystemExit(f"push failed: {p.stderr}")
                t = deploy_times(rec, job_of(p), "bench-dev")
                if t.get("_state") != "active":
                    raise SystemExit(f"deploy ended {t.get('_state')}: {agent.log()[-2000:]}")
                ours_s.append(t["verifying"] - t["downloading"])
                ours_detail.append(t["_download"])  # type: ignore[arg-type]
                for d in (tmp / "repo" / "models").glob("*.onnx"):  # keep the repo from filling the disk
                    if d.stat().st_size > 10**6:
                        d.unlink()
            # push -> active on the demo model
            for r in range(args.rounds):
                demo = tmp / "m" / f"demo{r}" / "person-ssdlite.onnx"
                demo.parent.mkdir(parents=True)
                import onnx

                m = onnx.load(str(ROOT / "models" / "person-ssdlite.onnx"))
                m.metadata_props.add(key="bench", value=str(r))
                onnx.save(m, str(demo))
                for f in ("person-ssdlite.json", "person-ssdlite.anchors.npy"):
                    shutil.copy(ROOT / "models" / f, demo.parent / f)
                t0 = time.time()
                p = jetfleet("--broker", broker.url, "push", str(demo), "--device", "bench-dev",
                             "--repo", str(tmp / "repo"), "--key", str(tmp / "keys" / "fleet.key"),
                             "--probation", "2", "--card", str(demo.parent / "person-ssdlite.json"))
                wall = time.time() - t0
                t = deploy_times(rec, job_of(p), "bench-dev")
                push_rows.append({
                    "push_to_active_s": round(wall, 2), "exit": p.returncode,
                    "download_s": round(t["verifying"] - t["downloading"], 3),
                    "verify_load_s": round(t["activating"] - t["verifying"], 3),
                    "activate_s": round(t["probation"] - t["activating"], 3),
                    "probation_s": round(t["active"] - t["probation"], 3),
                })
            agent.stop()
            rec.close()
            serve.terminate()
            serve.wait(10)
            serve_log.close()
        mb = size / 1e6
        report = {
            "model_mb": round(mb, 1),
            "baseline_mosquitto_pub_s": [round(x, 3) for x in base_s],
            "baseline_mb_per_s": round(mb / statistics.median(base_s), 1),
            "jetagent_pull_s": [round(x, 3) for x in ours_s],
            "jetagent_mb_per_s": round(mb / statistics.median(ours_s), 1),
            "jetagent_over_baseline": round(statistics.median(base_s) / statistics.median(ours_s), 2),
            "jetagent_download_detail": ours_detail,
            "push_to_active_demo_model": push_rows,
            "load_average": os.getloadavg(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model_mb']} MB over loopback Mosquitto, {args.rounds} alternating rounds (median)")
    print(f"{'':44}{'seconds':>10}{'MB/s':>10}")
    print(f"{'mosquitto_pub -f -> mosquitto_sub (1 msg)':44}{statistics.median(base_s):10.3f}"
          f"{report['baseline_mb_per_s']:10.1f}")
    print(f"{'jetagent pull (verified, fsynced, stored)':44}{statistics.median(ours_s):10.3f}"
          f"{report['jetagent_mb_per_s']:10.1f}")
    print(f"jetagent / baseline: {report['jetagent_over_baseline']}x")
    print("\njetfleet push -> active, demo model (12 MB), probation 2 s:")
    for row in push_rows:
        print(f"  {row}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
