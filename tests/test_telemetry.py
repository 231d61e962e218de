"""Telemetry: tegrastats lines of several L4T releases, sysfs thermal zones and GPU load
(from a sysfs tree made in tmp_path), a real child process standing in for tegrastats."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from agent.uplink.telemetry import Telemetry, find_gpu_load, parse_tegrastats, thermal_zones

# Line shapes as NVIDIA's L4T docs and FACTS.md describe them, one per release family.
JETPACK4_NANO = (
    "RAM 1183/3956MB (lfb 229x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [3%@102,2%@102,1%@102,0%@102] EMC_FREQ 0%@204 GR3D_FREQ 0%@76 APE 25 PLL@25C CPU@27.5C "
    "PMIC@100C GPU@27C AO@32.5C thermal@27.25C POM_5V_IN 1022/1022 POM_5V_GPU 0/0 POM_5V_CPU 124/124"
)
JETPACK5_ORIN = (
    "RAM 2285/30536MB (lfb 7014x4MB) SWAP 0/15268MB (cached 0MB) "
    "CPU [0%@729,off,off,off,0%@729,0%@729,0%@729,0%@729,off,off,off,off] EMC_FREQ 0%@2133 "
    "GR3D_FREQ 0%@611 VIC_FREQ 729 APE 174 CV0@-256C CPU@45.062C Tboard@34C SOC2@40.812C Tdiode@35.5C "
    "SOC0@41.062C CV1@-256C GPU@-256C tj@45.062C SOC1@40.875C CV2@-256C VDD_GPU_SOC 2035mW/2035mW "
    "VDD_CPU_CV 406mW/406mW VIN_SYS_5V0 2526mW/2526mW NC 0mW/0mW VDDQ_VDD2_1V8AO 502mW/502mW NC 0mW/0mW"
)
JETPACK6_ORIN_NANO = (
    "08-14-2024 10:22:31 RAM 1923/7620MB (lfb 11x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 10%@1300 NVENC off "
    "NVDEC off NVJPG off NVJPG1 off VIC off OFA off APE 200 cpu@48.343C soc2@47.281C soc0@47.937C "
    "gpu@47.687C tj@48.343C soc1@47.468C VDD_IN 4526mW/4526mW VDD_CPU_GPU_CV 525mW/525mW VDD_SOC 1413mW/1413mW"
)
JETPACK7 = (
    "10-02-2025 12:00:00 RAM 5120/62841MB (lfb 2x4MB) SWAP 0/31420MB (cached 0MB) "
    "CPU [4%@1728,2%@1728,off,off] EMC_FREQ 1%@3199 GR3D_FREQ 12%@[1300,1300] NVENC off NVDEC off "
    "NVDLA0 off NVDLA1 off PVA0_FREQ off APE 200 cpu@50.5C soc2@47.2C gpu@46.9C tj@50.5C "
    "VDD_GPU_SOC 3200mW/3100mW/3900mW VDD_CPU_CV 800mW/780mW/1200mW"
)
THOR = (
    "11-20-2025 09:15:02 RAM 8123/125772MB (lfb 12x4MB) SWAP 0/0MB (cached 0MB) "
    "CPU [1%@2601,0%@2601,0%@2601,0%@2601] EMC_FREQ @4266 GR3D_FREQ @[1575,1575,1575] NVENC @1100 NVDEC off "
    "CPU@41.2C GPU@39.8C SOC@40.1C TJ@41.2C VDD_GPU 1200mW/1200mW/1180mW VIN 30100mW/30000mW/29900mW"
)


def test_jetpack4() -> None:
    t = parse_tegrastats(JETPACK4_NANO)
    assert t["ram_used_mb"] == 1183 and t["ram_total_mb"] == 3956 and t["lfb"] == {"blocks": 229, "block_mb": 4}
    assert t["iram_total_kb"] == 252 and len(t["cpu"]) == 4 and t["cpu"][0] == {"pct": 3, "mhz": 102}
    assert t["gpu_pct"] == 0 and t["engines"]["ape"]["mhz"] == 25
    assert t["temps_c"]["pmic"] == 100.0 and t["power_mw"]["pom_5v_in"] == {"now": 1022, "avg": 1022}
    assert "unknown" not in t


def test_jetpack5_parked_cores_and_absent_sensors() -> None:
    t = parse_tegrastats(JETPACK5_ORIN)
    assert t["cpu"][1] is None and sum(c is None for c in t["cpu"]) == 7 and len(t["cpu"]) == 12
    assert "gpu" not in t["temps_c"] and "cv0" not in t["temps_c"]  # -256C: not fitted
    assert t["temps_c"]["tj"] == 45.062 and t["temps_c"]["tboard"] == 34.0
    assert t["engines"]["gr3d_freq"] == {"pct": 0, "mhz": 611}
    assert t["power_mw"]["vdd_gpu_soc"] == {"now": 2035, "avg": 2035}
    assert "unknown" not in t


def test_jetpack6_timestamp_lowercase_sensors_and_engines_off() -> None:
    t = parse_tegrastats(JETPACK6_ORIN_NANO)
    assert t["time"] == "08-14-2024 10:22:31"
    assert t["gpu_pct"] == 10 and t["engines"]["gr3d_freq"]["mhz"] == 1300
    assert t["engines"]["nvenc"] is None and t["engines"]["ofa"] is None
    assert t["temps_c"]["gpu"] == 47.687 and t["power_mw"]["vdd_in"]["now"] == 4526
    assert "unknown" not in t


def test_jetpack7_per_gpc_clocks_and_three_value_rails() -> None:
    t = parse_tegrastats(JETPACK7)
    assert t["engines"]["gr3d_freq"] == {"pct": 12, "mhz": [1300, 1300]} and t["gpu_pct"] == 12
    assert t["engines"]["nvdla1"] is None and t["engines"]["pva0_freq"] is None
    assert t["power_mw"]["vdd_gpu_soc"] == {"now": 3200, "avg": 3100, "max": 3900}
    assert "unknown" not in t


def test_thor_frequencies_without_percentages_and_uppercase_sensors() -> None:
    t = parse_tegrastats(THOR)
    assert t["engines"]["gr3d_freq"] == {"pct": None, "mhz": [1575, 1575, 1575]}
    assert "gpu_pct" not in t  # no load figure printed: none invented
    assert t["engines"]["emc_freq"] == {"pct": None, "mhz": 4266} and t["engines"]["nvenc"]["mhz"] == 1100
    assert t["temps_c"]["tj"] == 41.2 and t["power_mw"]["vin"]["max"] == 29900
    assert t["swap_total_mb"] == 0 and "unknown" not in t


def test_unknown_fields_are_listed_not_fatal() -> None:
    t = parse_tegrastats("RAM 1/2MB FANCY_NEW [a,b] ?? GR3D_FREQ 7%@900 weird@token cpu@40C")
    assert t["ram_used_mb"] == 1 and t["gpu_pct"] == 7 and t["temps_c"] == {"cpu": 40.0}
    assert t["unknown"] == ["FANCY_NEW", "[a,b]", "??", "weird@token"]
    assert parse_tegrastats("") == {"engines": {}, "temps_c": {}, "power_mw": {}}


def make_sys(root: Path) -> Path:
    """A sysfs tree shaped like an Orin's: two thermal zones (one over its passive trip), a GPU load file."""
    zones = root / "devices" / "virtual" / "thermal"
    for i, (name, milli, trip) in enumerate([("cpu-thermal", 88500, 85000), ("gpu-thermal", 51000, 95000)]):
        z = zones / f"thermal_zone{i}"
        z.mkdir(parents=True)
        (z / "type").write_text(name + "\n")
        (z / "temp").write_text(f"{milli}\n")
        (z / "trip_point_0_type").write_text("passive\n")
        (z / "trip_point_0_temp").write_text(f"{trip}\n")
        (z / "trip_point_1_type").write_text("critical\n")
        (z / "trip_point_1_temp").write_text("105000\n")
    broken = zones / "thermal_zone2"
    broken.mkdir()
    (broken / "type").write_text("absent-sensor\n")
    (broken / "temp").write_text("-256000\n")
    gpu = root / "devices" / "platform" / "bus@0" / "17000000.gpu"
    gpu.mkdir(parents=True)
    (gpu / "load").write_text("437\n")
    return root


