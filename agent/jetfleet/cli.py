"""`jetfleet`: the fleet operator's command line.

    jetfleet [--broker URL] [--prefix P] [TLS and login options] status [--json]
    jetfleet ... watch [--interval S] [--count N]
    jetfleet ... cmd DEVICE NAME [--args JSON] [--timeout S]
    jetfleet keys init --dir KEYDIR
    jetfleet ... serve --repo DIR [--share-group G] [--window N] [--log-interval S]
    jetfleet ... push MODEL.onnx (--device ID ... | --group G [--expect N]) --repo DIR --key KEY [options]
    jetfleet ... rollback --device ID [--timeout S] [--json]
    jetfleet ... rollout MODEL --group G --canary N% --promote-after DURATION --max-failures K --repo DIR --key KEY
    jetfleet ... rollout --resume ID

The broker defaults to $JETFLEET_BROKER (else mqtt://localhost:1883) and the password to
$JETFLEET_PASSWORD, so it need not appear in `ps`. Expected failures print one line
and exit 2; a command a device refused exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.jetfleet.client import FleetClient, FleetOptions
from agent.jetfleet.push import PushSpec, policy_from_args, push, rollback
from agent.jetfleet.repo import ModelRepo
from agent.jetfleet.rollout import run_rollout
from agent.jetfleet.rollout_state import parse_duration, parse_percent
from agent.jetfleet.serve import ModelServer, serve_forever
from agent.jetfleet.view import FleetView, format_table
from agent.wire.core import DEFAULT_PREFIX, encode, valid_id
from agent.wire.signing import fingerprint_file, generate_keys
from engines.errors import JetagentError

log = logging.getLogger("jetfleet")

CLEAR = "\x1b[H\x1b[2J"


def _positive(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return v


def _size(text: str) -> int:
    """Bytes, or with a K/M suffix (binary): 262144, 256K, 1M."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1024, "M": 1024 * 1024}.get(t[-1:], 1)
    try:
        v = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 262144, 256K, 1M)") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return v


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _percent(text: str) -> float:
    try:
        return parse_percent(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return v


def options(args: argparse.Namespace) -> FleetOptions:
    return FleetOptions(
        broker=args.broker, prefix=args.prefix,
        tls_ca=Path(args.tls_ca) if args.tls_ca else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_insecure=args.tls_insecure,
        username=args.username, password=args.password or os.environ.get("JETFLEET_PASSWORD"),
    )


def connect(args: argparse.Namespace) -> FleetClient:
    return FleetClient(options(args)).connect(args.connect_timeout)


def cmd_status(args: argparse.Namespace) -> int:
    client = connect(args)
    try:
        view = FleetView(client.topics)
        view.subscribe(client)
        view.settle(quiet_s=0.3, max_s=args.wait)
        rows = view.rows()
    finally:
        client.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    client = connect(args)
    tty = sys.stdout.isatty()
    drawn = 0
    try:
        view = FleetView(client.topics)
        view.subscribe(client)
        view.settle(quiet_s=0.2, max_s=min(args.interval, 1.0))
        while True:
            rows = view.rows()
            stamp = time.strftime("%H:%M:%S")
            text = (f"jetfleet watch  {args.broker}  {len(rows)} device(s)  {stamp}  (Ctrl-C to stop)\n"
                    + format_table(rows))
            sys.stdout.write((CLEAR if tty else "") + text + ("\n" if tty else "\n\n"))
            sys.stdout.flush()
            drawn += 1
            if args.count and drawn >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


def cmd_cmd(args: argparse.Namespace) -> int:
    try:
        cmd_args: Any = json.loads(args.args) if args.args else {}
    except json.JSONDecodeError as exc:
        raise JetagentError(f"--args: not valid JSON: {exc}") from None
    if not isinstance(cmd_args, dict):
        raise JetagentError("--args: must be a JSON object, like '{\"camera\": \"front\"}'")
    client = connect(args)
    try:
        reply = client.request(args.device, encode({"v": 1, "cmd": args.name, "args": cmd_args}), args.timeout)
    finally:
        client.close()
    print(json.dumps(reply, indent=2))
    return 0 if reply["ok"] else 1


def cmd_keys_init(args: argparse.Namespace) -> int:
    priv, pub = generate_keys(args.dir)
    print(f"signing key  {priv.resolve()} (mode 0600: keep it secret, keep it off the devices)")
    print(f"public key   {pub.resolve()}")
    print(f"key id       {fingerprint_file(pub)}")
    print("devices trust it with this line in the [fleet] section of their config:")
    print(f'trusted_keys = ["{pub.resolve()}"]')
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.share_group and not valid_id(args.share_group):
        raise JetagentError(f"--share-group: {args.share_group!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    repo = ModelRepo(args.repo)
    try:
        repo.manifests.mkdir(parents=True, exist_ok=True)  # an empty repository is served too
    except OSError as exc:
        raise JetagentError(f"--repo: cannot use {repo.root}: {exc.strerror or exc}") from None
    if not args.verbose:
        logging.getLogger("agent").setLevel(logging.INFO)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client = FleetClient(options(args), max_inflight=args.window).connect(args.connect_timeout)
    server = ModelServer(client, repo, share_group=args.share_group or None)
    try:
        server.start()
        serve_forever(server, stop, args.log_interval)
    finally:
        server.stop()
        client.drain(5.0)
        client.close()
    return 0


def push_spec(args: argparse.Namespace) -> PushSpec:
    if not args.repo or not args.key:
        raise JetagentError("--repo and --key are required")
    labels = [x.strip() for x in args.labels.split(",")] if args.labels is not None else None
    if labels is not None and not all(labels):
        raise JetagentError(f"--labels {args.labels!r}: empty label (give them as a,b,c)")
    return PushSpec(model=Path(args.model), repo=Path(args.repo), key=Path(args.key),
                    card=Path(args.card) if args.card else None, labels=labels, task=args.task,
                    accuracy_min=args.accuracy_min, chunk_size=args.chunk_size)


def cmd_push(args: argparse.Namespace) -> int:
    spec = push_spec(args)
    if not Path(args.key).is_file():
        raise JetagentError(f"--key {args.key}: no such file (make one with `jetfleet keys init --dir KEYDIR`)")
    client = connect(args)
    try:
        return push(client, spec, devices=args.device or [], group=args.group, expect=args.expect,
                    expect_wait=args.expect_wait,
                    precision=args.precision or "", policy=policy_from_args(args.probation, args.min_fps),
                    wait=not args.no_wait, timeout=args.timeout, as_json=args.json)
    finally:
        client.close()


def cmd_rollout(args: argparse.Namespace) -> int:
    spec = None
    if not args.resume:
        if args.model is None or args.group is None:
            raise JetagentError("rollout needs MODEL and --group (or --resume ID)")
        spec = push_spec(args)
        if Path(args.model).is_file() and not Path(args.key).is_file():
            raise JetagentError(f"--key {args.key}: no such file (make one with `jetfleet keys init --dir KEYDIR`)")
    if args.max_failures < 0 or args.max_errors < 0:
        raise JetagentError("--max-failures and --max-errors must be >= 0")
    client = connect(args)
    try:
        return run_rollout(client, args, spec)
    finally:
        client.close()


def cmd_rollback(args: argparse.Namespace) -> int:
    client = connect(args)
    try:
        return rollback(client, args.device, reason=args.reason, timeout=args.timeout, as_json=args.json)
    finally:
        client.close()


def add_push_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    """What push and rollout share: the repository, the key, the model's card and policy."""
    p.add_argument("--repo", required=required, help="the model repository (created if missing)")
    p.add_argument("--key", required=required, help="the fleet signing key (KEYDIR/fleet.key)")
    p.add_argument("--card", help="the model card (default: MODEL.json beside the model)")
    p.add_argument("--labels", help="class labels a,b,c (replace the card's)")
    p.add_argument("--task", help="the card's task (classification, detection, ...)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), help="what devices build (default: theirs)")
    p.add_argument("--accuracy-min", type=_fraction, help="least agreement with FP32 an INT8/FP16 build must show")
    p.add_argument("--probation", type=_positive, help="seconds of health-gated probation after the swap")
    p.add_argument("--min-fps", type=float, help="roll back on probation below this FPS")
    p.add_argument("--chunk-size", type=_size, help="bytes per chunk (default: 1 MiB for models of 16 MiB or "
                                                    "more, else 256 KiB; never over the broker's limit)")
    p.add_argument("--json", action="store_true", help="print the outcome per device as JSON")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jetfleet", description="Watch and command a fleet of jetagent devices.")
    p.add_argument("--version", action="version", version=f"jetfleet {__version__}")
    p.add_argument("--broker", default=os.environ.get("JETFLEET_BROKER", "mqtt://localhost:1883"),
                   help="mqtt://host:1883 or mqtts://host:8883 (default: $JETFLEET_BROKER or mqtt://localhost:1883)")
    p.add_argument("--prefix", default=os.environ.get("JETFLEET_PREFIX", DEFAULT_PREFIX), help="topic prefix")
    p.add_argument("--tls-ca", help="CA certificate (PEM) that signed the broker's certificate")
    p.add_argument("--tls-cert", help="client certificate (PEM), for brokers that require one")
    p.add_argument("--tls-key", help="client private key (PEM)")
    p.add_argument("--tls-insecure", action="store_true", help="do not check the broker's host name")
    p.add_argument("--username")
    p.add_argument("--password", help="(better: $JETFLEET_PASSWORD)")
    p.add_argument("--connect-timeout", type=_positive, default=5.0, help="seconds to wait for the broker")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    st = sub.add_parser("status", help="one row per device, from retained state and the latest health")
    st.add_argument("--json", action="store_true", help="print a JSON list of devices")
    st.add_argument("--wait", type=_positive, default=2.0, help="most seconds to collect messages")
    st.set_defaults(func=cmd_status)

    w = sub.add_parser("watch", help="the status table, live, until Ctrl-C")
    w.add_argument("--interval", type=_positive, default=1.0, help="seconds between redraws")
    w.add_argument("--count", type=int, default=0, help="stop after N redraws (0 = never)")
    w.set_defaults(func=cmd_watch)

    c = sub.add_parser("cmd", help="send a command to a device and print its reply")
    c.add_argument("device")
    c.add_argument("name", help="ping, get-config, restart-pipeline, ...")
    c.add_argument("--args", help="JSON object of arguments")
    c.add_argument("--timeout", type=_positive, default=10.0, help="seconds to wait for the reply")
    c.set_defaults(func=cmd_cmd)

    k = sub.add_parser("keys", help="the fleet's model-signing key")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    ki = ksub.add_parser("init", help="make an Ed25519 signing key KEYDIR/fleet.key and KEYDIR/fleet.pub")
    ki.add_argument("--dir", required=True, help="directory for fleet.key (mode 0600) and fleet.pub")
    ki.set_defaults(func=cmd_keys_init)

    sv = sub.add_parser("serve", help="answer devices' chunk requests from a model repository (until SIGTERM)")
    sv.add_argument("--repo", required=True, help="the repository jetfleet push writes")
    sv.add_argument("--share-group", default="jetfleet",
                    help="shared-subscription group: servers in one group split the requests (default jetfleet; "
                         "'' for a plain subscription)")
    sv.add_argument("--window", type=int, default=16, choices=range(1, 65), metavar="N",
                    help="unacknowledged chunk messages in flight to the broker (1-64, default 16)")
    sv.add_argument("--log-interval", type=_positive, default=10.0, help="seconds between throughput lines")
    sv.set_defaults(func=cmd_serve)

    pu = sub.add_parser("push", help="put a model on devices or a group, and follow it until it is active")
    pu.add_argument("model", help="the ONNX file (its card MODEL.json beside it)")
    who = pu.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", action="append", help="a target device (repeat for more)")
    who.add_argument("--group", help="a device group ([fleet] groups in the device's config)")
    pu.add_argument("--expect", type=int, default=0, help="with --group: wait for this many devices to show up")
    pu.add_argument("--expect-wait", type=_positive, default=30.0, help="most seconds to wait for them")
    add_push_options(pu)
    pu.add_argument("--no-wait", action="store_true", help="publish and return; do not follow the devices")
    pu.add_argument("--timeout", type=_positive, default=1800.0, help="most seconds to follow the devices")
    pu.set_defaults(func=cmd_push)

    rb = sub.add_parser("rollback", help="a device serves its previous model again; follow it until it settles")
    rb.add_argument("--device", required=True)
    rb.add_argument("--reason", default="operator asked for a rollback (jetfleet rollback)")
    rb.add_argument("--timeout", type=_positive, default=120.0, help="most seconds to follow the device")
    rb.add_argument("--json", action="store_true", help="print the outcome as JSON")
    rb.set_defaults(func=cmd_rollback)

    ro = sub.add_parser("rollout", help="canaries of a group first; promote to the group when they stay healthy, "
                                        "else roll them back")
    ro.add_argument("model", nargs="?", help="an ONNX file, or a model already in the repository (name or sha256)")
    ro.add_argument("--group", help="the device group to roll out to")
    ro.add_argument("--canary", type=_percent, default=10.0, metavar="N%",
                    help="share of the group that goes first (sorted ids; at least one device; default 10%%)")
    ro.add_argument("--promote-after", type=_duration, default=300.0, metavar="DURATION",
                    help="how long active canaries must stay healthy (90s, 5m, 1h; default 5m)")
    ro.add_argument("--max-failures", type=int, default=0, metavar="K",
                    help="canary failures tolerated (failed, rolled back, unhealthy; default 0)")
    ro.add_argument("--max-errors", type=int, default=0,
                    help="inference errors a canary may add while watched before it counts as unhealthy")
    ro.add_argument("--expect", type=int, default=0, help="wait for this many devices of the group to show up")
    add_push_options(ro, required=False)
    ro.add_argument("--timeout", type=_positive, default=1800.0,
                    help="most seconds for the canaries to finish, and to follow the group after promotion")
    ro.add_argument("--state-dir", help="where rollouts are saved (default ~/.local/state/jetfleet/rollouts)")
    ro.add_argument("--resume", metavar="ID", help="continue an interrupted rollout by its id")
    ro.add_argument("--restart", action="store_true", help="start again even if this rollout was run before")
    ro.add_argument("--no-wait", action="store_true", help="after promoting, do not follow the rest of the group")
    ro.set_defaults(func=cmd_rollout)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result: int = args.func(args)
        return result
    except JetagentError as exc:
        print(f"jetfleet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
