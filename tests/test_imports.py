"""Layering rules of DESIGN.md, enforced.

* imports point one way: agent -> calibration -> engines;
* every module imports with tensorrt, pycuda (and cuda-python) blocked, and all but
  the few that transform frames import with cv2 blocked too;
* paho only in the MQTT link and the fleet tool; tensorrt/pycuda only inside engines/
  (and the TensorRT calibrator), and only inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("agent", "engines", "calibration")
LAYER = {"engines": 0, "calibration": 1, "agent": 2}
# Modules that turn frames into tensors or read cameras, and those built on them.
NEEDS_CV2 = {
    "engines.preprocess", "engines.runner", "agent.sources", "agent.pipeline", "agent.daemon",
    "agent.bench", "calibration.reservoir", "calibration.dataset", "calibration.gate",
    "calibration.candidates", "calibration.deploy", "calibration.ort_target", "calibration.trt_target",
    "agent.updater", "agent.activate", "agent.delivery", "agent.serving",
}
PAHO_ALLOWED = ("agent.link", "agent.fleet")  # the device's link, and the jetfleet modules (agent.fleet*)
GPU_MODULES = ("tensorrt", "pycuda", "cuda")


def modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__main__":
                continue  # runs the CLI when imported
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def imported_names(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module name, at top level?) for every import in a file."""
    found: list[tuple[str, bool]] = []
    top_level = {id(n) for n in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top_level))
    return found


def test_there_are_modules_to_check() -> None:
    names = {m for m, _ in modules()}
    assert {"agent.cli", "engines.base", "engines.onnxrt"} <= names


@pytest.mark.parametrize("module, path", modules(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_layering(module: str, path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    mine = LAYER[module.split(".")[0]]
    for name, top in imported_names(tree):
        root = name.split(".")[0]
        if root in LAYER:
            assert LAYER[root] <= mine, f"{module} imports {name}: imports point agent -> calibration -> engines"
        if root == "paho":
            assert module.startswith(PAHO_ALLOWED), f"{module} imports paho; only {PAHO_ALLOWED} may"
        if root in GPU_MODULES:
            assert module.startswith(("engines.", "calibration.trt")), f"{module} imports {name}"
            assert not top, f"{module} imports {name} at module level; import it lazily"


def _import_all(blocked: tuple[str, ...]) -> dict[str, str]:
    code = f"""
import importlib, json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # makes `import name` raise ImportError
failed = {{}}
for mod in {[m for m, _ in modules()]!r}:
    try:
        importlib.import_module(mod)
    except ImportError as exc:
        failed[mod] = str(exc)
print(json.dumps(failed))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json
    result: dict[str, str] = json.loads(proc.stdout)
    return result


def test_every_module_imports_without_gpu_libraries() -> None:
    assert _import_all(("tensorrt", "pycuda", "pycuda.driver", "cuda")) == {}


def test_only_frame_modules_need_cv2() -> None:
    failed = _import_all(("tensorrt", "pycuda", "pycuda.driver", "cuda", "cv2"))
    assert set(failed) <= NEEDS_CV2, {m: e for m, e in failed.items() if m not in NEEDS_CV2}
    assert all("cv2" in e for e in failed.values()), failed
    assert "engines.preprocess" in failed  # the block works
    for light in ("agent.cli", "agent.config", "engines.base", "engines.onnxrt", "engines.postprocess"):
        assert light not in failed
