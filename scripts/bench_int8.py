#!/usr/bin/env python3
"""FP32 vs INT8 candidates for the demo detector on this CPU, in one run (a benchmark, not a test).

    .venv/bin/python scripts/bench_int8.py [--calib 64] [--holdout 96] [--json-out FILE] [--quick]

Calibrates on frames of the first half of clips/vtest.avi and compares on frames of the
second half. For each quantizer profile (u8s8 vs s8s8, per-channel vs per-tensor,
reduce_range, Conv-only, min-max / percentile / entropy, calibration-set size) and graph
optimisation level it measures agreement with FP32 (detection precision / recall / F1 of
boxes matched at IoU 0.5) and latency with 1 intra-op thread and with ORT's default, timed
in alternating rounds (medians), so other work on the machine hurts every row alike.
Prints a table, then the JSON (also written to --json-out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibration.candidates import TimingPlan, time_runners  # noqa: E402
from calibration.dataset import CalibrationSet, set_from_video  # noqa: E402
from calibration.engine_cache import EngineCache, Fingerprint, cpu_identity, has_vnni  # noqa: E402
from calibration.gate import detection_agreement, observe  # noqa: E402
from calibration.ort_target import ort_version  # noqa: E402
from calibration.quantize import QuantProfile, cpu_profile, export_qdq, tensorrt_profile  # noqa: E402
from engines.base import BackendOptions  # noqa: E402
from engines.modelcard import ModelCard, load_card  # noqa: E402
from engines.runner import ModelRunner, file_sha256, open_model  # noqa: E402

MODEL = ROOT / "models" / "person-ssdlite.onnx"
VIDEO = ROOT / "clips" / "vtest.avi"


def profiles(quick: bool) -> list[tuple[QuantProfile, tuple[str, ...]]]:
    """(profile, graph optimisation levels to serve it with)."""
    base = cpu_profile("minmax")
    rows = [(base, ("all", "extended", "basic")),
            (tensorrt_profile("minmax"), ("all", "basic"))]
    if quick:
        return rows
    return [
        *rows,
        (cpu_profile("minmax", activations="s8"), ("all",)),
        (cpu_profile("minmax", per_channel=False), ("all",)),
        (cpu_profile("minmax", reduce_range=True), ("all",)),
        (cpu_profile("minmax", op_types=("Conv",)), ("all",)),
        (cpu_profile("percentile", percentile=99.999), ("all",)),
        (cpu_profile("percentile", percentile=99.99), ("all",)),
        (cpu_profile("percentile", percentile=99.9), ("all",)),
        (cpu_profile("entropy"), ("all",)),
    ]


def quantize(cache: EngineCache, sha: str, dataset: CalibrationSet, profile: QuantProfile) -> tuple[Path, float]:
    fp = Fingerprint(model_sha256=sha, backend="onnxruntime", backend_version=ort_version(), device=cpu_identity(),
                     precision="int8", calibration_sha256=dataset.content_hash,
                     options={"artifact": "qdq-onnx", "profile": profile.to_dict()})
    entry = cache.get_or_build(fp, "model.qdq.onnx", lambda p: export_qdq(MODEL, p, dataset, profile).to_dict())
    return entry.artifact, float(entry.record.get("build_seconds", 0.0))


def open_row(path: Path, card: ModelCard, level: str, threads: int, precision: str) -> ModelRunner:
    return open_model(path, card=card, options=BackendOptions(threads=threads, graph_optimization=level,
                                                              precision=precision))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=int, default=64, help="calibration frames from the first half")
    parser.add_argument("--holdout", type=int, default=96, help="comparison frames from the second half")
    parser.add_argument("--sizes", default="16,128", help="extra calibration-set sizes for the default profile")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--frames", type=int, default=12, help="frames per candidate per round")
    parser.add_argument("--cache-dir", default=str(ROOT / ".state" / "bench_int8"))
    parser.add_argument("--json-out", help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", help="only the default and TensorRT profiles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    started = time.monotonic()
    load_before = os.getloadavg()
    card = load_card(MODEL.with_suffix(".json"))
    sha = file_sha256(MODEL)
    cache = EngineCache(Path(args.cache_dir))
    dataset = set_from_video(card.input, VIDEO, calibration=args.calib, holdout=args.holdout)
    sets = {args.calib: dataset}
    for size in (int(s) for s in args.sizes.split(",") if s):
        sets[size] = set_from_video(card.input, VIDEO, calibration=size, holdout=args.holdout)

    rows: list[dict[str, Any]] = [{"name": "fp32", "precision": "fp32", "profile": None, "level": level,
                                   "path": MODEL, "calibration_frames": 0}
                                  for level in ("all", "basic")]
    for profile, levels in profiles(args.quick):
        path, seconds = quantize(cache, sha, dataset, profile)
        rows += [{"name": profile.name, "precision": "int8", "profile": profile.to_dict(), "level": level,
                  "path": path, "quantize_s": seconds, "calibration_frames": args.calib} for level in levels]
    for size, other in sets.items():
        if size != args.calib:
            path, seconds = quantize(cache, sha, other, cpu_profile("minmax"))
            rows.append({"name": f"cpu-u8s8-pc-minmax-calib{size}", "precision": "int8",
                         "profile": cpu_profile("minmax").to_dict(), "level": "all", "path": path,
                         "quantize_s": seconds, "calibration_frames": size})

    reference = observe(open_row(MODEL, card, "all", 1, "fp32"), dataset, keep_outputs=False)
    for row in rows:
        runner = open_row(row["path"], card, row["level"], 1, row["precision"])
        try:
            row["agreement"] = detection_agreement(reference.results, observe(runner, dataset, False).results
                                                   ).to_dict()
        finally:
            runner.close()
        print(f"gated {row['name']} opt-{row['level']}: F1 {row['agreement']['value']:.3f}", file=sys.stderr)

    tensors = [dataset.holdout[i] for i in range(dataset.size[1])]
    plan = TimingPlan(rounds=args.rounds, frames=args.frames, warmup=3)
    for threads in (1, 0):
        runners = {f"{i}": open_row(r["path"], card, r["level"], threads, r["precision"]) for i, r in enumerate(rows)}
        try:
            measured = time_runners(runners, tensors, plan)
        finally:
            for runner in runners.values():
                runner.close()
        key = "threads_1" if threads == 1 else "threads_default"
        base = measured[str(next(i for i, r in enumerate(rows) if r["name"] == "fp32" and r["level"] == "all"))]
        for i, row in enumerate(rows):
            m = measured[str(i)]
            row[key] = {"p50_ms": round(m["p50"], 2), "p90_ms": round(m["p90"], 2), "p99_ms": round(m["p99"], 2),
                        "speedup_vs_fp32": round(base["p50"] / m["p50"], 3),
                        "round_p50_spread_ms": round(m["round_p50_spread"], 2)}
        print(f"timed with threads={threads or 'default'}", file=sys.stderr)

    target = 1.4
    for row in rows:
        row["passes_gate"] = row["agreement"]["value"] >= 0.95
        row["meets_target"] = row["passes_gate"] and row["threads_1"]["speedup_vs_fp32"] >= target
        row["path"] = str(row["path"])
    identity = cpu_identity()
    result = {
        "model": str(MODEL.relative_to(ROOT)), "video": str(VIDEO.relative_to(ROOT)),
        "calibration": {"frames": args.calib, "part": "first half", "content_sha256": dataset.content_hash},
        "holdout": {"frames": args.holdout, "part": "second half",
                    "fp32_objects": sum(len(r) for r in reference.results)},
        "onnxruntime": ort_version(), "cpu": identity, "vnni": has_vnni(identity), "cores": os.cpu_count(),
        "python": platform.python_version(),
        "timing": {"rounds": args.rounds, "frames_per_round": args.frames, "method": "alternating rounds, p50"},
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1), "target": {"f1": 0.95, "speedup": target},
        "rows": rows,
    }
    print_table(result)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


def print_table(result: dict[str, Any]) -> None:
    print(f"person-ssdlite on {result['cpu']['model']} ({result['cores']} cores, VNNI {result['vnni']}), "
          f"onnxruntime {result['onnxruntime']}; calibrated on {result['calibration']['frames']} frames of the first "
          f"half of vtest.avi, compared on {result['holdout']['frames']} frames of the second half "
          f"({result['holdout']['fp32_objects']} FP32 detections)")
    print(f"{'candidate':36}{'opt':>9}{'calib':>6}{'P':>7}{'R':>7}{'F1':>7}{'1 thr p50':>11}{'x':>7}"
          f"{'dflt p50':>10}{'x':>7}  verdict")
    for row in result["rows"]:
        a, one, dflt = row["agreement"], row["threads_1"], row["threads_default"]
        verdict = "TARGET MET" if row["meets_target"] else ("passes" if row["passes_gate"] else "fails gate")
        if row["precision"] == "fp32":
            verdict = "reference" if row["level"] == "all" else "-"
        print(f"{row['name'][:35]:36}{row['level']:>9}{row['calibration_frames']:>6}{a['precision']:7.3f}"
              f"{a['recall']:7.3f}{a['value']:7.3f}{one['p50_ms']:9.2f}ms{one['speedup_vs_fp32']:6.2f}x"
              f"{dflt['p50_ms']:8.2f}ms{dflt['speedup_vs_fp32']:6.2f}x  {verdict}")
    print(f"load average before {result['load_average_before']}, after {result['load_average_after']}; "
          f"{result['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
