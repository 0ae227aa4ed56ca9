"""Ports of a service on this machine: a bind test before use, free loopback ports for replicas."""
from __future__ import annotations

import ipaddress
import socket

LOOPBACK = "127.0.0.1"


def _family(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR as aiohttp and Envoy set it: a port
    in TIME_WAIT counts as free, one with a listener (on this address or a wildcard) does not."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK, exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A port the kernel hands out as free on host (not in exclude)."""
    for _ in range(100):
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.bind((host.strip("[]"), 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise OSError(f"no free port on {host}")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")
