"""Ports, processes and addresses, the same on every side: the lab starting local sites, a site finding its hub.

>>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("10.0.0.7")
(True, True, False)
"""

from __future__ import annotations

import ipaddress
import os
import socket

#: Where sites look for their hub when told nothing else, and where ``flip-lab up`` listens when it is free.
DEFAULT_HUB = "127.0.0.1:9093"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` (an IPv4 or IPv6 address) at the moment of asking."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether process ``pid`` is running (one of another user's counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, without port) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
