"""systemd's notify protocol (Type=notify, WatchdogSec=), without a dependency.

The protocol is one datagram to $NOTIFY_SOCKET ('@' = abstract socket). Unlike
the `sdnotify` package this reports failures (once) instead of swallowing them.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        e = os.environ if env is None else env
        self.address = e.get("NOTIFY_SOCKET", "")
        usec = e.get("WATCHDOG_USEC", "")
        pid = e.get("WATCHDOG_PID", "")
        watchdog_ok = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # systemd asks for a ping at least every WATCHDOG_USEC; ping at half of it.
        self.watchdog_interval_s = int(usec) / 2e6 if watchdog_ok else 0.0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(addr)
                s.sendall("\n".join(fields).encode())
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *((f"STATUS={status}",) if status else ()))

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")
