"""Free TCP ports for tests, outside the kernel's ephemeral range.

A port taken from the ephemeral range (``bind(0)``) can be handed to some client socket's
local end between the moment a test picks it and the moment a server binds it; ports below
the range (20000-32767 here; ``/proc/sys/net/ipv4/ip_local_port_range`` starts at 32768)
are only ever taken by listeners. Each port is handed out once per test process, and the
search starts at a random place so that parallel test processes rarely meet.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32000
_given: set[int] = set()
_next = random.randrange(LOW, HIGH)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, not handed out before."""
    global _next
    for _ in range(HIGH - LOW):
        port = _next
        _next = LOW + (_next + 1 - LOW) % (HIGH - LOW)
        if port not in _given and _bindable(port):
            _given.add(port)
            return port
    raise RuntimeError("no free port left below the ephemeral range")


def free_ports_in_a_row(count: int) -> int:
    """A port P with P .. P+count-1 free (and handed out together)."""
    global _next
    for _ in range(HIGH - LOW):
        base = _next
        _next = LOW + (_next + count - LOW) % (HIGH - LOW)
        ports = range(base, base + count)
        if base + count <= HIGH and all(p not in _given and _bindable(p) for p in ports):
            _given.update(ports)
            return base
    raise RuntimeError(f"no {count} free ports in a row")
