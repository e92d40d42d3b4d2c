"""Loopback helpers: free ports, readiness probes, a minimal DNS client."""

from __future__ import annotations

import random
import socket
import struct
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"

_handed_out: set[int] = set()


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1, never handed out twice
    in one harness run."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((LOOPBACK, 0))
            port = t.getsockname()[1]
            if port in _handed_out:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((LOOPBACK, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found on 127.0.0.1")


def wait_until(what: str, cond, timeout: float, interval: float = 0.05, proc=None):
    """Poll `cond()` until it returns a truthy value or `timeout` passes.
    Fails early if `proc` (a procs.Proc) exits."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited (code {proc.popen.returncode}) while waiting "
                               f"for {what}; log:\n{proc.log_tail()}")
        if time.monotonic() >= deadline:
            extra = f"; log of {proc.name}:\n{proc.log_tail()}" if proc is not None else ""
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def tcp_listening(port: int, host: str = LOOPBACK) -> bool:
    """A LISTEN socket on host:port (read from /proc/net/tcp, no connection
    made: some backends, like iperf3, must not see stray connects)."""
    want = f"{socket.htonl(struct.unpack('!I', socket.inet_aton(host))[0]):08X}:{port:04X}"
    wild = f"00000000:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        f = line.split()
        if len(f) > 3 and f[3] == "0A" and f[1] in (want, wild):
            return True
    return False


def http_ok(port: int, host: str = LOOPBACK, timeout: float = 1.0) -> bool:
    """One HTTP/1.1 GET with Connection: close; True on a 200."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def dns_query_packet(qid: int, name: str, qtype: int = 1) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split(".")) + b"\0"
    return header + q + struct.pack("!HH", qtype, 1)


def dns_ok(port: int, name: str = "www.example.com", host: str = LOOPBACK,
           timeout: float = 0.5) -> bool:
    """One A query over UDP; True on a NOERROR answer with our ID."""
    qid = random.randrange(65536)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(dns_query_packet(qid, name), (host, port))
            data, _ = s.recvfrom(4096)
    except OSError:
        return False
    if len(data) < 12:
        return False
    rid, flags = struct.unpack("!HH", data[:4])
    return rid == qid and (flags & 0x8000) and (flags & 0xF) == 0
