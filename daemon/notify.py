"""sd_notify: tell systemd we are ready, what we are doing, and that we are alive.

A few lines on the $NOTIFY_SOCKET datagram socket instead of a dependency. Outside systemd
(no $NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("groupgate.notify")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str | int) -> bool:
        """Send KEY=value lines (READY=1, STATUS=..., WATCHDOG=1); True if delivered."""
        if not self.address:
            return False
        text = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace socket
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode("utf-8"), addr)
            return True
        except OSError as exc:
            log.warning("notify.failed", error=str(exc))
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec for this process, in seconds; None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2_000_000, 0.5)
    except ValueError:
        return None
