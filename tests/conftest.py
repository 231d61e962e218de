from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_models import color_classifier  # noqa: E402

DEMO_MODEL = ROOT / "models" / "person-ssdlite.onnx"
VTEST = ROOT / "clips" / "vtest.avi"


@pytest.fixture(scope="session")
def color_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return color_classifier(tmp_path_factory.mktemp("models") / "color.onnx")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    if not DEMO_MODEL.is_file():
        pytest.fail(f"{DEMO_MODEL} is missing; it is committed with the repository")
    return DEMO_MODEL


@pytest.fixture(scope="session")
def vtest() -> Path:
    if not VTEST.is_file():
        pytest.fail(f"{VTEST} is missing; `make test` fetches it (scripts/fetch_footage.sh)")
    return VTEST


def write_video(path: Path, frames: list[np.ndarray], fps: float = 30.0) -> Path:
    """Write frames to a real MJPG AVI that OpenCV reads back."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write MJPG here")
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def color_frames(n: int, size: tuple[int, int] = (160, 120)) -> list[np.ndarray]:
    """Solid frames cycling red, green, blue (BGR order, as OpenCV delivers them)."""
    w, h = size
    bgr = [(0, 0, 255), (0, 255, 0), (255, 0, 0)]
    return [np.full((h, w, 3), bgr[i % 3], np.uint8) for i in range(n)]


@pytest.fixture()
def color_video(tmp_path: Path) -> Path:
    return write_video(tmp_path / "colors.avi", color_frames(90))


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests talk to loopback only.
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(k, raising=False)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
