"""The unit file, checked by systemd's own tools without installing it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT

UNIT = ROOT / "systemd" / "jetagent.service"


def test_unit_has_the_settings_the_daemon_relies_on() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "StateDirectory=jetagent", "DevicePolicy=closed",
                 "DeviceAllow=char-video4linux rw", "SupplementaryGroups=video render", "ProtectSystem=strict"):
        assert line in text
    unit_section = text.split("[Service]")[0]
    assert "StartLimitIntervalSec=" in unit_section and "StartLimitBurst=" in unit_section
    settings = [ln.strip() for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert "PrivateDevices=yes" not in settings  # would hide /dev/video* and the GPU nodes


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_and_security() -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    # The ExecStart binary exists only on an installed device.
    problems = [ln for ln in proc.stderr.splitlines() if ln.strip() and "is not executable" not in ln]
    assert problems == [], proc.stderr
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    last = [ln for ln in sec.stdout.splitlines() if "Overall exposure level" in ln]
    assert last, sec.stdout + sec.stderr
    score = float(last[0].split("level for jetagent.service:")[1].split()[0])
    assert score <= 4.0, last[0]
