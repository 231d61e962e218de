"""`jetagent`: run the daemon, check a config, benchmark a model, check the device (doctor), prove
the hardware paths (selftest)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from agent import __version__
from engines.base import PRECISIONS, backend_names
from engines.errors import JetagentError

log = logging.getLogger("jetagent")


def setup_logging(level: str = "info") -> None:
    """Our loggers at `level`; everything else (libraries logging to the root logger, such as
    ONNX Runtime's quantizer) at WARNING or above, so the agent's log stays readable."""
    ours = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=max(ours, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for name in ("agent", "engines", "calibration", "jetagent"):
        logging.getLogger(name).setLevel(ours)


def _positive(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return v


def cmd_run(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.daemon import Agent, check_config

    config = load_config(args.config)
    setup_logging(args.log_level or config.log_level)
    if args.check_config:
        for line in check_config(config):
            print(line)
        print(f"config OK: {args.config}")
        return 0
    agent = Agent(config)
    agent.open()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only record the request; the main loop does the shutdown.
        agent.stop_event.set()

    previous: dict[int, Callable[..., object] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        agent.start()
        log.info("device %s: serving %d camera(s)", config.device_id, len(agent.cameras))
        agent.run(duration=args.duration)
    finally:
        agent.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("stopped")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """With a card (beside the model, --card, or derived from the model when unambiguous): the
    raw loop and, with --video, the full pipeline. Without one (or --raw, or --shapes): the
    backend alone on generated inputs of the model's own shapes."""
    from agent.bench import BenchOptions, format_table, run_bench
    from engines.modelcard import card_path_for

    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        if p not in PRECISIONS:
            raise JetagentError(f"--precision: unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    model = Path(args.model)
    has_card = args.card is not None or card_path_for(model).exists()
    if args.raw or args.shapes is not None or (not has_card and not args.video and not args.calib_video
                                               and precisions == ["fp32"]):
        if args.video or args.calib_video or precisions != ["fp32"]:
            raise JetagentError("--raw/--shapes run the backend alone on generated inputs; --video, --calib-video "
                                "and --precision other than fp32 need a card")
        return _bench_raw(args, has_card)
    card, note = _bench_card(model, args.card)
    if note:
        print(f"jetagent: note: {note}", file=sys.stderr)
    if precisions != ["fp32"] or args.calib_video:
        return _bench_precisions(args, precisions, card)
    opts = BenchOptions(
        model=model, card=card, card_note=note, backend=args.backend,
        precision="fp32", threads=args.threads, graph_optimization=args.graph_optimization,
        video=args.video, duration_s=args.duration, warmup=args.warmup, rounds=args.rounds,
        opencv_threads=args.opencv_threads,
    )
    report = run_bench(opts)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0


def _bench_card(model: Path, card_arg: str | None) -> tuple[Any, str | None]:
    """--card, the card beside the model, or the card derived from the model (when certain)."""
    from engines.cardinit import card_for

    if card_arg is not None:
        return Path(card_arg), None
    if not model.is_file():
        raise JetagentError(f"model file not found: {model}")
    card, note = card_for(model)
    return (card if note else None), note


def _bench_raw(args: argparse.Namespace, has_card: bool) -> int:
    from agent.bench import format_table
    from agent.bench_raw import RawBenchOptions, run_raw_bench

    opts = RawBenchOptions(model=Path(args.model), backend=args.backend, shapes=args.shapes, threads=args.threads,
                           graph_optimization=args.graph_optimization, duration_s=args.duration,
                           warmup=args.warmup, rounds=args.rounds)
    if has_card:
        opts.notes.append("the model's card is not used (--raw/--shapes)")
    report = run_raw_bench(opts)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def _bench_precisions(args: argparse.Namespace, precisions: list[str], card: Any) -> int:
    """FP32 vs each INT8 (and FP16) candidate: calibrated on one part of --calib-video, gated and
    timed on the other, as a deployment would; and which candidate the gate would serve."""
    from agent.bench import PrecisionBenchOptions, format_precision_table, run_precision_bench

    if not args.calib_video:
        raise JetagentError(f"--precision {','.join(precisions)}: needs --calib-video FILE (frames to calibrate "
                            "on, and held-out frames to compare with FP32)")
    if not 0.0 < args.calib_split < 1.0:
        raise JetagentError("--calib-split must be between 0 and 1")
    report = run_precision_bench(PrecisionBenchOptions(
        model=Path(args.model), calib_video=args.calib_video, precisions=tuple(dict.fromkeys(["fp32", *precisions])),
        card=card, backend=args.backend, threads=args.threads,
        graph_optimization=args.graph_optimization, calibration_frames=args.calib_frames,
        holdout_frames=args.holdout_frames, split=args.calib_split, rounds=max(args.rounds, 3), warmup=args.warmup,
        minimum=args.min_accuracy, cache_dir=Path(args.cache_dir) if args.cache_dir else None))
    print(json.dumps(report, indent=2) if args.json else format_precision_table(report))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Collect a calibration set from the configured camera(s) through the real pipeline and
    the frame reservoir, and store it under the state dir (where deployment looks for it)."""
    import time

    from agent.camera.pipeline import CameraPipeline
    from agent.config import load_config
    from agent.daemon import make_grabber, open_camera_model
    from calibration.dataset import CalibrationStore
    from calibration.reservoir import FrameReservoir

    config = load_config(args.config)
    cameras = [c for c in config.cameras if args.camera in (None, c.name)]
    if not cameras:
        raise JetagentError(f"--camera {args.camera!r}: no such camera in {args.config} "
                            f"(cameras: {', '.join(c.name for c in config.cameras)})")
    if args.frames < 2:
        raise JetagentError("--frames must be at least 2 (calibration + held-out)")
    holdout = max(1, args.frames // 4)
    store = CalibrationStore(config.state_dir / "calibration")
    results, lines = [], []
    for cam in cameras:
        runner = open_camera_model(config, cam)
        grabber = make_grabber(cam)
        pipeline = CameraPipeline(cam.name, grabber, runner)
        reservoir = FrameReservoir(runner.card.input, calibration_size=args.frames - holdout, holdout_size=holdout,
                                   min_interval_s=args.interval, camera=cam.name)
        pipeline.observers.append(reservoir)
        reservoir.start()
        grabber.start()
        deadline = time.monotonic() + args.timeout
        try:
            while time.monotonic() < deadline and not reservoir.full:
                if not pipeline.run_once(timeout=0.5) and grabber.finished:
                    break
        finally:
            grabber.stop()
            reservoir.stop()
            runner.close()
        if not reservoir.full:
            log.warning("camera %s: stopped with %d+%d of %d frames (%s)", cam.name, *reservoir.counts(),
                        args.frames, "source ended" if grabber.finished else "timeout")
        dataset = reservoir.snapshot()
        path = store.save(dataset)
        results.append({"camera": cam.name, "path": str(path), "sha256": dataset.content_hash,
                        "calibration": dataset.size[0], "holdout": dataset.size[1], "frames": pipeline.stats.frames,
                        "reservoir": reservoir.stats.as_dict()})
        lines.append(f"camera {cam.name}: {dataset.size[0]} calibration + {dataset.size[1]} held-out frames "
                     f"-> {path} (sha256 {dataset.content_hash[:12]})")
    print(json.dumps(results, indent=2) if args.json else "\n".join(lines))
    return 0


def cmd_card_init(args: argparse.Namespace) -> int:
    """Derive a card from the model, check it with one real inference, write it, and print every
    value with why (lines marked ? are guesses to check)."""
    from engines.base import open_backend
    from engines.cardinit import derive_card, parse_size, summarize
    from engines.modelcard import card_path_for, parse_card
    from engines.modelcheck import check_model
    from engines.runner import ModelRunner

    model = Path(args.model)
    if not model.is_file():
        raise JetagentError(f"model file not found: {model}")
    out = Path(args.out) if args.out and args.out != "-" else card_path_for(model) if not args.out else None
    if out is not None and out.exists() and not args.force:
        raise JetagentError(f"{out} exists; --force to overwrite it, or --out elsewhere")
    derivation = derive_card(model, size=parse_size(args.size) if args.size else None, name=args.name)
    base = out.parent if out is not None else model.parent
    info = sys.stderr if out is None else sys.stdout
    print(f"card for {model.name}: {summarize(derivation.guesses)}", file=info)
    for line in derivation.lines():
        print(line, file=info)
    card = parse_card(derivation.card, base_dir=model.parent, where="derived card")
    runner = ModelRunner(card, open_backend("onnxruntime", model), path=str(model))
    try:
        checked = check_model(runner, derivation.facts)
    finally:
        runner.close()
    print(f"checked: {checked.line()}", file=info)
    text = json.dumps(derivation.card, indent=2) + "\n"
    if out is None:
        print(text, end="")
        return 0
    if base.resolve() != model.parent.resolve() and card.kind == "ssd":
        print(f"note: the card names {card.option('anchors')} relative to itself; copy it beside {out}", file=info)
    from engines.fileio import atomic_write_bytes

    atomic_write_bytes(out, text.encode())
    print(f"wrote {out}", file=info)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """One line per check (or --json); exit 1 when any check failed."""
    from agent.doctor import DoctorOptions, report, run_doctor

    config = None if args.no_config else Path(args.config)
    checks = run_doctor(DoctorOptions(config=config, frames=args.frames, camera_timeout_s=args.timeout,
                                      broker_timeout_s=args.timeout))
    result = report(checks)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for check in checks:
            print(check.line())
        print("doctor: " + ("all checks passed" if result["ok"] else f"FAILED: {', '.join(result['failed'])}"))
    return 0 if result["ok"] else 1


def cmd_selftest(args: argparse.Namespace) -> int:
    """Prove the hardware paths and write a report to attach to a bug report; exit 1 on a failure."""
    from agent.selftest import SelftestOptions, format_selftest, run_selftest

    opts = SelftestOptions(out=Path(args.out), model=Path(args.model) if args.model else None,
                           video=Path(args.video) if args.video else None, frames=args.frames,
                           holdout=args.holdout, loop_seconds=args.loop_seconds, minimum=args.min_accuracy,
                           require_gpu=args.require_gpu, cpu=not args.no_cpu, all_candidates=args.all_candidates)
    report = run_selftest(opts)
    print(json.dumps(report, indent=2) if args.json else format_selftest(report))
    return 0 if report["verdict"] in ("passed", "passed-cpu-only") else 1


def _add_doctor_and_selftest(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="check that this device can run the agent (one line per check)")
    doctor.add_argument("--config", default="/etc/jetagent/agent.toml", help="TOML config file")
    doctor.add_argument("--no-config", action="store_true", help="check the device only")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    doctor.add_argument("--frames", type=int, default=3, help="frames each camera must deliver")
    doctor.add_argument("--timeout", type=_positive, default=10.0, help="seconds per camera / broker check")
    doctor.set_defaults(func=cmd_doctor)

    selftest = sub.add_parser("selftest", help="build and time every engine route on the demo model; "
                              "write a report for bug reports")
    selftest.add_argument("--out", required=True, help="report JSON to write")
    selftest.add_argument("--model", help="ONNX model with its card (default: the demo person detector)")
    selftest.add_argument("--video", help="video to calibrate on and loop (default: clips/vtest.avi)")
    selftest.add_argument("--frames", type=int, default=64, help="calibration frames (default 64)")
    selftest.add_argument("--holdout", type=int, default=48, help="held-out frames compared with FP32 (default 48)")
    selftest.add_argument("--loop-seconds", type=_positive, default=60.0,
                          help="seconds of camera loop on the video per engine (default 60)")
    selftest.add_argument("--min-accuracy", type=float, default=0.95, help="the gate's bound (default 0.95)")
    selftest.add_argument("--require-gpu", action="store_true", help="fail when TensorRT is not usable here")
    selftest.add_argument("--no-cpu", action="store_true", help="skip the ONNX Runtime (CPU) parts")
    selftest.add_argument("--all-candidates", action="store_true",
                          help="every INT8 candidate of each route, not only the first")
    selftest.add_argument("--json", action="store_true", help="print the report instead of the summary")
    selftest.set_defaults(func=cmd_selftest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jetagent", description="Camera inference agent for NVIDIA Jetson.")
    parser.add_argument("--version", action="version", version=f"jetagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the camera loops from a config file")
    run.add_argument("--config", required=True, help="TOML config file")
    run.add_argument("--check-config", action="store_true",
                     help="validate the config, open every model and file source, then exit")
    run.add_argument("--duration", type=_positive, default=None, help="stop after this many seconds")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None)
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="benchmark a model: raw backend loop vs full pipeline (no card: the "
                           "backend alone on generated inputs)")
    bench.add_argument("model", help="ONNX model file (its card <model>.json beside it, if it has one)")
    bench.add_argument("--card", help="model card JSON (default: <model>.json; none: generated inputs, or with "
                       "--video the card derived from the model when that is unambiguous)")
    bench.add_argument("--shapes", help="input shapes for the backend alone on generated inputs, trtexec's "
                       "spelling: name:1x3x640x640[,name2:...] (needed for dynamic dims)")
    bench.add_argument("--raw", action="store_true", help="the backend alone on generated inputs, even with a card")
    bench.add_argument("--backend", choices=backend_names(), default="onnxruntime")
    bench.add_argument("--precision", default="fp32", help="comma-separated: fp32,fp16,int8")
    bench.add_argument("--video", help="video file for the pipeline run (and the frames of the raw loop)")
    bench.add_argument("--duration", type=_positive, default=10.0, help="seconds per loop (split over rounds)")
    bench.add_argument("--rounds", type=int, default=2, help="alternating raw/pipeline rounds")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--threads", type=int, default=0, help="backend intra-op threads (0 = default)")
    bench.add_argument("--opencv-threads", type=int, default=1,
                       help="OpenCV's own threads, as the agent runs it (1; 0 = OpenCV's default)")
    bench.add_argument("--graph-optimization", choices=("disable", "basic", "extended", "all"), default="all")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--calib-video", help="with --precision int8/fp16: calibrate on the first part of this "
                       "video and compare every candidate with FP32 on the rest")
    bench.add_argument("--calib-frames", type=int, default=64, help="calibration frames (default 64)")
    bench.add_argument("--holdout-frames", type=int, default=48, help="held-out comparison frames (default 48)")
    bench.add_argument("--calib-split", type=float, default=0.5, help="fraction of the video used for calibration")
    bench.add_argument("--min-accuracy", type=float, default=0.95, help="the gate's bound (default 0.95)")
    bench.add_argument("--cache-dir", help="keep quantized models/engines here between runs (default: none)")
    bench.set_defaults(func=cmd_bench)

    card = sub.add_parser("card", help="model cards: derive one from the model")
    card_sub = card.add_subparsers(dest="card_command", required=True)
    init = card_sub.add_parser("init", help="write a card derived from the model itself, every guess with why")
    init.add_argument("model", help="ONNX model file")
    init.add_argument("--out", help="where to write the card (default <model>.json; - prints it)")
    init.add_argument("--size", help="input WIDTHxHEIGHT for a model with dynamic H/W (default: its metadata)")
    init.add_argument("--name", help="the card's name (default: the file's stem)")
    init.add_argument("--force", action="store_true", help="overwrite an existing card")
    init.set_defaults(func=cmd_card_init)

    calibrate = sub.add_parser("calibrate", help="collect a calibration set from the configured camera(s)")
    calibrate.add_argument("--config", required=True, help="TOML config file")
    calibrate.add_argument("--frames", type=int, required=True, help="frames to keep (a quarter are held out)")
    calibrate.add_argument("--camera", help="only this camera (default: every camera in the config)")
    calibrate.add_argument("--interval", type=float, default=0.5, help="least seconds between kept frames")
    calibrate.add_argument("--timeout", type=_positive, default=600.0, help="give up collecting after this long")
    calibrate.add_argument("--json", action="store_true", help="print JSON")
    calibrate.set_defaults(func=cmd_calibrate)
    _add_doctor_and_selftest(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        setup_logging("warning")
    try:
        result: int = args.func(args)
        return result
    except JetagentError as exc:
        print(f"jetagent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
