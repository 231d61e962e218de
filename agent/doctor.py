"""`jetagent doctor`: is this device ready to run the agent? One line per check.

Checks, in order: the config; the Jetson (device-tree model, L4T release, power mode);
ONNX Runtime and its providers; the CUDA memory seam (cuda-python, pycuda); TensorRT
(version, routes, device, SM count, memory, CUDA, DLA cores, plugins, asked of a child
process so a broken install cannot take the doctor down); each camera (opens and delivers
frames) and its model (opens); the broker (TCP, the configured TLS, an MQTT CONNECT);
the trusted key files; the clock (sane, NTP, certificates valid now); disk space and
write access for the state directory.

Each check is "ok", "warn" (works, but not as the owner would want), "fail" (the agent
cannot do what the config asks), or "skip" (does not apply here, says why). Whether a
missing piece fails depends on the config: no TensorRT fails with `backend = "tensorrt"`
and is only noted with `backend = "onnxruntime"`. The exit status is 1 when any check
failed, else 0. Nothing here changes the device (the broker check connects with the
client id `<device_id>-doctor` and no session, so the running agent is not disturbed).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.config import Config, FleetConfig
from engines.errors import JetagentError

log = logging.getLogger(__name__)
EARLIEST_SANE = 1735689600  # 2025-01-01: a clock before this cannot validate any certificate we use
MIN_FREE_FAIL = 512 << 20
MIN_FREE_WARN = 2 << 30


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status.upper():5} {self.name:18} {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "data": self.data}


@dataclass(frozen=True)
class DoctorOptions:
    config: Path | None
    frames: int = 3
    camera_timeout_s: float = 10.0
    probe_timeout_s: float = 120.0
    broker_timeout_s: float = 5.0
    launcher: tuple[str, ...] | None = None  # the TensorRT probe child (tests)


def _run(argv: Sequence[str], timeout: float = 5.0) -> str | None:
    """A command's stdout, or None when it is missing or fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _guard(name: str, func: Callable[[], Check | list[Check]]) -> list[Check]:
    """Run one check; an expected failure is a "fail" line, a bug is a "fail" line with its type."""
    try:
        result = func()
    except JetagentError as exc:
        return [Check(name, "fail", str(exc))]
    except Exception as exc:  # the doctor reports, it does not crash: the traceback goes to the log
        log.exception("doctor check %s crashed", name)
        return [Check(name, "fail", f"check crashed: {type(exc).__name__}: {exc}")]
    return result if isinstance(result, list) else [result]


# ---- the device ------------------------------------------------------------------------------------

def check_jetson(model_path: Path = Path("/proc/device-tree/model"),
                 release_path: Path = Path("/etc/nv_tegra_release")) -> Check:
    from calibration.engine_cache import jetson_model, l4t_release

    board, l4t = jetson_model(model_path), l4t_release(release_path)
    if board is None or "jetson" not in board.lower():
        return Check("jetson", "skip", f"not a Jetson ({platform.machine()}"
                     + (f", device tree says {board!r}" if board else ", no /proc/device-tree/model") + ")")
    data: dict[str, Any] = {"board": board, "l4t": l4t}
    mode = _run(["nvpmodel", "-q"])
    if mode is None:
        return Check("jetson", "warn", f"{board}, L4T {l4t or 'unknown'}; power mode unknown (nvpmodel -q "
                     "failed or is missing)", data)
    lines = [ln.strip() for ln in mode.splitlines() if ln.strip()]
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("NV Power Mode")), "unknown")
    number = next((ln for ln in lines if ln.isdigit()), "?")
    data.update(power_mode=name, power_mode_id=number)
    return Check("jetson", "ok", f"{board}, L4T {l4t or 'unknown'}, power mode {name} ({number})", data)


