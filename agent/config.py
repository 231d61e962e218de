"""The agent's configuration: a TOML file read into frozen dataclasses.

Errors name the key path (`cameras[1].source: ...`). Unknown keys are errors,
so a typo never silently falls back to a default. Relative paths are resolved
against the directory of the config file.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.base import PRECISIONS, backend_names
from engines.errors import JetagentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 (JetPack 6)
    import tomli as tomllib


class ConfigError(JetagentError):
    """The config file is missing, malformed, or has a bad value; says where."""


@dataclass(frozen=True)
class BackendConfig:
    name: str = "onnxruntime"
    precision: str = "fp32"
    threads: int = 0
    providers: tuple[str, ...] = ()
    graph_optimization: str = "all"
    # TensorRT (issue 12): the CUDA memory seam, build limits, DLA, and how long start-up waits
    # for an engine before ONNX Runtime serves while it builds in the background.
    cuda_memory: str = "auto"  # auto | cuda-python | pycuda
    workspace_mib: int = 0  # TensorRT build workspace; 0 = an eighth of device memory, 256 MiB..2 GiB
    dla_core: int | None = None
    build_timeout_s: float = 1800.0
    startup_wait_s: float = 20.0

    @property
    def workspace_bytes(self) -> int | None:
        """For calibration.deploy.DeployConfig.from_backend (None: the builder's default)."""
        return self.workspace_mib << 20 if self.workspace_mib else None


@dataclass(frozen=True)
class CameraConfig:
    name: str
    source: str
    model: Path
    card: Path | None = None  # default: <model>.json
    loop: bool = False  # files: start over at the end
    pace: str = "native"  # files: "native" = at the file's frame rate, "fast" = as fast as served


@dataclass(frozen=True)
class ResultsConfig:
    output: str = "-"  # "-" stdout, "none", or a file path (JSON lines, appended)
    every: int = 1  # write every Nth frame's result


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 30.0
    log: bool = True


@dataclass(frozen=True)
class CalibrationConfig:
    """How the agent collects a calibration set from its own camera when a deployment needs one."""

    frames: int = 64  # calibration samples
    holdout: int = 32  # held-out samples the accuracy gate runs on
    min_interval_s: float = 0.2  # at most one sample per interval (spread over time)
    collect_timeout_s: float = 300.0  # give up (and serve FP32, saying why) after this long
    min_frames: int = 16  # fewer calibration samples than this: no INT8


@dataclass(frozen=True)
class TLSConfig:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False


@dataclass(frozen=True)
class FleetConfig:
    broker: str
    prefix: str = "jetagent"
    username: str | None = None
    password: str | None = None
    tls: TLSConfig | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    trusted_keys: tuple[str, ...] = ()
    drift_interval_s: float = 60.0
    outbox_max_messages: int = 10000
    outbox_max_bytes: int = 64 * 1024 * 1024
    reconnect_min_s: float = 1.0  # first reconnect delay; doubles (with jitter) up to reconnect_max_s
    reconnect_max_s: float = 60.0
    groups: tuple[str, ...] = ()  # group desired states this device follows (its own one wins)
    max_model_bytes: int = 2 * 1024**3  # the store refuses bigger models


@dataclass(frozen=True)
class Config:
    device_id: str
    state_dir: Path
    cameras: tuple[CameraConfig, ...]
    backend: BackendConfig = field(default_factory=BackendConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    fleet: FleetConfig | None = None
    log_level: str = "info"
    # OpenCV's own thread pool (resize, colour, decode). 1: the grabber threads already run
    # beside inference, and a pool would steal its cores (measured: pipeline/raw throughput
    # 0.95 with OpenCV's default of 2 threads, 0.97 with 1). 0 = OpenCV's default.
    opencv_threads: int = 1
    path: Path | None = None  # the file it was read from


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def valid_prefix(prefix: str) -> bool:
    """A topic prefix: no wildcards, no empty levels, no leading '$' (broker-reserved)."""
    return bool(_PREFIX_RE.match(prefix)) and len(prefix) <= 128


class _Table:
    """Typed, strict access to one TOML table; every error names its key path."""

    def __init__(self, raw: Any, where: str, base: Path) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where or 'config'}: must be a table")
        self.raw: Mapping[str, Any] = raw
        self.where = where
        self.base = base
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path(key)}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def _get(self, key: str, default: Any, required: bool) -> Any:
        self.used.add(key)
        if key not in self.raw:
            if required:
                raise self.fail(key, "missing (required)")
            return default
        return self.raw[key]

    def string(self, key: str, default: str | None = None, required: bool = False) -> Any:
        v = self._get(key, default, required)
        if v is not None and (not isinstance(v, str) or (required and not v)):
            raise self.fail(key, f"must be a non-empty string, not {v!r}")
        return v

    def ident(self, key: str, required: bool = True) -> str:
        v = self.string(key, required=required)
        if not isinstance(v, str) or not _ID_RE.match(v):
            raise self.fail(key, f"must be 1-64 letters, digits, '_', '.', '-' (got {v!r})")
        return v

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        v = self._get(key, default, False)
        if v not in options:
            raise self.fail(key, f"must be one of {', '.join(options)}, not {v!r}")
        return str(v)

    def boolean(self, key: str, default: bool) -> bool:
        v = self._get(key, default, False)
        if not isinstance(v, bool):  # strict: "yes", 1 and "true" are errors
            raise self.fail(key, f"must be true or false, not {v!r}")
        return v

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        v = self._get(key, default, False)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}, not {v!r}")
        return v

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        v = self._get(key, default, False)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < minimum:
            raise self.fail(key, f"must be a number >= {minimum:g}, not {v!r}")
        return float(v)

    def strings(self, key: str) -> tuple[str, ...]:
        v = self._get(key, [], False)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.fail(key, "must be a list of strings")
        return tuple(v)

    def file(self, key: str) -> Path | None:
        v = self.string(key)
        return None if v is None else self._resolve(v)

    def required_file(self, key: str) -> Path:
        return self._resolve(self.string(key, required=True))

    def _resolve(self, v: str) -> Path:
        return _local_path(self.base, v)

    def table(self, key: str) -> _Table | None:
        v = self._get(key, None, False)
        return None if v is None else _Table(v, self.path(key), self.base)

    def done(self) -> None:
        extra = sorted(set(self.raw) - self.used)
        if extra:
            raise self.fail(extra[0], "unknown key")