def test_thermal_zones_and_throttling(tmp_path: Path) -> None:
    temps, hot = thermal_zones(make_sys(tmp_path))
    assert temps == {"cpu-thermal": 88.5, "gpu-thermal": 51.0}
    assert hot == ["cpu-thermal 88.5C >= passive trip 85C"]
    assert thermal_zones(tmp_path / "nothing") == ({}, [])


def test_gpu_load_file_is_found_where_orin_keeps_it(tmp_path: Path) -> None:
    root = make_sys(tmp_path)
    assert find_gpu_load(root) == root / "devices/platform/bus@0/17000000.gpu/load"
    assert find_gpu_load(tmp_path / "nothing") is None


def test_sample_has_the_portable_fields(tmp_path: Path) -> None:
    tel = Telemetry(tmp_path, sys_root=make_sys(tmp_path / "sys"), tegrastats=None)
    tel.start()
    s = tel.sample()
    tel.stop()
    for key in ("cpu_pct", "mem_total_mb", "mem_used_mb", "disk_free_mb", "disk_total_mb", "uptime_s", "load1"):
        assert isinstance(s[key], (int, float)), key
    assert s["mem_total_mb"] > s["mem_used_mb"] > 0 and s["disk_total_mb"] > 0
    assert s["process"]["rss_mb"] > 0 and s["process"]["threads"] >= 1
    assert s["gpu_load_pct"] == 43.7 and s["temp_max_c"] == 88.5
    assert s["throttled"] is True and "tegrastats" not in s


