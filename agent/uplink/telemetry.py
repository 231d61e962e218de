"""System telemetry for health reports: psutil for the portable part, sysfs and
`tegrastats` for what only a Jetson has.

NVML does not support the Jetson's integrated GPU, so GPU load comes from the load
file under /sys/devices (the path differs by module) or from tegrastats' GR3D_FREQ.
tegrastats runs as a child process (`tegrastats --interval N`) only if the binary
exists; its line format drifts between L4T releases, so `parse_tegrastats` reads it
field by field and keeps going past anything it does not know.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

# -- tegrastats ---------------------------------------------------------------------------

_TIME = re.compile(r"\d\d-\d\d-\d{4} \d\d:\d\d:\d\d")
_RAM = re.compile(r"RAM (\d+)/(\d+)MB(?: \(lfb (\d+)x(\d+)MB\))?")
_SWAP = re.compile(r"SWAP (\d+)/(\d+)MB(?: \(cached (\d+)MB\))?")
_IRAM = re.compile(r"IRAM (\d+)/(\d+)kB ?\(lfb (\d+)kB\)")
_CPU = re.compile(r"CPU \[([^\]]*)\]")
_MTS = re.compile(r"MTS fg (\d+)% bg (\d+)%")
_RAIL = re.compile(r"([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?=\s|$)")
_TEMP = re.compile(r"([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C(?=\s|$)")
_ENGINE = re.compile(r"([A-Z][A-Z0-9_]*) (off|\d+%@\[[\d,]+\]|\d+%@\d+|\d+%|@\[[\d,]+\]|@\d+|\d+)(?=\s|$)")
_VALUE = re.compile(r"^(?:(\d+)%)?(?:@(?:\[([\d,]+)\]|(\d+)))?$")
_ABSENT_C = -200.0  # sensors that are not fitted read -256C


def _usage(text: str) -> dict[str, Any] | None:
    """'12%@1300', '12%@[1300,1300]', '@1575', '45%', '174', 'off' -> {pct, mhz} or None (off)."""
    if text == "off":
        return None
    if text.isdigit():
        return {"pct": None, "mhz": int(text)}
    m = _VALUE.match(text)
    if not m:
        return {"pct": None, "mhz": None, "raw": text}
    pct, many, one = m.groups()
    mhz: int | list[int] | None = None
    if many is not None:
        mhz = [int(x) for x in many.split(",") if x]
    elif one is not None:
        mhz = int(one)
    return {"pct": int(pct) if pct is not None else None, "mhz": mhz}


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One tegrastats line -> a dict of what it says. Unknown fields are listed, not fatal."""
    out: dict[str, Any] = {"engines": {}, "temps_c": {}, "power_mw": {}}
    unknown: list[str] = []
    pos, s = 0, line.strip()
    while pos < len(s):
        if s[pos].isspace():
            pos += 1
            continue
        for pattern, handle in _FIELDS:
            m = pattern.match(s, pos)
            if m:
                handle(out, m)
                pos = m.end()
                break
        else:
            end = s.find(" ", pos)
            end = len(s) if end < 0 else end
            if len(unknown) < 32:
                unknown.append(s[pos:end])
            pos = end
    if unknown:
        out["unknown"] = unknown
    gr3d = out["engines"].get("gr3d_freq")
    if gr3d is not None and gr3d.get("pct") is not None:
        out["gpu_pct"] = gr3d["pct"]
    return out


def _f_time(out: dict[str, Any], m: re.Match[str]) -> None:
    out["time"] = m.group(0)


def _f_ram(out: dict[str, Any], m: re.Match[str]) -> None:
    out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m.group(3):
        out["lfb"] = {"blocks": int(m.group(3)), "block_mb": int(m.group(4))}


def _f_swap(out: dict[str, Any], m: re.Match[str]) -> None:
    out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    if m.group(3):
        out["swap_cached_mb"] = int(m.group(3))