def _local_path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    cfg = parse_config(raw, base=p.resolve().parent)
    return Config(**{**cfg.__dict__, "path": p})


def parse_config(raw: Mapping[str, Any], base: Path = Path(".")) -> Config:
    top = _Table(raw, "", base)
    device_id = top.ident("device_id")
    state_dir = top.required_file("state_dir")
    log_level = top.choice("log_level", ("debug", "info", "warning", "error"), "info")
    opencv_threads = top.integer("opencv_threads", 1)
    backend = _backend(top.table("backend"))
    results = _results(top.table("results"))
    health = _health(top.table("health"))
    calibration = _calibration(top.table("calibration"))
    fleet_t = top.table("fleet")
    fleet = _fleet(fleet_t) if fleet_t is not None else None
    cams_raw = top._get("cameras", None, True)
    if not isinstance(cams_raw, list) or not cams_raw:
        raise ConfigError("cameras: must be a non-empty array of tables ([[cameras]])")
    cameras = tuple(_camera(_Table(c, f"cameras[{i}]", base)) for i, c in enumerate(cams_raw))
    names = [c.name for c in cameras]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"cameras[{i}].name: duplicate camera name {n!r}")
    top.done()
    return Config(device_id=device_id, state_dir=state_dir, cameras=cameras, backend=backend,
                  results=results, health=health, calibration=calibration, fleet=fleet,
                  log_level=log_level, opencv_threads=opencv_threads)


def _backend(t: _Table | None) -> BackendConfig:
    if t is None:
        return BackendConfig()
    cfg = BackendConfig(
        name=t.choice("name", backend_names(), "onnxruntime"),
        precision=t.choice("precision", PRECISIONS, "fp32"),
        threads=t.integer("threads", 0),
        providers=t.strings("providers"),
        graph_optimization=t.choice("graph_optimization", ("disable", "basic", "extended", "all"), "all"),
        cuda_memory=t.choice("cuda_memory", ("auto", "cuda-python", "pycuda"), "auto"),
        workspace_mib=t.integer("workspace_mib", 0),
        dla_core=t.integer("dla_core", 0) if t.has("dla_core") else None,
        build_timeout_s=t.number("build_timeout_s", 1800.0, minimum=1.0),
        startup_wait_s=t.number("startup_wait_s", 20.0),
    )
    t.done()
    return cfg


