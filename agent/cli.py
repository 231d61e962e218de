"""`jetagent`: run the daemon, check a config, benchmark a model."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from agent import __version__
from engines.base import PRECISIONS, backend_names
from engines.errors import JetagentError

log = logging.getLogger("jetagent")


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


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
    from agent.bench import BenchOptions, format_table, run_bench

    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        if p not in PRECISIONS:
            raise JetagentError(f"--precision: unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if precisions != ["fp32"]:
        raise JetagentError("--precision: only fp32 is available until on-device INT8 calibration lands")
    opts = BenchOptions(
        model=Path(args.model), card=Path(args.card) if args.card else None, backend=args.backend,
        precision="fp32", threads=args.threads, graph_optimization=args.graph_optimization,
        video=args.video, duration_s=args.duration, warmup=args.warmup, rounds=args.rounds,
    )
    report = run_bench(opts)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0


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

    bench = sub.add_parser("bench", help="benchmark a model: raw backend loop vs full pipeline")
    bench.add_argument("model", help="ONNX model file (its card <model>.json beside it)")
    bench.add_argument("--card", help="model card JSON (default: <model>.json)")
    bench.add_argument("--backend", choices=backend_names(), default="onnxruntime")
    bench.add_argument("--precision", default="fp32", help="comma-separated: fp32,fp16,int8")
    bench.add_argument("--video", help="video file for the pipeline run (and the frames of the raw loop)")
    bench.add_argument("--duration", type=_positive, default=10.0, help="seconds per loop (split over rounds)")
    bench.add_argument("--rounds", type=int, default=2, help="alternating raw/pipeline rounds")
    bench.add_argument("--warmup", type=int, default=10)
    bench.add_argument("--threads", type=int, default=0, help="backend intra-op threads (0 = default)")
    bench.add_argument("--graph-optimization", choices=("disable", "basic", "extended", "all"), default="all")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(func=cmd_bench)
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
