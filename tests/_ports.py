"""Ports for the processes the tests start, without the bind-then-close race.

A process started by a test binds port 0 and the test reads the port it got from /proc
(``listening_ports``): under pytest-xdist, and beside other suites on the same machine, a port
picked in advance can be taken by someone else before the process binds it.

``free_port`` remains for the one case where a port must be named before anything binds it: an
address where nothing listens (a collector that is down) or a configuration file that must name
its own port.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

_LISTEN = "0A"  # TCP state in /proc/net/tcp


def free_port() -> int:
    """A port that was free a moment ago (racy: see the module docstring)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets' inodes, matched in /proc/net)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    except OSError:  # the process is gone
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