def _f_iram(out: dict[str, Any], m: re.Match[str]) -> None:
    out["iram_used_kb"], out["iram_total_kb"] = int(m.group(1)), int(m.group(2))


def _f_cpu(out: dict[str, Any], m: re.Match[str]) -> None:
    out["cpu"] = [_usage(c.strip()) for c in m.group(1).split(",") if c.strip()]


def _f_mts(out: dict[str, Any], m: re.Match[str]) -> None:
    out["mts"] = {"fg_pct": int(m.group(1)), "bg_pct": int(m.group(2))}


def _f_rail(out: dict[str, Any], m: re.Match[str]) -> None:
    rail = {"now": int(m.group(2)), "avg": int(m.group(3))}
    if m.group(4):
        rail["max"] = int(m.group(4))
    out["power_mw"][m.group(1).lower()] = rail


def _f_temp(out: dict[str, Any], m: re.Match[str]) -> None:
    value = float(m.group(2))
    if value > _ABSENT_C:
        out["temps_c"][m.group(1).lower()] = value


def _f_engine(out: dict[str, Any], m: re.Match[str]) -> None:
    out["engines"][m.group(1).lower()] = _usage(m.group(2))


# Order matters: specific shapes before the generic "NAME value".
_FIELDS = ((_TIME, _f_time), (_RAM, _f_ram), (_SWAP, _f_swap), (_IRAM, _f_iram), (_CPU, _f_cpu),
           (_MTS, _f_mts), (_RAIL, _f_rail), (_TEMP, _f_temp), (_ENGINE, _f_engine))


