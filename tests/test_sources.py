from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.camera.grabber import Grabber
from agent.camera.sources import DirectoryReader, SourceError, SourceSpec, parse_source, probe_source
from conftest import color_frames, write_video


@pytest.mark.parametrize("text, kind", [
    ("clips/vtest.avi", "file"),
    ("/dev/video0", "v4l2"),
    ("0", "v4l2"),
    ("v4l2:///dev/video2", "v4l2"),
    ("rtsp://10.0.0.5:554/stream1", "stream"),
    ("https://example.invalid/live.m3u8", "stream"),
    ("csi://0", "csi"),
    ("gst:videotestsrc ! videoconvert ! appsink", "gstreamer"),
])
def test_parse_source_kinds(text: str, kind: str) -> None:
    assert parse_source(text).kind == kind


def test_csi_pipeline_carries_parameters() -> None:
    spec = parse_source("csi://1?width=1280&height=720&fps=60&flip=2")
    assert "sensor-id=1" in spec.target and "width=1280,height=720,framerate=60/1" in spec.target
    assert "flip-method=2" in spec.target and spec.target.endswith("appsink drop=true max-buffers=1")
    assert spec.is_live


@pytest.mark.parametrize("bad, msg", [
    ("", "empty"), ("ftp://x/y", "scheme"), ("gst:videotestsrc ! fakesink", "appsink"),
    ("csi://front", "sensor id"), ("csi://0?width=wide", "integers"),
])
def test_bad_sources(bad: str, msg: str) -> None:
    with pytest.raises(SourceError, match=msg):
        parse_source(bad)


def test_probe_reports_size_and_errors(color_video: Path, tmp_path: Path) -> None:
    spec, w, h = probe_source(str(color_video))
    assert (spec.kind, w, h) == ("file", 160, 120)
    with pytest.raises(SourceError, match="not found"):
        probe_source(str(tmp_path / "missing.avi"))
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"\x00" * 4096)
    with pytest.raises(SourceError):
        probe_source(str(garbage))


def test_directory_source(tmp_path: Path) -> None:
    for i, f in enumerate(color_frames(3)):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), f)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "004.jpg").write_bytes(b"broken")  # unreadable image: skipped with a warning
    spec = parse_source(str(tmp_path))
    assert spec.kind == "directory"
    r = DirectoryReader(spec)
    got = []
    while (f := r.read()) is not None:
        got.append(int(f[0, 0].argmax()))
    assert got == [2, 1, 0]  # red, green, blue in BGR channel index
    assert r.rewind() and r.read() is not None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no images"):
        DirectoryReader(parse_source(str(empty)))


def take_all(g: Grabber, limit: int = 10000) -> list[int]:
    seqs = []
    while len(seqs) < limit:
        f = g.next_frame(timeout=2.0)
        if f is None:
            break
        seqs.append(f.seq)
    return seqs


def test_lossless_delivers_every_frame_in_order(color_video: Path) -> None:
    g = Grabber(parse_source(str(color_video)), mode="lossless")
    g.start()
    seqs = take_all(g)
    g.stop()
    assert seqs == list(range(1, 91))
    assert g.dropped == 0 and g.finished and g.state == "ended"


def test_loop_restarts_a_file(color_video: Path) -> None:
    g = Grabber(parse_source(str(color_video)), mode="lossless", loop=True)
    g.start()
    seqs = take_all(g, limit=200)
    g.stop()
    assert seqs == list(range(1, 201)) and not g.state == "ended"


def test_latest_mode_hands_the_newest_frame_and_counts_drops(color_video: Path) -> None:
    g = Grabber(parse_source(str(color_video)), mode="latest", paced=True)  # 30 fps file
    g.start()
    taken = []
    start = time.monotonic()
    while (f := g.next_frame(timeout=2.0)) is not None:
        taken.append(f.seq)
        time.sleep(0.1)  # a slow loop: ~10 fps against a 30 fps source
    elapsed = time.monotonic() - start
    g.stop()
    assert 2.4 < elapsed < 6.0  # paced at the file's rate: 90 frames ~ 3 s
    assert taken == sorted(taken) and len(taken) < 60
    assert len(taken) + g.dropped == taken[-1] == g.read_frames == 90


class FlakyCamera:
    """A live source at our FrameReader seam: gives `frames` frames, then goes dark."""

    def __init__(self, frames: int) -> None:
        self.left = frames
        self.fps = 0.0

    def read(self) -> np.ndarray | None:
        if self.left <= 0:
            return None
        self.left -= 1
        time.sleep(0.002)
        return np.zeros((4, 4, 3), np.uint8)

    def rewind(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_lost_live_source_reconnects_with_backoff() -> None:
    opens = []
    plan = ["ok", "fail", "fail", "ok"]

    def opener(spec: SourceSpec) -> FlakyCamera:
        step = plan[min(len(opens), len(plan) - 1)]
        opens.append(step)
        if step == "fail":
            raise SourceError("camera unplugged")
        return FlakyCamera(5)

    states: list[str] = []
    g = Grabber(parse_source("/dev/video9"), opener=opener, backoff=(0.01, 0.05), name="flaky")
    g.start()
    deadline = time.monotonic() + 5
    got = 0
    while time.monotonic() < deadline and len(opens) < 5:
        if g.next_frame(timeout=0.05) is not None:
            got += 1
        states.append(g.state)
    g.stop()
    assert opens[:4] == ["ok", "fail", "fail", "ok"]
    assert g.reconnects >= 2 and got >= 2
    assert "reconnecting" in states and "streaming" in states
    assert g.state == "stopped"


def test_restart_budget_slows_down_but_keeps_trying() -> None:
    calls = []

    def opener(spec: SourceSpec) -> FlakyCamera:
        calls.append(time.monotonic())
        raise SourceError("no such device")

    g = Grabber(parse_source("/dev/video9"), opener=opener, backoff=(0.001, 0.3), restart_budget=(3, 60.0))
    g.start()
    time.sleep(0.5)
    state, error = g.state, g.error
    g.stop()
    assert state == "failed" and "no such device" in error
    assert 4 <= len(calls) <= 7  # a few quick tries, then the budget's long pause


def test_unopenable_file_finishes_the_grabber(tmp_path: Path) -> None:
    g = Grabber(parse_source(str(tmp_path / "gone.avi")), mode="lossless")
    g.start()
    assert g.next_frame(timeout=2.0) is None
    g.stop()
    assert g.finished and g.state == "failed" and "not found" in g.error


def test_stop_interrupts_a_blocked_lossless_reader(color_video: Path) -> None:
    g = Grabber(parse_source(str(color_video)), mode="lossless")
    g.start()
    assert g.next_frame(timeout=2.0) is not None
    t = threading.Thread(target=g.stop)
    t.start()
    t.join(3)
    assert not t.is_alive()


def test_generated_video_round_trip(tmp_path: Path) -> None:
    p = write_video(tmp_path / "x.avi", color_frames(5, (64, 48)))
    _, w, h = probe_source(str(p))
    assert (w, h) == (64, 48)
