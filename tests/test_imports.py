"""Layering rules of DESIGN.md and docs/architecture.md, enforced.

* imports point one way: agent -> calibration -> engines;
* inside agent/, each room imports only the rooms it may (ROOMS below): jetfleet only the
  wire contract, the MQTT plumbing and engines; camera no other agent subpackage; wire no
  client; paho only in the MQTT plumbing and the two clients;
* every module imports with tensorrt, pycuda (and cuda-python) blocked, and all but
  the few that transform frames import with cv2 blocked too (delivery needs no cv2);
* tensorrt/pycuda only inside engines/ (and the TensorRT calibrator), and only inside functions.
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
    "engines.preprocess", "engines.runner", "agent.camera.sources", "agent.camera.grabber", "agent.camera.pipeline",
    "agent.daemon",
    "agent.bench", "calibration.reservoir", "calibration.dataset", "calibration.gate",
    "calibration.candidates", "calibration.deploy", "calibration.ort_target", "calibration.trt_target",
    "agent.serving", "engines.modelcheck",
}
# paho: the shared MQTT plumbing and the two clients that use it, nothing else.
PAHO_ALLOWED = {"agent.mqtt", "agent.uplink.link", "agent.jetfleet.client"}
GPU_MODULES = ("tensorrt", "pycuda", "cuda")
# The rooms inside agent/ and what each may import from agent (beyond itself, the `agent`
# package's own __init__ for the version, and the lower layers where the package rule allows).
# A room missing here (the entry points: cli, daemon, serving, bench, config, sdnotify) may
# import any room.
ROOMS: dict[str, tuple[str, ...]] = {
    "agent.wire": (),
    "agent.camera": (),
    "agent.mqtt": ("agent.wire",),
    "agent.uplink": ("agent.wire", "agent.mqtt", "agent.camera.snapshot", "agent.config"),
    "agent.delivery": ("agent.wire", "agent.uplink", "agent.camera"),
    "agent.jetfleet": ("agent.wire", "agent.mqtt"),
}
# Lower layers a room may not reach into although the package rule would let it.
ROOM_FORBIDS: dict[str, tuple[str, ...]] = {
    "agent.jetfleet": ("calibration",),
    "agent.camera": ("calibration",),
    "agent.wire": ("calibration",),
}


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
            if node.module in LAYER:  # `from agent import daemon` imports agent.daemon
                found += [(f"{node.module}.{a.name}", id(node) in top_level) for a in node.names
                          if a.name != "__version__"]
    return found


def test_there_are_modules_to_check() -> None:
    names = {m for m, _ in modules()}
    assert {"agent.cli", "engines.base", "engines.onnxrt"} <= names


def room_of(module: str) -> str | None:
    for room in ROOMS:
        if module == room or module.startswith(room + "."):
            return room
    return None


def violations(module: str, source: str) -> list[str]:
    """Every import rule `module` (with this source text) breaks, one line each."""
    tree = ast.parse(source)
    mine = LAYER[module.split(".")[0]]
    room = room_of(module)
    found = []
    for name, top in imported_names(tree):
        root = name.split(".")[0]
        if root in LAYER and LAYER[root] > mine:
            found.append(f"{module} imports {name}: imports point agent -> calibration -> engines")
        if root == "paho" and module not in PAHO_ALLOWED:
            found.append(f"{module} imports {name}; only {sorted(PAHO_ALLOWED)} may import paho")
        if root in GPU_MODULES:
            if not module.startswith(("engines.", "calibration.trt")):
                found.append(f"{module} imports {name}")
            if top:
                found.append(f"{module} imports {name} at module level; import it lazily")
        if room is None:
            continue
        if root == "agent" and name != "agent" and room_of(name) != room:
            if not any(name == ok or name.startswith(ok + ".") for ok in ROOMS[room]):
                found.append(f"{module} imports {name}: {room} may import only "
                             f"{', '.join(ROOMS[room]) or 'no other part of agent'} (tests/test_imports.py ROOMS)")
        if root in ROOM_FORBIDS.get(room, ()):
            found.append(f"{module} imports {name}: {room} does not use {root}")
    return found


@pytest.mark.parametrize("module, path", modules(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_layering(module: str, path: Path) -> None:
    assert violations(module, path.read_text()) == []


@pytest.mark.parametrize("module, line", [
    ("agent.jetfleet.push", "from agent.delivery.store import ModelStore"),
    ("agent.jetfleet.view", "from agent.camera.pipeline import CameraPipeline"),
    ("agent.jetfleet.cli", "import calibration.deploy"),
    ("agent.jetfleet.push", "from agent.uplink.link import FleetLink"),
    ("agent.camera.pipeline", "from agent.wire.core import Topics"),
    ("agent.camera.sources", "from agent.delivery import updater"),
    ("agent.wire.core", "from agent.mqtt import parse_broker_url"),
    ("agent.wire.desired", "from agent.jetfleet.client import FleetClient"),
    ("agent.wire.deploy", "import paho.mqtt.client"),
    ("agent.delivery.updater", "import paho.mqtt.client as mqtt"),
    ("agent.uplink.session", "from agent.delivery.updater import Updater"),
    ("agent.mqtt", "from agent.uplink.link import FleetLink"),
    ("engines.runner", "from calibration.gate import judge"),
    ("calibration.gate", "from agent.config import Config"),
    ("agent.daemon", "import tensorrt"),
    ("agent.jetfleet.rollout", "from agent import daemon"),
])
def test_each_rule_catches_a_forbidden_import(module: str, line: str) -> None:
    """The rules above are only as good as their checker: each forbidden import is caught."""
    path = ROOT / (module.replace(".", "/") + ".py")
    source = path.read_text() + "\n" + line + "\n"
    assert violations(module, source), f"{line!r} in {module} was not caught"


def test_rooms_exist() -> None:
    """A renamed room would make its rule check nothing."""
    for room in ROOMS:
        assert (ROOT / room.replace(".", "/")).with_suffix(".py").is_file() or \
            (ROOT / room.replace(".", "/") / "__init__.py").is_file(), room


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
    for light in ("agent.cli", "agent.config", "engines.base", "engines.onnxrt", "engines.postprocess",
                  "agent.delivery.updater", "agent.delivery.session", "agent.jetfleet.cli"):
        assert light not in failed
