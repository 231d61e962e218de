#!/usr/bin/env python3
"""What the fleet link and its reports cost the agent, in CPU, as a fraction of one core.

Runs the same agent (same model, same looping video at its native rate) as a
subprocess in three modes, interleaved over several rounds, against a real Mosquitto
on loopback:

  off       no [fleet] section: the pipeline alone (health lines still logged)
  default   [fleet] with the default report interval (30 s)
  high      [fleet] reporting every --high-interval seconds, to make the cost visible

For each run it reads the agent's CPU time (user + system, all threads, from /proc via
psutil) over a fixed window after a warm-up, and the number of reports the outbox
numbered in that window. Differences are paired by round (same background load). The
per-report cost comes from the high run (an upper bound: the idle link is in it too);
the cost at the default rate is measured directly and derived (per-report cost / 30 s).

    .venv/bin/python scripts/bench_link.py [--seconds 20] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from broker import Broker  # noqa: E402 - the tests' Mosquitto helper
from onnx_models import color_classifier  # noqa: E402

DEFAULT_INTERVAL = 30.0


def make_video(path: Path, frames: int = 60, fps: float = 30.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (320, 240))
    for i in range(frames):
        img = np.full((240, 320, 3), ((0, 0, 255), (0, 255, 0), (255, 0, 0))[i % 3], np.uint8)
        writer.write(img)
    writer.release()
    return path


def write_config(d: Path, mode: str, broker: str, model: Path, video: Path, high: float) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    interval = {"off": DEFAULT_INTERVAL, "default": DEFAULT_INTERVAL, "high": high}[mode]
    lines = ['device_id = "bench"', f'state_dir = "{d / "state"}"', 'log_level = "warning"',
             "[results]", 'output = "none"', "[health]", f"interval_s = {interval}"]
    if mode != "off":
        lines += ["[fleet]", f'broker = "{broker}"']
    lines += ["[backend]", "threads = 1", "[[cameras]]", 'name = "cam"', f'source = "{video}"',
              f'model = "{model}"', 'pace = "native"', "loop = true"]
    cfg = d / "agent.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def next_seq(state_dir: Path) -> int:
    db = state_dir / "outbox.sqlite"
    if not db.exists():
        return 1
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    except sqlite3.Error:
        row = None
    finally:
        con.close()
    return int(row[0]) if row else 1


def run_once(d: Path, mode: str, args: argparse.Namespace, broker: str, model: Path, video: Path) -> dict[str, Any]:
    cfg = write_config(d, mode, broker, model, video, args.high_interval)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        p = psutil.Process(proc.pid)
        time.sleep(args.warmup)
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
        seq0, c0, t0 = next_seq(d / "state"), p.cpu_times(), time.monotonic()
        time.sleep(args.seconds)
        seq1, c1, t1 = next_seq(d / "state"), p.cpu_times(), time.monotonic()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wall = t1 - t0
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {"mode": mode, "wall_s": round(wall, 2), "cpu_s": round(cpu, 3), "cores": cpu / wall,
            "reports": seq1 - seq0, "reports_per_s": (seq1 - seq0) / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds after start before measuring")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of off/default/high")
    ap.add_argument("--high-interval", type=float, default=0.1, help="report interval of the high run")
    ap.add_argument("--model", type=Path, help="ONNX model with its card (default: a tiny generated one)")
    ap.add_argument("--video", type=Path, help="video to loop (default: a generated 320x240 30 fps clip)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_link.") as tmp_s:
        tmp = Path(tmp_s)
        model = args.model or color_classifier(tmp / "color.onnx")
        video = args.video or make_video(tmp / "loop.avi")
        runs: list[dict[str, Any]] = []
        with Broker(tmp / "broker") as b:
            for r in range(args.rounds):
                for mode in ("off", "default", "high"):
                    res = run_once(tmp / f"{mode}-{r}", mode, args, b.url, model, video)
                    runs.append(res)
                    print(f"round {r + 1} {mode:8s} {res['cores']:.4f} cores, {res['reports']} reports",
                          file=sys.stderr)

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["mode"] == mode)

    def paired(mode: str) -> list[float]:
        """Per round: this mode's CPU minus the off run of the same round (shared background load)."""
        by = {(i // 3, x["mode"]): x["cores"] for i, x in enumerate(runs)}
        return [by[(r, mode)] - by[(r, "off")] for r in range(args.rounds)]

    off, dflt, high = med("off", "cores"), med("default", "cores"), med("high", "cores")
    d_default, d_high = paired("default"), paired("high")
    rate = med("high", "reports_per_s")
    # Upper bound per report: everything the high run costs over the pipeline alone, idle link included.
    per_report_ms = statistics.median(d_high) / rate * 1e3 if rate > 0 else float("nan")
    derived = (per_report_ms / 1e3) / DEFAULT_INTERVAL
    offs = [x["cores"] for x in runs if x["mode"] == "off"]
    result = {
        "seconds_per_run": args.seconds, "rounds": args.rounds, "cpu_count": psutil.cpu_count(),
        "modes": {
            "off": {"cores": round(off, 5)},
            "default": {"interval_s": DEFAULT_INTERVAL, "cores": round(dflt, 5),
                        "over_off_paired": [round(d, 5) for d in d_default]},
            "high": {"interval_s": args.high_interval, "cores": round(high, 5), "reports_per_s": round(rate, 2),
                     "over_off_paired": [round(d, 5) for d in d_high]},
        },
        "cpu_ms_per_report_upper_bound": round(per_report_ms, 3),
        "default_rate_cost_cores_derived": round(derived, 6),
        "default_rate_cost_cores_measured": round(statistics.median(d_default), 5),
        "noise_off_spread_cores": round(max(offs) - min(offs), 5),
        "runs": runs,
    }

    def rng(ds: list[float]) -> str:
        return f"{statistics.median(ds):+.4f} [{min(ds):+.4f}..{max(ds):+.4f}]"

    print(f"{'mode':10s} {'interval':>9s} {'reports/s':>10s} {'CPU (cores)':>12s}   over off, paired by round")
    print(f"{'off':10s} {'-':>9s} {0:>10.2f} {off:>12.4f}")
    print(f"{'default':10s} {DEFAULT_INTERVAL:>8g}s {med('default', 'reports_per_s'):>10.2f} {dflt:>12.4f}   "
          f"{rng(d_default)}")
    print(f"{'high':10s} {args.high_interval:>8g}s {rate:>10.2f} {high:>12.4f}   {rng(d_high)}")
    print(f"per report (upper bound, idle link included): {per_report_ms:.2f} ms CPU -> at the default "
          f"{DEFAULT_INTERVAL:g} s interval {derived:.5f} cores; measured directly: {rng(d_default)} cores, "
          f"against a run-to-run spread of {max(offs) - min(offs):.4f} cores in 'off'")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