class TegrastatsReader:
    """Runs `tegrastats --interval MS` and keeps its newest line, parsed.

    If the agent dies, the child's next write hits a closed pipe and it exits too.
    """

    def __init__(self, binary: str, interval_ms: int = 1000) -> None:
        self.binary = binary
        self.interval_ms = interval_ms
        self.latest: dict[str, Any] | None = None
        self.latest_at = 0.0
        self.lines = 0
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._proc = subprocess.Popen([self.binary, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, bufsize=1)
        except OSError as exc:
            log.warning("telemetry: cannot run %s: %s", self.binary, exc)
            return
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            if not line.strip():
                continue
            try:
                self.latest = parse_tegrastats(line)
            except (ValueError, IndexError) as exc:  # a shape the parser chokes on: skip the line
                log.debug("telemetry: unparsable tegrastats line %r: %s", line, exc)
                continue
            self.latest_at = time.monotonic()
            self.lines += 1

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(2)
        if self._thread is not None:
            self._thread.join(2)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()


# -- sysfs ----------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # missing, or a sensor that errors on read (EINVAL, ENODATA)
        return None


def _celsius(text: str | None) -> float | None:
    try:
        v = float(text) if text is not None else None
    except ValueError:
        return None
    if v is None:
        return None
    c = v / 1000.0 if abs(v) >= 1000 else v  # millidegrees, as the kernel documents
    return round(c, 2) if c > _ABSENT_C else None


def thermal_zones(sys_root: Path = Path("/sys")) -> tuple[dict[str, float], list[str]]:
    """(zone name -> degrees C, reasons a zone is at or over a passive trip point)."""
    temps: dict[str, float] = {}
    hot: list[str] = []
    base = sys_root / "devices" / "virtual" / "thermal"
    for zone in sorted(base.glob("thermal_zone*"), key=lambda p: (len(p.name), p.name)):
        name = (_read(zone / "type") or zone.name).lower()
        t = _celsius(_read(zone / "temp"))
        if t is None:
            continue
        if name in temps:
            name = f"{name}.{zone.name.removeprefix('thermal_zone')}"
        temps[name] = t
        passive = [c for c in (_celsius(_read(tp.with_name(tp.name.replace("_type", "_temp"))))
                               for tp in zone.glob("trip_point_*_type") if _read(tp) == "passive")
                   if c is not None]
        if passive and t >= min(passive):
            hot.append(f"{name} {t:g}C >= passive trip {min(passive):g}C")
    return temps, hot


_GPU_LOAD_GLOBS = ("gpu.0/load", "platform/gpu.0/load", "platform/bus@0/*.gpu/load", "platform/*.gpu/load",
                   "*.gpu/load", "*.ga10b/load", "*.gv11b/load", "*.gp10b/load", "platform/*.ga10b/load")


def find_gpu_load(sys_root: Path = Path("/sys")) -> Path | None:
    """The Jetson GPU's load file (per mille), wherever this module keeps it."""
    devices = sys_root / "devices"
    for pattern in _GPU_LOAD_GLOBS:
        for p in sorted(devices.glob(pattern)):
            if p.is_file():
                return p
    return None


# -- the sampler ------------------------------------------------------------------------------

class Telemetry:
    """Samples the system for each health report. `start()` primes the CPU counters."""

    def __init__(self, state_dir: Path, *, sys_root: Path = Path("/sys"), tegrastats: str | None = "auto",
                 tegrastats_interval_ms: int = 1000) -> None:
        self.state_dir = state_dir
        self.sys_root = sys_root
        self._proc = psutil.Process()
        if tegrastats == "auto":
            tegrastats = shutil.which("tegrastats") or ("/usr/bin/tegrastats"
                                                        if os.path.exists("/usr/bin/tegrastats") else None)
        self.tegrastats = TegrastatsReader(tegrastats, tegrastats_interval_ms) if tegrastats else None
        self.gpu_load_path: Path | None = None

    def start(self) -> None:
        psutil.cpu_percent(None)
        self._proc.cpu_percent(None)
        self.gpu_load_path = find_gpu_load(self.sys_root)
        if self.tegrastats is not None:
            self.tegrastats.start()

    def stop(self) -> None:
        if self.tegrastats is not None:
            self.tegrastats.stop()

    def sample(self) -> dict[str, Any]:
        mem = psutil.virtual_memory()
        out: dict[str, Any] = {
            "cpu_pct": psutil.cpu_percent(None),
            "cpu_count": psutil.cpu_count() or 0,
            "load1": round(os.getloadavg()[0], 2),
            "mem_total_mb": mem.total // 2**20,
            "mem_used_mb": (mem.total - mem.available) // 2**20,
            "mem_pct": mem.percent,
            "swap_used_mb": psutil.swap_memory().used // 2**20,
            "uptime_s": round(time.time() - psutil.boot_time(), 1),
        }
        try:
            disk = psutil.disk_usage(str(self.state_dir))
            out.update(disk_free_mb=disk.free // 2**20, disk_total_mb=disk.total // 2**20, disk_pct=disk.percent)
        except OSError as exc:
            out["disk_error"] = str(exc)
        with self._proc.oneshot():
            out["process"] = {"cpu_pct": self._proc.cpu_percent(None),
                              "rss_mb": round(self._proc.memory_info().rss / 2**20, 1),
                              "threads": self._proc.num_threads()}
        temps, hot = thermal_zones(self.sys_root)
        out["temps_c"] = temps
        out["throttled"] = bool(hot) if temps else None
        if hot:
            out["throttle_reasons"] = hot
        gpu = None
        if self.gpu_load_path is not None:
            raw = _read(self.gpu_load_path)
            if raw is not None and raw.isdigit():
                gpu = round(int(raw) / 10.0, 1)
        ts = self.tegrastats
        if ts is not None and ts.latest is not None:
            fields = dict(ts.latest)
            fields["age_s"] = round(time.monotonic() - ts.latest_at, 1)
            out["tegrastats"] = fields
            if gpu is None:
                gpu = fields.get("gpu_pct")
            for name, c in fields.get("temps_c", {}).items():
                temps.setdefault(name, c)
        out["gpu_load_pct"] = gpu
        out["temp_max_c"] = max(temps.values()) if temps else None
        return out