def _camera(t: _Table) -> CameraConfig:
    model = t.required_file("model")
    cfg = CameraConfig(
        name=t.ident("name"),
        source=_source(t),
        model=model,
        card=t.file("card"),
        loop=t.boolean("loop", False),
        pace=t.choice("pace", ("native", "fast"), "native"),
    )
    t.done()
    return cfg


def _source(t: _Table) -> str:
    s = t.string("source", required=True)
    # Local paths are relative to the config file; URLs, devices and pipelines are not.
    if "://" in s or s.startswith(("gst:", "/dev/")) or s.isdigit():
        return str(s)
    return str(_local_path(t.base, s))


def _results(t: _Table | None) -> ResultsConfig:
    if t is None:
        return ResultsConfig()
    out = t.string("output", "-")
    if out not in ("-", "none"):
        out = str(_local_path(t.base, out))
    cfg = ResultsConfig(output=out, every=t.integer("every", 1, minimum=1))
    t.done()
    return cfg


def _calibration(t: _Table | None) -> CalibrationConfig:
    if t is None:
        return CalibrationConfig()
    cfg = CalibrationConfig(
        frames=t.integer("frames", 64, minimum=1), holdout=t.integer("holdout", 32, minimum=1),
        min_interval_s=t.number("min_interval_s", 0.2), collect_timeout_s=t.number("collect_timeout_s", 300.0),
        min_frames=t.integer("min_frames", 16, minimum=1),
    )
    if cfg.min_frames > cfg.frames:
        raise t.fail("min_frames", f"must be <= frames ({cfg.frames})")
    t.done()
    return cfg


def _health(t: _Table | None) -> HealthConfig:
    if t is None:
        return HealthConfig()
    cfg = HealthConfig(interval_s=t.number("interval_s", 30.0, minimum=0.1), log=t.boolean("log", True))
    t.done()
    return cfg


def _fleet(t: _Table) -> FleetConfig:
    broker = t.string("broker", required=True)
    if not re.match(r"^mqtts?://[^/:]+(:\d+)?/?$", broker):
        raise t.fail("broker", f"must look like mqtt://host:1883 or mqtts://host:8883, not {broker!r}")
    tls_t = t.table("tls")
    tls = None
    if tls_t is not None:
        tls = TLSConfig(ca=tls_t.file("ca"), cert=tls_t.file("cert"), key=tls_t.file("key"),
                        insecure=tls_t.boolean("insecure", False))
        if (tls.cert is None) != (tls.key is None):
            raise tls_t.fail("cert", "cert and key must be given together")
        tls_t.done()
    if broker.startswith("mqtts://") and tls is None:
        tls = TLSConfig()
    cfg = FleetConfig(
        broker=broker,
        prefix=t.string("prefix", "jetagent") or "jetagent",
        username=t.string("username"),
        password=t.string("password"),
        tls=tls,
        keepalive_s=t.integer("keepalive_s", 30, minimum=5),
        session_expiry_s=t.integer("session_expiry_s", 7 * 24 * 3600),
        trusted_keys=tuple(str(_local_path(t.base, k)) for k in t.strings("trusted_keys")),
        drift_interval_s=t.number("drift_interval_s", 60.0, minimum=1.0),
        outbox_max_messages=t.integer("outbox_max_messages", 10000, minimum=1),
        outbox_max_bytes=t.integer("outbox_max_bytes", 64 * 1024 * 1024, minimum=1024),
        reconnect_min_s=t.number("reconnect_min_s", 1.0, minimum=0.1),
        reconnect_max_s=t.number("reconnect_max_s", 60.0, minimum=0.1),
        groups=t.strings("groups"),
        max_model_bytes=t.integer("max_model_bytes", 2 * 1024**3, minimum=1024),
    )
    for g in cfg.groups:
        if not _ID_RE.match(g):
            raise t.fail("groups", f"group names are 1-64 of A-Z a-z 0-9 _ . -, not {g!r}")
    if cfg.reconnect_max_s < cfg.reconnect_min_s:
        raise t.fail("reconnect_max_s", f"must be >= reconnect_min_s ({cfg.reconnect_min_s:g})")
    if not valid_prefix(cfg.prefix):
        raise t.fail("prefix", f"must be topic levels of A-Z a-z 0-9 _ . - separated by '/', not {cfg.prefix!r}")
    t.done()
    return cfg
