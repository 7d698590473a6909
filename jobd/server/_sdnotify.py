"""systemd's readiness protocol (sd_notify(3)): one datagram per state change on the unix
socket named by $NOTIFY_SOCKET, when there is one. Never fails the server: a notification
that cannot be sent is logged. Standard library only.

    notify("READY=1")        # listening: `systemctl start` returns, dependents start
    notify("STOPPING=1")     # shutdown has begun
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify"]

log = logging.getLogger(__name__)


def notify(state: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=...") to $NOTIFY_SOCKET; False when it is unset or
    the send failed. "@name" is an abstract socket, as systemd documents."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket: ignored", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # A datagram to a local socket: sent at once or refused, never a long wait.
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", env.get("NOTIFY_SOCKET"), exc)
        return False
    return True
