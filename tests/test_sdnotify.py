from __future__ import annotations

import os
import socket
from pathlib import Path

from agent.sdnotify import Notifier


def test_datagrams_reach_a_real_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.enabled and n.watchdog_interval_s == 10.0
        assert n.ready("1 camera")
        assert srv.recv(100) == b"READY=1\nSTATUS=1 camera"
        assert n.watchdog()
        assert srv.recv(100) == b"WATCHDOG=1"


def test_abstract_socket() -> None:
    name = f"jetagent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert srv.recv(100) == b"STOPPING=1"


def test_disabled_and_broken(tmp_path: Path, caplog) -> None:
    assert not Notifier({}).ready()
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval_s == 0.0
    broken = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not broken.ready() and not broken.watchdog()
    assert caplog.text.count("cannot notify systemd") == 1  # said once, not per ping