def check_onnxruntime(config: Config | None) -> Check:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Check("onnxruntime", "fail", f"not importable: {exc}")
    available = list(ort.get_available_providers())
    data = {"version": ort.__version__, "providers": available}
    wanted = list(config.backend.providers) if config is not None else []
    missing = [p for p in wanted if p not in available]
    if missing:
        return Check("onnxruntime", "fail", f"{ort.__version__}: configured providers {missing} are not in this "
                     f"build (it has {', '.join(available)})", data)
    return Check("onnxruntime", "ok", f"{ort.__version__}, providers {', '.join(available)}", data)


def _needs_tensorrt(config: Config | None) -> bool:
    return config is not None and config.backend.name == "tensorrt"


def check_cuda_seam(config: Config | None) -> Check:
    from engines.cuda_mem import available_implementations, choose_implementation

    seams = available_implementations()
    text = "; ".join(f"{s['name']} {s['version']}" if s["importable"] else f"{s['name']}: {s['error']}"
                     for s in seams)
    try:
        chosen = choose_implementation(config.backend.cuda_memory if config is not None else None)
    except JetagentError as exc:
        status = "fail" if _needs_tensorrt(config) else "skip"
        return Check("cuda memory", status, str(exc).split(". ")[0] + ("" if status == "fail" else
                     " (not needed: backend is not tensorrt)"), {"seams": seams})
    return Check("cuda memory", "ok", f"uses {chosen} ({text})", {"seams": seams, "chosen": chosen})


def check_tensorrt(config: Config | None, opts: DoctorOptions) -> Check:
    from calibration.build import DEFAULT_LAUNCHER, probe_tensorrt

    try:
        probe = probe_tensorrt(timeout_s=opts.probe_timeout_s, launcher=opts.launcher or DEFAULT_LAUNCHER,
                               cuda_memory=config.backend.cuda_memory if config is not None and
                               config.backend.cuda_memory != "auto" else None)
    except JetagentError as exc:
        if _needs_tensorrt(config):
            return Check("tensorrt", "fail", str(exc))
        return Check("tensorrt", "skip", f"{str(exc).split('. ')[0]} (not needed: backend is not tensorrt)")
    device = probe.get("device", {})
    memory = int(device.get("total_memory") or 0) / 2**30
    detail = (f"TensorRT {probe.get('tensorrt_version')} on {device.get('name')} (sm_"
              f"{str(device.get('compute_capability')).replace('.', '')}, {device.get('multiprocessors')} SMs, "
              f"{memory:.1f} GiB), CUDA {device.get('cuda_runtime') or '?'}, DLA cores {probe.get('dla_cores')}, "
              f"routes {', '.join(probe.get('routes', []))}, plugins {'ok' if probe.get('plugins') else 'MISSING'}")
    status = "ok" if probe.get("plugins") else "warn"
    return Check("tensorrt", status, detail, {k: v for k, v in probe.items() if k != "event"})


# ---- what the config names -------------------------------------------------------------------------

