"""`jetagent doctor` and `jetagent selftest` through the real entry point (`python -m agent ...`).

Here there is no GPU: the doctor must say so (and fail only where the config needs TensorRT), and
the selftest must say so and run its CPU parts on the demo model and video. With the stand-in
TensorRT made importable (tests/standin_site on PYTHONPATH, in the process and its build children)
the same commands run their GPU parts end to end. A real Mosquitto (with TLS) answers the broker check.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import Broker, free_port, make_pki
from calib_models import conv_classifier
from conftest import ROOT, color_frames, write_video

STANDIN_SITE = ROOT / "tests" / "standin_site"


def jetagent(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full)


def with_standin_trt(extra_path: str = "") -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(STANDIN_SITE), str(ROOT), extra_path) if p)
    return {"PYTHONPATH": path, "JETAGENT_STANDIN_TRT": "10.3.0.30"}


def lines_by_name(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition(" ")
        name = rest.strip()[:18].strip()
        if status in ("OK", "WARN", "FAIL", "SKIP"):
            out[name] = status
    return out


def write_config(tmp_path: Path, **parts: Any) -> Path:
    lines = ['device_id = "cam-doc"', f'state_dir = "{tmp_path / "state"}"', "[backend]",
             f'name = "{parts.get("backend", "onnxruntime")}"']
    if "fleet" in parts:
        lines += parts["fleet"]
    lines += ["[[cameras]]", 'name = "front"', f'source = "{parts["source"]}"', f'model = "{parts["model"]}"']
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def public_key(path: Path) -> Path:
    key = Ed25519PrivateKey.generate().public_key()
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


# ---- doctor -----------------------------------------------------------------------------------------

def test_doctor_on_this_machine_says_there_is_no_gpu_and_passes_without_a_config() -> None:
    proc = jetagent("doctor", "--no-config")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = lines_by_name(proc.stdout)
    assert status["jetson"] == "SKIP" and status["tensorrt"] == "SKIP" and status["onnxruntime"] == "OK"
    assert "not a Jetson" in proc.stdout and "TensorRT is not importable here" in proc.stdout
    assert proc.stdout.rstrip().endswith("doctor: all checks passed")


def test_doctor_checks_everything_a_config_names(tmp_path: Path, demo_model: Path, vtest: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    key = public_key(tmp_path / "fleet.pub")
    with Broker(tmp_path / "broker", pki=pki) as broker:
        fleet = ["[fleet]", f'broker = "{broker.url}"', f'trusted_keys = ["{key}"]', "[fleet.tls]",
                 f'ca = "{pki.ca}"']
        config = write_config(tmp_path, source=vtest, model=demo_model, fleet=fleet)
        proc = jetagent("doctor", "--config", str(config), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] and report["failed"] == []
    for name in ("config", "onnxruntime", "camera front", "model front", "broker", "trusted keys", "clock",
                 "disk", "state dir"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "768x576" in checks["camera front"]["detail"]
    assert "TLSv1." in checks["broker"]["detail"] and "accepted" in checks["broker"]["detail"]
    assert checks["tensorrt"]["status"] == "skip" and "not needed" in checks["tensorrt"]["detail"]


def test_doctor_fails_with_the_reason_for_each_problem(tmp_path: Path, demo_model: Path) -> None:
    bad_key = tmp_path / "fleet.pub"
    bad_key.write_text("not a key\n")
    fleet = ["[fleet]", f'broker = "mqtt://127.0.0.1:{free_port()}"', f'trusted_keys = ["{bad_key}"]']
    config = write_config(tmp_path, backend="tensorrt", source=tmp_path / "missing.mp4", model=demo_model,
                          fleet=fleet)
    proc = jetagent("doctor", "--config", str(config), "--timeout", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = lines_by_name(proc.stdout)
    for name in ("tensorrt", "cuda memory", "camera front", "broker", "trusted keys"):
        assert status[name] == "FAIL", (name, proc.stdout)
    assert status["model front"] == "OK"  # ONNX Runtime serves it while the engine is built
    assert "Connection refused" in proc.stdout and "is not a PEM public key" in proc.stdout
    assert "FAILED: " in proc.stdout.splitlines()[-1] and "Traceback" not in proc.stderr
    missing = jetagent("doctor", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and lines_by_name(missing.stdout)["config"] == "FAIL"
    assert "config file not found" in missing.stdout and lines_by_name(missing.stdout)["onnxruntime"] == "OK"


def test_doctor_reports_the_tensorrt_it_finds(tmp_path: Path, demo_model: Path, vtest: Path) -> None:
    config = write_config(tmp_path, backend="tensorrt", source=vtest, model=demo_model)
    proc = jetagent("doctor", "--config", str(config), env=with_standin_trt())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tensorrt_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("OK    tensorrt"))
    assert "TensorRT 10.3.0.30 on Stand-in Orin (sm_87, 8 SMs, 8.0 GiB), CUDA 12.6" in tensorrt_line
    assert "plugins ok" in tensorrt_line and "uses pycuda" in proc.stdout


# ---- selftest -----------------------------------------------------------------------------------------

def test_selftest_without_a_gpu_says_so_and_runs_the_cpu_parts(tmp_path: Path, demo_model: Path,
                                                               vtest: Path) -> None:
    out = tmp_path / "report.json"
    proc = jetagent("selftest", "--out", str(out), "--frames", "8", "--holdout", "8", "--loop-seconds", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU: NOT TESTED: TensorRT is not importable here" in proc.stdout
    assert "verdict: passed-cpu-only" in proc.stdout
    report = json.loads(out.read_text())
    assert report["verdict"] == "passed-cpu-only" and report["gpu"]["available"] is False
    assert report["model"]["name"] == "person-ssdlite" and report["bound"]["metric"] == "detection_f1"
    rows = {(r["backend"], r["precision"]): r for r in report["results"]}
    assert set(rows) == {("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    for row in rows.values():
        assert row["status"] in ("passed", "below-gate") and row["camera_loop"]["frames"] > 0
        assert row["latency_ms"]["p50"] > 0 and "value" in row["agreement"]
    assert rows[("onnxruntime", "fp32")]["agreement"]["value"] == 1.0
    assert report["environment"]["versions"]["onnxruntime"] and "cpu_flags" in report["environment"]


def fake_trtexec(folder: Path) -> Path:
    folder.mkdir()
    script = folder / "trtexec"
    script.write_text("#!/bin/sh\n"
                      f'echo "$@" >> {folder / "calls"}\n'
                      'echo "[I] Latency: min = 1.10 ms, max = 2.20 ms, mean = 1.50 ms, median = 1.40 ms, '
                      'percentile(90%) = 1.90 ms"\n'
                      'echo "[I] GPU Compute Time: min = 0.90 ms, max = 1.80 ms, mean = 1.20 ms, median = 1.10 ms"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def test_selftest_runs_every_tensorrt_route_the_module_has(tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "cls.onnx")
    video = write_video(tmp_path / "colours.avi", color_frames(60, (64, 48)))
    bin_dir = fake_trtexec(tmp_path / "bin")
    out = tmp_path / "report.json"
    env = {**with_standin_trt(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = jetagent("selftest", "--out", str(out), "--model", str(model), "--video", str(video), "--frames", "6",
                    "--holdout", "6", "--loop-seconds", "1", "--no-cpu", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["verdict"] == "passed" and report["gpu"]["probe"]["tensorrt_version"] == "10.3.0.30"
    rows = {r["route"]: r for r in report["results"]}
    assert set(rows) == {"fp32", "fp16-flag", "fp16-onnx", "implicit-calibrator", "explicit-qdq"}
    assert rows["fp16-onnx"]["status"] == "skipped"
    for route in ("fp32", "fp16-flag", "implicit-calibrator", "explicit-qdq"):
        row = rows[route]
        assert row["status"] == "passed", row
        assert row["build"]["route"] == route and row["build"]["workspace_bytes"] == 1 << 30
        assert row["trtexec"]["gpu_compute_ms"]["median"] == 1.1 and row["camera_loop"]["frames"] > 0
    assert rows["fp32"]["build"]["tf32"] is False
    calls = (bin_dir / "calls").read_text().splitlines()
    assert len(calls) == 4 and all("--loadEngine=" in c for c in calls)


def test_selftest_fails_when_a_gpu_is_required_and_absent(tmp_path: Path) -> None:
    model = conv_classifier(tmp_path / "cls.onnx")
    video = write_video(tmp_path / "colours.avi", color_frames(30, (64, 48)))
    out = tmp_path / "report.json"
    proc = jetagent("selftest", "--out", str(out), "--model", str(model), "--video", str(video), "--frames", "4",
                    "--holdout", "4", "--loop-seconds", "1", "--require-gpu", "--no-cpu")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["verdict"] == "failed" and report["gpu"]["required"] is True
    assert any("TensorRT is not usable here" in p for p in report["summary"]["problems"])
    bad = jetagent("selftest", "--out", str(out), "--model", str(tmp_path / "none.onnx"))
    assert bad.returncode == 2 and "jetagent: error: model" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("command", ["doctor", "selftest"])
def test_help_names_the_command(command: str) -> None:
    proc = jetagent(command, "--help")
    assert proc.returncode == 0 and command in proc.stdout