def test_this_machine_without_jetson_files(tmp_path: Path) -> None:
    tel = Telemetry(tmp_path, sys_root=tmp_path / "empty", tegrastats=None)
    tel.start()
    s = tel.sample()
    assert s["gpu_load_pct"] is None and s["throttled"] is None and s["temps_c"] == {}


@pytest.fixture()
def fake_tegrastats(tmp_path: Path) -> Path:
    """An executable that prints tegrastats lines at --interval, like the real binary."""
    script = tmp_path / "tegrastats"
    script.write_text(f"""#!{sys.executable}
import sys, time
ms = int(sys.argv[sys.argv.index("--interval") + 1])
while True:
    print({JETPACK6_ORIN_NANO!r}, flush=True)
    time.sleep(ms / 1000)
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_tegrastats_child_process_feeds_the_sample(tmp_path: Path, fake_tegrastats: Path) -> None:
    tel = Telemetry(tmp_path, sys_root=tmp_path / "empty", tegrastats=str(fake_tegrastats),
                    tegrastats_interval_ms=50)
    tel.start()
    try:
        deadline = time.monotonic() + 10
        while tel.tegrastats is not None and tel.tegrastats.lines < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        s = tel.sample()
    finally:
        tel.stop()
    assert s["tegrastats"]["ram_total_mb"] == 7620 and s["tegrastats"]["age_s"] < 5
    assert s["gpu_load_pct"] == 10  # no sysfs load file: GR3D_FREQ's figure
    assert s["temps_c"]["gpu"] == 47.687 and s["temp_max_c"] == 48.343
    proc = tel.tegrastats._proc if tel.tegrastats else None
    assert proc is not None and proc.poll() is not None, "the child must be gone after stop()"


def test_tegrastats_found_on_path(tmp_path: Path, fake_tegrastats: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake_tegrastats.parent}{os.pathsep}{os.environ['PATH']}")
    tel = Telemetry(tmp_path)
    assert tel.tegrastats is not None and tel.tegrastats.binary == str(fake_tegrastats)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    if not os.path.exists("/usr/bin/tegrastats"):
        assert Telemetry(tmp_path).tegrastats is None
