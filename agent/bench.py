"""`jetagent bench`: honest numbers for one model on this device.

Every figure is measured against a baseline in the same run: the full camera
pipeline (decode on the grabber thread, preprocess, infer, postprocess) is
timed next to a raw backend loop over the same frames, preprocessed in
advance. Rounds alternate so a noisy neighbour hurts both sides alike.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.pipeline import CameraPipeline
from agent.sources import Grabber, open_reader, parse_source
from agent.stats import Histogram
from engines.base import BackendOptions
from engines.errors import JetagentError
from engines.runner import ModelRunner, open_model


@dataclass
class BenchOptions:
    model: Path
    card: Path | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
    threads: int = 0
    graph_optimization: str = "all"
    video: str | None = None
    duration_s: float = 10.0
    warmup: int = 10
    rounds: int = 2
    frames: int = 64  # distinct frames the raw loop cycles through


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
        frames = []
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
    t0 = time.perf_counter()
    runner = open_model(opts.model, card=opts.card, backend=opts.backend, options=BackendOptions(
        threads=opts.threads, graph_optimization=opts.graph_optimization, precision=opts.precision))
    load_s = time.perf_counter() - t0
    try:
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
            "backend": runner.backend.describe(),
            "precision": runner.precision,
            "threads": opts.threads,
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
    lines = [
        f"jetagent bench  {report['model_name']}  ({report['model']}, sha256 {report['sha256'][:12]})",
        f"backend {be.get('backend')} {be.get('version')} {','.join(be.get('providers', []))}  "
        f"precision {report['precision']}  threads {threads}  load {report['load_s']:.2f} s",
        "",
        f"{'':22}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'FPS':>9}",
    ]
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
    else:
        lines.append("(no --video: raw loop on synthetic frames only; give --video for the pipeline)")
    lines.append(f"peak RSS {report['peak_rss_mb']:.0f} MB; {report['rounds']} alternating rounds, "
                 f"{report['duration_s']:g} s per loop")
    return "\n".join(lines)
