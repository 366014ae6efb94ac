"""Loopback ports and polling helpers shared by the server fixtures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, *,
                 signals: tuple[signal.Signals, ...] = (signal.SIGTERM,),
                 timeout: float = 10.0) -> None:
    """Stop a child by its own PID: each of `signals` in turn (sharing `timeout`), SIGKILL last.

    With no signals it is an immediate SIGKILL (a simulated crash). Always reaps the child.
    """
    if proc is None or proc.poll() is not None:
        return
    for sig in signals:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout / len(signals))
            return
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait(timeout=timeout)


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.02,
               what: str = "condition") -> None:
    """Poll `check` until it is true; raise TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def _pid_has_tcp(pid: int, port: int, *, column: int, state: str) -> bool:
    """Whether process `pid` holds a TCP socket on 127.0.0.1:`port` in `state` (via /proc)."""
    address = f"0100007F:{port:04X}"
    inodes: set[str] = set()
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[column] == address and fields[3] == state:
                    inodes.add(f"socket:[{fields[9]}]")
        if not inodes:
            return False
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(f"{fd_dir}/{fd}") in inodes:
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def pid_listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` listens on 127.0.0.1:`port` (so a server we started owns it)."""
    return _pid_has_tcp(pid, port, column=1, state="0A")  # 0A = LISTEN


def pid_connected_to(pid: int, port: int) -> bool:
    """Whether process `pid` has an established connection to 127.0.0.1:`port`."""
    return _pid_has_tcp(pid, port, column=2, state="01")  # 01 = ESTABLISHED