def _read_frames(source: str, frames: int, timeout: float) -> tuple[int, tuple[int, int] | None, str]:
    """(frames read, (width, height), error) from a source, on a thread so a stuck camera times out."""
    from agent.camera.sources import open_reader, parse_source

    result: dict[str, Any] = {"n": 0, "size": None, "error": ""}

    def body() -> None:
        try:
            reader = open_reader(parse_source(source))
        except JetagentError as exc:
            result["error"] = str(exc)
            return
        try:
            for _ in range(frames):
                image = reader.read()
                if image is None:
                    result["error"] = "the source ended or returned no frame"
                    return
                result["n"] += 1
                result["size"] = (int(image.shape[1]), int(image.shape[0]))
        finally:
            reader.close()

    worker = threading.Thread(target=body, name="doctor-camera", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return int(result["n"]), result["size"], f"no frame within {timeout:g} s"
    return int(result["n"]), result["size"], str(result["error"])


def check_cameras(config: Config, opts: DoctorOptions) -> list[Check]:
    out = []
    for cam in config.cameras:
        started = time.monotonic()
        n, size, error = _read_frames(cam.source, opts.frames, opts.camera_timeout_s)
        data = {"source": cam.source, "frames": n, "size": list(size) if size else None}
        if n >= opts.frames:
            shape = f" {size[0]}x{size[1]}" if size else ""
            out.append(Check(f"camera {cam.name}", "ok", f"{cam.source}: {n} frames{shape} in "
                             f"{time.monotonic() - started:.1f} s", data))
        else:
            hint = " (a live camera the running agent holds cannot open twice: stop jetagent first)" \
                if cam.source.startswith(("/dev/", "csi://")) else ""
            out.append(Check(f"camera {cam.name}", "fail", f"{cam.source}: {n} of {opts.frames} frames: "
                             f"{error}{hint}", data))
    return out


def check_models(config: Config) -> list[Check]:
    from agent.serving import needs_engine, open_camera_model

    out = []
    for cam in config.cameras:
        def one(cam: Any = cam) -> Check:
            runner = open_camera_model(config, cam)
            try:
                later = "; the TensorRT engine is built from it at start" if needs_engine(config, cam.model) else ""
                return Check(f"model {cam.name}", "ok", f"{runner.card.name} ({cam.model.name}) opens on "
                             f"{runner.backend.name} {runner.precision}{later}",
                             {"model": str(cam.model), "sha256": runner.sha256})
            finally:
                runner.close()
        out += _guard(f"model {cam.name}", one)
    return out


def _tls_context(fleet: FleetConfig) -> ssl.SSLContext | None:
    tls = fleet.tls
    if tls is None:
        return None
    context = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.insecure:
        context.check_hostname = False
    return context


def check_broker(config: Config, opts: DoctorOptions) -> Check:
    from agent.mqtt import parse_broker_url

    fleet = config.fleet
    if fleet is None:
        return Check("broker", "skip", "no [fleet] section: the agent runs standalone")
    host, port, _ = parse_broker_url(fleet.broker)
    try:
        context = _tls_context(fleet)
    except (OSError, ssl.SSLError) as exc:
        return Check("broker", "fail", f"{fleet.broker}: cannot load the TLS files: {exc}")
    try:
        with socket.create_connection((host, port), timeout=opts.broker_timeout_s) as sock:
            if context is not None:
                with context.wrap_socket(sock, server_hostname=host) as tls_sock:
                    tls_version = tls_sock.version()
    except ssl.SSLError as exc:
        return Check("broker", "fail", f"{fleet.broker}: TLS handshake failed: {exc.reason or exc}")
    except OSError as exc:
        return Check("broker", "fail", f"{fleet.broker}: cannot connect: {exc.strerror or exc}")
    from agent.uplink.link import FleetLink

    client_id = f"{config.device_id}-doctor"[:64]
    link = FleetLink(replace(fleet, session_expiry_s=0), client_id, will_topic=f"{fleet.prefix}/doctor/{client_id}",
                     will_payload=b"")
    link.start()
    try:
        connected = link.wait_connected(opts.broker_timeout_s)
        error = link.last_error
    finally:
        link.stop()
    tls = f", {tls_version}" if context is not None else ", no TLS"
    if not connected:
        return Check("broker", "fail", f"{fleet.broker}{tls}: no MQTT CONNACK as {client_id} within "
                     f"{opts.broker_timeout_s:g} s ({error or 'no answer'})")
    return Check("broker", "ok", f"{fleet.broker}{tls}, MQTT 5 connect as {client_id} accepted",
                 {"max_packet_size": link.info.max_packet_size, "receive_maximum": link.info.receive_maximum})


def check_keys(config: Config) -> Check:
    from agent.wire.signing import TrustStore

    fleet = config.fleet
    if fleet is None:
        return Check("trusted keys", "skip", "no [fleet] section")
    if not fleet.trusted_keys:
        return Check("trusted keys", "warn", "none configured: every pushed model will be refused")
    store = TrustStore.from_files(list(fleet.trusted_keys))
    return Check("trusted keys", "ok", f"{len(store.keys)} Ed25519 key(s) readable: "
                 f"{', '.join(Path(k).name for k in fleet.trusted_keys)}", {"key_ids": sorted(store.keys)})


def check_clock(config: Config | None) -> Check:
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    if now < EARLIEST_SANE:
        return Check("clock", "fail", f"{stamp}: before 2025; TLS certificates cannot validate (set the time, "
                     "enable NTP: timedatectl set-ntp true)")
    synced = _run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    problems = []
    if config is not None and config.fleet is not None and config.fleet.tls is not None:
        problems += _certificate_problems(config.fleet, now)
    if problems:
        return Check("clock", "fail", f"{stamp}: " + "; ".join(problems))
    if synced is not None and synced.strip() != "yes":
        return Check("clock", "warn", f"{stamp}, not NTP-synchronised (timedatectl)")
    return Check("clock", "ok", stamp + (", NTP-synchronised" if synced is not None else ""))


def _certificate_problems(fleet: FleetConfig, now: float) -> list[str]:
    from datetime import datetime, timezone

    from cryptography import x509

    out = []
    tls = fleet.tls
    for path in (tls.ca, tls.cert) if tls is not None else ():
        if path is None:
            continue
        try:
            cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            out.append(f"{path}: unreadable certificate ({exc})")
            continue
        moment = datetime.fromtimestamp(now, timezone.utc)
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            out.append(f"{Path(path).name} is valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                       f"{cert.not_valid_after_utc:%Y-%m-%d}, not now")
    return out


def check_disk(config: Config) -> list[Check]:
    state = config.state_dir
    existing = state
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    free = usage.free
    data = {"state_dir": str(state), "free_bytes": free, "total_bytes": usage.total}
    status = "fail" if free < MIN_FREE_FAIL else "warn" if free < MIN_FREE_WARN else "ok"
    out = [Check("disk", status, f"{free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB at {existing}"
                 + (" (models, engines and calibration sets need room: at least 2 GiB)" if status != "ok" else ""),
                 data)]
    try:
        state.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state, prefix=".doctor-"):
            pass
        out.append(Check("state dir", "ok", f"{state} is writable"))
    except OSError as exc:
        who = f"uid {os.geteuid()}"
        out.append(Check("state dir", "warn" if os.geteuid() != 0 else "fail",
                         f"{state}: not writable by {who} ({exc.strerror or exc}); the service writes it as "
                         "the jetagent user"))
    return out


def run_doctor(opts: DoctorOptions) -> list[Check]:
    """Every check, in order (see the module docstring)."""
    from agent.config import load_config

    checks: list[Check] = []
    config: Config | None = None
    if opts.config is None:
        checks.append(Check("config", "skip", "no --config given: only the device is checked"))
    else:
        try:
            config = load_config(opts.config)
            fleet = config.fleet.broker if config.fleet else "standalone"
            checks.append(Check("config", "ok", f"{opts.config}: {len(config.cameras)} camera(s), backend "
                                f"{config.backend.name} {config.backend.precision}, fleet {fleet}"))
        except JetagentError as exc:
            checks.append(Check("config", "fail", str(exc)))
    checks += _guard("jetson", check_jetson)
    checks += _guard("onnxruntime", lambda: check_onnxruntime(config))
    checks += _guard("cuda memory", lambda: check_cuda_seam(config))
    checks += _guard("tensorrt", lambda: check_tensorrt(config, opts))
    if config is not None:
        cfg = config
        checks += _guard("cameras", lambda: check_cameras(cfg, opts))
        checks += check_models(cfg)
        checks += _guard("broker", lambda: check_broker(cfg, opts))
        checks += _guard("trusted keys", lambda: check_keys(cfg))
    checks += _guard("clock", lambda: check_clock(config))
    if config is not None:
        checks += _guard("disk", lambda: check_disk(cfg))
    return checks


def report(checks: list[Check]) -> dict[str, Any]:
    failed = [c.name for c in checks if c.status == "fail"]
    return {"ok": not failed, "failed": failed, "checks": [c.to_dict() for c in checks]}
