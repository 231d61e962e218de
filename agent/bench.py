"""`jetagent bench`: honest numbers for one model on this device.

Every figure is measured against a baseline in the same run: the full camera
pipeline (decode on the grabber thread, preprocess, infer, postprocess) is
timed next to a raw backend loop over the same frames, preprocessed in
advance. Rounds alternate so a noisy neighbour hurts both sides alike.

This is the run with a card (beside the model, `--card`, or derived from the model when
that is unambiguous). Without one, `agent.bench_raw` runs the backend alone on generated
inputs; `format_table` prints both.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.camera.grabber import Grabber
from agent.camera.pipeline import CameraPipeline
from agent.camera.sources import open_reader, parse_source, set_opencv_threads
from agent.camera.stats import Histogram
from engines.base import BackendOptions
from engines.errors import JetagentError
from engines.modelcard import ModelCard
from engines.modelcheck import check_model
from engines.runner import ModelRunner, open_model


@dataclass
class BenchOptions:
    model: Path
    card: Path | ModelCard | None = None  # a ModelCard: derived from the model (card_note says so)
    card_note: str | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    threads: int = 0
    graph_optimization: str = "all"
    video: str | None = None
    duration_s: float = 10.0
    warmup: int = 10
    rounds: int = 2
    frames: int = 64  # distinct frames the raw loop cycles through
    opencv_threads: int = 1  # as the agent runs (agent.config.Config.opencv_threads)


@dataclass
class LoopResult:
    fps: list[float] = field(default_factory=list)
    latency: Histogram = field(default_factory=Histogram)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = self.latency.summary_ms((50, 90, 99))
        return {"fps": round(statistics.median(self.fps), 2) if self.fps else 0.0,
                "fps_rounds": [round(f, 2) for f in self.fps],
                "latency_ms": lat, **({"stages_ms": self.stages} if self.stages else {})}


def read_frames(video: str, count: int) -> list[np.ndarray]:
    reader = open_reader(parse_source(video))
    try:
        frames: list[np.ndarray] = []
        while len(frames) < count:
            f = reader.read()
            if f is None:
                break
            frames.append(f)
    finally:
        reader.close()
    if not frames:
        raise JetagentError(f"video {video!r} gave no frames")
    return frames


def synthetic_frames(count: int, width: int = 1280, height: int = 720) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(min(count, 8))]


def raw_loop(runner: ModelRunner, tensors: list[np.ndarray], seconds: float, out: LoopResult) -> None:
    """The baseline: backend.infer on ready tensors, nothing else."""
    n, i = 0, 0
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        t0 = time.perf_counter()
        runner.infer(tensors[i])
        now = time.perf_counter()
        out.latency.record(now - t0)
        n += 1
        i = (i + 1) % len(tensors)
    out.fps.append(n / (now - start))


def pipeline_loop(runner: ModelRunner, video: str, seconds: float, out: LoopResult) -> None:
    """The product: a real grabber (lossless, looping) and the camera pipeline."""
    grabber = Grabber(parse_source(video), mode="lossless", loop=True, name="bench")
    pipe = CameraPipeline("bench", grabber, runner)
    grabber.start()
    try:
        # first frame through: decoder start-up is not part of steady-state throughput
        while not pipe.run_once(timeout=5.0):
            if grabber.finished:
                raise JetagentError(f"video {video!r} gave no frames: {grabber.error}")
        n0 = pipe.stats.frames
        start = time.perf_counter()
        deadline = start + seconds
        now = start
        while now < deadline:
            pipe.run_once(timeout=1.0)
            now = time.perf_counter()
        out.fps.append((pipe.stats.frames - n0) / (now - start))
    finally:
        grabber.stop()
    out.latency.merge(pipe.stats.stages["total"])
    for stage, h in pipe.stats.stages.items():
        out.stages.setdefault(stage, {}).update(h.summary_ms((50, 99)))


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    set_opencv_threads(opts.opencv_threads)
    t0 = time.perf_counter()
    runner = open_model(opts.model, card=opts.card, backend=opts.backend, options=BackendOptions(
        threads=opts.threads, graph_optimization=opts.graph_optimization, precision=opts.precision))
    load_s = time.perf_counter() - t0
    try:
        checked = check_model(runner)  # the card's size and outputs fit the model, or one clear error
        frames = read_frames(opts.video, opts.frames) if opts.video else synthetic_frames(opts.frames)
        tensors = [runner.preprocess(f)[0] for f in frames]
        for i in range(opts.warmup):
            runner.run(frames[i % len(frames)])
        raw, pipe = LoopResult(), LoopResult()
        rounds = max(1, opts.rounds)
        per_round = opts.duration_s / rounds
        for _ in range(rounds):
            raw_loop(runner, tensors, per_round, raw)
            if opts.video:
                pipeline_loop(runner, opts.video, per_round, pipe)
        report: dict[str, Any] = {
            "model": str(opts.model),
            "model_name": runner.card.name,
            "sha256": runner.sha256,
            "mode": "card",
            "card": {"path": None if isinstance(opts.card, ModelCard) else str(opts.card or
                                                                             Path(opts.model).with_suffix(".json")),
                     "derived": isinstance(opts.card, ModelCard), "note": opts.card_note,
                     "input": f"{runner.card.input.name} {runner.card.input.width}x{runner.card.input.height}",
                     "kind": runner.card.kind, "check": checked.line()},
            "backend": runner.backend.describe(),
            "precision": runner.precision,
            "threads": opts.threads,
            "opencv_threads": opts.opencv_threads,
            "video": opts.video,
            "frame_size": [int(frames[0].shape[1]), int(frames[0].shape[0])],
            "duration_s": opts.duration_s,
            "rounds": rounds,
            "load_s": round(load_s, 3),
            "raw": raw.summary(),
        }
        if opts.video:
            report["pipeline"] = pipe.summary()
            report["pipeline_over_raw"] = round(report["pipeline"]["fps"] / report["raw"]["fps"], 3)
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return report
    finally:
        runner.close()


def format_table(report: dict[str, Any]) -> str:
    be = report["backend"]
    threads = report["threads"] or "default"
    build = f"  build {report['build_s']:.1f} s" if "build_s" in report else ""
    lines = [
        f"jetagent bench  {report['model_name']}  ({report['model']}, sha256 {report['sha256'][:12]})",
        f"backend {be.get('backend')} {be.get('version')} {','.join(be.get('providers', []))}  "
        f"precision {report['precision']}  threads {threads}{build}  load {report['load_s']:.2f} s",
    ]
    if report.get("mode") == "raw":
        lines.append("no card: the backend alone on generated inputs " + ", ".join(
            f"{n} {'x'.join(map(str, i['shape']))} {i['dtype']}" for n, i in report["inputs"].items()))
        lines += [f"note: {n}" for n in report.get("notes", [])]
    elif report.get("card", {}).get("note"):
        lines.append(f"note: {report['card']['note']}")
    lines += ["", f"{'':22}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'FPS':>9}"]
    r = report["raw"]
    lat = r["latency_ms"]
    lines.append(f"{'raw backend loop':22}{lat['p50']:9.2f}{lat['p90']:9.2f}{lat['p99']:9.2f}{r['fps']:9.1f}")
    if "pipeline" in report:
        p = report["pipeline"]
        lat = p["latency_ms"]
        lines.append(f"{'full pipeline':22}{lat['p50']:9.2f}{lat['p90']:9.2f}{lat['p99']:9.2f}{p['fps']:9.1f}")
        st = p.get("stages_ms", {})
        if st:
            lines.append("  stages p50/p99 ms: " + ", ".join(
                f"{s} {v['p50']:.2f}/{v['p99']:.2f}" for s, v in st.items() if s != "total"))
        lines.append(f"pipeline / raw throughput: {report['pipeline_over_raw']:.3f}  "
                     f"(video {report['video']}, {report['frame_size'][0]}x{report['frame_size'][1]})")
    elif report.get("mode") == "raw":
        t = report["throughput"]
        if t["batch"] > 1:
            lines.append(f"throughput {t['samples_per_s']:.1f} samples/s (batch {t['batch']})")
        lines.append("(no card: give one, or `jetagent card init`, and --video for the full pipeline)")
    else:
        lines.append("(no --video: raw loop on synthetic frames only; give --video for the pipeline)")
    lines.append(f"peak RSS {report['peak_rss_mb']:.0f} MB; {report['rounds']} alternating rounds, "
                 f"{report['duration_s']:g} s per loop")
    return "\n".join(lines)


@dataclass
class PrecisionBenchOptions:
    """`jetagent bench --precision fp32,int8[,fp16] --calib-video FILE`: each candidate vs FP32."""

    model: Path
    calib_video: str
    precisions: tuple[str, ...] = ("fp32", "int8")
    card: Path | ModelCard | None = None
    backend: str = "onnxruntime"
    threads: int = 0
    graph_optimization: str = "all"
    calibration_frames: int = 64
    holdout_frames: int = 48
    split: float = 0.5  # calibrate on the first part of the video, compare on the rest
    rounds: int = 5
    frames_per_round: int = 10
    warmup: int = 3
    minimum: float = 0.95
    metric: str = "auto"
    min_speedup: float = 1.05
    cache_dir: Path | None = None  # keep quantized models/plans here (default: a fresh temp dir)


def run_precision_bench(opts: PrecisionBenchOptions) -> dict[str, Any]:
    """Calibrate on one part of the video, then gate and time every candidate on the other
    part, exactly as a deployment would; report them all and what the gate would serve."""
    import tempfile

    from calibration.candidates import TimingPlan
    from calibration.dataset import set_from_video
    from calibration.deploy import DeployConfig, deploy_model
    from calibration.gate import GateBound
    from engines.modelcard import card_path_for, load_card

    card = opts.card if isinstance(opts.card, ModelCard) else load_card(opts.card or card_path_for(opts.model))
    dataset = set_from_video(card.input, opts.calib_video, calibration=opts.calibration_frames,
                             holdout=opts.holdout_frames, split=opts.split)
    asked = "int8" if "int8" in opts.precisions else "fp16" if "fp16" in opts.precisions else "fp32"
    config = DeployConfig(backend=opts.backend, precision=asked, threads=opts.threads,
                          graph_optimization=opts.graph_optimization, min_speedup=opts.min_speedup,
                          timing=TimingPlan(opts.rounds, opts.frames_per_round, opts.warmup), measure_fallbacks=True)
    with tempfile.TemporaryDirectory(prefix="jetagent-bench-") as scratch:
        state = opts.cache_dir or Path(scratch)
        deployment = deploy_model(opts.model, card, dataset, config, GateBound(opts.minimum, opts.metric),
                                  state_dir=state, reuse=False)
        deployment.runner.close()
    report = deployment.report
    candidates = [_bench_row(c) for c in report.get("candidates", [])
                  if c["precision"] in opts.precisions or c["precision"] == "fp32"]
    for precision in opts.precisions:
        if not any(c["precision"] == precision for c in candidates):
            candidates.append({"name": precision, "precision": precision, "status": "unavailable", "passed": False,
                               "error": f"{opts.backend} has no {precision} path on this device"})
    fp32 = next((c for c in candidates if c["precision"] == "fp32" and c.get("latency_ms")), None)
    for row in candidates:
        if fp32 is not None and row.get("latency_ms"):
            row["speedup_vs_fp32"] = round(fp32["latency_ms"]["p50"] / row["latency_ms"]["p50"], 3)
    parts = {s.get("part") for s in dataset.sources}
    return {
        "model": str(opts.model), "model_name": card.name, "sha256": report.get("model_sha256"),
        "backend": report.get("backend"), "device": report.get("device"), "threads": opts.threads,
        "precisions": list(opts.precisions),
        "calibration": {"video": opts.calib_video, "split": opts.split, "calibration_frames": dataset.size[0],
                        "holdout_frames": dataset.size[1], "parts": sorted(p for p in parts if p),
                        "content_sha256": dataset.content_hash},
        "bound": report.get("bound"), "candidates": candidates,
        "served": report.get("selected"), "served_precision": report.get("precision"),
        "fallback": report.get("fallback"), "reason": report.get("reason"), "timing": report.get("timing"),
        "seconds": report.get("seconds"),
    }


def _bench_row(candidate: dict[str, Any]) -> dict[str, Any]:
    agreement = candidate.get("agreement") or {}
    row: dict[str, Any] = {
        "name": candidate["name"], "precision": candidate["precision"], "options": candidate.get("options", {}),
        "profile": candidate.get("profile"), "status": candidate["status"], "passed": candidate["passed"],
        "metric": agreement.get("metric"), "value": agreement.get("value"),
    }
    for key in ("precision", "recall", "reference_objects", "candidate_objects", "agreeing_frames", "frames",
                "note"):
        if key in agreement:
            row["precision_vs_fp32" if key == "precision" else key] = agreement[key]
    latency = candidate.get("latency_ms")
    if latency:
        row["latency_ms"] = {k: latency[k] for k in ("p50", "p90", "p99", "mean") if k in latency}
    for key in ("error", "cache_hit", "prepare_seconds"):
        if key in candidate:
            row[key] = candidate[key]
    return row


def format_precision_table(report: dict[str, Any]) -> str:
    cal = report["calibration"]
    backend = report.get("backend") or {}
    metric = (report.get("bound") or {}).get("metric", "metric")
    lines = [
        f"jetagent bench  {report['model_name']}  ({report['model']}, sha256 {str(report['sha256'])[:12]})",
        f"backend {backend.get('name')} {backend.get('version')}  threads {report['threads'] or 'default'}  "
        f"calibrated on {cal['calibration_frames']} frames of {cal['video']} (first {cal['split']:.0%}), "
        f"compared with FP32 on {cal['holdout_frames']} held-out frames (the rest)",
        "",
        f"{'candidate':46}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'speedup':>9}  {metric:>14}  {'P/R':>11}  gate",
    ]
    for row in report["candidates"]:
        lat = row.get("latency_ms") or {}
        speed = f"{row['speedup_vs_fp32']:.2f}x" if "speedup_vs_fp32" in row else "-"
        value = f"{row['value']:.3f}" if row.get("value") is not None else "-"
        pr = (f"{row['precision_vs_fp32']:.2f}/{row['recall']:.2f}" if "recall" in row else "")
        verdict = {"passed": "pass", "failed": "FAIL"}.get(row["status"], row["status"])
        mark = " <- serves" if row["name"] == report["served"] else ""
        lines.append(f"{row['name'][:45]:46}{lat.get('p50', float('nan')):8.2f}{lat.get('p90', float('nan')):8.2f}"
                     f"{lat.get('p99', float('nan')):8.2f}{speed:>9}  {value:>14}  {pr:>11}  {verdict}{mark}")
        if row.get("error"):
            lines.append(f"    {row['error'][:150]}")
    lines += ["", f"gate would serve {report['served']} ({report['served_precision']}): {report['reason']}"]
    timing = report.get("timing") or {}
    lines.append(f"latency: {timing.get('rounds')} alternating rounds x {timing.get('frames_per_round')} frames per "
                 f"candidate, medians; load average {timing.get('load_average')}")
    return "\n".join(lines)
