"""scripts/install_jetson.sh: `--dry-run` prints every action, including the CUDA memory seam it sets
up, and changes nothing; the script is shellcheck-clean. (The real run needs a Jetson and root.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "install_jetson.sh"


def dry_run(tmp_path: Path, *args: str, cuda: str | None = "12.6.68") -> subprocess.CompletedProcess[str]:
    cuda_home = tmp_path / "cuda"
    cuda_home.mkdir(exist_ok=True)
    if cuda is not None:
        (cuda_home / "version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": cuda}}))
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--prefix", str(tmp_path / "opt"), "--cuda-home",
                           str(cuda_home), *args], capture_output=True, text=True, timeout=120)


def actions(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_prints_every_action_and_the_cuda_seam_plan(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, "--config", str(ROOT / "docs" / "agent.example.toml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CUDA 12.6 at" in proc.stdout and "CUDA memory seam: cuda-python (pip install 'cuda-python==12.6.*')" \
        in proc.stdout
    steps = actions(proc)
    venv = tmp_path / "opt" / "venv"
    expected = [f"python3 -m venv --system-site-packages {venv}", f"{venv}/bin/pip install -q 'numpy<2' {ROOT}",
                f"{venv}/bin/pip install -q 'cuda-python==12.6.*'",
                f"{venv}/bin/pip uninstall -q -y cuda-python cuda-bindings",
                "apt-get install -y -qq --no-install-recommends python3-dev build-essential",
                "systemctl daemon-reload", "systemctl enable --now jetagent.service"]
    for step in expected:
        assert step in steps, (step, steps)
    checks = [s for s in steps if "open_device_memory" in s]
    assert len(checks) == 2 and '"cuda-python"' in checks[0] and '"pycuda"' in checks[1]
    assert any(s.endswith("pip install -q pycuda") and f"PATH={tmp_path / 'cuda'}/bin:" in s for s in steps)
    assert steps.index(f"{venv}/bin/pip install -q 'cuda-python==12.6.*'") < steps.index(
        "apt-get install -y -qq --no-install-recommends python3-dev build-essential")
    assert f"{venv}/bin/jetagent doctor" in proc.stdout
    assert not (tmp_path / "opt").exists(), "a dry run changed something"


@pytest.mark.parametrize(("seam", "present", "absent"), [
    ("pycuda", "pip install -q pycuda", "cuda-python=="),
    ("cuda-python", "cuda-python==12.2.*", "pip install -q pycuda")])
def test_a_seam_can_be_asked_for(tmp_path: Path, seam: str, present: str, absent: str) -> None:
    proc = dry_run(tmp_path, "--cuda-memory", seam, cuda="12.2.140")
    assert proc.returncode == 0, proc.stderr
    text = "\n".join(actions(proc))
    assert present in text and absent not in text


def test_dry_run_says_where_the_real_run_would_stop(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, cuda=None)
    assert proc.returncode == 1
    assert "the real run would STOP here: no CUDA toolkit at" in proc.stderr
    assert "systemctl daemon-reload" in actions(proc), "the rest of the plan is still printed"
    cpu = dry_run(tmp_path, "--cpu-only", cuda=None)
    assert cpu.returncode == 0 and "CUDA memory seam: none (--cpu-only)" in cpu.stdout
    assert not any("cuda-python" in s or "pycuda" in s for s in actions(cpu))
    bad = dry_run(tmp_path, "--cuda-memory", "opencl")
    assert bad.returncode == 2 and "choose auto, cuda-python or pycuda" in bad.stderr


def test_a_real_run_needs_root(tmp_path: Path) -> None:
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    if as_nobody and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux) to drop to another user")
    proc = subprocess.run([*as_nobody, "bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 1 and "run as root (sudo), or with --dry-run" in proc.stderr


def test_the_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is missing: make setup installs it (apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, str(SCRIPT), str(ROOT / "scripts" / "fetch_footage.sh")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
